"""Platform control socket: how the TSM, and only the TSM, configures the root port.

DESIGN decision 10: root-port IDE keys and trusted-DMA windows are programmed over a
UNIX socket of the device server (``--platform-socket PATH``) that requires a credential
only the TSM holds.  At start the device server draws a random 32-byte token and writes
it, hex, to a 0600 file (``--platform-credential FILE``); the TSM reads it from there.
The token never crosses the socket and is never logged.

Protocol: one JSON object per line (UTF-8, at most 64 KiB), both ways.

1. On connect the server sends ``{"type": "hello", "protocol": "teeio-platform/1",
   "nonce": <32 random bytes, hex>}``.  Per connection, both sides derive
   ``K_mac = HKDF-SHA256(token, salt=nonce, info="teeio-platform/1 mac")`` and
   ``K_wrap`` the same way with info ``"teeio-platform/1 wrap"``.
2. Requests: ``{"seq": n, "op": OP, "args": {...}, "mac": hex}`` with ``seq`` strictly
   increasing on the connection (so nothing can be replayed, within the connection or,
   the nonce being new, into another) and ``mac = HMAC-SHA256(K_mac, "req" || nonce ||
   canonical(request without "mac"))``, canonical = ``json.dumps(obj, sort_keys=True,
   separators=(",", ":"))``.
3. Responses: ``{"seq": n, "ok": true, "result": {...}, "mac": hex}``, the MAC as above
   with ``"rsp"``; or ``{"seq": n or null, "ok": false, "error": {"code": C, "message":
   M}}`` (also MACed when the request was authenticated).  Codes: ``malformed`` (not a
   JSON object, missing or mistyped field, line too long), ``unauthenticated`` (missing or
   wrong MAC), ``replay`` (seq not increasing), ``unknown_op``, ``bad_args``, ``refused``
   (the root port said no: unknown stream, overlap, unmapped range, keys not GO...),
   ``internal``.  The connection stays open after any error.

Operations and their ``args``:

=====================  ===================================================================
``status``             -- → ``{"link", "endpoint", "root_port", "server"}``
``events``             ``since`` (int, default 0) → ``{"events": [...]}`` (IDE failures,
                       remap security events), numbered by ``seq``
``stream_setup``       ``stream_id``, ``rid_base``, ``rid_limit``: (re)create, no keys
``stream_remove``      ``stream_id``
``stream_reset``       ``stream_id``: keys invalidated, Insecure (re-establishment)
``key_prog``           ``stream_id``, ``direction`` ("rx"/"tx", the root port's), ``substream``
                       ("PR"/"NPR"/"CPL"), ``key_set`` (0/1), ``wrapped_key``: hex of
                       ``AES-256-GCM(K_wrap, iv=seq as 12 BE bytes, key(32) || IFV(8 BE),
                       aad="teeio-platform/1 key")``
``key_set_go``         ``stream_id``, ``direction``, ``key_set``, ``substream`` (optional: all)
``key_set_stop``       as ``key_set_go``
``stream_enable``      ``stream_id``, ``enable`` (bool) → ``{"state": "secure"|"insecure"}``
``window_authorise``   ``requester_id``, ``stream_id``, ``base``, ``size``, ``access``
                       ("rw", "r", "w") → the window, with the backing it recorded
``window_reauthorise`` ``window_id`` → the window (current backing, active again)
``window_revoke``      ``window_id``
``mmio_private``       ``requester_id``, ``stream_id``, ``enable`` (bool): the device's TEE
                       MMIO (BAR0) goes T=1 on that stream from now on (after START), or
                       back to T=0 (before STOP) → ``{"mmio_private": {RID hex: stream}}``
=====================  ===================================================================

The protocol helpers (``derive_keys``, ``canonical``, ``request_mac``, ``wrap_key``...)
use nothing of the device server; :class:`PlatformClient` is a reference client.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from vfio_user_dev.line_server import LineServer
from vfio_user_dev.link import Link
from vfio_user_dev.root_port import RootPort, RootPortError

log = logging.getLogger(__name__)

PROTOCOL = "teeio-platform/1"
TOKEN_LEN = 32
NONCE_LEN = 32
MAX_LINE = 64 * 1024
MAX_CONNECTIONS = 8
#: A connection must authenticate (one MACed request) within this many seconds, or it is
#: closed: anyone on the host can connect, so silent connections must not hold the slots
#: the TSM needs.  Authenticated connections (the TSM's long-lived one) have no deadline.
AUTH_DEADLINE = 10.0
KEY_AAD = b"teeio-platform/1 key"


# -- protocol helpers (no device-server state) ----------------------------------------------

class PlatformCtlError(Exception):
    """An error response (client side) or a request the server refuses (server side)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def derive_keys(token: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """(K_mac, K_wrap) of one connection."""
    def hkdf(info: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, nonce, info).derive(token)
    return hkdf(PROTOCOL.encode() + b" mac"), hkdf(PROTOCOL.encode() + b" wrap")


def message_mac(k_mac: bytes, kind: bytes, nonce: bytes, msg: dict[str, Any]) -> str:
    body = {k: v for k, v in msg.items() if k != "mac"}
    return hmac.new(k_mac, kind + nonce + canonical(body), hashlib.sha256).hexdigest()


def wrap_key(k_wrap: bytes, seq: int, key: IdeKey) -> str:
    blob = key.key + key.ifv.to_bytes(8, "big")
    return AESGCM(k_wrap).encrypt(seq.to_bytes(12, "big"), blob, KEY_AAD).hex()


def unwrap_key(k_wrap: bytes, seq: int, wrapped: str) -> IdeKey:
    blob = AESGCM(k_wrap).decrypt(seq.to_bytes(12, "big"), bytes.fromhex(wrapped), KEY_AAD)
    if len(blob) != 40:
        raise ValueError("wrapped key must hold 32 key bytes and an 8-byte IFV")
    return IdeKey(blob[:32], int.from_bytes(blob[32:], "big"))


def write_credential(path: Path) -> bytes:
    """A fresh token, written hex to *path* (mode 0600, replaced atomically)."""
    token = secrets.token_bytes(TOKEN_LEN)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def read_credential(path: Path) -> bytes:
    """The token in *path*; refused if the file is readable by group or others."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise PermissionError(f"{path}: credential file must be mode 0600, is "
                              f"{st.st_mode & 0o777:o}")
    token = bytes.fromhex(path.read_text().strip())
    if len(token) != TOKEN_LEN:
        raise ValueError(f"{path}: expected a {TOKEN_LEN}-byte token")
    return token


# -- server ---------------------------------------------------------------------------------

def _arg(args: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if name not in args:
        if default is ...:
            raise PlatformCtlError("bad_args", f"missing argument {name!r}")
        return default
    v = args[name]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise PlatformCtlError("bad_args", f"{name!r} must be an integer")
    if not isinstance(v, kind):
        raise PlatformCtlError("bad_args", f"{name!r} must be a {kind.__name__}")
    return v


def _enum(args: dict[str, Any], name: str, table: dict[str, Any], optional: bool = False) -> Any:
    v = _arg(args, name, str, None if optional else ...)
    if v is None:
        return None
    try:
        return table[v.upper()]
    except KeyError:
        raise PlatformCtlError("bad_args", f"{name!r} must be one of "
                                           f"{', '.join(sorted(table))}") from None


_DIRECTIONS = {"RX": Direction.RX, "TX": Direction.TX}
_SUBSTREAMS = {s.name: s for s in SubStream}


def _key_set(args: dict[str, Any]) -> KeySet:
    v = _arg(args, "key_set", int)
    if v not in (0, 1):
        raise PlatformCtlError("bad_args", "'key_set' must be 0 or 1")
    return KeySet(v)


class _Session:
    def __init__(self, token: bytes) -> None:
        self.nonce = secrets.token_bytes(NONCE_LEN)
        self.k_mac, self.k_wrap = derive_keys(token, self.nonce)
        self.last_seq = -1


class PlatformControlServer(LineServer[_Session]):
    """Serves the platform control protocol on a UNIX socket, a thread per connection
    (:class:`~vfio_user_dev.line_server.LineServer`)."""

    name = "platform control"
    thread_name = "platform-ctl"

    def __init__(self, path: str, token: bytes, root_port: RootPort, link: Link,
                 endpoint_status: Callable[[], dict[str, object]] | None = None) -> None:
        self._token = token
        self.root_port = root_port
        self.link = link
        self.endpoint_status = endpoint_status or link.endpoint.status
        self.counters = {"connections": 0, "requests": 0, "auth_failures": 0, "errors": 0}
        super().__init__(path, MAX_LINE, MAX_CONNECTIONS)
        self.ops: dict[str, Callable[[_Session, int, dict[str, Any]], dict[str, Any]]] = {
            "status": self._status, "events": self._events,
            "stream_setup": self._stream_setup, "stream_remove": self._stream_remove,
            "stream_reset": self._stream_reset, "key_prog": self._key_prog,
            "key_set_go": self._key_set_go, "key_set_stop": self._key_set_stop,
            "stream_enable": self._stream_enable, "window_authorise": self._window_authorise,
            "window_reauthorise": self._window_reauthorise,
            "window_revoke": self._window_revoke, "mmio_private": self._mmio_private,
        }

    def __repr__(self) -> str:     # the token stays out of every repr
        return f"PlatformControlServer({self.path!r})"

    def opened(self, conn: socket.socket) -> _Session:
        session = _Session(self._token)
        conn.settimeout(AUTH_DEADLINE)
        conn.sendall(canonical({"type": "hello", "protocol": PROTOCOL,
                                "nonce": session.nonce.hex()}) + b"\n")
        return session

    def answer(self, state: _Session, conn: socket.socket, line: bytes) -> dict[str, Any]:
        reply = self.handle_line(state, line)
        if state.last_seq >= 0:
            conn.settimeout(None)      # authenticated: no deadline
        return reply

    def too_long(self, state: _Session) -> dict[str, Any]:
        return self._error(None, None, "malformed", f"request longer than {MAX_LINE} bytes")

    def encode(self, reply: dict[str, Any]) -> bytes:
        return canonical(reply)

    def _error(self, session: _Session | None, seq: int | None, code: str,
               message: str) -> dict[str, Any]:
        self.counters["errors"] += 1
        if code == "unauthenticated":
            self.counters["auth_failures"] += 1
        log.warning("platform control request refused (%s): %s", code, message)
        reply: dict[str, Any] = {"seq": seq, "ok": False,
                                 "error": {"code": code, "message": message}}
        if session is not None:
            reply["mac"] = message_mac(session.k_mac, b"rsp", session.nonce, reply)
        return reply

    def handle_line(self, session: _Session, line: bytes) -> dict[str, Any]:
        """One request line in, one response object out (never raises)."""
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return self._error(None, None, "malformed", f"not JSON: {exc}")
        if not isinstance(msg, dict):
            return self._error(None, None, "malformed", "a request must be a JSON object")
        seq = msg.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or seq >= 1 << 64:
            return self._error(None, None, "malformed", "'seq' must be an integer 0..2^64-1")
        mac = msg.get("mac")
        if not isinstance(mac, str):
            return self._error(None, seq, "unauthenticated", "request carries no MAC")
        want = message_mac(session.k_mac, b"req", session.nonce, msg)
        if not hmac.compare_digest(mac.lower(), want):
            return self._error(None, seq, "unauthenticated", "wrong MAC")
        if seq <= session.last_seq:
            return self._error(session, seq, "replay",
                               f"seq {seq} is not above the last one ({session.last_seq})")
        session.last_seq = seq
        op, args = msg.get("op"), msg.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            return self._error(session, seq, "malformed",
                               "'op' must be a string and 'args' an object")
        fn = self.ops.get(op)
        if fn is None:
            return self._error(session, seq, "unknown_op", f"no operation {op!r}")
        self.counters["requests"] += 1
        try:
            result = fn(session, seq, args)
        except PlatformCtlError as exc:
            return self._error(session, seq, exc.code, exc.message)
        except RootPortError as exc:
            return self._error(session, seq, "refused", str(exc))
        except Exception as exc:
            log.exception("platform control %s failed", op)
            return self._error(session, seq, "internal", f"{type(exc).__name__}")
        reply = {"seq": seq, "ok": True, "result": result}
        reply["mac"] = message_mac(session.k_mac, b"rsp", session.nonce, reply)
        return reply

    # -- operations ------------------------------------------------------------------------
    def _status(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        return {"link": self.link.status(), "endpoint": self.endpoint_status(),
                "root_port": self.root_port.status(), "server": dict(self.counters)}

    def _events(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        return {"events": self.root_port.events_since(_arg(args, "since", int, 0))}

    def _stream_setup(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        sid = _arg(args, "stream_id", int)
        self.root_port.setup_stream(sid, _arg(args, "rid_base", int, 0),
                                    _arg(args, "rid_limit", int, 0xFFFF))
        log.info("platform control: stream %d set up", sid)
        return {}

    def _stream_remove(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        self.root_port.remove_stream(_arg(args, "stream_id", int))
        return {}

    def _stream_reset(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        self.root_port.reset_stream(_arg(args, "stream_id", int))
        return {}

    def _key_prog(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        sid = _arg(args, "stream_id", int)
        direction = _enum(args, "direction", _DIRECTIONS)
        sub = _enum(args, "substream", _SUBSTREAMS)
        ks = _key_set(args)
        try:
            key = unwrap_key(s.k_wrap, seq, _arg(args, "wrapped_key", str))
        except Exception as exc:     # InvalidTag, ValueError (bad hex, bad length)
            raise PlatformCtlError("bad_args", "wrapped_key does not unwrap "
                                              f"({type(exc).__name__})") from None
        self.root_port.program_key(sid, ks, direction, sub, key)
        return {}

    def _go_stop_args(self, args: dict[str, Any]) -> tuple[int, KeySet, Direction,
                                                           SubStream | None]:
        return (_arg(args, "stream_id", int), _key_set(args), _enum(args, "direction",
                                                                     _DIRECTIONS),
                _enum(args, "substream", _SUBSTREAMS, optional=True))

    def _key_set_go(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        self.root_port.key_set_go(*self._go_stop_args(args))
        return {}

    def _key_set_stop(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        self.root_port.key_set_stop(*self._go_stop_args(args))
        return {}

    def _stream_enable(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        state = self.root_port.enable_stream(_arg(args, "stream_id", int),
                                             _arg(args, "enable", bool, True))
        return {"state": state}

    def _window_authorise(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        access = _arg(args, "access", str, "rw")
        if access not in ("rw", "r", "w"):
            raise PlatformCtlError("bad_args", "'access' must be 'rw', 'r' or 'w'")
        w = self.root_port.authorise_window(
            _arg(args, "requester_id", int), _arg(args, "stream_id", int),
            _arg(args, "base", int), _arg(args, "size", int), "r" in access, "w" in access)
        return w.as_dict()

    def _window_reauthorise(self, s: _Session, seq: int,
                            args: dict[str, Any]) -> dict[str, Any]:
        return self.root_port.reauthorise_window(_arg(args, "window_id", int)).as_dict()

    def _window_revoke(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        self.root_port.revoke_window(_arg(args, "window_id", int))
        return {}

    def _mmio_private(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        self.root_port.set_mmio_private(_arg(args, "requester_id", int),
                                        _arg(args, "stream_id", int),
                                        _arg(args, "enable", bool))
        return {"mmio_private": self.root_port.status()["mmio_private"]}


# -- reference client -----------------------------------------------------------------------

class PlatformClient:
    """A client of the platform control socket (what the TSM does)."""

    def __init__(self, path: str, token: bytes, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._rfile = self.sock.makefile("rb")
        hello = self.recv()
        if hello.get("type") != "hello" or hello.get("protocol") != PROTOCOL:
            raise PlatformCtlError("malformed", f"unexpected greeting {hello!r}")
        self.nonce = bytes.fromhex(str(hello["nonce"]))
        self._k_mac, self._k_wrap = derive_keys(token, self.nonce)
        self.seq = 0

    def __repr__(self) -> str:
        return "PlatformClient()"

    def close(self) -> None:
        self._rfile.close()
        self.sock.close()

    def __enter__(self) -> PlatformClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv(self) -> dict[str, Any]:
        line = self._rfile.readline(MAX_LINE + 1)
        if not line:
            raise ConnectionError("platform control socket closed")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise PlatformCtlError("malformed", "response is not an object")
        return msg

    def send_raw(self, data: bytes) -> dict[str, Any]:
        """Send *data* as it is (tests: malformed or forged requests); the reply."""
        self.sock.sendall(data)
        return self.recv()

    def request(self, op: str, args: dict[str, Any] | None = None, *,
                seq: int | None = None) -> dict[str, Any]:
        """The signed request object for *op* (sent by :meth:`call`)."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        msg: dict[str, Any] = {"seq": seq, "op": op, "args": args or {}}
        msg["mac"] = message_mac(self._k_mac, b"req", self.nonce, msg)
        return msg

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        msg = self.request(op, args)
        reply = self.send_raw(canonical(msg) + b"\n")
        mac = reply.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(
                mac, message_mac(self._k_mac, b"rsp", self.nonce, reply)):
            err = reply.get("error") or {}
            raise PlatformCtlError(str(err.get("code", "unauthenticated")),
                                   f"response not authenticated: {err.get('message', '')}")
        if reply.get("seq") != msg["seq"]:
            raise PlatformCtlError("malformed", f"response to seq {reply.get('seq')}, "
                                                f"sent {msg['seq']}")
        if not reply.get("ok"):
            err = reply["error"]
            raise PlatformCtlError(str(err["code"]), str(err["message"]))
        result = reply["result"]
        assert isinstance(result, dict)
        return result

    def key_prog(self, stream_id: int, direction: str, substream: str, key_set: int,
                 key: IdeKey) -> None:
        seq = self.seq + 1
        self.call("key_prog", stream_id=stream_id, direction=direction, substream=substream,
                  key_set=key_set, wrapped_key=wrap_key(self._k_wrap, seq, key))
