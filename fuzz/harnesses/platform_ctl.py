"""The platform control server's request handling (``PlatformControlServer.handle_line``)
over a real root port and link: raw lines, and JSON requests the harness authenticates
(a fresh MAC and sequence number) so that every operation's argument checks are reached.
It never raises, its reply encodes, and no request ends in an ``internal`` error."""

from __future__ import annotations

import contextlib
import json
import tempfile
from functools import lru_cache
from typing import Any

from fuzz.runner import check, chunks, frames
from teeio.platform_channel import PlatformCtlError, canonical, message_mac
from vfio_user_dev.platform import Platform
from vfio_user_dev.platform_ctl import PlatformControlServer, _Session

KIND = "responder"
TOKEN = b"t" * 32


@lru_cache(maxsize=1)
def server() -> PlatformControlServer:
    tmp = tempfile.mkdtemp(prefix="fuzz-platform-")
    machine = Platform()
    return PlatformControlServer(f"{tmp}/platform.sock", TOKEN, machine.root_port, machine.link)


def _req(op: str, **args: Any) -> bytes:
    return b"\1" + json.dumps({"op": op, "args": args}).encode()


def seeds() -> list[bytes]:
    server()
    ops = [_req("status"), _req("events", since=0),
           _req("stream_setup", stream_id=1, rid_base=0x100, rid_limit=0x100),
           _req("key_prog", stream_id=1, direction="rx", substream="pr", key_set=0,
                key="00" * 48),
           _req("key_set_go", stream_id=1, direction="rx", key_set=0),
           _req("stream_enable", stream_id=1),
           _req("window_authorise", requester_id=0x100, stream_id=1, base=0x10000,
                size=0x1000, access="rw"),
           _req("window_reauthorise", window_id=1), _req("window_revoke", window_id=1),
           _req("mmio_private", requester_id=0x100, stream_id=1, enable=True),
           _req("key_set_stop", stream_id=1, direction="tx", key_set=1),
           _req("stream_reset", stream_id=1), _req("stream_remove", stream_id=1),
           b"\0" + b'{"seq": 1, "op": "status", "mac": "00"}']
    return [frames([o]) for o in ops] + [frames(ops)]


def one_input(data: bytes) -> None:
    srv = server()
    session = _Session(TOKEN)
    for chunk in chunks(data):
        if not chunk:
            continue
        line = chunk[1:]
        if chunk[0] & 1:
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):
                msg = None
            if isinstance(msg, dict):
                msg["seq"] = session.last_seq + 1
                args = msg.get("args")
                if isinstance(args, dict) and "wait" in args:
                    args["wait"] = 0             # a long poll is a wait, not a hang
                msg.pop("mac", None)
                msg["mac"] = message_mac(session.k_mac, b"req", session.nonce, msg)
                with contextlib.suppress(ValueError, TypeError, RecursionError):
                    line = canonical(msg)
        reply = srv.handle_line(session, line)
        check(isinstance(reply, dict), f"reply {reply!r}")
        canonical(reply)
        error = reply.get("error")
        if isinstance(error, dict):
            check(error.get("code") != "internal", f"internal error: {error}")


__all__ = ["PlatformCtlError"]
