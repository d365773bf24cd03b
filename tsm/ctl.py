"""The TSM daemon's control API and ``teeio-tsm ctl`` / ``teeio-tsm status``.

A 0600 UNIX socket, one JSON object per line both ways; the error codes and the operations
are in docs/tdisp-and-tsm.md, "The control socket, request by request".  The CLI makes
paths absolute: the daemon's working directory is not the caller's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teeio.transport import LineClient, LineServer

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
CTL_SOCKET_NAME = "ctl.sock"
CLIENT_TIMEOUT = 120.0     # connect attests and keys a stream: seconds, not milliseconds
ENV_SOCKET = "TEEIO_TSM_CTL"
#: A control connection with no request for this long is closed (a silent client must not
#: hold a slot for ever); at most MAX_CONNECTIONS are served at once.
IDLE_TIMEOUT = 60.0
MAX_CONNECTIONS = 16


class CtlError(Exception):
    """An error response: ``code`` (docs/tdisp-and-tsm.md, "The control socket") and a
    one-line message."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


Dispatch = Callable[[str, dict[str, Any]], dict[str, Any]]


# -- server ---------------------------------------------------------------------------------

class CtlServer(LineServer[None]):
    """Serves the control API on *path*, a thread per connection
    (:class:`~teeio.transport.LineServer`)."""

    name = "control"
    thread_name = "tsm-ctl"

    def __init__(self, path: str, dispatch: Dispatch, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.dispatch = dispatch
        self.idle_timeout = idle_timeout
        self.counters = {"connections": 0, "requests": 0, "errors": 0, "busy": 0}
        super().__init__(path, MAX_LINE, max_connections)

    def refuse(self, conn: socket.socket) -> None:
        self.counters["connections"] += 1
        reply = self._error("busy", "too many control connections; try again")
        with contextlib.suppress(OSError), conn:
            conn.settimeout(1.0)
            conn.sendall(self.encode(reply) + b"\n")
        self.counters["busy"] += 1

    def opened(self, conn: socket.socket) -> None:
        conn.settimeout(self.idle_timeout)

    def answer(self, state: None, conn: socket.socket, line: bytes) -> dict[str, Any]:
        return self.handle_line(line)

    def too_long(self, state: None) -> dict[str, Any]:
        return self._error("malformed", f"line longer than {MAX_LINE} bytes")

    def encode(self, reply: dict[str, Any]) -> bytes:
        return json.dumps(reply, sort_keys=True).encode()

    def _error(self, code: str, message: str) -> dict[str, Any]:
        self.counters["errors"] += 1
        log.warning("control request refused (%s): %s", code, message)
        return {"ok": False, "error": {"code": code, "message": message}}

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line → one response object (never raises)."""
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: nesting deeper than the parser's stack (not a ValueError)
            return self._error("malformed", f"not JSON: {type(exc).__name__}: "
                                            f"{' '.join(str(exc).split())[:200]}")
        if not isinstance(msg, dict):
            return self._error("malformed", "a request must be a JSON object")
        op, args = msg.get("op"), msg.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            return self._error("malformed", "'op' must be a string and 'args' an object")
        self.counters["requests"] += 1
        log.info("control: %s", op)
        try:
            result = self.dispatch(op, args)
        except CtlError as exc:
            return self._error(exc.code, exc.message)
        except Exception as exc:
            log.exception("control %s failed", op)
            return self._error("internal", f"{op}: {type(exc).__name__}: {exc}")
        return {"ok": True, "result": result}


# -- client ---------------------------------------------------------------------------------

class CtlClient(LineClient):
    """A client of the TSM daemon's control socket."""

    peer = "the TSM daemon"
    max_reply = MAX_LINE * 64          # a status document can be long

    def __init__(self, path: str, timeout: float = CLIENT_TIMEOUT) -> None:
        super().__init__(path, timeout)

    def error(self, code: str, message: str) -> CtlError:
        return CtlError(code, message)


# -- the status table -----------------------------------------------------------------------

def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _known(fact: dict[str, Any]) -> str:
    """Where a fact came from and how old it is: ``device 0.4s``."""
    age = fact.get("age_s")
    return f"{fact.get('source', '?')} {age:.1f}s" if age is not None else \
        str(fact.get("source", "?"))


def format_status(st: dict[str, Any]) -> str:
    out = [f"TSM boot id {st['boot_id']} (pid {st['pid']}), state {st['state_dir']}"]
    devs = [["DEVICE", "DOE", "SESSION", "HEARTBEAT", "RID", "STREAM", "KNOWN FROM", "VMM",
             "NOTE"]]
    for d in st["devices"]:
        s, sess = d["stream"], d["session"]
        vmm = d.get("vmm")
        devs.append([d["name"], d["doe"], sess["id"] if sess else "-",
                     f"{sess['heartbeat_period']}s/{sess['heartbeats']}" if sess else "-",
                     d["requester_id"] or "-", f"{s['id']} {s['state']}", _known(s),
                     "-" if vmm is None else "connected" if vmm["connected"]
                     else "gone", d["last_error"] or s["reason"] or ""])
    out += ["", *_table(devs)] if st["devices"] else ["", "no devices"]
    if st["tdis"]:
        tdis = [["TDI", "STATE", "KNOWN FROM", "EPOCH", "VM", "PRIVATE MMIO", "REASON"]]
        for t in st["tdis"]:
            tdis.append([t["name"], t["state"], _known(t), str(t["lock_epoch"]),
                         t["vm"] or "-", "open" if t["mmio_private"] else "closed",
                         t["reason"] or ""])
        out += ["", *_table(tdis)]
    if st["vms"]:
        vms = [["VM", "TDI", "GHCX SOCKET", "GUEST", "REQUESTS", "ERRORS", "REJECTED",
                "WINDOWS"]]
        for v in st["vms"]:
            g = v["ghcx"] or {}
            c = g.get("counters", {})
            guest = ("session" if g.get("established") else
                     "connected" if g.get("connected") else
                     "session closed" if g.get("session") == "closed" else "-")
            rejected = ",".join(f"{k}={n}" for k, n in g.get("rejected", {}).items()) or "0"
            wins = " ".join(f"{w['window_id']}:{w['base']:#x}+{w['size']:#x}/{w['access']}"
                            for w in v["windows"]) or "-"
            vms.append([v["vm"], v["device"], v["ghcx_socket"], guest,
                        str(c.get("requests", 0)), str(c.get("errors", 0)), rejected, wins])
        out += ["", *_table(vms)]
    if st["counters"]:
        out += ["", "counters: " + " ".join(f"{k}={v}" for k, v in st["counters"].items())]
    return "\n".join(out)


def format_history(h: dict[str, Any]) -> str:
    """The journal's timeline, one line a record: time, device, what, details."""
    out = []
    skip = {"seq", "time", "type", "device", "event_time"}
    for r in h["records"]:
        when = time.strftime("%H:%M:%S", time.localtime(float(r.get("time", 0))))
        when += f".{int(float(r.get('time', 0)) * 1000) % 1000:03d}"
        what = r["type"] if r["type"] != "platform" else f"platform {r.get('kind')}"
        rest = " ".join(f"{k}={v}" for k, v in sorted(r.items())
                        if k not in skip and k != "kind" and v is not None)
        out.append(f"{when}  {r.get('device') or '-':8}  {what:24}  {rest}")
    if h["total"] > len(h["records"]):
        out.insert(0, f"(the last {len(h['records'])} of {h['total']} records)")
    return "\n".join(out) if out else "no records"


def wait_for_paths(paths: list[Path], deadline: float) -> None:
    """Until every path exists, or *deadline* (then the request says what is missing)."""
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)


def connect_waiting(path: str, wait: float) -> CtlClient:
    """A client of the daemon at *path*, trying for up to *wait* seconds."""
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        try:
            return CtlClient(path)
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise CtlError("failed", f"control socket {path}: cannot connect: "
                                         f"{exc.strerror or exc} (is the daemon running?)"
                               ) from None
            time.sleep(0.05)


# -- command line ---------------------------------------------------------------------------

OPS = ("connect", "reconnect", "disconnect", "bind", "unbind", "lock", "stop", "status")


def _abs(p: Path | None) -> str | None:
    return None if p is None else str(p.absolute())


def add_socket_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ctl-socket", type=Path, metavar="PATH",
                    help=f"the daemon's control socket (default: ${ENV_SOCKET}, or "
                         f"DIR/{CTL_SOCKET_NAME} with --state-dir)")
    ap.add_argument("--state-dir", type=Path, metavar="DIR",
                    help="the daemon's --state-dir (to find its control socket)")
    ap.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for the daemon's control socket to accept "
                         "(and, for connect, for the device server's sockets): daemons "
                         "just started in the background")


def parse_int(text: str) -> int:
    """An integer option: decimal, or 0x/0o/0b prefixed."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer (0x... allowed)") \
            from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_socket_arguments(ap)
    sub = ap.add_subparsers(dest="ctl_op", required=True, metavar="OP")
    c = sub.add_parser("connect", help="attest a device, open the session, set the IDE "
                                       "stream up")
    c.add_argument("--device", required=True, metavar="NAME",
                   help="the name the TSM keeps the device under")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--doe-socket", type=Path, metavar="PATH",
                       help="the device's DOE socket (teeio-device --doe-socket)")
    where.add_argument("--doe-tcp-port", type=int, metavar="N",
                       help="the device's DOE TCP port (teeio-device --doe-tcp-port)")
    c.add_argument("--host", default="127.0.0.1",
                   help="host of --doe-tcp-port (default 127.0.0.1)")
    c.add_argument("--platform-socket", type=Path, required=True, metavar="PATH",
                   help="the platform (root port) socket (teeio-device --platform-socket)")
    c.add_argument("--platform-credential", type=Path, required=True, metavar="FILE",
                   help="the credential the platform socket requires")
    c.add_argument("--trust-anchor", type=Path, required=True, metavar="PEM",
                   help="the root certificate the device's chain must lead to")
    c.add_argument("--reference-values", type=Path, metavar="JSON",
                   help="reference values (teeio-refvalues) the measurements must match")
    c.add_argument("--stream-id", type=int, metavar="N",
                   help="IDE Stream ID (default 1)")
    c.add_argument("--block", type=int, metavar="N",
                   help="the device's Selective IDE stream block to use (default 0)")
    r = sub.add_parser("reconnect", help="re-establish a known device whose session is down "
                                         "(its VM binding and secret are kept)")
    r.add_argument("--device", required=True, metavar="NAME", help="the device's name")
    d = sub.add_parser("disconnect", help="tear the stream down, END_SESSION")
    d.add_argument("--device", required=True, metavar="NAME", help="the device's name")
    b = sub.add_parser("bind", help="bind a device's TDI to a VM: secret file, GHCx socket")
    b.add_argument("--vm", required=True, metavar="VMID",
                   help="the VM's id (the guest reads it from fw_cfg)")
    b.add_argument("--device", required=True, metavar="NAME",
                   help="the connected device whose TDI the VM gets")
    b.add_argument("--ghcx-socket", type=Path, required=True, metavar="PATH",
                   help="where the TSM serves the VM's GHCx channel")
    b.add_argument("--secret-file", type=Path, metavar="FILE",
                   help="where to write the launch secret (default: under the state "
                        "directory's vms/)")
    b.add_argument("--mmio-reporting-offset", type=parse_int, metavar="N",
                   help="MMIO_REPORTING_OFFSET asked for at LOCK, a 4 KiB multiple "
                        "(default 0)")
    for op, text in (("unbind", "stop the VM's TDI if needed, forget the VM"),
                     ("lock", "host-requested LOCK of the VM's TDI (a new lock epoch)"),
                     ("stop", "host-requested STOP of the VM's TDI")):
        sub.add_parser(op, help=text).add_argument("--vm", required=True, metavar="VMID",
                                                   help="the VM's id")
    s = sub.add_parser("status", help="devices, sessions, streams, TDIs, VMs")
    add_status_arguments(s)


def add_status_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", action="store_true", help="the status document as JSON")
    ap.add_argument("--refresh", action="store_true",
                    help="ask each device (GET_DEVICE_INTERFACE_STATE, IDE_KM QUERY) and "
                         "its platform now, before answering")
    ap.add_argument("--history", action="store_true",
                    help="the timeline of TDI, stream, window, VM and platform events from "
                         "the journal instead")
    ap.add_argument("--device", metavar="NAME", help="with --history: only this device's")
    ap.add_argument("--limit", type=int, default=200, metavar="N",
                    help="with --history: the last N records (default 200)")


def socket_path(ns: argparse.Namespace) -> str:
    if ns.ctl_socket is not None:
        return str(ns.ctl_socket)
    if ns.state_dir is not None:
        return str(ns.state_dir / CTL_SOCKET_NAME)
    if os.environ.get(ENV_SOCKET):
        return os.environ[ENV_SOCKET]
    raise CtlError("bad_args", f"where is the daemon? give --ctl-socket or --state-dir "
                               f"(or set {ENV_SOCKET})")


def request_args(ns: argparse.Namespace) -> dict[str, Any]:
    op: str = ns.ctl_op
    if op == "connect":
        args = {"device": ns.device, "doe_socket": _abs(ns.doe_socket),
                "doe_tcp_port": ns.doe_tcp_port, "host": ns.host,
                "platform_socket": _abs(ns.platform_socket),
                "platform_credential": _abs(ns.platform_credential),
                "trust_anchor": _abs(ns.trust_anchor),
                "reference_values": _abs(ns.reference_values), "stream_id": ns.stream_id,
                "block": ns.block}
    elif op in ("disconnect", "reconnect"):
        args = {"device": ns.device}
    elif op == "bind":
        args = {"vm": ns.vm, "device": ns.device, "ghcx_socket": _abs(ns.ghcx_socket),
                "secret_file": _abs(ns.secret_file),
                "mmio_reporting_offset": ns.mmio_reporting_offset}
    elif op in ("unbind", "lock", "stop"):
        args = {"vm": ns.vm}
    elif op == "status" and getattr(ns, "history", False):
        args = {"device": ns.device, "limit": ns.limit}
    elif op == "status":
        args = {"refresh": True} if getattr(ns, "refresh", False) else {}
    else:
        args = {}
    return {k: v for k, v in args.items() if v is not None}


def summary(op: str, result: dict[str, Any]) -> str:
    if op in ("connect", "reconnect"):
        sess = result.get("session") or {}
        return (f"{op} {result['name']}: session {sess.get('id')}, stream "
                f"{result['stream']['id']} {result['stream']['state']}, RID "
                f"{result['requester_id']}")
    if op == "bind":
        return (f"bind {result['vm']}: TDI {result['device']}, GHCx socket "
                f"{result['ghcx_socket']}, secret file {result['secret_file']}")
    if op == "unbind" and result.get("failed"):
        return f"unbind {result['vm']}: done, but: {'; '.join(result['failed'])}"
    if op in ("lock", "stop"):
        epoch = f", lock epoch {result['lock_epoch']}" if "lock_epoch" in result else ""
        return f"{op} {result['tdi']}: {result['state']}{epoch}"
    return f"{op}: done"


def run_command(ns: argparse.Namespace) -> int:
    op: str = ns.ctl_op
    try:
        path = socket_path(ns)
        wait = getattr(ns, "wait", 0.0)
        deadline = time.monotonic() + wait
        client = connect_waiting(path, wait)
        if op == "connect":      # the device server's sockets, just started maybe
            wait_for_paths([p for p in (ns.doe_socket, ns.platform_socket,
                                        ns.platform_credential) if p is not None], deadline)
        wire_op = "history" if op == "status" and getattr(ns, "history", False) else op
        with client:
            try:
                result = client.call(wire_op, **request_args(ns))
            except (OSError, ValueError) as exc:
                raise CtlError("failed", f"control socket {path}: {exc}") from None
    except CtlError as exc:
        reason = " ".join(exc.message.split()) or exc.code
        print(f"ctl {op} FAILED: {reason}", file=sys.stderr)
        return 1
    if op == "status":
        print(json.dumps(result, indent=2, sort_keys=True) if ns.json
              else format_history(result) if getattr(ns, "history", False)
              else format_status(result))
    else:
        print(summary(op, result))
    return 0


__all__ = ["IDLE_TIMEOUT", "MAX_CONNECTIONS", "CtlClient", "CtlError", "CtlServer", "OPS",
           "add_arguments", "add_socket_arguments", "add_status_arguments", "format_status",
           "run_command"]
