"""Optional vfio-user transport through libvfio-user (nutanix/libvfio-user), via ctypes:
the bindings (``bindings.py``), the device's callbacks (``callbacks.py``) and the backend
with its run loop (``backend.py``).  Notes: docs/device-internals.md.
"""

from vfio_user_dev.libvfio_user.backend import SOCKET_DMA_OPTION, LibIrqSink, LibVfioUserServer
from vfio_user_dev.libvfio_user.bindings import (
    ENV_VAR,
    SIGNATURES,
    SONAME,
    VFU_SGL_DIRECT_ACCESS,
    DmaCb,
    Iovec,
    IrqStateCb,
    LibraryMissing,
    LogFn,
    QuiesceCb,
    RegionAccessCb,
    ResetCb,
    VfuDmaInfo,
    VfuResetType,
    declare,
    load,
)
from vfio_user_dev.libvfio_user.callbacks import DeviceCallbacks, guarded, liblog, log, logged

__all__ = ["ENV_VAR", "SIGNATURES", "SOCKET_DMA_OPTION", "SONAME", "VFU_SGL_DIRECT_ACCESS",
           "DeviceCallbacks", "DmaCb", "Iovec", "IrqStateCb", "LibIrqSink", "LibVfioUserServer",
           "LibraryMissing", "LogFn", "QuiesceCb", "RegionAccessCb", "ResetCb", "VfuDmaInfo",
           "VfuResetType", "declare", "guarded", "liblog", "load", "log", "logged"]
