"""What the TSM learns about a device, taken through the lifecycle table.

This module owns the application of the TDI lifecycle table (``tsm/lifecycle.py``, which
holds the table itself): whether an operation is allowed in the TDI's state
(:meth:`ReconcileMixin._allow`), what a fact the TSM learnt does to the record
(:meth:`ReconcileMixin._learn`) and the actions of a row (:meth:`ReconcileMixin._take`);
asking the device and the platform for the truth of the TDI and the stream
(:meth:`ReconcileMixin._refresh_state`, :meth:`ReconcileMixin._refresh_stream`); and the
platform's events (``tsm/platform_watch.py``): one watch per device, each event journaled
and taken into the tables.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from teeio.platform_channel import PlatformCtlError, StreamState
from teeio.tdisp.defs import TdiState
from tsm.device import LINK_ERRORS, DeviceError, one_line
from tsm.ghcx_server import GhcxFailure
from tsm.lifecycle import DEVICE_SAYS, Act, Input, Refused, Step
from tsm.lifecycle import step as lifecycle_step
from tsm.platform_watch import PlatformWatch
from tsm.registry import DeviceEntry, Registry, VmBinding
from tsm.tdi import REASON_DEVICE_ERROR
from tsm.tdisp import TdispRequestError

log = logging.getLogger("tsm.daemon")      # the daemon's log, whichever part writes it


class ReconcileMixin(Registry):
    """The lifecycle table applied to the records, and the platform's events."""

    if TYPE_CHECKING:      # the daemon's own (tsm/daemon.py)
        def _revoke(self, dev: DeviceEntry, vm: VmBinding, wid: int, reason: str) -> None: ...
        def _mmio_private(self, dev: DeviceEntry, enable: bool) -> None: ...
        def _journal_tdi(self, dev: DeviceEntry, source: str = "tsm") -> None: ...
        def _journal_stream(self, dev: DeviceEntry, state: StreamState, reason: str | None,
                            source: str = "tsm") -> None: ...

    # -- the lifecycle table (tsm/lifecycle.py) -------------------------------------------
    def _allow(self, dev: DeviceEntry, what: Input) -> Step:
        """The row for an operation on *dev*'s TDI, or GhcxFailure ``state``."""
        try:
            row = lifecycle_step(dev.tdi.state, what, f"TDI {dev.config.name}")
        except Refused as exc:
            raise GhcxFailure("state", str(exc)) from None
        assert row is not None
        return row

    def _learn(self, dev: DeviceEntry, what: Input, reason: str, source: str) -> bool:
        """What the TSM learnt about *dev*'s TDI, through the table; True if the record
        changed.  Its actions run best effort (logged, counted)."""
        row = lifecycle_step(dev.tdi.state, what, f"TDI {dev.config.name}")
        if row is None:
            return False
        before = dev.tdi.state
        self._take(dev, row, reason, source)
        if dev.tdi.state is not before:
            log.warning("device %s: TDI %s -> %s (%s: %s)", dev.config.name, before.name,
                        dev.tdi.state.name, what.name, reason)
        return True

    def _take(self, dev: DeviceEntry, row: Step, reason: str | None, source: str) -> None:
        """Record *row*'s next state and do its actions."""
        tdi = dev.tdi
        vm = self.vms.get(tdi.vm) if tdi.vm else None
        if row.acts & Act.REVOKE_WINDOWS and vm is not None:
            for wid in sorted(vm.windows):
                self._revoke(dev, vm, wid, reason or row.next.name)
        if row.acts & Act.CLOSE_MMIO and tdi.mmio_private:
            try:
                self._mmio_private(dev, False)
            except (PlatformCtlError, DeviceError) as exc:
                self._count("platform_errors")
                log.error("device %s: cannot close private MMIO: %s", dev.config.name, exc)
        if row.next is TdiState.ERROR:
            if tdi.state is not TdiState.ERROR:        # the first reason stays
                tdi.failed(reason or REASON_DEVICE_ERROR)
        elif row.next is not tdi.state:
            tdi.state = row.next
            tdi.reason = None if source == "tsm" else reason
        if row.acts & Act.CLEAR_LOCK:
            tdi.clear_lock()
        if row.acts & Act.JOURNAL:
            self._journal_tdi(dev, source)

    def _refresh_state(self, dev: DeviceEntry, journal: bool = False) -> None:
        """GET_DEVICE_INTERFACE_STATE, and what it says through the table
        (``DEVICE_*`` rows: only a step down is believed; a LOCKED or RUN the TSM did not
        lead the TDI to is ERROR).  With *journal*, the state is journaled as the
        device's word even if nothing changed (after a restart: the new session's)."""
        with dev.link.lock:
            live = dev.link.tdisp_client().get_state()
        tdi = dev.tdi
        if live is not tdi.state and live in (TdiState.CONFIG_LOCKED, TdiState.RUN):
            self._count("tdi_state_mismatch")
        why = (f"device reported {live.name}, the TSM recorded {tdi.state.name}"
               if live is not tdi.state else f"device reported {live.name}")
        if live is TdiState.ERROR:
            why = tdi.reason or dev.tdi_event or REASON_DEVICE_ERROR
        changed = self._learn(dev, DEVICE_SAYS[live], why, "device")
        if not changed:
            dev.facts["tdi"] = {"source": "device", "at": time.time()}
            if journal:
                self._journal_tdi(dev, source="device")

    def _refresh_stream(self, dev: DeviceEntry, source: str = "device") -> None:
        """The stream as both ends report it now (IDE_KM QUERY, platform status)."""
        live = dev.link.stream_state()
        if live != dev.stream_state:
            self._journal_stream(dev, live, "as both ends report it now", source)
        else:
            dev.facts["stream"] = {"source": source, "at": time.time()}

    # -- platform events (tsm/platform_watch.py) --------------------------------------------
    #: Event kinds after which the TSM asks the device and the platform for the truth.
    REFRESH_ON = frozenset({"tdi", "device_reset", "client_disconnected", "command",
                            "ide_stream", "ide_registers", "rp_stream", "ide_fail", "remap"})

    def _watch(self, dev: DeviceEntry) -> None:
        """Listen to *dev*'s platform events (one watch per device name and socket)."""
        cfg = dev.config
        with self.lock:
            old = self.watches.get(cfg.name)
            if old is not None and (old.socket_path, old.credential) == (
                    cfg.platform_socket, cfg.platform_credential):
                return
            w = PlatformWatch(cfg.name, cfg.platform_socket, cfg.platform_credential,
                              lambda ev, lost, boot: self.platform_events(cfg.name, ev, lost,
                                                                          boot))
            self.watches[cfg.name] = w
        if old is not None:
            old.stop()
        w.start()

    def _unwatch(self, name: str) -> None:
        """Stop listening to device *name*'s platform events."""
        with self.lock:
            w = self.watches.pop(name, None)
        if w is not None:
            w.stop()

    def platform_events(self, name: str, events: list[dict[str, Any]], lost: bool,
                        boot_changed: bool) -> None:
        """Platform events of device *name*, in order (the watch thread).  Windows and
        private MMIO the platform revoked by itself are forgotten; VMM connects and
        disconnects are recorded; after anything that may change TDI or stream truth (or
        a gap, or a restarted device server) the TSM asks the device and the platform
        now, and takes what they say through the lifecycle table.  Every event is
        journaled (``platform`` records: the timeline of ``status --history``)."""
        with self.lock:
            dev = self.devices.get(name)
        if dev is None:
            return
        while not dev.op.acquire(timeout=1.0):
            if self._closing.is_set():
                return
        try:
            with self.lock:
                if self.devices.get(name) is not dev:
                    return
            refresh = lost or boot_changed
            if lost or boot_changed:
                self._count("platform_event_gaps")
                self.journal.append("platform", device=name, kind="gap",
                                    reason="device server restarted" if boot_changed
                                    else "events were dropped")
            for ev in events:
                self._count("platform_events")
                self._platform_event(dev, ev)
                refresh = refresh or ev.get("kind") in self.REFRESH_ON
            if refresh and dev.link.session_up and dev.busy is None:
                try:
                    self._refresh_state(dev)
                    self._refresh_stream(dev)
                except (*LINK_ERRORS, DeviceError, TdispRequestError) as exc:
                    self._count("refresh_failures")
                    log.warning("device %s: cannot read the TDI state after a platform "
                                "event: %s", name, one_line(exc))
        except Exception:           # a bug must not end the watch silently
            log.exception("device %s: platform events not handled", name)
            self._count("platform_event_failures")
        finally:
            dev.op.release()

    def _platform_event(self, dev: DeviceEntry, ev: dict[str, Any]) -> None:
        """One platform event of *dev* (its ``op`` held): journaled, and what it says of
        windows, private MMIO, the TDI's last transition and the VMM taken in."""
        kind = str(ev.get("kind"))
        keep = {k: v for k, v in ev.items() if k not in ("backing",)}
        self.journal.append("platform", device=dev.config.name, **{
            k if k not in ("type", "seq", "time") else f"event_{k}": v
            for k, v in keep.items()})
        rid = ev.get("requester_id")
        ours = rid is None or rid == dev.requester_id
        if kind == "window_revoked" and ours:
            wid = ev.get("window")
            for vm in self.vms.values():
                if vm.device == dev.config.name and wid in vm.windows:
                    del vm.windows[wid]
                    self.journal.append("window_revoked", window_id=wid,
                                        reason=f"by the platform: {ev.get('reason')}")
        elif kind == "mmio_private" and ours and not ev.get("enabled"):
            if dev.tdi.mmio_private:
                dev.tdi.mmio_private = False
                self.journal.append("mmio_private", device=dev.config.name, enabled=False,
                                    source="platform")
        elif kind == "tdi" and ours:
            # The DSM's own words for a transition into ERROR: the reason it is recorded
            # with (any other transition leaves no reason to give).
            dev.tdi_event = (f"device: {ev.get('before')} -> {ev.get('after')} on "
                             f"{ev.get('event')}" if ev.get("after") == "ERROR" else None)
        elif kind in ("client_connected", "client_disconnected"):
            dev.vmm = {"connected": kind == "client_connected", "at": ev.get("time"),
                       "reason": ev.get("reason")}
            dev.facts["vmm"] = {"source": "platform", "at": ev.get("time")}

