"""Optional vfio-user transport through libvfio-user (nutanix/libvfio-user), via ctypes.

The same :class:`~vfio_user_dev.platform.Platform` as the pure-Python server
(``server.py``), served by the field's C library instead (docs/design.md decision 1).  The
library is not a dependency: it is loaded at run time from ``$TEEIO_LIBVFIO_USER`` or
the loader's search path (``libvfio-user.so.0``), and without it this backend refuses to
start with one sentence saying so.  Bindings follow the library's
``include/libvfio-user.h`` (LIB_VFIO_USER 0.2; it promises no stable ABI).

How the device is wired to the library::

    vfu_create_ctx(VFU_TRANS_SOCK, path, ATTACH_NB)   the socket is bound here
    vfu_pci_init(PCI Express)                        the library's own config copy stays
                                                     unused: see the config region
    vfu_setup_region  BAR0, BAR1   RW|MEM, trapped   every access reaches the callback
                      CONFIG       RW|ALWAYS_CB      all of config space is the device's
                                                     (the library's capability API knows
                                                     no DOE or IDE)
    vfu_setup_device_dma(register, unregister)       maps feed device.dma (DmaMapSet):
                                                     mmap()ed by the library -> a view;
                                                     not mapped -> refused (DmaFault), or
                                                     with socket_dma: vfu_sgl_read/_write
    vfu_setup_device_nr_irqs(irq.counts)             INTx 1, MSI-X 4 (as the device says)
    vfu_setup_irq_state_callback(INTx, MSI-X)        MASK/UNMASK -> device.irq
    vfu_setup_device_reset_cb / _quiesce_cb          reset, lost client, quiesce
    run thread: select(poll fd) -> vfu_attach_ctx / vfu_run_ctx, one request at a time

Threads.  The library is not thread-safe, so every call into it is made under one
re-entrant lock, the *context lock*.  The run thread holds it while the library handles
one request (device callbacks run then, on that thread); it never holds it while waiting
for the client.  The device's DMA engine takes it for ``vfu_sgl_read``/``vfu_sgl_write``
(it holds no device lock then).  Interrupts are raised with the device lock held, so an
interrupt never waits for the context lock: it is triggered at once when the lock is free
(or already ours), else queued for the run thread, which is woken to trigger it.

Quiesce.  The callback reports the device quiesced at once and never answers -1/EBUSY:
the library calls it only from inside its own functions, all called under the context
lock, so no library DMA call of the engine can run until the library is done; accesses
to mapped memory are tracked by the DmaMapSet itself, whose unmap waits for them (the
library munmaps only after the unregister callback returned).  An EBUSY would oblige us
to call ``vfu_device_quiesced`` later, which nothing here does.

Socket DMA.  Memory the library did not mmap() (DMA_MAP without an fd) can only be
reached with DMA_READ/DMA_WRITE messages (``vfu_sgl_read``/``vfu_sgl_write``), which the
library sends and then waits for the reply on the command socket: a client command sent
meanwhile (a vCPU's MMIO access) is taken for the reply and the connection is out of
step from then on (the library's issue 279; its "twin socket" capability avoids it, but
neither QEMU nor our client offers it).  So this backend refuses socket DMA unless the
server is created with ``socket_dma=True`` (``--libvfio-user-socket-dma``): the access
faults (the job ends with FAULT) and one ERROR is logged.  With the opt-in, a failure the
library reports as EPROTO/EINVAL (a reply out of step) shuts the connection down, so that
the library resets instead of reading on from a corrupt stream.  ``VFU_SGL_DIRECT_ACCESS``
is always passed, so a region with an fd the library did not map (the client's FILE_IO
flag) is read with pread/pwrite rather than over the socket; the library's public API does
not tell such a region from one without an fd, so without the opt-in it is refused too.

Differences from the pure-Python server, all the library's own behaviour: it
negotiates VERSION itself (inside ``vfu_attach_ctx``) and replies with its own
capabilities; it reports the IRQ indices with the EVENTFD flag only; it turns an INTx
unmask eventfd (QEMU's, under KVM) into one UNMASK callback and drops the fd, so INTx is
not automasked here (the sink says ``automask = False``): the line level is re-evaluated
on each UNMASK and each new interrupt event instead; it applies a MASK/UNMASK with
DATA_BOOL to every vector in the range, whatever the bools say; it keeps the eventfds, so
MSI-X is used when MSI-X Enable is set in config space; and DMA to memory without an fd is
refused unless opted in (see Socket DMA).  Guest RAM shared as an fd (QEMU ``share=on``)
never takes that path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import mmap
import os
import select
import socket
import threading
from collections.abc import Callable
from enum import IntEnum, IntFlag
from typing import Any, TypeVar

from teeio.pcie.config import Reg
from teeio.transport import remove_stale_socket
from vfio_user_dev.dma import DmaFault, Inode
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import (
    MAX_DMA_MAPS,
    DmaFlags,
    PciIrq,
    PciRegion,
    ProtocolError,
    RegionFlags,
)

log = logging.getLogger(__name__)
liblog = logging.getLogger(__name__ + ".lib")

ENV_VAR = "TEEIO_LIBVFIO_USER"
SONAME = "libvfio-user.so.0"
SOCKET_DMA_OPTION = "--libvfio-user-socket-dma"

# -- definitions from include/libvfio-user.h ------------------------------------------------


class VfuTrans(IntEnum):
    VFU_TRANS_SOCK = 0


class VfuDevType(IntEnum):
    VFU_DEV_TYPE_PCI = 0


class VfuPciType(IntEnum):
    VFU_PCI_TYPE_CONVENTIONAL = 0
    VFU_PCI_TYPE_PCI_X_1 = 1
    VFU_PCI_TYPE_PCI_X_2 = 2
    VFU_PCI_TYPE_EXPRESS = 3


class VfuRegionFlag(IntFlag):
    VFU_REGION_FLAG_READ = 1 << 0
    VFU_REGION_FLAG_WRITE = 1 << 1
    VFU_REGION_FLAG_MEM = 1 << 2
    VFU_REGION_FLAG_ALWAYS_CB = 1 << 3
    VFU_REGION_FLAG_64_BITS = 1 << 4
    VFU_REGION_FLAG_PREFETCH = 1 << 5


class VfuResetType(IntEnum):
    VFU_RESET_DEVICE = 0
    VFU_RESET_LOST_CONN = 1
    VFU_RESET_PCI_FLR = 2


LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0
VFU_SGL_DIRECT_ACCESS = 1 << 0     # vfu_sgl_read/write: through the client's fd if it has one
# The library refuses a DMA_MAP beyond this many live maps itself; the same cap as the
# map set's (spec "Version": max_dma_maps), which a register callback never meets then.
LIBVFIO_USER_MAX_DMA_REGIONS = MAX_DMA_MAPS
PCI_HEADER_TYPE_NORMAL = 0
# enum vfu_dev_irq_type (VFU_DEV_INTX_IRQ ... VFU_DEV_REQ_IRQ) is linux/vfio.h's order,
# which PciIrq already is; the region indices are PciRegion's.

# syslog(3) levels, as the library logs with them
_SYSLOG_TO_LOGGING = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL,
                      3: logging.ERROR, 4: logging.WARNING, 5: logging.INFO, 6: logging.INFO,
                      7: logging.DEBUG}
LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR = 7, 6, 4, 3


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class VfuDmaInfo(ctypes.Structure):
    """``vfu_dma_info_t``: vaddr and mapping are set only when the library mmap()ed it."""

    _fields_ = [("iova", Iovec), ("vaddr", ctypes.c_void_p), ("mapping", Iovec),
                ("page_size", ctypes.c_size_t), ("prot", ctypes.c_uint32)]


_ctx = ctypes.c_void_p        # vfu_ctx_t *
LogFn = ctypes.CFUNCTYPE(None, _ctx, ctypes.c_int, ctypes.c_char_p)
# ssize_t (vfu_ctx_t *, char *buf, size_t count, loff_t offset, bool is_write)
RegionAccessCb = ctypes.CFUNCTYPE(ctypes.c_ssize_t, _ctx, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_int64, ctypes.c_bool, use_errno=True)
QuiesceCb = ctypes.CFUNCTYPE(ctypes.c_int, _ctx, use_errno=True)
ResetCb = ctypes.CFUNCTYPE(ctypes.c_int, _ctx, ctypes.c_int, use_errno=True)
DmaCb = ctypes.CFUNCTYPE(None, _ctx, ctypes.POINTER(VfuDmaInfo))
IrqStateCb = ctypes.CFUNCTYPE(None, _ctx, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_bool)

# Every function this module calls: (restype, argtypes).  Pointers are c_void_p and sizes
# c_size_t/c_ssize_t, never the default int (which would truncate them to 32 bits).
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "dma_sg_size": (ctypes.c_size_t, []),
    "vfu_create_ctx": (ctypes.c_void_p, [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                         ctypes.c_void_p, ctypes.c_int]),
    "vfu_realize_ctx": (ctypes.c_int, [_ctx]),
    "vfu_attach_ctx": (ctypes.c_int, [_ctx]),
    "vfu_get_poll_fd": (ctypes.c_int, [_ctx]),
    "vfu_run_ctx": (ctypes.c_int, [_ctx]),
    "vfu_destroy_ctx": (None, [_ctx]),
    "vfu_setup_log": (ctypes.c_int, [_ctx, LogFn, ctypes.c_int]),
    "vfu_setup_region": (ctypes.c_int, [_ctx, ctypes.c_int, ctypes.c_size_t, RegionAccessCb,
                                        ctypes.c_int, ctypes.POINTER(Iovec), ctypes.c_uint32,
                                        ctypes.c_int, ctypes.c_uint64]),
    "vfu_setup_device_reset_cb": (ctypes.c_int, [_ctx, ResetCb]),
    "vfu_setup_device_quiesce_cb": (None, [_ctx, QuiesceCb]),
    "vfu_setup_device_dma": (ctypes.c_int, [_ctx, ctypes.c_size_t, DmaCb, DmaCb]),
    "vfu_setup_device_nr_irqs": (ctypes.c_int, [_ctx, ctypes.c_int, ctypes.c_uint32]),
    "vfu_setup_irq_state_callback": (ctypes.c_int, [_ctx, ctypes.c_int, IrqStateCb]),
    "vfu_irq_trigger": (ctypes.c_int, [_ctx, ctypes.c_uint32]),
    "vfu_addr_to_sgl": (ctypes.c_int, [_ctx, ctypes.c_void_p, ctypes.c_size_t,
                                       ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
    "vfu_sgl_read": (ctypes.c_int, [_ctx, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                    ctypes.c_int]),
    "vfu_sgl_write": (ctypes.c_int, [_ctx, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                     ctypes.c_int]),
    "vfu_pci_init": (ctypes.c_int, [_ctx, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "vfu_pci_set_id": (None, [_ctx, ctypes.c_uint16, ctypes.c_uint16, ctypes.c_uint16,
                              ctypes.c_uint16]),
    "vfu_pci_set_class": (None, [_ctx, ctypes.c_uint8, ctypes.c_uint8, ctypes.c_uint8]),
}


# -- loading ---------------------------------------------------------------------------------

class LibraryMissing(RuntimeError):
    """libvfio-user could not be loaded; the message is the one sentence users see."""


def missing_sentence(detail: str) -> str:
    return (f"the libvfio-user backend needs {SONAME}, which could not be loaded ({detail}); "
            f"build or install libvfio-user and point {ENV_VAR}=/path/{SONAME} at it")


def declare(cdll: Any) -> None:
    """Set restype and argtypes of every function in :data:`SIGNATURES` on *cdll*."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(cdll, name)
        fn.restype = restype
        fn.argtypes = argtypes


def load(path: str | None = None) -> Any:
    """The library (a ``ctypes.CDLL`` with errno capture), its functions declared; from
    *path*, else ``$TEEIO_LIBVFIO_USER``, else the loader's search path.  LibraryMissing
    says what is missing and how to point to it."""
    where = path or os.environ.get(ENV_VAR) or SONAME
    try:
        cdll = ctypes.CDLL(where, use_errno=True)
    except OSError as exc:
        origin = (f"{ENV_VAR}={where}" if os.environ.get(ENV_VAR) and not path
                  else f"{ENV_VAR} is not set and the loader found none" if where == SONAME
                  else where)
        raise LibraryMissing(missing_sentence(f"{origin}: {exc}")) from None
    try:
        declare(cdll)
    except AttributeError as exc:
        raise LibraryMissing(missing_sentence(f"{where} lacks a function: {exc}")) from None
    return cdll


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err) if err else 'failed'}")


# -- callbacks: never let an exception cross into C --------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def guarded(default_errno: int = errno.EIO) -> Callable[[F], F]:
    """For a callback returning int: an exception becomes -1 with errno set (the device's
    own refusals keep their errno; a DMA fault is EFAULT; anything else, BaseException
    included, is logged with its traceback and becomes *default_errno*)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any) -> Any:
            try:
                return fn(*args)
            except ProtocolError as exc:
                log.debug("%s refused: %s", fn.__name__, exc)
                ctypes.set_errno(exc.errno)
            except DmaFault as exc:
                log.warning("%s: %s", fn.__name__, exc)
                ctypes.set_errno(errno.EFAULT)
            except BaseException:
                # BaseException too: ctypes would turn a KeyboardInterrupt/SystemExit that
                # escapes a callback into a silent 0, i.e. success (of a reset, a quiesce).
                log.exception("%s failed (answered with errno %s)", fn.__name__,
                              errno.errorcode.get(default_errno, default_errno))
                ctypes.set_errno(default_errno)
            return -1
        return inner  # type: ignore[return-value]
    return wrap


def logged(fn: F) -> F:
    """For a void callback: an exception (BaseException included) is logged with its
    traceback; C gets nothing, and nothing escapes into it."""
    @functools.wraps(fn)
    def inner(*args: Any) -> None:
        try:
            fn(*args)
        except BaseException:
            log.exception("%s failed", fn.__name__)
    return inner  # type: ignore[return-value]


def _file_behind(vaddr: int) -> tuple[Inode | None, int]:
    """(device, inode) and file offset of the mapping that holds *vaddr* in this process,
    from /proc/self/maps: the identity of the client's file the library mmap()ed."""
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= vaddr < hi:
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                inode = int(fields[4])
                offset = int(fields[2], 16) + vaddr - lo
                return ((os.makedev(major, minor), inode) if inode else None), offset
    return None, 0


class DeviceCallbacks:
    """The device model as the library calls it: one ctypes callback per hook.  The
    objects live as long as this instance, which the server keeps until the context is
    destroyed."""

    def __init__(self, platform: Platform, on_lost_client: Callable[[], None]) -> None:
        self.platform = platform
        self.device = platform.device
        self.on_lost_client = on_lost_client
        self.region = {int(index): RegionAccessCb(self._region_cb(int(index)))
                       for index in self.device.REGIONS}
        self.quiesce = QuiesceCb(self._quiesce)
        self.reset = ResetCb(self._reset)
        self.dma_register = DmaCb(self._dma_register)
        self.dma_unregister = DmaCb(self._dma_unregister)
        self.irq_state = {int(index): IrqStateCb(self._irq_state_cb(int(index)))
                          for index in (PciIrq.INTX, PciIrq.MSIX)}
        self.log = LogFn(self._log)

    def _region_cb(self, index: int) -> Callable[[Any, int, int, int, bool], int]:
        @guarded()
        def region_access(_ctx: Any, buf: int, count: int, offset: int, is_write: bool) -> int:
            if is_write:
                self.platform.region_write(index, offset, ctypes.string_at(buf, count))
            else:
                data = self.platform.region_read(index, offset, count)
                if len(data) != count:
                    raise RuntimeError(f"region {index} read returned {len(data)} of "
                                       f"{count} bytes")
                ctypes.memmove(buf, data, count)
            return count
        return region_access

    @guarded()
    def _quiesce(self, _ctx: Any) -> int:
        # Always 0, never -1/EBUSY: nothing of ours can be mid-call into the library (see
        # the module docstring), and an EBUSY would oblige us to call vfu_device_quiesced
        # later, which nothing here does (the library would wait forever).  Keep it so.
        return 0

    @guarded()
    def _reset(self, _ctx: Any, kind: int) -> int:
        if kind == VfuResetType.VFU_RESET_LOST_CONN:
            self.on_lost_client()
        elif kind in (VfuResetType.VFU_RESET_DEVICE, VfuResetType.VFU_RESET_PCI_FLR):
            self.platform.reset("flr" if kind == VfuResetType.VFU_RESET_PCI_FLR
                              else "client_reset")
        else:
            raise ProtocolError(errno.EINVAL, f"unknown reset type {kind}")
        return 0

    @logged
    def _dma_register(self, _ctx: Any, info_p: Any) -> None:
        info = info_p.contents
        address, size = info.iova.iov_base or 0, int(info.iova.iov_len)
        flags = ((DmaFlags.READ if info.prot & mmap.PROT_READ else 0)
                 | (DmaFlags.WRITE if info.prot & mmap.PROT_WRITE else 0))
        if self.platform.dma.has(address, size, flags, bool(info.vaddr)):
            log.debug("DMA map %#x+%#x announced again: already there", address, size)
            return      # the library repeats the callback for an identical DMA_MAP
        view: memoryview | None = None
        inode: Inode | None = None
        fd_offset = 0
        if info.vaddr:
            view = memoryview((ctypes.c_ubyte * size).from_address(info.vaddr)).cast("B")
            inode, fd_offset = _file_behind(info.vaddr)
        self.platform.dma.map_view(address, size, flags, view, fd_offset=fd_offset, inode=inode)
        log.debug("DMA_MAP %#x+%#x flags=%d %s", address, size, flags,
                  "mapped" if view is not None else "no-fd")

    @logged
    def _dma_unregister(self, _ctx: Any, info_p: Any) -> None:
        info = info_p.contents
        self.platform.dma.unmap(info.iova.iov_base or 0, int(info.iova.iov_len))

    def _irq_state_cb(self, index: int) -> Callable[[Any, int, int, bool], None]:
        @logged
        def irq_state(_ctx: Any, start: int, count: int, mask: bool) -> None:
            with self.device._lock:     # an unmask may replay: device lock first, as ever
                self.device.irq.mask(index, range(start, start + count), bool(mask))
        return irq_state

    @staticmethod
    def _log(_ctx: Any, level: int, msg: bytes | None) -> None:
        with contextlib.suppress(Exception):    # logging must never raise into C
            liblog.log(_SYSLOG_TO_LOGGING.get(level, logging.INFO), "%s",
                       (msg or b"").decode(errors="replace").rstrip())


def _syslog_level(logger: logging.Logger) -> int:
    level = logger.getEffectiveLevel()
    return (LOG_DEBUG if level <= logging.DEBUG else LOG_INFO if level <= logging.INFO
            else LOG_WARNING if level <= logging.WARNING else LOG_ERR)


# -- the transport -----------------------------------------------------------------------------

class LibVfioUserServer:
    """Serves *device* on the UNIX socket *path* through libvfio-user, one client at a
    time; the same interface as :class:`vfio_user_dev.server.Server` (``serve_forever``,
    ``close``, ``clients``).  *socket_dma*: reach memory without an fd with DMA_READ/
    DMA_WRITE messages despite the risk (module docstring, Socket DMA); refused otherwise."""

    def __init__(self, path: str, platform: Platform, lib: Any | None = None, *,
                 socket_dma: bool = False) -> None:
        self.path = path
        self.platform = platform
        self.device = platform.device
        self.lib = lib if lib is not None else load()
        self.socket_dma = socket_dma
        self.clients = 0
        self.max_clients: int | None = None
        self._lock = threading.RLock()          # the context lock (module docstring)
        self._stop = threading.Event()
        self._attached = False
        self._socket_dma_refusal_logged = False
        # Interrupts waiting for the context lock: (index, vector, device generation).
        # _queue_lock also guards the wake pipe's fds (written, read, closed under it).
        self._pending_irqs: list[tuple[int, int, int]] = []
        self._queue_lock = threading.Lock()
        # Our own dup of the client connection (made under the context lock when it is
        # attached): close() shuts it down without asking the library, which it may not
        # call unlocked; closed when the client is lost and when the context is destroyed.
        self._conn: socket.socket | None = None
        self._conn_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sg_size = int(self.lib.dma_sg_size())
        self.callbacks = DeviceCallbacks(platform, self._lost_client)
        remove_stale_socket(path)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ctx = self.lib.vfu_create_ctx(VfuTrans.VFU_TRANS_SOCK, path.encode(),
                                      LIBVFIO_USER_FLAG_ATTACH_NB, None,
                                      VfuDevType.VFU_DEV_TYPE_PCI)
        if not ctx:
            err = _oserror(f"vfu_create_ctx({path})")
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise err
        self._ctx: int | None = ctx
        try:
            self._setup(ctx)
        except BaseException:
            self._destroy()
            raise
        self._irq_sink = _LibIrqSink(self)
        self.device.irq.sink = self._irq_sink

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise _oserror(what)

    def _setup(self, ctx: int) -> None:
        lib, cb, dev = self.lib, self.callbacks, self.device
        self._check(lib.vfu_setup_log(ctx, cb.log, _syslog_level(liblog)), "vfu_setup_log")
        self._check(lib.vfu_pci_init(ctx, VfuPciType.VFU_PCI_TYPE_EXPRESS,
                                     PCI_HEADER_TYPE_NORMAL, 0), "vfu_pci_init")
        cfg = dev.config
        lib.vfu_pci_set_id(ctx, cfg.get(Reg.VENDOR_ID, 2), cfg.get(Reg.DEVICE_ID, 2),
                           cfg.get(Reg.SUBSYSTEM_VENDOR_ID, 2), cfg.get(Reg.SUBSYSTEM_ID, 2))
        klass = cfg.get(Reg.CLASS_CODE, 3)
        lib.vfu_pci_set_class(ctx, klass >> 16, (klass >> 8) & 0xFF, klass & 0xFF)
        for index, spec in dev.REGIONS.items():
            flags = VfuRegionFlag(0)
            if spec.flags & RegionFlags.READ:
                flags |= VfuRegionFlag.VFU_REGION_FLAG_READ
            if spec.flags & RegionFlags.WRITE:
                flags |= VfuRegionFlag.VFU_REGION_FLAG_WRITE
            # Config space: every access to the device's callback.  BARs: memory, no fd,
            # so never mappable: every access traps (docs/design.md decision 7).
            flags |= (VfuRegionFlag.VFU_REGION_FLAG_ALWAYS_CB if index == PciRegion.CONFIG
                      else VfuRegionFlag.VFU_REGION_FLAG_MEM)
            self._check(lib.vfu_setup_region(ctx, int(index), spec.size, cb.region[int(index)],
                                             int(flags), None, 0, -1, 0),
                        f"vfu_setup_region({PciRegion(index).name})")
        self._check(lib.vfu_setup_device_reset_cb(ctx, cb.reset), "vfu_setup_device_reset_cb")
        lib.vfu_setup_device_quiesce_cb(ctx, cb.quiesce)
        self._check(lib.vfu_setup_device_dma(ctx, LIBVFIO_USER_MAX_DMA_REGIONS,
                                             cb.dma_register, cb.dma_unregister),
                    "vfu_setup_device_dma")
        for irq, count in dev.irq.counts.items():
            self._check(lib.vfu_setup_device_nr_irqs(ctx, int(irq), count),
                        f"vfu_setup_device_nr_irqs({PciIrq(irq).name})")
        for irq, state_cb in cb.irq_state.items():
            self._check(lib.vfu_setup_irq_state_callback(ctx, irq, state_cb),
                        f"vfu_setup_irq_state_callback({PciIrq(irq).name})")
        self._check(lib.vfu_realize_ctx(ctx), "vfu_realize_ctx")

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the run thread (vfu_attach_ctx, vfu_run_ctx)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="libvfio-user", daemon=True)
            self._thread.start()

    def serve_forever(self, max_clients: int | None = None) -> None:
        self.max_clients = max_clients
        log.info("listening on %s (libvfio-user)", self.path)
        self.start()
        assert self._thread is not None
        while self._thread.is_alive():
            self._thread.join(0.2)      # in steps, so that signal handlers run

    def close(self) -> None:
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is None:
            with self._lock:
                self._destroy()
            return
        if thread is threading.current_thread():
            return
        thread.join(2)
        if thread.is_alive():
            # Stuck inside the library waiting for a client that sends nothing: shut the
            # connection down under it, through our own dup (the library is not asked).
            self._shutdown_conn()
            thread.join(5)
            if thread.is_alive():
                log.error("libvfio-user run thread did not stop within 7 s of close(); "
                          "leaving it (a daemon thread) and the context behind")

    def _shutdown_conn(self) -> None:
        """Shut the client connection down (both directions) through our dup: the library
        then sees the client gone and resets."""
        with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)

    def _close_conn(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _wake(self) -> None:
        with self._queue_lock:
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):      # full (non-blocking): already woken
                os.write(self._wake_w, b"!")

    def _destroy(self) -> None:
        """Destroy the context (under the lock, or before any thread runs): the library
        unregisters the DMA maps, resets, closes the eventfds and removes the socket."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self.lib.vfu_destroy_ctx(ctx)
        self._close_conn()
        if self.device.irq.sink is getattr(self, "_irq_sink", None):
            self.device.irq.sink = None
        with self._queue_lock:
            self._pending_irqs.clear()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    # -- the run thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    assert self._ctx is not None
                    fd = int(self.lib.vfu_get_poll_fd(self._ctx))
                wake = self._wake_r     # closed only by _destroy, on this thread
                try:
                    ready, _, _ = select.select([fd, wake], [], [])
                except OSError:
                    continue        # the fd went away under us (a reset in a DMA call)
                if wake in ready:
                    with self._queue_lock, contextlib.suppress(BlockingIOError):
                        os.read(wake, 4096)
                with self._lock:
                    self._flush_irqs()
                if self._stop.is_set() or fd not in ready:
                    continue
                if not self._attached:
                    self._attach()
                else:
                    self._serve()
                if (self.max_clients is not None and self.clients >= self.max_clients
                        and not self._attached):
                    break
        except Exception:
            log.exception("libvfio-user run thread failed")
        finally:
            with self._lock:
                self._destroy()

    def _attach(self) -> None:
        with self._lock:
            assert self._ctx is not None
            self.clients += 1       # counted when accepted, as the Python server does
            if self.lib.vfu_attach_ctx(self._ctx) < 0:
                self.clients -= 1
                err = ctypes.get_errno()
                if err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    log.warning("client not attached: %s", os.strerror(err))
                return
            self._attached = True
            self.platform.events.emit("client_connected", client=self.clients,
                                    transport="libvfio-user")
            self.platform.dma.remote_read = self._remote_read
            self.platform.dma.remote_write = self._remote_write
            fd = int(self.lib.vfu_get_poll_fd(self._ctx))
            try:
                conn = socket.socket(fileno=os.dup(fd))
            except OSError as exc:
                log.warning("no dup of the client connection (fd %d): %s", fd, exc)
            else:
                with self._conn_lock:
                    old, self._conn = self._conn, conn
                if old is not None:
                    old.close()
        log.info("client connected (libvfio-user negotiated VERSION)")

    def _serve(self) -> None:
        """Handle the requests waiting on the socket, one per call and lock hold."""
        while not self._stop.is_set():
            with self._lock:
                if self._ctx is None or not self._attached:
                    return
                rc = int(self.lib.vfu_run_ctx(self._ctx))
                err = ctypes.get_errno()
                self._flush_irqs()
            if rc == 0:
                return
            if rc < 0:
                if err == errno.ENOTCONN:
                    log.info("client disconnected")
                else:
                    log.warning("vfu_run_ctx: %s", os.strerror(err))
                return

    def _lost_client(self) -> None:
        """The library's VFU_RESET_LOST_CONN: the client is gone (its DMA maps were
        unregistered just before); drop its state and reset the device, as the Python
        server does.  Also called when the context is destroyed."""
        if not self._attached:
            return
        self._attached = False
        self._close_conn()
        with self._queue_lock:
            # An interrupt queued for the lost client must not reach the next one (as a
            # PBA bit set when it turns out undeliverable); entries also carry the device
            # generation, which the reset below moves on, for any queued after this.
            self._pending_irqs.clear()
            self._wake_locked()     # the run thread polls another fd now (a reset may
                                    # come from a DMA call on the engine thread)
        self.platform.dma.remote_read = None
        self.platform.dma.remote_write = None
        self.platform.client_gone("connection lost", self.clients)

    # -- interrupts ---------------------------------------------------------------------------
    def trigger(self, index: int, vector: int) -> None:
        """vfu_irq_trigger now if the context lock is free (or ours), else on the run
        thread; the IRQ controller hears the outcome."""
        if self._lock.acquire(blocking=False):
            try:
                self._trigger_now(index, vector)
            finally:
                self._lock.release()
            return
        with self._queue_lock:
            self._pending_irqs.append((index, vector, self.device.generation))
            if len(self._pending_irqs) == 1:    # empty -> non-empty: wake the run thread
                self._wake_locked()

    def _flush_irqs(self) -> None:
        """Trigger the queued interrupts (under the context lock); one queued before a
        reset of the device (or the loss of its client) is dropped silently."""
        with self._queue_lock:
            pending, self._pending_irqs = self._pending_irqs, []
        for index, vector, generation in pending:
            if generation != self.device.generation:
                log.debug("queued %s %d dropped: the device was reset since",
                          PciIrq(index).name, vector)
                continue
            self._trigger_now(index, vector)

    def _trigger_now(self, index: int, vector: int) -> None:
        irq = self.device.irq
        if self._ctx is None or not self._attached:
            irq.undelivered(index, vector)
            return
        if self.lib.vfu_irq_trigger(self._ctx, vector) < 0:
            err = ctypes.get_errno()
            log.debug("vfu_irq_trigger(%s %d): %s", PciIrq(index).name, vector,
                      os.strerror(err))
            irq.undelivered(index, vector)
            return
        irq.delivered(index, vector)

    # -- DMA to memory the library did not map (vfu_sgl_read / vfu_sgl_write) ----------------
    def _sgl(self, address: int, length: int, prot: int) -> ctypes.Array[ctypes.c_char]:
        """One scatter/gather entry for guest *address*+*length* (under the lock)."""
        assert self._ctx is not None
        sg = ctypes.create_string_buffer(self._sg_size)
        n = int(self.lib.vfu_addr_to_sgl(self._ctx, address, length, sg, 1, prot))
        if n == 1:
            return sg
        if n < -1:
            raise DmaFault(f"DMA {address:#x}+{length:#x} spans {-n - 1} library regions")
        raise DmaFault(f"DMA {address:#x}+{length:#x}: {os.strerror(ctypes.get_errno())}")

    def _refuse_socket_dma(self, what: str, address: int, length: int) -> DmaFault:
        if not self._socket_dma_refusal_logged:
            self._socket_dma_refusal_logged = True
            log.error("DMA to guest memory without an fd (DMA_MAP without one: QEMU without "
                      "share=on guest RAM) refused: libvfio-user would send DMA_READ/"
                      "DMA_WRITE and take a client command sent meanwhile for the reply, "
                      "desynchronising the connection (libvfio-user issue 279); the job "
                      "ends with FAULT. Share guest RAM as an fd, use the python backend, "
                      "or accept the risk with %s", SOCKET_DMA_OPTION)
        return DmaFault(f"DMA {what} {address:#x}+{length:#x}: memory without an fd, socket "
                        f"DMA refused on the libvfio-user backend ({SOCKET_DMA_OPTION})")

    def _sgl_failed(self, call: str, address: int, length: int) -> DmaFault:
        """The DmaFault for a failed vfu_sgl_*; a reply out of step (EPROTO, EINVAL)
        shuts the connection down, so that the library resets rather than reading on."""
        err = ctypes.get_errno()
        if err in (errno.EPROTO, errno.EINVAL):
            log.error("%s %#x+%#x: %s: the connection is out of step; shutting it down",
                      call, address, length, os.strerror(err))
            self._shutdown_conn()
        return DmaFault(f"{call} {address:#x}+{length:#x}: {os.strerror(err) or 'failed'}")

    def _remote_read(self, address: int, length: int) -> bytes:
        if not self.socket_dma:
            raise self._refuse_socket_dma("read", address, length)
        with self._lock:
            if self._ctx is None or not self._attached:
                raise DmaFault(f"DMA read at {address:#x}: no client")
            sg = self._sgl(address, length, mmap.PROT_READ)
            buf = ctypes.create_string_buffer(length)
            if self.lib.vfu_sgl_read(self._ctx, sg, 1, buf, VFU_SGL_DIRECT_ACCESS) < 0:
                raise self._sgl_failed("vfu_sgl_read", address, length)
            return buf.raw

    def _remote_write(self, address: int, data: bytes) -> None:
        if not self.socket_dma:
            raise self._refuse_socket_dma("write", address, len(data))
        with self._lock:
            if self._ctx is None or not self._attached:
                raise DmaFault(f"DMA write at {address:#x}: no client")
            sg = self._sgl(address, len(data), mmap.PROT_WRITE)
            buf = ctypes.create_string_buffer(data, len(data))
            if self.lib.vfu_sgl_write(self._ctx, sg, 1, buf, VFU_SGL_DIRECT_ACCESS) < 0:
                raise self._sgl_failed("vfu_sgl_write", address, len(data))


class _LibIrqSink:
    """The IRQ controller's sink when the library holds the client's eventfds.  The
    library keeps one eventfd array for INTx and MSI-X, so the device uses MSI-X when
    MSI-X Enable is set in its config space and INTx otherwise (PCIe 6.x §7.7.2.2)."""

    automask = False    # the library drops QEMU's INTx unmask eventfd (see the module doc)

    def __init__(self, server: LibVfioUserServer) -> None:
        self.server = server

    def ready(self, index: int, vector: int) -> bool:
        msix = self.server.device.msix_enabled()
        return msix if index == PciIrq.MSIX else index == PciIrq.INTX and not msix

    def signal(self, index: int, vector: int) -> None:
        self.server.trigger(index, vector)
