"""The host's own path to the function (docs/design.md decision 12): config and BAR access, FLR,
firmware update and the (untrusted) link, on a UNIX socket of the device server.

No credential: every access takes the VMM's path and the same TDISP enforcement (PCIe 6.x
§11.2.1, §11.2.6).  One JSON object per line both ways; the operations, their arguments
and error codes are in docs/tdisp-and-tsm.md, "The host's own path".
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teeio.transport import LineClient, LineServer
from vfio_user_dev.dsm import FirmwareUpdateError
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import PciRegion, ProtocolError

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_CONNECTIONS = 8
#: A connection idle this long is closed, so silent clients cannot hold every slot.
IDLE_TIMEOUT = 60.0
MAX_FAULTS = 256
CONFIG_SIZES = (1, 2, 4)
BAR_SIZES = (1, 2, 4, 8)

__all__ = ["HostAccessClient", "HostAccessError", "HostAccessServer", "MAX_LINE", "main"]


class HostAccessError(Exception):
    """An error reply (client side) or a request the server refuses (server side)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


def _int(args: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    v = args.get(name, default)
    if v is None:
        raise HostAccessError("bad_args", f"missing argument {name!r}")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise HostAccessError("bad_args", f"{name!r} must be an integer {lo:#x}..{hi:#x}")
    return v


def _size(args: dict[str, Any], allowed: tuple[int, ...]) -> int:
    size = _int(args, "size", 1, 8)
    if size not in allowed:
        raise HostAccessError("bad_args", f"'size' must be one of {allowed}")
    return size


class HostAccessServer(LineServer[None]):
    """Serves the host access protocol for *device* on a UNIX socket, a thread per
    connection (:class:`~teeio.transport.LineServer`)."""

    name = "host access"
    thread_name = "host-access"
    skip_blank_lines = True

    def __init__(self, path: str, platform: Platform) -> None:
        self.platform = platform
        self.device = platform.device
        self.counters = {"connections": 0, "requests": 0, "errors": 0}
        super().__init__(path, MAX_LINE, MAX_CONNECTIONS)
        self.ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "config_read": self._config_read, "config_write": self._config_write,
            "bar_read": self._bar_read, "bar_write": self._bar_write, "flr": self._flr,
            "fw_update": self._fw_update, "link_inject": self._link_inject,
            "link_clear": self._link_clear, "stats": self._stats,
        }

    def __repr__(self) -> str:
        return f"HostAccessServer({self.path!r})"

    def opened(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE_TIMEOUT)

    def answer(self, state: None, conn: socket.socket, line: bytes) -> dict[str, Any]:
        return self.handle_line(line)

    def too_long(self, state: None) -> dict[str, Any]:
        return self._error("malformed", f"request longer than {MAX_LINE} bytes")

    def encode(self, reply: dict[str, Any]) -> bytes:
        return json.dumps(reply, separators=(",", ":")).encode()

    def _error(self, code: str, message: str) -> dict[str, Any]:
        self.counters["errors"] += 1
        log.info("host access request refused (%s): %s", code, message)
        return {"ok": False, "error": {"code": code, "message": message}}

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line in, one reply object out (never raises)."""
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return self._error("malformed", f"not JSON: {exc}")
        if not isinstance(msg, dict):
            return self._error("malformed", "a request must be a JSON object")
        op, args = msg.get("op"), msg.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            return self._error("malformed", "'op' must be a string and 'args' an object")
        reply = self._call(op, args)
        if "id" in msg:
            reply["id"] = msg["id"]
        return reply

    def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        fn = self.ops.get(op)
        if fn is None:
            return self._error("unknown_op", f"no operation {op[:64]!r}")
        self.counters["requests"] += 1
        try:
            result = fn(args)
        except HostAccessError as exc:
            return self._error(exc.code, exc.message)
        except ProtocolError as exc:
            return self._error("bad_args", str(exc))
        except Exception as exc:
            log.exception("host access %s failed", op)
            return self._error("internal", type(exc).__name__)
        log.debug("host access %s %s", op, args)
        return {"ok": True, "result": result}

    # -- operations --------------------------------------------------------------------------
    def _config_read(self, args: dict[str, Any]) -> dict[str, Any]:
        size = _size(args, CONFIG_SIZES)
        offset = _int(args, "offset", 0, 0x1000 - size)
        raw = self.platform.region_read(PciRegion.CONFIG, offset, size, host=True)
        return {"value": int.from_bytes(raw, "little")}

    def _config_write(self, args: dict[str, Any]) -> dict[str, Any]:
        size = _size(args, CONFIG_SIZES)
        offset = _int(args, "offset", 0, 0x1000 - size)
        value = _int(args, "value", 0, (1 << 8 * size) - 1)
        self.platform.region_write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"),
                                 host=True)
        raw = self.platform.region_read(PciRegion.CONFIG, offset, size, host=True)
        return {"value": int.from_bytes(raw, "little")}

    def _bar(self, args: dict[str, Any]) -> tuple[PciRegion, int, int]:
        bar = _int(args, "bar", 0, 5)
        region = PciRegion(bar)
        spec = self.device.REGIONS.get(region)
        if spec is None:
            raise HostAccessError("bad_args", f"BAR{bar} is not implemented")
        size = _size(args, BAR_SIZES)
        return region, _int(args, "offset", 0, spec.size - size), size

    def _bar_read(self, args: dict[str, Any]) -> dict[str, Any]:
        region, offset, size = self._bar(args)
        raw = self.platform.region_read(region, offset, size, host=True)
        return {"value": int.from_bytes(raw, "little")}

    def _bar_write(self, args: dict[str, Any]) -> dict[str, Any]:
        region, offset, size = self._bar(args)
        value = _int(args, "value", 0, (1 << 8 * size) - 1)
        self.platform.region_write(region, offset, value.to_bytes(size, "little"), host=True)
        return {}

    def _flr(self, args: dict[str, Any]) -> dict[str, Any]:
        self.platform.reset("host_flr")
        return {"tdi": self.device.tdi_state().name}

    def _fw_update(self, args: dict[str, Any]) -> dict[str, Any]:
        path = args.get("path")
        if not isinstance(path, str) or not path or len(path) > 4096:
            raise HostAccessError("bad_args", "'path' must be a file name")
        try:
            measurements = self.device.firmware_update(Path(path))
        except FirmwareUpdateError as exc:
            raise HostAccessError("refused" if exc.refused else "failed", str(exc)) from None
        return {"measurements": [{"index": m.index, "label": m.label, "size": len(m.data)}
                                 for m in measurements]}

    def _link_inject(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("kind")
        kinds = {k.name: k for k in FaultKind} | {k.value: k for k in FaultKind}
        if not isinstance(name, str) or name.upper().replace("-", "_") not in kinds:
            raise HostAccessError("bad_args", "'kind' must be one of "
                                              f"{', '.join(k.name for k in FaultKind)}")
        kind = kinds[name.upper().replace("-", "_")]
        direction = args.get("direction", "upstream")
        if not isinstance(direction, str) or direction.upper() not in LinkDirection.__members__:
            raise HostAccessError("bad_args", "'direction' must be upstream or downstream")
        count = _int(args, "count", 1, MAX_FAULTS, 1)
        nth = _int(args, "nth", 1, 1 << 20, 1)
        bit = args.get("bit")
        if bit is not None:
            bit = _int(args, "bit", 0, 8 * 4096)
        if sum(not f.done for f in self.platform.link.faults) + count > MAX_FAULTS:
            raise HostAccessError("bad_args", f"at most {MAX_FAULTS} faults may be armed")
        for i in range(count):
            self.platform.link.inject(Fault(kind, LinkDirection[direction.upper()], nth + i,
                                          bit=bit))
        log.warning("host armed %d link fault(s): %s %s from TLP #%d", count, kind.value,
                    direction, nth)
        return {"armed": count}

    def _link_clear(self, args: dict[str, Any]) -> dict[str, Any]:
        self.platform.link.clear_faults()
        return {}

    def _stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.platform.stats()


# -- client ---------------------------------------------------------------------------------

class HostAccessClient(LineClient):
    """A client of the host access socket."""

    peer = "the host access socket"
    max_reply = MAX_LINE

    def error(self, code: str, message: str) -> HostAccessError:
        return HostAccessError(code, message)


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text, 0)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vfio_user_dev.host_access",
                                 description="One request to a device server's host access "
                                             "socket (--host-socket); prints the reply.")
    ap.add_argument("--socket", required=True, help="the device server's --host-socket PATH")
    ap.add_argument("op", help="config_read, config_write, bar_read, bar_write, flr, "
                               "fw_update, link_inject, link_clear, stats")
    ap.add_argument("args", nargs="*", metavar="key=value",
                    help="the request's arguments, e.g. offset=0x10 size=4")
    ns = ap.parse_args(argv)
    args: dict[str, Any] = {}
    for item in ns.args:
        key, sep, text = item.partition("=")
        if not sep or not key:
            ap.error(f"argument {item!r} is not key=value")
        args[key] = _value(text)
    try:
        with HostAccessClient(ns.socket) as c:
            reply = c.request(ns.op, **args)
    except (OSError, ValueError) as exc:
        print(json.dumps({"ok": False, "error": {"code": "connection",
                                                 "message": str(exc)}}))
        return 1
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
