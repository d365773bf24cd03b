"""The host's API: the control socket's operations (``tsm/ctl.py``).

This module owns :meth:`ControlApiMixin.ctl_request` and one method per operation
(``ctl_*``; the operations' names on the wire are ``connect``, ``disconnect``,
``reconnect``, ``bind``, ``unbind``, ``lock``, ``stop``, ``status`` and ``history``): the
connect of a new or known device, the binding of a VM to a TDI (its secret's file and
GHCx socket) and its unbinding, and the status document and the journal's timeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from teeio.platform_channel import StreamState
from tsm import ide
from tsm.binding_api import BindingApiMixin
from tsm.ctl import CtlError
from tsm.device import LINK_ERRORS, DeviceConfig, DeviceError, DeviceLink, one_line
from tsm.ghcx_server import GhcxFailure
from tsm.journal import JournalError
from tsm.registry import (
    NAME_RE,
    VM_ID_RE,
    DeviceBusy,
    DeviceEntry,
    VmBinding,
    _abs,
    _arg,
    _name,
)
from tsm.tdi import TdiRecord
from tsm.tdisp import TdispRequestError

log = logging.getLogger("tsm.daemon")      # the daemon's log, whichever part writes it

#: A control operation: its arguments → its result.
Operation = Callable[[dict[str, Any]], dict[str, Any]]


class ControlApiMixin(BindingApiMixin):
    """The control API's operations."""

    #: journal records replayed at start (``status``'s ``journal_records_replayed``)
    replayed: int

    if TYPE_CHECKING:      # the daemon's own (tsm/daemon.py) and its other parts'
        def _revoke(self, dev: DeviceEntry, vm: VmBinding, wid: int, reason: str) -> None: ...
        def _journal_stream(self, dev: DeviceEntry, state: StreamState, reason: str | None,
                            source: str = "tsm") -> None: ...
        def _connected(self, dev: DeviceEntry) -> None: ...
        def _link(self, cfg: DeviceConfig) -> DeviceLink: ...
        def _reconnect(self, dev: DeviceEntry) -> None: ...
        def _unwatch(self, name: str) -> None: ...
        def _serve_vm(self, vm: VmBinding) -> None: ...
        def _refresh_state(self, dev: DeviceEntry, journal: bool = False) -> None: ...
        def _refresh_stream(self, dev: DeviceEntry, source: str = "device") -> None: ...
        def lock_tdi(self, dev: DeviceEntry, vm: VmBinding) -> None: ...
        def stop_tdi(self, dev: DeviceEntry, vm: VmBinding | None, why: str) -> None: ...

    def ctl_request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One control request (``tsm/ctl.py``) → its result; raises CtlError for an
        error response (``busy``, ``failed``, ``bad_args``, ``unknown_op``)."""
        ops: dict[str, Operation] = {
            "connect": self.ctl_connect, "disconnect": self.ctl_disconnect,
            "bind": self.ctl_bind, "unbind": self.ctl_unbind, "lock": self.ctl_lock,
            "stop": self.ctl_stop, "status": self.ctl_status,
            "reconnect": self.ctl_reconnect, "history": self.ctl_history}
        fn = ops.get(op)
        if fn is None:
            raise CtlError("unknown_op", f"no operation {op!r} (one of {', '.join(ops)})")
        if fn == self.ctl_status and not args.get("refresh"):
            return self.ctl_status(args)          # without any lock (Registry)
        if fn == self.ctl_history:
            return self.ctl_history(args)
        try:
            return fn(args)                      # each takes the locks it needs
        except DeviceBusy as exc:
            raise CtlError("busy", str(exc)) from None
        except GhcxFailure as exc:
            raise CtlError("failed", exc.message) from None
        except TdispRequestError as exc:
            raise CtlError("failed", f"device: {exc.request}: {exc.code_name}") from None
        except (*LINK_ERRORS, DeviceError, JournalError) as exc:
            raise CtlError("failed", one_line(exc)) from None

    def _device(self, args: dict[str, Any],
                busy: str | None = None) -> contextlib.AbstractContextManager[
                    tuple[VmBinding | None, DeviceEntry]]:
        """The ``device`` argument's entry, held (:meth:`_held`)."""
        name = _name(args, "device", NAME_RE)
        return self._held(lambda: (None, self._device_named(name)), busy)

    def _vm(self, args: dict[str, Any]) -> contextlib.AbstractContextManager[
            tuple[VmBinding | None, DeviceEntry]]:
        """The ``vm`` argument's binding and its device, held (:meth:`_held`)."""
        vm_id = _name(args, "vm", VM_ID_RE)

        def find() -> tuple[VmBinding | None, DeviceEntry]:
            vm = self.vms.get(vm_id)
            if vm is None:
                raise CtlError("failed", f"no VM {vm_id!r} is bound")
            return vm, self.devices[vm.device]

        return self._held(find)

    # -- devices -----------------------------------------------------------------------------
    def ctl_connect(self, args: dict[str, Any]) -> dict[str, Any]:
        """``connect``: a new device (attest, session, stream), or a known one whose
        session is down; its status."""
        name = _name(args, "device", NAME_RE)
        doe_socket = _arg(args, "doe_socket", str, None)
        doe_port = _arg(args, "doe_tcp_port", int, None)
        if (doe_socket is None) == (doe_port is None):
            raise CtlError("bad_args", "give exactly one of doe_socket and doe_tcp_port")
        refs = _arg(args, "reference_values", str, None)
        stream_id = _arg(args, "stream_id", int, ide.DEFAULT_STREAM_ID)
        if not 0 <= stream_id <= 0xFF:
            raise CtlError("bad_args", "stream_id must be 0..255")
        cfg = DeviceConfig(name=name, trust_anchor=_abs(_arg(args, "trust_anchor", str)),
                           platform_socket=_abs(_arg(args, "platform_socket", str)),
                           platform_credential=_abs(_arg(args, "platform_credential", str)),
                           doe_socket=_abs(doe_socket) if doe_socket else None,
                           doe_tcp_port=doe_port, host=_arg(args, "host", str, "127.0.0.1"),
                           reference_values=_abs(refs) if refs else None, stream_id=stream_id,
                           block=_arg(args, "block", int, 0))
        with self.lock:
            for what, path in (("doe_socket", cfg.doe_socket),
                               ("platform_socket", cfg.platform_socket)):
                owner = self._ghcx_owner(path)
                if owner is not None:
                    raise CtlError("bad_args", f"{what} {path} is the GHCx socket this TSM "
                                               f"serves for VM {owner}: refused")
            known = name in self.devices
            if not known:
                if name in self._connecting:
                    raise DeviceBusy(f"device {name} is busy: being connected")
                self._connecting.add(name)        # against a second connect of the name
        if not known:
            try:
                dev = self._connect_new(cfg, None)
            finally:
                with self.lock:
                    self._connecting.discard(name)
        else:
            with self._device(args, "being connected") as (_, old):
                dev = self._connect_known(cfg, old)
        return self._device_status(dev)

    def _connect_known(self, cfg: DeviceConfig, old: DeviceEntry) -> DeviceEntry:
        """``connect`` of a known device (its ``op`` held)."""
        name = cfg.name
        if old.link.session_up:
            raise CtlError("failed", f"device {name} is already connected")
        if old.tdi.vm:
            # A bound device whose session is down (lost heartbeat, failed reconnect):
            # re-established as it is known, keeping the VM's binding and secret.
            if cfg != old.config:
                raise CtlError("failed", f"device {name} is bound to VM {old.tdi.vm}: "
                                         "reconnect it as it was connected (ctl reconnect "
                                         f"--device {name})")
            self._reconnect(old)
            return old
        return self._connect_new(cfg, old)

    def _connect_new(self, cfg: DeviceConfig, old: DeviceEntry | None) -> DeviceEntry:
        """A new entry for *cfg*, replacing *old* (whose ``op`` the caller holds) or a name
        the caller reserved in ``_connecting``.  The new entry goes into the table held and
        busy, until its TDI state is known."""
        name = cfg.name
        dev = DeviceEntry(cfg, self._link(cfg), TdiRecord(name))
        if old is not None:
            old.link.close()
            dev.tdi.lock_epoch = old.tdi.lock_epoch     # epochs never repeat
        try:
            dev.link.connect()
        except DeviceError:
            dev.link.close()
            raise
        dev.op.acquire()          # a new lock no one else can see yet: never waits
        try:
            with self._busy(dev, "being connected"):
                with self.lock, self._tables_lock:
                    self.devices[name] = dev
                self.journal.append("device", **cfg.as_record())
                self._connected(dev)
        finally:
            dev.op.release()
        return dev

    def ctl_reconnect(self, args: dict[str, Any]) -> dict[str, Any]:
        """A known device whose session is down, reconnected with its journaled
        parameters (bound or not)."""
        with self._device(args, "being reconnected") as (_, dev):
            self._reconnect(dev)
        return self._device_status(dev)

    def ctl_disconnect(self, args: dict[str, Any]) -> dict[str, Any]:
        """``disconnect``: an unbound device's session ended and the device forgotten."""
        with self._device(args, "being disconnected") as (_, dev):
            if dev.tdi.vm:
                raise CtlError("failed", f"device {dev.config.name} is bound to VM "
                                         f"{dev.tdi.vm} (unbind it first)")
            dev.link.disconnect()
            dev.link.close()
            self.journal.append("session", device=dev.config.name, session_id=None,
                                reason="disconnected")
            self._journal_stream(dev, StreamState.INSECURE, "disconnected")
            with self.lock, self._tables_lock:
                del self.devices[dev.config.name]
            self._unwatch(dev.config.name)
            self.journal.append("device_removed", device=dev.config.name)
            return {"device": dev.config.name, "disconnected": True}

    # -- VMs ---------------------------------------------------------------------------------
    def ctl_lock(self, args: dict[str, Any]) -> dict[str, Any]:
        """``lock``: the VM's TDI locked by the host (``lock_tdi``)."""
        with self._vm(args) as (vm, dev):
            assert vm is not None
            self.lock_tdi(dev, vm)
            return {"tdi": dev.config.name, "state": dev.tdi.state.name,
                    "lock_epoch": dev.tdi.lock_epoch}

    def ctl_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        """``stop``: the VM's TDI stopped by the host (``stop_tdi``)."""
        with self._vm(args) as (vm, dev):
            assert vm is not None
            self.stop_tdi(dev, vm, "stopped by the host")
            return {"tdi": dev.config.name, "state": dev.tdi.state.name}

    # -- status, history ---------------------------------------------------------------------
    def _device_status(self, dev: DeviceEntry) -> dict[str, Any]:
        """One device's entry of the status document (no lock, no device I/O)."""
        link, cfg = dev.link, dev.config
        up, sid, rid = link.session_up, link.session_id, dev.requester_id   # read once each
        return {"name": cfg.name, "doe": cfg.where(), "platform_socket": cfg.platform_socket,
                "connected": up,
                "session": ({"id": f"0x{sid:08x}",
                             "heartbeat_period": link.heartbeat_period,
                             "heartbeats": link.heartbeats}
                            if up and sid is not None else None),
                "requester_id": f"0x{rid:04x}" if rid is not None else None,
                "stream": {"id": cfg.stream_id, "state": dev.stream_state,
                           "reason": dev.stream_reason,
                           **self._fact(dev, "stream", time.time())},
                "vmm": dev.vmm,
                "platform_events": (w.status() if (w := self.watches.get(cfg.name))
                                    else None),
                "last_error": dev.last_error, "busy": dev.busy}

    def _refresh(self, name: str) -> None:
        """``status --refresh``: ask the device (GET_DEVICE_INTERFACE_STATE, IDE_KM
        QUERY) and the platform (status) now, and take what they say."""
        with self._device({"device": name}) as (_, dev):
            if not dev.link.session_up:
                dev.last_error = dev.last_error or "not connected: nothing refreshed"
                return
            self._refresh_state(dev)
            self._refresh_stream(dev)

    @staticmethod
    def _fact(dev: DeviceEntry, what: str, now: float) -> dict[str, Any]:
        """Where *dev*'s fact *what* came from, and how old it is (seconds)."""
        f = dev.facts.get(what)
        if f is None:
            return {"source": "journal", "age_s": None}
        at = f.get("at")
        return {"source": f["source"],
                "age_s": None if at is None else round(max(0.0, now - float(at)), 3)}

    def ctl_history(self, args: dict[str, Any]) -> dict[str, Any]:
        """``history``: the journal's timeline of TDI, stream, window, VM and platform records (of
        ``device``, if given; the last ``limit``, default 200)."""
        name = _arg(args, "device", str, None)
        limit = _arg(args, "limit", int, 200)
        if limit <= 0:
            raise CtlError("bad_args", "limit must be > 0")
        records = self.journal.read()
        kinds = ("tdi", "stream", "session", "window", "window_revoked", "mmio_private",
                 "vm", "vm_removed", "platform", "device", "device_removed", "daemon_start")
        out = [r for r in records if r.get("type") in kinds
               and (name is None or r.get("device") in (name, None))]
        return {"records": out[-limit:], "total": len(out)}

    def ctl_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """``status``: the status document; takes no daemon lock and does no device I/O (except with
        ``refresh``: each device asked first, under its own lock)."""
        if args.get("refresh"):
            with self.lock:
                names = list(self.devices)
            for name in names:
                self._refresh(name)
        now = time.time()
        with self._tables_lock:
            devices = list(self.devices.values())
            bound = list(self.vms.values())
            counters = dict(sorted(self.counters.items()))
        tdis = [{"name": d.config.name, "state": d.tdi.state.name,
                 "lock_epoch": d.tdi.lock_epoch, "vm": d.tdi.vm, "reason": d.tdi.reason,
                 "mmio_private": d.tdi.mmio_private, "digests": d.tdi.digests(),
                 **self._fact(d, "tdi", now)}
                for d in devices]
        vms = []
        for vm in bound:
            ghcx = vm.server
            server = ghcx.status() if ghcx is not None else None
            vms.append({"vm": vm.vm, "device": vm.device, "ghcx_socket": vm.ghcx_socket,
                        "secret_file": vm.secret_file,
                        "mmio_reporting_offset": vm.mmio_reporting_offset,
                        "ghcx": server,
                        "windows": [{"window_id": k, **v}
                                    for k, v in sorted(dict(vm.windows).items())]})
        return {"boot_id": self.boot_id.hex(), "pid": os.getpid(),
                "state_dir": str(self.state_dir), "journal_records_replayed": self.replayed,
                "devices": [self._device_status(d) for d in devices],
                "tdis": tdis, "vms": vms, "counters": counters}


