"""The device as libvfio-user calls it: one ctypes callback per hook (region access,
reset, quiesce, DMA register/unregister, IRQ state, log), none of which lets an exception
cross into C.  Each performs the same operation as the pure-Python session
(``operations.DeviceOperations``), with the arguments the library decoded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import mmap
import os
from collections.abc import Callable
from typing import Any, TypeVar

from vfio_user_dev.dma import DmaFault, Inode
from vfio_user_dev.libvfio_user.bindings import (
    SYSLOG_TO_LOGGING,
    DmaCb,
    IrqStateCb,
    LogFn,
    QuiesceCb,
    RegionAccessCb,
    ResetCb,
    VfuResetType,
)
from vfio_user_dev.operations import DeviceOperations
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import DmaFlags, PciIrq, ProtocolError

log = logging.getLogger("vfio_user_dev.libvfio_user")     # the backend's one log
liblog = logging.getLogger("vfio_user_dev.libvfio_user.lib")

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
        self.ops = DeviceOperations(platform)
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
                self.ops.region_write(index, offset, ctypes.string_at(buf, count))
            else:
                data = self.ops.region_read(index, offset, count)
                if len(data) != count:
                    raise RuntimeError(f"region {index} read returned {len(data)} of "
                                       f"{count} bytes")
                ctypes.memmove(buf, data, count)
            return count
        return region_access

    @guarded()
    def _quiesce(self, _ctx: Any) -> int:
        # Always 0, never -1/EBUSY: nothing of ours can be mid-call into the library (the
        # library calls it only under the backend's context lock), and an EBUSY would
        # oblige us to call vfu_device_quiesced later, which nothing here does (the
        # library would wait forever).  Keep it so.
        return 0

    @guarded()
    def _reset(self, _ctx: Any, kind: int) -> int:
        if kind == VfuResetType.VFU_RESET_LOST_CONN:
            self.on_lost_client()
        elif kind in (VfuResetType.VFU_RESET_DEVICE, VfuResetType.VFU_RESET_PCI_FLR):
            self.ops.reset("flr" if kind == VfuResetType.VFU_RESET_PCI_FLR else "client_reset")
        else:
            raise ProtocolError(errno.EINVAL, f"unknown reset type {kind}")
        return 0

    @logged
    def _dma_register(self, _ctx: Any, info_p: Any) -> None:
        info = info_p.contents
        address, size = info.iova.iov_base or 0, int(info.iova.iov_len)
        flags = ((DmaFlags.READ if info.prot & mmap.PROT_READ else 0)
                 | (DmaFlags.WRITE if info.prot & mmap.PROT_WRITE else 0))
        view: memoryview | None = None
        inode: Inode | None = None
        fd_offset = 0
        if info.vaddr:
            view = memoryview((ctypes.c_ubyte * size).from_address(info.vaddr)).cast("B")
            inode, fd_offset = _file_behind(info.vaddr)
        self.ops.dma_map_view(address, size, flags, view, fd_offset=fd_offset, inode=inode)

    @logged
    def _dma_unregister(self, _ctx: Any, info_p: Any) -> None:
        info = info_p.contents
        self.ops.dma_unmap(info.iova.iov_base or 0, int(info.iova.iov_len))

    def _irq_state_cb(self, index: int) -> Callable[[Any, int, int, bool], None]:
        @logged
        def irq_state(_ctx: Any, start: int, count: int, mask: bool) -> None:
            self.ops.mask_irqs(index, range(start, start + count), bool(mask))
        return irq_state

    @staticmethod
    def _log(_ctx: Any, level: int, msg: bytes | None) -> None:
        with contextlib.suppress(Exception):    # logging must never raise into C
            liblog.log(SYSLOG_TO_LOGGING.get(level, logging.INFO), "%s",
                       (msg or b"").decode(errors="replace").rstrip())
