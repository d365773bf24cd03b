"""The TSM daemon's tables and how they are shared.

This module owns what every job of the daemon (:mod:`tsm.daemon`) works on: the device
table (:class:`DeviceEntry`), the VM bindings (:class:`VmBinding`), the platform-event
watches and the counters, held by :class:`Registry` with the locks that guard them, and
the per-device serialisation every operation goes through (:meth:`Registry._held`).  It
also holds the checks of names and arguments the control API takes (:func:`_arg`,
:func:`_name`, :func:`_abs`) and the per-VM launch secret's file (:class:`SecretFile`,
:func:`write_secret`, :func:`read_secret`), which is only ever reached through its directory's
fd, opened once.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teeio.ghcx import BOOT_ID_SIZE, SECRET_SIZE
from teeio.platform_channel import StreamState
from tsm.ctl import CtlError
from tsm.device import DeviceConfig, DeviceLink
from tsm.ghcx_server import GhcxServer
from tsm.journal import Journal
from tsm.platform_watch import PlatformWatch
from tsm.tdi import TdiRecord

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
VM_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")     # docs/ghcx.md "Launch secret and VM id"
#: How long a request waits for another operation on the same device to finish before it
#: is answered ``busy`` (ctl) or ``state`` (GHCx); a device being connected answers at once.
OP_WAIT = 30.0


@dataclass
class DeviceEntry:
    """One connected (or known, journaled) device: its link, its TDI's record, its
    stream's state and what the platform said of it."""

    config: DeviceConfig
    link: DeviceLink
    tdi: TdiRecord
    stream_state: StreamState = StreamState.INSECURE
    stream_reason: str | None = None
    requester_id: int | None = None
    last_error: str | None = None
    #: Serialises every operation on this device (:class:`Registry`); ``busy`` says what
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
    """A VM bound to a device's TDI: its GHCx socket and server, its secret's file, and
    the trusted-DMA windows it holds (by window id)."""

    vm: str
    device: str
    ghcx_socket: str
    secret_file: str
    mmio_reporting_offset: int = 0
    windows: dict[int, dict[str, Any]] = field(default_factory=dict)
    server: GhcxServer | None = field(default=None, repr=False)
    #: the secret's file, its directory held open (:class:`SecretFile`); None until opened
    secret: SecretFile | None = field(default=None, repr=False, compare=False)

    def secret_handle(self) -> SecretFile:
        """The secret's file, its directory opened now if it is not yet (after a replay)."""
        if self.secret is None:
            self.secret = SecretFile(Path(self.secret_file))
        return self.secret

    def close_secret(self) -> None:
        if self.secret is not None:
            self.secret.close()
            self.secret = None


#: open a directory: never through a symlink, not inherited by children
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path: Path, create: bool = False) -> int:
    """A file descriptor of directory *path*, which is resolved once (``realpath``) and then
    opened component by component from ``/`` with ``O_NOFOLLOW``: a component swapped for a
    symlink meanwhile fails (``ELOOP``/``ENOTDIR``) instead of being followed.  With
    *create*, missing components are made (mode 0700)."""
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in Path(os.path.realpath(path)).parts[1:]:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


class SecretFile:
    """A VM's launch-secret file, held as its directory's fd and its name: opened once
    (:func:`open_dir`), then every write, read and unlink goes through ``dir_fd=`` with
    ``O_NOFOLLOW``, so swapping the directory (or a component above it) for a symlink later
    cannot redirect the daemon to a file of the same name elsewhere."""

    def __init__(self, path: Path, create: bool = False) -> None:
        if path.name in ("", ".", ".."):
            raise IsADirectoryError(21, "not a file name", str(path))
        self.path = str(path)
        self.name = path.name
        self.dir_fd = open_dir(path.parent, create)

    def __repr__(self) -> str:
        return f"SecretFile({self.path!r})"

    def identity(self) -> tuple[int, int, str]:
        """(device, inode) of the directory and the name: the same file for two of them."""
        st = os.fstat(self.dir_fd)
        return st.st_dev, st.st_ino, self.name

    def lstat(self) -> os.stat_result | None:
        """The file's own status (a symlink is not followed), None if it is missing."""
        try:
            return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def write(self) -> None:
        """A fresh per-VM secret, raw bytes, in a 0600 file (replaced atomically, a symlink
        in its place replaced, not followed).  QEMU hands it to the guest with ``-fw_cfg
        name=opt/org.teeio/ghcx-secret,file=PATH``."""
        tmp = f".{self.name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.dir_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.dir_fd)
        try:
            os.write(fd, secrets.token_bytes(SECRET_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def read(self) -> bytes:
        """The secret, from a regular 0600 file that holds exactly one."""
        fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{self.path}: a GHCx secret file must be a regular file")
            if st.st_mode & 0o077:
                raise PermissionError(f"{self.path}: a GHCx secret file must be mode 0600, "
                                      f"is {st.st_mode & 0o777:o}")
            data = os.read(fd, SECRET_SIZE + 1)
        finally:
            os.close(fd)
        if len(data) != SECRET_SIZE:
            raise ValueError(f"{self.path}: a GHCx secret is {SECRET_SIZE} bytes, "
                             f"not {len(data)}")
        return data

    def unlink(self) -> None:
        """Delete the file in the directory opened at first (a missing one is no error)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name, dir_fd=self.dir_fd)

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def write_secret(path: Path) -> None:
    """A fresh secret in the file at *path* (:meth:`SecretFile.write`; missing directories
    are made, 0700)."""
    sf = SecretFile(path, create=True)
    try:
        sf.write()
    finally:
        sf.close()


def read_secret(path: Path) -> bytes:
    """A VM's secret from its file, which must be 0600 and hold exactly one secret."""
    sf = SecretFile(path)
    try:
        return sf.read()
    finally:
        sf.close()


# -- argument checks (control API) --------------------------------------------------------------

def _arg(args: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """Argument *name* of *kind* (``bool`` is no ``int``), or *default* if absent or null;
    without a default, a missing argument is ``bad_args``."""
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
    """Argument *key*, a device name or VM id that must match *pattern*."""
    v = _arg(args, key, str)
    if not pattern.fullmatch(v):
        raise CtlError("bad_args", f"{key} {v!r}: use 1-{16 if pattern is VM_ID_RE else 32} "
                                   "characters of [A-Za-z0-9._-]")
    return str(v)


def _abs(path: str) -> str:
    """*path* made absolute (against the daemon's working directory), not resolved."""
    return str(Path(path).absolute())


class Registry:
    """The TSM's tables (devices, VMs, platform watches, counters) and their locks: the
    base every job of the daemon (:class:`tsm.daemon.Daemon`) is built on.  Thread-safe,
    and one device's slow or stalled I/O delays only the requests for that device.  The
    locks, in the only order they are taken:

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

    #: the journal (``tsm/journal.py``), opened by the daemon before anything is replayed
    journal: Journal

    def __init__(self, state_dir: Path) -> None:
        """Empty tables, a fresh boot id; nothing is read or written yet."""
        self.state_dir = state_dir
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

    def _count(self, key: str) -> None:
        """One more of counter *key* (``status``'s ``counters``)."""
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
        """The entry of device *name*, or ``busy`` (being connected) or ``failed``.  Under
        :attr:`lock`."""
        dev = self.devices.get(name)
        if dev is None:
            if name in self._connecting:
                raise DeviceBusy(f"device {name} is busy: being connected")
            raise CtlError("failed", f"no device {name!r} (connect it first)")
        return dev

