"""``teeio-tsm daemon``: the persistent TSM (issue 5).

    teeio-tsm daemon --state-dir DIR [--ctl-socket PATH] [--heartbeat SECONDS] [-v]

Runs in the foreground and logs to stderr.  It owns, per device, the DOE connection, the
SPDM session, the Selective IDE stream and the TDI (``tsm/device.py``, ``tsm/tdi.py``);
per VM, a GHCx server (``tsm/ghcx_server.py``) and the launch secret's file; and it
answers the control API (``tsm/ctl.py``) on ``DIR/ctl.sock`` (0600).

DESIGN "Who does what": the guest asks for LOCK; the TSM locks, fetches the report, and
takes measurements with the guest's nonce; the guest's TDI_ACCEPT carries the digests and
lock epoch it verified, and START_INTERFACE is sent only if they are still current.  There
is no host-side start: the host can only LOCK and STOP (``ctl lock``/``ctl stop``).

Everything the TSM must not forget goes to the journal (``tsm/journal.py``) before it
answers.  At start the journal is replayed, and the daemon **fails safe** (DESIGN
"Restart"): the SPDM sessions died with the old process, so every stream is marked
Insecure and every CONFIG_LOCKED/RUN TDI ERROR ("TSM restarted: SPDM session lost"), the
journaled trusted-DMA windows and private MMIO are revoked on the platform socket, each
device is reconnected (its new GET_VERSION makes the device end the old session, so the
device's TDI really is in ERROR: checked with GET_DEVICE_INTERFACE_STATE and journaled),
the stream is keyed afresh in the new session, and every bound VM's GHCx socket listens
again with a new boot id, so the guest's next call gets REHELLO and then sees ERROR.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teeio.ghcx import BOOT_ID_SIZE, SECRET_SIZE
from teeio.platform_channel import PlatformCtlError
from teeio.spdm.defs import MEAS_OP_ALL, NONCE_SIZE
from teeio.tdisp.defs import TdiState
from teeio.transport import background
from tsm import ctl, ide
from tsm.ctl import CtlError
from tsm.device import LINK_ERRORS, DeviceConfig, DeviceError, DeviceLink, one_line
from tsm.ghcx_server import GhcxFailure, GhcxServer
from tsm.journal import Journal, JournalError, read_records
from tsm.lifecycle import DEVICE_SAYS, Act, Input, Refused, Step
from tsm.lifecycle import step as lifecycle_step
from tsm.platform_watch import PlatformWatch
from tsm.tdi import REASON_DEVICE_ERROR, REASON_RESTART, TdiRecord, lock_flags, read_report
from tsm.tdisp import TdispRequestError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
VM_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")     # docs/ghcx.md "Launch secret and VM id"
ACCESS = ("rw", "r", "w")
#: Trusted-DMA windows one VM may hold at once (DMA_ACCEPT beyond it: ``refused``).
MAX_WINDOWS_PER_VM = 64
REASON_HEARTBEAT = "SPDM session lost"
#: After a lost session (heartbeat), the daemon reconnects on its own: one attempt after
#: each of these delays (seconds), then it gives up (``ctl reconnect`` tries again).
RECONNECT_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: How long a request waits for another operation on the same device to finish before it
#: is answered ``busy`` (ctl) or ``state`` (GHCx); a device being connected answers at once.
OP_WAIT = 30.0


@dataclass
class DeviceEntry:
    config: DeviceConfig
    link: DeviceLink
    tdi: TdiRecord
    stream_state: str = "insecure"
    stream_reason: str | None = None
    requester_id: int | None = None
    last_error: str | None = None
    #: Serialises every operation on this device (Daemon docstring); ``busy`` says what
    #: holds it while the device is being (re)connected, only ever set with ``op`` held.
    op: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    busy: str | None = None
    #: where each fact came from and when (``tdi``, ``stream``, ``vmm``): ``source`` is
    #: ``tsm`` (its own operation), ``device`` (asked in the session), ``platform`` (an
    #: event), ``journal`` (replayed; not confirmed since); ``at`` is UNIX time
    facts: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    #: the VMM's vfio-user connection to the device, as the platform reported it
    vmm: dict[str, Any] | None = None
    #: the last TDI transition the platform reported (the DSM's event name)
    tdi_event: str | None = None


class DeviceBusy(Exception):
    """The device is being (re)connected, or another operation on it did not finish in
    time: ctl ``busy``, GHCx ``state``."""


@dataclass
class VmBinding:
    vm: str
    device: str
    ghcx_socket: str
    secret_file: str
    mmio_reporting_offset: int = 0
    windows: dict[int, dict[str, Any]] = field(default_factory=dict)
    server: GhcxServer | None = field(default=None, repr=False)


def write_secret(path: Path) -> None:
    """A fresh per-VM secret, raw bytes, in a 0600 file (replaced atomically).  QEMU hands
    it to the guest with ``-fw_cfg name=opt/org.teeio/ghcx-secret,file=PATH``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_SIZE))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret(path: Path) -> bytes:
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise PermissionError(f"{path}: a GHCx secret file must be mode 0600, is "
                              f"{st.st_mode & 0o777:o}")
    data = path.read_bytes()
    if len(data) != SECRET_SIZE:
        raise ValueError(f"{path}: a GHCx secret is {SECRET_SIZE} bytes, not {len(data)}")
    return data


# -- argument checks (control API) --------------------------------------------------------------

def _arg(args: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if args.get(name) is None:
        if default is ...:
            raise CtlError("bad_args", f"missing argument {name!r}")
        return default
    v = args[name]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise CtlError("bad_args", f"{name!r} must be an integer")
    if not isinstance(v, kind):
        raise CtlError("bad_args", f"{name!r} must be a {kind.__name__}")
    return v


def _name(args: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    v = _arg(args, key, str)
    if not pattern.fullmatch(v):
        raise CtlError("bad_args", f"{key} {v!r}: use 1-{16 if pattern is VM_ID_RE else 32} "
                                   "characters of [A-Za-z0-9._-]")
    return str(v)


def _abs(path: str) -> str:
    return str(Path(path).absolute())


class Daemon:
    """The TSM's state and operations.  Thread-safe, and one device's slow or stalled I/O
    delays only the requests for that device.  The locks, in the only order they are taken:

    1. ``DeviceEntry.op``, one device's operation lock: every operation that talks to the
       device (GHCx requests, ctl ops, the heartbeat's fail-safe, reconnects) holds it
       throughout, and it covers that device's state (``tdi``, stream, ``last_error``) and
       its VM's windows.  An entry is replaced in or removed from the device table, and a
       VM bound to or unbound from it, only with its ``op`` held; so a request looks the
       device up, takes ``op`` (waiting at most :attr:`op_wait`) and looks again.  Never
       two devices' ``op`` at once.  While a device is (re)connected, ``busy`` says so and
       requests are answered at once (ctl ``busy``, GHCx ``state``) instead of waiting;
       a new name being connected is reserved in ``_connecting``.
    2. ``DeviceLink.lock``: the SPDM requester and the platform client (``tsm/device.py``).
    3. :attr:`lock`, the daemon lock: held only to look up and to commit the device and VM
       tables (check-then-insert of a name, ``bind``'s local secret file and socket), never
       across device I/O, and no device lock is ever taken under it.
    4. :attr:`_tables_lock`: the snapshot that ``status`` reads, and the counters;
       innermost, with the journal's own lock (``Journal.append`` serialises itself).

    ``status`` (ctl, and GHCx STATUS) takes neither :attr:`lock` nor a device's ``op``: it
    answers while a ``connect`` attests or a device stalls a request.  It reads a snapshot
    of the device and VM tables, taken under :attr:`_tables_lock`; the fields it then reads
    are single attribute reads (a status may mix two moments of one TDI, never a broken
    structure)."""

    def __init__(self, state_dir: Path, heartbeat: float | None = None,
                 reconnect_delays: Sequence[float] = RECONNECT_DELAYS) -> None:
        self.state_dir = state_dir
        self.heartbeat = heartbeat
        self.reconnect_delays = tuple(reconnect_delays)
        self._closing = threading.Event()
        self.boot_id = os.urandom(BOOT_ID_SIZE)
        self.lock = threading.RLock()
        self._tables_lock = threading.Lock()
        self._connecting: set[str] = set()
        self.op_wait = OP_WAIT
        self.devices: dict[str, DeviceEntry] = {}
        self.vms: dict[str, VmBinding] = {}
        self.counters: Counter[str] = Counter()
        self.watches: dict[str, PlatformWatch] = {}
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.journal, records = Journal.open(state_dir)
        self._replay(records)
        self.replayed = len(records)

    def __repr__(self) -> str:
        return f"Daemon({str(self.state_dir)!r}, boot_id={self.boot_id.hex()})"

    def _count(self, key: str) -> None:
        with self._tables_lock:
            self.counters[key] += 1

    # -- per-device serialisation (class docstring) ---------------------------------------
    @contextlib.contextmanager
    def _held(self, find: Callable[[], tuple[VmBinding | None, DeviceEntry]],
              busy: str | None = None) -> Iterator[tuple[VmBinding | None, DeviceEntry]]:
        """Look up with *find* (under :attr:`lock`), take the device's ``op`` (at most
        :attr:`op_wait`), look up again (the device may have been replaced, the VM unbound
        meanwhile), and hold it; with *busy*, marked busy for others meanwhile.  Raises
        :class:`DeviceBusy` (or what *find* raises)."""
        deadline = time.monotonic() + self.op_wait
        while True:
            with self.lock:
                vm, dev = find()
            name = dev.config.name
            if dev.busy is not None:
                raise DeviceBusy(f"device {name} is busy: {dev.busy}")
            if not dev.op.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise DeviceBusy(f"device {name} is busy: another operation on it has not "
                                 f"finished in {self.op_wait:g} s")
            try:
                with self.lock:
                    again = find()
            except BaseException:
                dev.op.release()
                raise
            if again[0] is vm and again[1] is dev:
                break
            dev.op.release()
            if time.monotonic() > deadline:
                raise DeviceBusy(f"device {name} is busy: replaced while waiting for it")
        try:
            with self._busy(dev, busy):
                yield vm, dev
        finally:
            dev.op.release()

    @contextlib.contextmanager
    def _busy(self, dev: DeviceEntry, what: str | None) -> Iterator[None]:
        """Mark *dev* (whose ``op`` the caller holds) busy with *what* meanwhile."""
        dev.busy = what
        try:
            yield
        finally:
            dev.busy = None

    def _device_named(self, name: str) -> DeviceEntry:
        """Under :attr:`lock`."""
        dev = self.devices.get(name)
        if dev is None:
            if name in self._connecting:
                raise DeviceBusy(f"device {name} is busy: being connected")
            raise CtlError("failed", f"no device {name!r} (connect it first)")
        return dev

    # -- journal --------------------------------------------------------------------------
    def _replay(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            try:
                self._apply(rec)
            except (KeyError, ValueError, TypeError) as exc:
                raise JournalError(f"journal record {rec.get('seq')} ({rec.get('type')}) "
                                   f"cannot be applied: {exc!r}") from None

    def _apply(self, rec: dict[str, Any]) -> None:
        t = rec["type"]
        if t == "device":
            cfg = DeviceConfig.from_record(rec)
            old = self.devices.get(cfg.name)
            self.devices[cfg.name] = DeviceEntry(
                cfg, self._link(cfg), old.tdi if old else TdiRecord(cfg.name))
        elif t == "device_removed":
            self.devices.pop(rec["device"])
        elif t == "stream":
            dev = self.devices[rec["device"]]
            dev.stream_state = rec["state"]
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

    def _journal_tdi(self, dev: DeviceEntry, source: str = "tsm") -> None:
        t = dev.tdi
        dev.facts["tdi"] = {"source": source, "at": time.time()}
        self.journal.append("tdi", device=dev.config.name, state=t.state.name,
                            lock_epoch=t.lock_epoch, vm=t.vm, reason=t.reason, source=source)

    def _journal_stream(self, dev: DeviceEntry, state: str, reason: str | None,
                        source: str = "tsm") -> None:
        dev.stream_state, dev.stream_reason = state, reason
        dev.facts["stream"] = {"source": source, "at": time.time()}
        self.journal.append("stream", device=dev.config.name, stream_id=dev.config.stream_id,
                            state=state, requester_id=dev.requester_id, reason=reason,
                            source=source)

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

    # -- start, stop ---------------------------------------------------------------------
    def _link(self, cfg: DeviceConfig) -> DeviceLink:
        return DeviceLink(cfg, self._session_lost, heartbeat_interval=self.heartbeat)

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
        """DESIGN "Restart": the old session is gone; fail safe, then reconnect."""
        name = dev.config.name
        log.warning("device %s: recovering after a TSM restart", name)
        self.journal.append("session", device=name, session_id=None, reason=REASON_RESTART)
        if dev.stream_state != "insecure":
            self._journal_stream(dev, "insecure", REASON_RESTART)
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

    def _fail_safe_platform(self, dev: DeviceEntry, reason: str) -> None:
        """Revoke every journaled window of the device's VM, and its private MMIO."""
        vm = self.vms.get(dev.tdi.vm) if dev.tdi.vm else None
        if vm is not None:
            for wid in sorted(vm.windows):
                self._revoke(dev, vm, wid, reason)
        if dev.tdi.mmio_private or dev.tdi.state is TdiState.ERROR:
            try:
                self._mmio_private(dev, False)
            except (PlatformCtlError, DeviceError) as exc:
                self._count("platform_errors")
                log.error("device %s: cannot close private MMIO: %s", dev.config.name, exc)

    def _revoke(self, dev: DeviceEntry, vm: VmBinding, wid: int, reason: str) -> None:
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

    def _connect(self, dev: DeviceEntry) -> None:
        """Reconnect (attest, session, stream), then learn the TDI's state from the
        device, journaled whatever it is."""
        dev.link.connect()
        self._connected(dev)

    def _connected(self, dev: DeviceEntry) -> None:
        link = dev.link
        self._watch(dev)
        dev.last_error = None
        dev.requester_id = link.requester_id
        self.journal.append("session", device=dev.config.name,
                            session_id=f"0x{link.session_id or 0:08x}", reason=None)
        self._journal_stream(dev, "secure", None)
        self._refresh_state(dev, journal=True)

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
                            "ide_stream", "rp_stream", "ide_fail", "remap"})

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
            # The DSM's own words for the transition: the reason an ERROR is recorded with.
            dev.tdi_event = (f"device: {ev.get('before')} -> {ev.get('after')} on "
                             f"{ev.get('event')}")
        elif kind in ("client_connected", "client_disconnected"):
            dev.vmm = {"connected": kind == "client_connected", "at": ev.get("time"),
                       "reason": ev.get("reason")}
            dev.facts["vmm"] = {"source": "platform", "at": ev.get("time")}

    def _session_lost(self, link: DeviceLink, reason: str) -> None:
        """The heartbeat failed: the same fail-safe as a restart (DESIGN).  Called by the
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
            self._journal_stream(dev, "insecure", reason)
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

    def close(self) -> None:
        self._closing.set()
        with self.lock:
            vms, devices = list(self.vms.values()), list(self.devices.values())
        for vm in vms:
            server, vm.server = vm.server, None
            if server is not None:
                server.close()
        for name in list(self.watches):
            self._unwatch(name)
        for dev in devices:
            dev.link.close()
        self.journal.close()

    # -- GHCx ----------------------------------------------------------------------------
    def _serve_vm(self, vm: VmBinding) -> None:
        secret = read_secret(Path(vm.secret_file))
        vm.server = GhcxServer(vm.vm, vm.ghcx_socket, secret, self.boot_id,
                               self.ghcx_request).start()

    def ghcx_request(self, vm_id: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One decrypted guest request (docs/ghcx.md "Messages") → its response payload;
        raises GhcxFailure for an error response.

        Runs under the device's ``op`` only (class docstring): another VM's device stalled
        does not delay it.  STATUS takes no lock at all and answers even while its own
        device is busy."""

        def find() -> tuple[VmBinding | None, DeviceEntry]:
            vm = self.vms.get(vm_id)
            if vm is None or vm.device not in self.devices:
                raise GhcxFailure("refused", f"VM {vm_id} is not bound to a TDI")
            return vm, self.devices[vm.device]

        handlers = {"TDI_LOCK": self._g_lock, "TDI_INFO": self._g_info,
                    "GET_EVIDENCE": self._g_evidence, "TDI_ACCEPT": self._g_accept,
                    "DMA_ACCEPT": self._g_dma_accept, "DMA_RELEASE": self._g_dma_release,
                    "TDI_STOP": self._g_stop}
        with self.lock:
            vm, dev = find()
        if op == "STATUS":
            assert vm is not None
            return self._g_status(vm, dev, payload)
        fn = handlers.get(op)
        if fn is None:
            raise GhcxFailure("unknown_request", f"no request {op}")
        try:
            with self._held(find) as (held_vm, dev):
                assert held_vm is not None
                return fn(held_vm, dev, payload)
        except DeviceBusy as exc:
            self._count("ghcx_busy")
            raise GhcxFailure("state", str(exc)) from None
        except GhcxFailure as exc:
            self._count(f"ghcx_{exc.code}")
            raise
        except TdispRequestError as exc:
            self._count("ghcx_device")
            raise GhcxFailure("device", f"{exc.request}: {exc.code_name}") from None
        except (*LINK_ERRORS, DeviceError) as exc:
            self._count("ghcx_device")
            raise GhcxFailure("device", one_line(exc)) from None

    def _session(self, dev: DeviceEntry) -> DeviceLink:
        if not dev.link.session_up:
            why = dev.last_error or dev.tdi.reason or "not connected"
            raise GhcxFailure("state", f"device {dev.config.name} has no SPDM session ({why})")
        return dev.link

    def _g_lock(self, vm: VmBinding, dev: DeviceEntry, payload: dict[str, Any]) -> dict[str, Any]:
        self.lock_tdi(dev, vm)
        return {"state": dev.tdi.state.name, "lock_epoch": dev.tdi.lock_epoch}

    def lock_tdi(self, dev: DeviceEntry, vm: VmBinding) -> None:
        """LOCK_INTERFACE_REQUEST (PCIe 6.x §11.3.6: NO_FW_UPDATE, DEFAULT_STREAM_ID = the
        stream, the VM's MMIO reporting offset), then the whole report (§11.3.8), then
        lock_epoch + 1, journaled."""
        link = self._session(dev)
        self._allow(dev, Input.LOCK)
        epoch = dev.tdi.lock_epoch + 1
        flags = lock_flags(link.lock_flags)
        if link.ensure_stream():
            self._journal_stream(dev, "secure", "set up again before LOCK: the device's "
                                                "keys had been invalidated (reset)")
        with link.lock:
            client = link.tdisp_client()
            nonce = client.lock(flags, dev.config.stream_id, vm.mmio_reporting_offset)
            try:
                report: bytes | None = read_report(client)
            except BaseException:
                report = None        # locked all the same: recorded, then the error
                raise
            finally:
                dev.tdi.locked(epoch, int(flags), nonce, report, link.cert_chain)
                self._journal_tdi(dev)
        log.info("TDI %s: CONFIG_LOCKED for VM %s, lock epoch %d", dev.config.name, vm.vm,
                 dev.tdi.lock_epoch)

    def _g_info(self, vm: VmBinding, dev: DeviceEntry, payload: dict[str, Any]) -> dict[str, Any]:
        if dev.link.session_up:
            self._refresh_state(dev)
            live = dev.link.stream_state()
            if live != dev.stream_state:
                self._journal_stream(dev, live, "as both ends report it now")
        return self._info(dev, vm)

    def _info(self, dev: DeviceEntry, vm: VmBinding) -> dict[str, Any]:
        return dev.tdi.info(dev.config.stream_id, dev.stream_state, self.boot_id,
                            vm.mmio_reporting_offset)

    def _g_evidence(self, vm: VmBinding, dev: DeviceEntry,
                    payload: dict[str, Any]) -> dict[str, Any]:
        nonce_hex = payload.get("nonce")
        try:
            nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
        except ValueError:
            nonce = b""
        if len(nonce) != NONCE_SIZE:
            raise GhcxFailure("bad_request", f"nonce must be {NONCE_SIZE} bytes of hex")
        link = self._session(dev)
        if dev.tdi.state not in (TdiState.CONFIG_LOCKED, TdiState.RUN) or not dev.tdi.report:
            raise GhcxFailure("state", f"TDI {dev.config.name} is {dev.tdi.state.name}: "
                                       "evidence is given under a LOCK")
        with link.lock:
            assert link.requester is not None
            # DSP0274 §10.11: all blocks, signed, with exactly the guest's nonce; outside
            # the session, so L1 = VCA || GET_MEASUREMENTS || MEASUREMENTS of this
            # connection, which the guest re-checks.
            result = link.requester.get_measurements(MEAS_OP_ALL, nonce=nonce, signed=True)
        dev.tdi.evidence(result)
        return {"cert_chain": link.cert_chain.hex(), "vca": result.vca.hex(),
                "measurements": [[q.hex(), r.hex()] for q, r in result.transcript],
                "report": dev.tdi.report.hex()}

    def _g_accept(self, vm: VmBinding, dev: DeviceEntry,
                  payload: dict[str, Any]) -> dict[str, Any]:
        digests, epoch = payload.get("digests"), payload.get("lock_epoch")
        if not isinstance(digests, dict) or isinstance(epoch, bool) or not isinstance(epoch, int):
            raise GhcxFailure("bad_request", "TDI_ACCEPT needs {\"digests\": {...}, "
                                             "\"lock_epoch\": n}")
        link = self._session(dev)
        tdi = dev.tdi
        row = self._allow(dev, Input.ACCEPT)
        if epoch != tdi.lock_epoch:
            raise GhcxFailure("mismatch", f"lock epoch {epoch} is not the current one "
                                          f"({tdi.lock_epoch}): the TDI was locked again")
        if tdi.digest_transcript is None:
            raise GhcxFailure("mismatch", "no evidence was fetched under this lock")
        current = tdi.digests()
        differ = sorted(k for k in current if digests.get(k) != current[k])
        if differ:
            raise GhcxFailure("mismatch", f"digests differ from the current ones: "
                                          f"{', '.join(differ)}")
        assert tdi.start_nonce is not None
        with link.lock:
            link.tdisp_client().start(tdi.start_nonce)     # §11.3.10, LOCK's nonce
        tdi.start_nonce = None
        self._take(dev, row, None, "tsm")
        try:
            self._mmio_private(dev, True)
        except (PlatformCtlError, DeviceError) as exc:
            # fail safe: a TDI whose private MMIO could not be opened does not stay in RUN
            log.error("TDI %s: private MMIO not opened (%s): stopping it", dev.config.name,
                      exc)
            try:
                self.stop_tdi(dev, vm, "private MMIO could not be opened")
            except (GhcxFailure, TdispRequestError, *LINK_ERRORS, DeviceError):
                pass        # logged, and the TDI is ERROR: refused all the same
            raise GhcxFailure("refused", f"private MMIO could not be opened: "
                                         f"{one_line(exc)}") from None
        log.info("TDI %s: RUN (accepted by VM %s, lock epoch %d)", dev.config.name, vm.vm,
                 tdi.lock_epoch)
        return {"state": tdi.state.name, "dma_stream": dev.config.stream_id}

    def _g_dma_accept(self, vm: VmBinding, dev: DeviceEntry,
                      payload: dict[str, Any]) -> dict[str, Any]:
        base, size, access = payload.get("base"), payload.get("size"), payload.get("access", "rw")
        if (isinstance(base, bool) or not isinstance(base, int) or isinstance(size, bool)
                or not isinstance(size, int) or base < 0 or size <= 0 or access not in ACCESS):
            raise GhcxFailure("bad_request", "DMA_ACCEPT needs integer base >= 0, size > 0 "
                                             "and access rw, r or w")
        self._allow(dev, Input.DMA_ACCEPT)
        if len(vm.windows) >= MAX_WINDOWS_PER_VM:
            raise GhcxFailure("refused", f"VM {vm.vm} already has {len(vm.windows)} DMA "
                                         f"windows (at most {MAX_WINDOWS_PER_VM}): release "
                                         "one first")
        try:
            w = dev.link.platform_call("window_authorise", requester_id=dev.requester_id,
                                       stream_id=dev.config.stream_id, base=base, size=size,
                                       access=access)
        except PlatformCtlError as exc:
            raise GhcxFailure("refused", exc.message) from None
        wid = w.get("window_id", w.get("id"))
        if isinstance(wid, bool) or not isinstance(wid, int):
            raise GhcxFailure("internal", "the platform returned a window without an id")
        vm.windows[wid] = {"base": base, "size": size, "access": access}
        self.journal.append("window", window_id=wid, vm=vm.vm, device=dev.config.name,
                            base=base, size=size, access=access)
        return {"window_id": wid}

    def _g_dma_release(self, vm: VmBinding, dev: DeviceEntry,
                       payload: dict[str, Any]) -> dict[str, Any]:
        wid = payload.get("window_id")
        if isinstance(wid, bool) or not isinstance(wid, int):
            raise GhcxFailure("bad_request", "DMA_RELEASE needs an integer window_id")
        if wid not in vm.windows:
            raise GhcxFailure("refused", f"window {wid} is not one of this VM's")
        try:
            dev.link.platform_call("window_revoke", window_id=wid)
        except PlatformCtlError as exc:
            raise GhcxFailure("refused", f"window {wid}: {exc.message}") from None
        del vm.windows[wid]
        self.journal.append("window_revoked", window_id=wid, reason="released by the guest")
        return {}

    def _g_stop(self, vm: VmBinding, dev: DeviceEntry, payload: dict[str, Any]) -> dict[str, Any]:
        self.stop_tdi(dev, vm, "stopped by the guest")
        return {"state": dev.tdi.state.name}

    def stop_tdi(self, dev: DeviceEntry, vm: VmBinding | None, why: str) -> None:
        """Revoke the VM's windows, close private MMIO, STOP_INTERFACE (§11.3.12).

        The platform steps are best effort (logged and counted): whatever they do,
        STOP_INTERFACE is sent, since it is what really takes the TDI out of RUN (the
        device scrubs and refuses DMA).  If the STOP cannot be sent or fails, the record
        goes to ERROR (fail-safe: nothing can be accepted or started until a STOP works)
        and the error is raised."""
        row = self._allow(dev, Input.STOP)
        if vm is not None:
            for wid in sorted(vm.windows):
                self._revoke(dev, vm, wid, why)
        if dev.tdi.mmio_private or dev.tdi.state is TdiState.RUN:
            try:
                self._mmio_private(dev, False)
            except (PlatformCtlError, DeviceError) as exc:
                self._count("platform_errors")
                log.error("TDI %s: cannot close private MMIO (%s); sending STOP all the same",
                          dev.config.name, one_line(exc))
        try:
            link = self._session(dev)
            with link.lock:
                link.tdisp_client().stop()
        except (GhcxFailure, TdispRequestError, *LINK_ERRORS, DeviceError) as exc:
            self._count("stop_failures")
            text = exc.message if isinstance(exc, GhcxFailure) else one_line(exc)
            if dev.tdi.state is not TdiState.CONFIG_UNLOCKED:
                dev.tdi.failed(f"STOP failed ({why}): {text}")
                self._journal_tdi(dev)
            log.error("TDI %s: STOP_INTERFACE failed (%s): %s; the TDI is %s",
                      dev.config.name, why, text, dev.tdi.state.name)
            raise
        self._take(dev, row, None, "tsm")
        log.info("TDI %s: CONFIG_UNLOCKED (%s)", dev.config.name, why)

    def _g_status(self, vm: VmBinding, dev: DeviceEntry,
                  payload: dict[str, Any]) -> dict[str, Any]:
        return {"boot_id": self.boot_id.hex(), "vm_id": vm.vm, "tdi": dev.config.name,
                "state": dev.tdi.state.name,
                "windows": [{"window_id": k, **v}
                            for k, v in sorted(dict(vm.windows).items())]}

    # -- control API -----------------------------------------------------------------------
    def ctl_request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        ops = {"connect": self.op_connect, "disconnect": self.op_disconnect,
               "bind": self.op_bind, "unbind": self.op_unbind, "lock": self.op_lock,
               "stop": self.op_stop, "status": self.op_status,
               "reconnect": self.op_reconnect, "history": self.op_history}
        fn = ops.get(op)
        if fn is None:
            raise CtlError("unknown_op", f"no operation {op!r} (one of {', '.join(ops)})")
        if fn == self.op_status and not args.get("refresh"):
            return self.op_status(args)          # without any lock (class docstring)
        if fn == self.op_history:
            return self.op_history(args)
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

    def op_connect(self, args: dict[str, Any]) -> dict[str, Any]:
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

    def op_reconnect(self, args: dict[str, Any]) -> dict[str, Any]:
        """A known device whose session is down, reconnected with its journaled
        parameters (bound or not)."""
        with self._device(args, "being reconnected") as (_, dev):
            self._reconnect(dev)
        return self._device_status(dev)

    def op_disconnect(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._device(args, "being disconnected") as (_, dev):
            if dev.tdi.vm:
                raise CtlError("failed", f"device {dev.config.name} is bound to VM "
                                         f"{dev.tdi.vm} (unbind it first)")
            dev.link.disconnect()
            dev.link.close()
            self.journal.append("session", device=dev.config.name, session_id=None,
                                reason="disconnected")
            self._journal_stream(dev, "insecure", "disconnected")
            with self.lock, self._tables_lock:
                del self.devices[dev.config.name]
            self._unwatch(dev.config.name)
            self.journal.append("device_removed", device=dev.config.name)
            return {"device": dev.config.name, "disconnected": True}

    def op_bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """Under the device's ``op`` and the daemon lock throughout: no device I/O, only
        the secret file and the GHCx socket (local, quick)."""
        vm_id = _name(args, "vm", VM_ID_RE)
        with self._device(args) as (_, dev), self.lock:
            return self._bind(vm_id, dev, args)

    def _bind(self, vm_id: str, dev: DeviceEntry, args: dict[str, Any]) -> dict[str, Any]:
        if vm_id in self.vms:
            raise CtlError("failed", f"VM {vm_id} is already bound to "
                                     f"{self.vms[vm_id].device}")
        if dev.tdi.vm:
            raise CtlError("failed", f"TDI {dev.config.name} is already bound to VM "
                                     f"{dev.tdi.vm}")
        sock = _abs(_arg(args, "ghcx_socket", str))
        secret_file = _arg(args, "secret_file", str, None)
        secret_path = (Path(_abs(secret_file)) if secret_file
                       else self.state_dir.absolute() / "vms" / f"{vm_id}.secret")
        self._check_secret_path(secret_path)
        offset = _arg(args, "mmio_reporting_offset", int, 0)
        if not 0 <= offset < 1 << 64 or offset & 0xFFF:
            raise CtlError("bad_args", "mmio_reporting_offset must be a 4 KiB multiple, "
                                       "0..2^64-1")
        try:
            write_secret(secret_path)
        except OSError as exc:
            raise CtlError("failed", f"secret file {secret_path}: "
                                     f"{exc.strerror or exc}") from None
        vm = VmBinding(vm_id, dev.config.name, sock, str(secret_path), offset)
        try:
            self._serve_vm(vm)
        except OSError as exc:
            secret_path.unlink(missing_ok=True)
            raise CtlError("failed", f"GHCx socket {sock}: {exc.strerror or exc}") from None
        with self._tables_lock:
            self.vms[vm_id] = vm
        dev.tdi.vm = vm_id
        self.journal.append("vm", vm=vm_id, device=dev.config.name, ghcx_socket=sock,
                            secret_file=str(secret_path), mmio_reporting_offset=offset)
        return {"vm": vm_id, "device": dev.config.name, "ghcx_socket": sock,
                "secret_file": str(secret_path)}

    def _check_secret_path(self, path: Path) -> None:
        """``bind --secret-file``: not inside the state directory except its ``vms/`` (the
        journal, the control socket live there), not another VM's, and an existing file is
        only replaced if it looks like a secret of ours (regular, 0600, 32 bytes)."""
        real = Path(os.path.realpath(path))
        state = Path(os.path.realpath(self.state_dir))
        if real.is_relative_to(state) and real.parent != state / "vms":
            raise CtlError("bad_args", f"secret file {path}: inside the state directory "
                                       f"{state} only directly under {state / 'vms'}")
        for other in self.vms.values():
            if os.path.realpath(other.secret_file) == str(real):
                raise CtlError("failed", f"secret file {path} is VM {other.vm}'s")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CtlError("failed", f"secret file {path}: {exc.strerror or exc}") from None
        if (not stat.S_ISREG(st.st_mode) or st.st_size != SECRET_SIZE
                or st.st_mode & 0o077):
            raise CtlError("failed", f"secret file {path} exists and is not a GHCx secret "
                                     f"(a 0600 file of {SECRET_SIZE} bytes): not overwritten")

    def op_unbind(self, args: dict[str, Any]) -> dict[str, Any]:
        """STOP the TDI if needed and revoke the VM's windows, best effort; the VM is
        forgotten whatever failed, and the result lists what did (``failed``)."""
        with self._vm(args) as (held, dev):
            assert held is not None
            return self._unbind(held, dev)

    def _unbind(self, vm: VmBinding, dev: DeviceEntry) -> dict[str, Any]:
        why = f"VM {vm.vm} unbound"
        failed: list[str] = []
        if dev.tdi.state is not TdiState.CONFIG_UNLOCKED:
            try:
                self.stop_tdi(dev, vm, why)
            except GhcxFailure as exc:
                failed.append(f"STOP: {exc.message}")
            except TdispRequestError as exc:
                failed.append(f"STOP: device: {exc.request}: {exc.code_name}")
            except (*LINK_ERRORS, DeviceError) as exc:
                failed.append(f"STOP: {one_line(exc)}")
        for wid in sorted(vm.windows):
            self._revoke(dev, vm, wid, why)
        if vm.windows:
            failed.append("windows not revoked at the platform: "
                          + ", ".join(map(str, sorted(vm.windows))))
        if vm.server is not None:
            vm.server.close()
            vm.server = None
        try:
            Path(vm.secret_file).unlink(missing_ok=True)
        except OSError as exc:
            failed.append(f"secret file {vm.secret_file}: {exc.strerror or exc}")
        with self.lock, self._tables_lock:
            del self.vms[vm.vm]
            dev.tdi.vm = None
        self.journal.append("vm_removed", vm=vm.vm, failed=failed or None)
        if failed:
            self._count("unbind_failures")
            log.warning("VM %s unbound, but: %s", vm.vm, "; ".join(failed))
        return {"vm": vm.vm, "unbound": True, "failed": failed}

    def op_lock(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._vm(args) as (vm, dev):
            assert vm is not None
            self.lock_tdi(dev, vm)
            return {"tdi": dev.config.name, "state": dev.tdi.state.name,
                    "lock_epoch": dev.tdi.lock_epoch}

    def op_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._vm(args) as (vm, dev):
            assert vm is not None
            self.stop_tdi(dev, vm, "stopped by the host")
            return {"tdi": dev.config.name, "state": dev.tdi.state.name}

    def _device_status(self, dev: DeviceEntry) -> dict[str, Any]:
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
        f = dev.facts.get(what)
        if f is None:
            return {"source": "journal", "age_s": None}
        at = f.get("at")
        return {"source": f["source"],
                "age_s": None if at is None else round(max(0.0, now - float(at)), 3)}

    def op_history(self, args: dict[str, Any]) -> dict[str, Any]:
        """The journal's timeline of TDI, stream, window, VM and platform records (of
        ``device``, if given; the last ``limit``, default 200)."""
        name = _arg(args, "device", str, None)
        limit = _arg(args, "limit", int, 200)
        if limit <= 0:
            raise CtlError("bad_args", "limit must be > 0")
        records, _ = read_records(self.journal.path)
        kinds = ("tdi", "stream", "session", "window", "window_revoked", "mmio_private",
                 "vm", "vm_removed", "platform", "device", "device_removed", "daemon_start")
        out = [r for r in records if r.get("type") in kinds
               and (name is None or r.get("device") in (name, None))]
        return {"records": out[-limit:], "total": len(out)}

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """The status document; takes no daemon lock and does no device I/O (except with
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


# -- command line ---------------------------------------------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                    help="journal, VM secrets and the control socket live here")
    ap.add_argument("--ctl-socket", type=Path, metavar="PATH",
                    help="the control socket (default DIR/ctl.sock)")
    ap.add_argument("--heartbeat", type=float, metavar="SECONDS",
                    help="send SPDM HEARTBEAT this often (default: half the session's "
                         "HeartbeatPeriod; 0: never)")
    ap.add_argument(background.FLAG, action="store_true",
                    help="run in the background: return once the control socket listens "
                         "(prints the pid), the log going to --log")
    ap.add_argument("--log", type=Path, metavar="FILE",
                    help="with --background: where the log goes (default DIR/daemon.log)")


def run_command(ns: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    state_dir: Path = ns.state_dir
    ctl_path: Path = ns.ctl_socket or state_dir / "ctl.sock"
    if getattr(ns, "background", False):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return background.start("teeio-tsm daemon",
                                ["-m", "tsm", *(sys.argv[1:] if argv is None else argv)],
                                ns.log or state_dir / "daemon.log")
    try:
        daemon = Daemon(state_dir, ns.heartbeat)
    except Exception as exc:      # a bad journal, an unusable state dir, ...: one line
        log.debug("daemon init failed", exc_info=True)
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
        server = ctl.CtlServer(str(ctl_path), daemon.ctl_request).start()
    except Exception as exc:      # any start failure: one line, exit 1
        log.debug("start failed", exc_info=True)
        with contextlib.suppress(Exception):
            daemon.close()
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
    return 0


__all__ = ["Daemon", "DeviceEntry", "VmBinding", "add_arguments", "read_secret",
           "run_command", "write_secret"]
