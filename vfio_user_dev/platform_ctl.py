"""Platform control socket, server side: how the TSM, and only the TSM, configures the
root port.

docs/design.md decision 10: root-port IDE keys and trusted-DMA windows are programmed over a
UNIX socket of the device server (``--platform-socket PATH``) that requires a credential
only the TSM holds; the device server writes it at start
(:func:`teeio.platform_channel.write_credential`).  The protocol -- hello, per-connection
keys, MACed requests and responses, wrapped keys, the operations -- is
:mod:`teeio.platform_channel`, shared with the TSM's client; this module is the server,
which answers each operation from the root port
(:class:`~vfio_user_dev.root_port.RootPort`) and the link.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any

from teeio.ide import Direction, KeySet, SubStream
from teeio.platform_channel import (
    MAX_LINE,
    NONCE_LEN,
    PROTOCOL,
    PlatformCtlError,
    StreamState,
    canonical,
    derive_keys,
    message_mac,
    unwrap_key,
)
from teeio.transport import LineServer
from vfio_user_dev.link.wire import Link
from vfio_user_dev.root_port import RootPort, RootPortError

__all__ = ["AUTH_DEADLINE", "MAX_CONNECTIONS", "PlatformControlServer"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 8
#: A connection must authenticate (one MACed request) within this many seconds, or it is
#: closed: anyone on the host can connect, so silent connections must not hold the slots
#: the TSM needs.  Authenticated connections (the TSM's long-lived one) have no deadline.
AUTH_DEADLINE = 10.0
#: The longest one ``events`` request may wait for the next event.
MAX_EVENT_WAIT = 30.0


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
    (:class:`~teeio.transport.LineServer`)."""

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
            "stream_aggregation": self._stream_aggregation,
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
        """The platform events after ``since``; with ``wait`` (seconds, at most 30) the
        answer waits for the next one (a long poll: the TSM hears of an event at once)."""
        since = _arg(args, "since", int, 0)
        wait = args.get("wait", 0)
        if (since < 0 or isinstance(wait, bool) or not isinstance(wait, (int, float))
                or not 0 <= wait <= MAX_EVENT_WAIT):
            raise PlatformCtlError("bad_args", f"since must be >= 0 and wait 0..{MAX_EVENT_WAIT:g}")
        log_ = self.root_port.platform_events
        events, lost = log_.since(since, float(wait))
        return {"boot": log_.boot, "events": events, "lost": lost, "last": log_.last_seq}

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
        return {"state": StreamState(state)}

    def _stream_aggregation(self, s: _Session, seq: int, args: dict[str, Any]) -> dict[str, Any]:
        """The root port's Tx Aggregation Mode of a stream (PCIe 6.x §6.33.6), before its
        Enable: ``unit_tlps`` maps sub-streams (PR, NPR, CPL) to TLPs per unit (1, 2, 4, 8)."""
        modes = _arg(args, "unit_tlps", dict)
        if not all(isinstance(k, str) and k.upper() in _SUBSTREAMS and isinstance(v, int)
                   and not isinstance(v, bool) for k, v in modes.items()):
            raise PlatformCtlError("bad_args", "'unit_tlps' maps PR, NPR, CPL to 1, 2, 4 or 8")
        self.root_port.set_aggregation(_arg(args, "stream_id", int),
                                       {_SUBSTREAMS[k.upper()]: v for k, v in modes.items()})
        return {}

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
