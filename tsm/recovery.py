"""What the TSM does when a session is gone: after its own restart, or a lost heartbeat.

This module owns the journal's replay into the tables (:meth:`RecoveryMixin._replay`),
the daemon's start (:meth:`RecoveryMixin.start`), which fails safe and recovers every
journaled device (docs/design.md "Restart"), the heartbeat's fail-safe when a session is lost
(:meth:`RecoveryMixin._session_lost`), the bounded reconnect attempts that follow it, and
the reconnect of a known device (:meth:`RecoveryMixin._reconnect`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from teeio.platform_channel import StreamState
from teeio.tdisp.defs import TdiState
from tsm.attest import DoeDebug
from tsm.ctl import CtlError
from tsm.device import LINK_ERRORS, DeviceConfig, DeviceError, DeviceLink, one_line
from tsm.journal import JournalError
from tsm.lifecycle import Input
from tsm.registry import DeviceEntry, Registry, VmBinding
from tsm.tdi import REASON_RESTART, TdiRecord

log = logging.getLogger("tsm.daemon")      # the daemon's log, whichever part writes it

REASON_HEARTBEAT = "SPDM session lost"
#: After a lost session (heartbeat), the daemon reconnects on its own: one attempt after
#: each of these delays (seconds), then it gives up (``ctl reconnect`` tries again).
RECONNECT_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class RecoveryMixin(Registry):
    """Replay, start, and the fail-safe and reconnects after a lost session."""

    #: send SPDM HEARTBEAT this often (None: half the session's HeartbeatPeriod; 0: never)
    heartbeat: float | None
    #: the delays before each automatic reconnect attempt (empty: none)
    reconnect_delays: tuple[float, ...]
    #: debugging taps for every device link (--doe-capture, --export-session-secrets)
    debug: DoeDebug | None

    if TYPE_CHECKING:      # the daemon's own (tsm/daemon.py) and its other parts'
        def _revoke(self, dev: DeviceEntry, vm: VmBinding, wid: int, reason: str) -> None: ...
        def _mmio_private(self, dev: DeviceEntry, enable: bool) -> None: ...
        def _journal_stream(self, dev: DeviceEntry, state: StreamState, reason: str | None,
                            source: str = "tsm") -> None: ...
        def _connect(self, dev: DeviceEntry) -> None: ...
        def _learn(self, dev: DeviceEntry, what: Input, reason: str, source: str) -> bool: ...
        def _serve_vm(self, vm: VmBinding) -> None: ...

    # -- journal --------------------------------------------------------------------------
    def _replay(self, records: list[dict[str, Any]]) -> None:
        """The journal's *records*, in order, into the tables (record *i* is line *i*,
        from 1); a record that cannot be applied is a :class:`JournalError` naming its line
        and seq."""
        for lineno, rec in enumerate(records, 1):
            try:
                self._apply(rec)
            except JournalError as exc:
                raise JournalError(f"journal {self.journal.path}: line {lineno} (record "
                                   f"{rec.get('seq')!r}, {rec.get('type')}): {exc}") from None
            except (KeyError, ValueError, TypeError, OverflowError, AttributeError) as exc:
                raise JournalError(f"journal {self.journal.path}: line {lineno} (record "
                                   f"{rec.get('seq')!r}, {rec.get('type')}) cannot be applied: "
                                   f"{str(exc)[:200] or type(exc).__name__}") from None

    def _apply(self, rec: dict[str, Any]) -> None:
        """One journal record into the tables (unknown types: logged, counted)."""
        t = rec["type"]
        if t == "device":
            cfg = DeviceConfig.from_record(rec)
            old = self.devices.get(cfg.name)
            self.devices[cfg.name] = DeviceEntry(
                cfg, self._link(cfg), old.tdi if old else TdiRecord(cfg.name))
        elif t == "device_removed":
            # The daemon only removes an unbound device (``disconnect`` refuses a bound one),
            # so a removal while a VM is still bound cannot be its own: refused, since
            # applying it would forget the VM's windows and private MMIO without revoking
            # them (the fail-safe runs per known device at start).
            dev = self.devices[rec["device"]]
            if dev.tdi.vm is not None:
                raise JournalError(f"device {dev.config.name} removed while VM {dev.tdi.vm} "
                                   "is bound to it (unbind first): refused")
            self.devices.pop(rec["device"])
        elif t == "stream":
            dev = self.devices[rec["device"]]
            dev.stream_state = StreamState(rec["state"])
            dev.stream_reason = rec.get("reason")
            if rec.get("requester_id") is not None:
                dev.requester_id = int(rec["requester_id"])
        elif t == "vm":
            vm = VmBinding(rec["vm"], rec["device"], rec["ghcx_socket"], rec["secret_file"],
                           int(rec.get("mmio_reporting_offset", 0)))
            self.vms[vm.vm] = vm
            self.devices[vm.device].tdi.vm = vm.vm
        elif t == "vm_removed":
            vm = self.vms.pop(rec["vm"])
            if vm.device in self.devices:
                self.devices[vm.device].tdi.vm = None
        elif t == "tdi":
            tdi = self.devices[rec["device"]].tdi
            tdi.state = TdiState[rec["state"]]
            tdi.lock_epoch = int(rec["lock_epoch"])
            tdi.reason = rec.get("reason")
        elif t == "mmio_private":
            self.devices[rec["device"]].tdi.mmio_private = bool(rec["enabled"])
        elif t == "window":
            self.vms[rec["vm"]].windows[int(rec["window_id"])] = {
                k: rec[k] for k in ("base", "size", "access")}
        elif t == "window_revoked":
            for vm in self.vms.values():
                vm.windows.pop(int(rec["window_id"]), None)
        elif t not in ("daemon_start", "session", "platform"):
            log.warning("journal record %s of unknown type %r ignored", rec.get("seq"), t)
            self._count("journal_unknown_records")


    # -- start ---------------------------------------------------------------------------
    def _link(self, cfg: DeviceConfig) -> DeviceLink:
        """A (not yet connected) link to the device of *cfg*, whose heartbeat's failure
        comes to :meth:`_session_lost`."""
        return DeviceLink(cfg, self._session_lost, heartbeat_interval=self.heartbeat,
                          debug=self.debug)

    def start(self) -> None:
        """Recover what the journal knows (fail-safe), then serve every bound VM."""
        self.journal.append("daemon_start", boot_id=self.boot_id.hex(), pid=os.getpid())
        with self.lock:
            devices = list(self.devices.values())
        for dev in devices:
            with dev.op, self._busy(dev, "recovering after a TSM restart"):
                self._recover(dev)
        with self.lock:      # local sockets only: GHCx requests wait for it, briefly
            for vm in list(self.vms.values()):
                try:
                    self._serve_vm(vm)
                except (OSError, ValueError) as exc:
                    self._count("vm_serve_failures")
                    log.error("VM %s: cannot serve GHCx on %s: %s", vm.vm, vm.ghcx_socket,
                              one_line(exc))

    def _recover(self, dev: DeviceEntry) -> None:
        """docs/design.md "Restart": the old session is gone; fail safe, then reconnect."""
        name = dev.config.name
        log.warning("device %s: recovering after a TSM restart", name)
        self.journal.append("session", device=name, session_id=None, reason=REASON_RESTART)
        if dev.stream_state is not StreamState.INSECURE:
            self._journal_stream(dev, StreamState.INSECURE, REASON_RESTART)
        self._learn(dev, Input.TSM_RESTART, REASON_RESTART, "tsm")
        try:
            self._connect(dev)
        except (*LINK_ERRORS, DeviceError) as exc:
            # Any device failure (GET_DEVICE_INTERFACE_STATE after the connect raises the
            # TDISP client's errors, not DeviceError) is this device's alone: record it and
            # go on, so the other devices recover and every VM's GHCx server starts.
            dev.last_error = one_line(exc)
            self._count("reconnect_failures")
            log.error("device %s: cannot reconnect: %s", name, dev.last_error)
            if self.reconnect_delays and not dev.link.session_up:
                threading.Thread(target=self._reconnect_loop, args=(name, dev.link),
                                 name=f"reconnect-{name}", daemon=True).start()

    # -- a lost session -------------------------------------------------------------------
    def _session_lost(self, link: DeviceLink, reason: str) -> None:
        """The heartbeat failed: the same fail-safe as a restart (docs/design.md).  Called by the
        heartbeat thread without any lock; waits for the operation in progress on the
        device, and does nothing if the link was replaced or reconnected meanwhile."""
        with self.lock:
            dev = self.devices.get(link.config.name)
        if dev is None or dev.link is not link:
            return
        with dev.op:
            with self.lock:
                current = self.devices.get(link.config.name)
            if current is not dev or dev.link is not link or link.session_up:
                return
            self._count("sessions_lost")
            self.journal.append("session", device=dev.config.name, session_id=None,
                                reason=reason)
            self._journal_stream(dev, StreamState.INSECURE, reason)
            self._learn(dev, Input.SESSION_LOST, f"{REASON_HEARTBEAT}: {reason}", "tsm")
            if self.reconnect_delays and not self._closing.is_set():
                threading.Thread(target=self._reconnect_loop, args=(dev.config.name, link),
                                 name=f"reconnect-{dev.config.name}", daemon=True).start()

    def _reconnect_loop(self, name: str, link: DeviceLink) -> None:
        """Reconnect a device whose session was lost: bounded attempts with backoff, each
        logged.  Stops early if the device was disconnected, replaced or reconnected by
        hand meanwhile, or the daemon is closing."""
        attempts = len(self.reconnect_delays)
        for attempt, delay in enumerate(self.reconnect_delays, 1):
            if self._closing.wait(delay):
                return
            with self.lock:
                dev = self.devices.get(name)
            if dev is None or dev.link is not link or link.session_up:
                return
            with dev.op, self._busy(dev, "being reconnected"):
                with self.lock:
                    current = self.devices.get(name)
                if self._closing.is_set() or current is not dev or dev.link is not link \
                        or link.session_up:
                    return
                try:
                    self._reconnect(dev)
                except (*LINK_ERRORS, DeviceError, JournalError) as exc:
                    log.warning("device %s: reconnect attempt %d/%d failed: %s", name,
                                attempt, attempts, one_line(exc))
                    continue
                except Exception:        # a bug must not pass silently in a thread
                    log.exception("device %s: reconnect attempt %d/%d failed", name,
                                  attempt, attempts)
                    continue
                self._count("reconnects")
                log.warning("device %s: reconnected (attempt %d/%d); TDI %s", name, attempt,
                            attempts, dev.tdi.state.name)
                return
        self._count("reconnects_given_up")
        log.error("device %s: no reconnect after %d attempts; `teeio-tsm ctl reconnect "
                  "--device %s` tries again", name, attempts, name)

    def _reconnect(self, dev: DeviceEntry) -> None:
        """Re-establish a known device whose session is down, keeping its VM binding and
        the VM's secret.  Fail-safe first (a LOCKED/RUN record goes to ERROR, windows and
        private MMIO revoked); the TDI stays ERROR until the guest STOPs it, and the IDE
        stream is keyed afresh in the new session."""
        name = dev.config.name
        if dev.link.session_up:
            raise CtlError("failed", f"device {name} is already connected")
        self._learn(dev, Input.SESSION_LOST, REASON_HEARTBEAT, "tsm")
        try:
            self._connect(dev)
        except (*LINK_ERRORS, DeviceError) as exc:
            dev.last_error = one_line(exc)
            self._count("reconnect_failures")
            raise
        log.info("device %s: reconnected, session 0x%08x; TDI %s", name,
                 dev.link.session_id or 0, dev.tdi.state.name)

