"""The TSM control server's request handling (``CtlServer.handle_line``) with the daemon's
own dispatcher (``Daemon.ctl_request``) on an empty state directory: it never raises, its
reply encodes, and no request ends in an ``internal`` error.  ``connect`` (which would
open a device connection) is answered as ``status``; no device is ever known, so reconnect
and bind stop at their lookups."""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from fuzz.runner import check
from tsm.ctl import CtlServer
from tsm.daemon import Daemon

KIND = "responder"


@lru_cache(maxsize=1)
def server() -> CtlServer:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-tsm-ctl-"))
    daemon = Daemon(tmp / "state", heartbeat=0, reconnect_delays=())

    def dispatch(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "connect":
            return daemon.ctl_request("status", {})
        return daemon.ctl_request(op, args)

    return CtlServer(str(tmp / "ctl.sock"), dispatch)


def seeds() -> list[bytes]:
    server()
    docs: list[dict[str, Any]] = [
        {"op": "status"}, {"op": "status", "args": {"refresh": True}},
        {"op": "history", "args": {"device": "dev0", "limit": 5}},
        {"op": "disconnect", "args": {"device": "dev0"}},
        {"op": "unbind", "args": {"vm": "vm0"}}, {"op": "lock", "args": {"vm": "vm0"}},
        {"op": "stop", "args": {"vm": "vm0", "reason": "x"}},
        {"op": "reconnect", "args": {"device": "dev0"}},
        {"op": "bind", "args": {"vm": "vm0", "device": "dev0"}}, {"op": "nope"}]
    return [json.dumps(d).encode() for d in docs]


def one_input(data: bytes) -> None:
    reply = server().handle_line(data)
    check(isinstance(reply, dict), f"reply {reply!r}")
    json.dumps(reply, sort_keys=True)
    error = reply.get("error")
    if isinstance(error, dict):
        check(error.get("code") != "internal", f"internal error: {error}")

