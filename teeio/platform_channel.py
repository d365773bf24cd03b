"""The platform control channel's wire format, shared by its two ends.

docs/design.md decision 10: root-port IDE keys and trusted-DMA windows are programmed over a
UNIX socket of the device server (``--platform-socket PATH``) that requires a credential
only the TSM holds.  At start the device server draws a random 32-byte token and writes
it, hex, to a 0600 file (``--platform-credential FILE``); the TSM reads it from there.
The token never crosses the socket and is never logged.

The server is the device server's (it owns the root port); the client,
:class:`PlatformClient`, is what the TSM uses.  Both build every message with the helpers
here (:func:`canonical`, :func:`derive_keys`, :func:`message_mac`, :func:`wrap_key`,
:func:`unwrap_key`; the wrapped key's bytes are :class:`KeyBlob`, declared on
:mod:`teeio.codec`), and name a stream's state with :class:`StreamState`.  What a client
receives has one strict decode each: :func:`decode_hello`, :func:`decode_response`
(:class:`PlatformCtlError` ``malformed`` saying what is wrong).  The client
sends and receives through :class:`teeio.transport.LineConnection`, so this module holds
no socket code of its own.

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

A stream's state (``stream_enable``'s result, ``status``'s ``root_port.streams[].state``)
is Secure or Insecure, PCIe 6.x §6.33.4: on the wire the strings of :class:`StreamState`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teeio.codec import DecodeError, Struct, data, u64
from teeio.ide import IdeKey
from teeio.transport.line_client import LineConnection

__all__ = ["KEY_AAD", "MAX_LINE", "NONCE_LEN", "PROTOCOL", "TOKEN_LEN", "Hello", "KeyBlob",
           "PlatformClient", "PlatformCtlError", "Response", "StreamState", "canonical",
           "decode_hello", "decode_response", "derive_keys", "message_mac", "read_credential",
           "unwrap_key", "wrap_key", "write_credential"]

PROTOCOL = "teeio-platform/1"
TOKEN_LEN = 32
NONCE_LEN = 32
MAX_LINE = 64 * 1024
KEY_AAD = b"teeio-platform/1 key"


class StreamState(StrEnum):
    """An IDE stream's state as the platform channel and the TSM name it (PCIe 6.x
    §6.33.4: Secure once enabled with a GO key set in every sub-stream and direction;
    Insecure otherwise, and after any failure).  A ``str``: JSON carries the value.

    Not the IDE capability's Stream Status register field
    (:class:`teeio.pcie.ide_cap.StreamState`, §7.9.26.4.2), which is its integer
    encoding."""

    SECURE = "secure"
    INSECURE = "insecure"


class PlatformCtlError(Exception):
    """An error response (client side) or a request the server refuses (server side)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


# -- the JSON bodies a client receives: one strict decode each ---------------------------------

def _object(line: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise PlatformCtlError("malformed", f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PlatformCtlError("malformed", f"{what} is not a JSON object")
    return obj


@dataclass(frozen=True)
class Hello:
    """The server's greeting: ``{"type": "hello", "protocol": PROTOCOL, "nonce": hex}``."""

    nonce: bytes


def decode_hello(line: bytes) -> Hello:
    obj = _object(line, "greeting")
    if obj.get("type") != "hello" or obj.get("protocol") != PROTOCOL:
        raise PlatformCtlError("malformed", f"unexpected greeting {obj!r}")
    nonce = obj.get("nonce")
    try:
        raw = bytes.fromhex(nonce) if isinstance(nonce, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != NONCE_LEN:
        raise PlatformCtlError("malformed", f"greeting: 'nonce' must be {NONCE_LEN} bytes "
                                            f"in hex, got {nonce!r}")
    return Hello(raw)


@dataclass(frozen=True)
class Response:
    """One response: ``{"seq", "ok": true, "result": {...}, "mac"}`` or ``{"seq" (or
    null), "ok": false, "error": {"code", "message"}, "mac" (when authenticated)}``.
    :attr:`body` is the object as received, what :attr:`mac` covers."""

    seq: int | None
    ok: bool
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    mac: str | None
    body: dict[str, Any]


def decode_response(line: bytes) -> Response:
    obj = _object(line, "response")
    seq, ok, mac = obj.get("seq"), obj.get("ok"), obj.get("mac")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)
                            or not 0 <= seq < 1 << 64):
        raise PlatformCtlError("malformed", f"response 'seq' must be an integer 0..2^64-1 or "
                                            f"null, got {seq!r}")
    if not isinstance(ok, bool):
        raise PlatformCtlError("malformed", f"response 'ok' must be true or false, got {ok!r}")
    if mac is not None and not isinstance(mac, str):
        raise PlatformCtlError("malformed", "response 'mac' must be a string")
    if ok:
        result = obj.get("result")
        if not isinstance(result, dict):
            raise PlatformCtlError("malformed", "response 'result' must be an object")
        return Response(seq, ok, result, None, None, mac, obj)
    err = obj.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("code"), str) \
            or not isinstance(err.get("message"), str):
        raise PlatformCtlError("malformed", "response 'error' must be an object with string "
                                            "'code' and 'message'")
    return Response(seq, ok, None, err["code"], err["message"], mac, obj)


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


def _key_field() -> Any:
    f = data(32)
    f.repr = False          # a key: never in a repr
    return f


@dataclass(frozen=True)
class KeyBlob(Struct):
    """What ``wrapped_key`` encrypts: the key, then the IFV big-endian (the binary part of
    the channel; its envelope is the JSON request and its MAC)."""

    key: bytes = _key_field()
    ifv: int = u64(big=True)


def wrap_key(k_wrap: bytes, seq: int, key: IdeKey) -> str:
    blob = KeyBlob(key.key, key.ifv).encode()
    return AESGCM(k_wrap).encrypt(seq.to_bytes(12, "big"), blob, KEY_AAD).hex()


def unwrap_key(k_wrap: bytes, seq: int, wrapped: str) -> IdeKey:
    blob = AESGCM(k_wrap).decrypt(seq.to_bytes(12, "big"), bytes.fromhex(wrapped), KEY_AAD)
    try:
        k = KeyBlob.decode(blob)
    except DecodeError:     # not chained: the error keeps the raw (secret) bytes
        raise ValueError("wrapped key must hold 32 key bytes and an 8-byte IFV") from None
    return IdeKey(k.key, k.ifv)


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


class PlatformClient:
    """A client of the platform control socket (what the TSM does): checks the hello,
    derives the connection's keys, signs each request and checks each response."""

    def __init__(self, path: str, token: bytes, timeout: float = 10.0) -> None:
        self.conn = LineConnection(path, timeout, MAX_LINE)
        try:
            self.nonce = decode_hello(self._line()).nonce
        except BaseException:
            self.conn.close()
            raise
        self._k_mac, self._k_wrap = derive_keys(token, self.nonce)
        self.seq = 0

    def __repr__(self) -> str:
        return "PlatformClient()"

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PlatformClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> bytes:
        line = self.conn.recv_line()
        if not line:
            raise ConnectionError("platform control socket closed")
        return line

    def recv(self) -> dict[str, Any]:
        """The next response, strictly decoded, as the object received."""
        return decode_response(self._line()).body

    def send_raw(self, data: bytes) -> dict[str, Any]:
        """Send *data* as it is (tests: malformed or forged requests); the reply."""
        self.conn.send(data)
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
        self.conn.send(canonical(msg) + b"\n")
        rsp = decode_response(self._line())
        if rsp.mac is None or not hmac.compare_digest(
                rsp.mac, message_mac(self._k_mac, b"rsp", self.nonce, rsp.body)):
            raise PlatformCtlError(rsp.error_code or "unauthenticated",
                                   f"response not authenticated: {rsp.error_message or ''}")
        if rsp.seq != msg["seq"]:
            raise PlatformCtlError("malformed", f"response to seq {rsp.seq}, sent {msg['seq']}")
        if rsp.result is None:
            raise PlatformCtlError(rsp.error_code or "malformed", rsp.error_message or "")
        return rsp.result

    def key_prog(self, stream_id: int, direction: str, substream: str, key_set: int,
                 key: IdeKey) -> None:
        seq = self.seq + 1
        self.call("key_prog", stream_id=stream_id, direction=direction, substream=substream,
                  key_set=key_set, wrapped_key=wrap_key(self._k_wrap, seq, key))
