"""ctypes bindings of libvfio-user (nutanix/libvfio-user, ``include/libvfio-user.h``,
LIB_VFIO_USER 0.2; it promises no stable ABI): the enums and structs, the callback types,
the restype/argtypes of every function called, and loading the library.

The library is not a dependency: it is loaded at run time from ``$TEEIO_LIBVFIO_USER`` or
the loader's search path (``libvfio-user.so.0``); :class:`LibraryMissing` says, in one
sentence, what is missing and how to point to it.
"""

from __future__ import annotations

import ctypes
import logging
import os
from enum import IntEnum, IntFlag
from typing import Any

from vfio_user_dev.protocol import MAX_DMA_MAPS

ENV_VAR = "TEEIO_LIBVFIO_USER"
SONAME = "libvfio-user.so.0"

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
SYSLOG_TO_LOGGING = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL,
                     3: logging.ERROR, 4: logging.WARNING, 5: logging.INFO, 6: logging.INFO,
                     7: logging.DEBUG}
LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR = 7, 6, 4, 3


def syslog_level(logger: logging.Logger) -> int:
    """The library's log level (syslog) for what *logger* lets through."""
    level = logger.getEffectiveLevel()
    return (LOG_DEBUG if level <= logging.DEBUG else LOG_INFO if level <= logging.INFO
            else LOG_WARNING if level <= logging.WARNING else LOG_ERR)


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

# Every function the backend calls: (restype, argtypes).  Pointers are c_void_p and sizes
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


def oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err) if err else 'failed'}")

