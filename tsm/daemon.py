"""``teeio-tsm daemon``: the persistent TSM.

It owns, per device, the DOE connection, the SPDM session, the Selective IDE stream and the
TDI; per VM, a GHCx server and the launch secret's file; and it answers the control API on
``DIR/ctl.sock`` (0600).  It journals before it answers and fails safe after a restart
(docs/design.md "Who does what" and "Trust model / Restart"; docs/tdisp-and-tsm.md).  Its
jobs live in ``tsm/recovery.py``, ``tsm/reconcile.py``, ``tsm/guest_api.py`` and
``tsm/control_api.py``; this module holds what they share, and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from teeio import options
from teeio.platform_channel import PlatformCtlError, StreamState
from teeio.transport import background
from tsm import ctl
from tsm.attest import DoeDebug, add_debug_arguments
from tsm.control_api import ControlApiMixin
from tsm.device import DeviceError, one_line
from tsm.guest_api import GuestApiMixin
from tsm.journal import Journal
from tsm.reconcile import ReconcileMixin
from tsm.recovery import RECONNECT_DELAYS, RecoveryMixin
from tsm.registry import DeviceEntry, VmBinding, read_secret, write_secret

log = logging.getLogger(__name__)


class Daemon(RecoveryMixin, ReconcileMixin, GuestApiMixin, ControlApiMixin):
    """The TSM's state and operations: its tables and locks (and the order they are
    taken in) are :class:`tsm.registry.Registry`'s; each job is one of the parts this
    class is built from (module docstring)."""

    def __init__(self, state_dir: Path, heartbeat: float | None = None,
                 reconnect_delays: Sequence[float] = RECONNECT_DELAYS,
                 debug: DoeDebug | None = None) -> None:
        """Open (or create) *state_dir*'s journal and replay it into the tables; nothing
        is connected or served until :meth:`start`."""
        super().__init__(state_dir)
        self.heartbeat = heartbeat
        self.reconnect_delays = tuple(reconnect_delays)
        self.debug = debug
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.journal, records = Journal.open(state_dir)
        try:
            self._replay(records)
        except BaseException:
            self.journal.close()    # a journal that cannot be replayed is let go at once
            raise
        self.replayed = len(records)

    def __repr__(self) -> str:
        return f"Daemon({str(self.state_dir)!r}, boot_id={self.boot_id.hex()})"

    # -- journaled facts --------------------------------------------------------------------
    def _journal_tdi(self, dev: DeviceEntry, source: str = "tsm") -> None:
        """Journal *dev*'s TDI record as it is now, as *source*'s word."""
        t = dev.tdi
        dev.facts["tdi"] = {"source": source, "at": time.time()}
        self.journal.append("tdi", device=dev.config.name, state=t.state.name,
                            lock_epoch=t.lock_epoch, vm=t.vm, reason=t.reason, source=source)

    def _journal_stream(self, dev: DeviceEntry, state: StreamState, reason: str | None,
                        source: str = "tsm") -> None:
        """Record and journal *dev*'s stream *state* (and why), as *source*'s word."""
        dev.stream_state, dev.stream_reason = state, reason
        dev.facts["stream"] = {"source": source, "at": time.time()}
        self.journal.append("stream", device=dev.config.name, stream_id=dev.config.stream_id,
                            state=state, requester_id=dev.requester_id, reason=reason,
                            source=source)

    # -- the platform ----------------------------------------------------------------------
    def _revoke(self, dev: DeviceEntry, vm: VmBinding, wid: int, reason: str) -> None:
        """Revoke *vm*'s window *wid* at the platform and forget it (journaled); one the
        platform no longer has is gone all the same, one that cannot be revoked is kept."""
        try:
            dev.link.platform_call("window_revoke", window_id=wid)
        except PlatformCtlError as exc:      # refused: the platform no longer has it
            log.warning("window %d: revoke: %s (treated as gone)", wid, exc)
        except DeviceError as exc:
            self._count("platform_errors")
            log.error("window %d: cannot revoke: %s (kept in the journal)", wid, exc)
            return
        vm.windows.pop(wid, None)
        self.journal.append("window_revoked", window_id=wid, reason=reason)

    def _mmio_private(self, dev: DeviceEntry, enable: bool) -> None:
        """Open or close private MMIO of the TDI at the device server (platform op
        ``mmio_private``).  A platform without the operation is logged and counted."""
        rid = dev.requester_id
        try:
            dev.link.platform_call("mmio_private", requester_id=rid if rid is not None else 0,
                                   stream_id=dev.config.stream_id, enable=enable)
        except PlatformCtlError as exc:
            if exc.code != "unknown_op":
                raise
            self._count("mmio_private_unsupported")
            log.warning("device %s: the platform has no mmio_private operation; private "
                        "MMIO is not enforced there", dev.config.name)
            return
        dev.tdi.mmio_private = enable
        self.journal.append("mmio_private", device=dev.config.name, enabled=enable)

    # -- connecting --------------------------------------------------------------------------
    def _connect(self, dev: DeviceEntry) -> None:
        """Reconnect (attest, session, stream), then learn the TDI's state from the
        device, journaled whatever it is."""
        dev.link.connect()
        self._connected(dev)

    def _connected(self, dev: DeviceEntry) -> None:
        """*dev*'s link has just connected: watch its platform events, journal the new
        session and the Secure stream, and learn the TDI's state from the device."""
        link = dev.link
        self._watch(dev)
        dev.last_error = None
        dev.requester_id = link.requester_id
        self.journal.append("session", device=dev.config.name,
                            session_id=f"0x{link.session_id or 0:08x}", reason=None)
        self._journal_stream(dev, StreamState.SECURE, None)
        self._refresh_state(dev, journal=True)

    def close(self) -> None:
        """Stop serving: GHCx servers, platform watches and device links closed, then the
        journal (reconnect threads see :attr:`_closing` and stop)."""
        self._closing.set()
        with self.lock:
            vms, devices = list(self.vms.values()), list(self.devices.values())
        for vm in vms:
            server, vm.server = vm.server, None
            if server is not None:
                server.close()
            vm.close_secret()
        for name in list(self.watches):
            self._unwatch(name)
        for dev in devices:
            dev.link.close()
        self.journal.close()


# -- command line ---------------------------------------------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    """``teeio-tsm daemon``'s options."""
    ap.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                    help="journal, VM secrets and the control socket live here")
    ap.add_argument("--ctl-socket", type=Path, metavar="PATH",
                    help="the control socket (default DIR/ctl.sock)")
    ap.add_argument("--heartbeat", type=float, metavar="SECONDS",
                    help="send SPDM HEARTBEAT this often (default: half the session's "
                         "HeartbeatPeriod; 0: never)")
    add_debug_arguments(ap)
    ap.add_argument(background.FLAG, action="store_true",
                    help="run in the background: return once the control socket listens "
                         "(prints the pid), the log going to --log")
    ap.add_argument("--log", type=Path, metavar="FILE",
                    help="with --background: where the log goes (default DIR/daemon.log)")


def run_command(ns: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT (or, with ``--background``, start it and
    return once it is ready); 1 with one line on stderr if it cannot start."""
    state_dir: Path = ns.state_dir
    ctl_path: Path = ns.ctl_socket or state_dir / "ctl.sock"
    if getattr(ns, "background", False):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return background.start("teeio-tsm daemon",
                                ["-m", "tsm", *(sys.argv[1:] if argv is None else argv)],
                                ns.log or state_dir / "daemon.log")
    debug: DoeDebug | None = None
    if ns.ctl_socket is not None:      # checked before anything is started
        try:
            options.writable_file("--ctl-socket", ns.ctl_socket)
        except options.OptionError as exc:
            print(f"daemon FAILED: {exc}", file=sys.stderr)
            return 1
    try:
        debug = DoeDebug.from_args(ns, "teeio-tsm daemon")
        daemon = Daemon(state_dir, ns.heartbeat, debug=debug)
    except Exception as exc:      # a bad journal, an unusable state dir, ...: one line
        log.debug("daemon init failed", exc_info=True)
        if debug is not None:
            debug.close()
        print(f"daemon FAILED: {one_line(exc)}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def _signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    try:
        daemon.start()
        try:
            server = ctl.CtlServer(str(ctl_path), daemon.ctl_request).start()
        except OSError as exc:
            if exc.filename is None:       # bind() names no path: say which socket
                exc.filename = str(ctl_path)
            raise
    except Exception as exc:      # any start failure: one line, exit 1
        log.debug("start failed", exc_info=True)
        with contextlib.suppress(Exception):
            daemon.close()
        if debug is not None:
            debug.close()
        print(f"daemon FAILED: {one_line(exc)}", file=sys.stderr)
        return 1
    log.info("TSM daemon ready: boot id %s, state %s, control %s", daemon.boot_id.hex(),
             state_dir, ctl_path)
    background.notify_ready()
    try:
        stop.wait()
    finally:
        server.close()
        daemon.close()
        if debug is not None:
            debug.close()
    return 0


__all__ = ["Daemon", "DeviceEntry", "VmBinding", "add_arguments", "read_secret",
           "run_command", "write_secret"]
