"""The operations on the platform that both vfio-user transports perform: region access
(spec "VFIO_USER_REGION_READ/WRITE"), DMA map and unmap into the map set
("VFIO_USER_DMA_MAP/UNMAP"), device reset ("VFIO_USER_DEVICE_RESET"), interrupt masks
("VFIO_USER_DEVICE_SET_IRQS"), the loss of the client.  The pure-Python session
(``session.py``) calls them after decoding a message, the libvfio-user callbacks
(``libvfio_user/callbacks.py``) after the library did.
"""

from __future__ import annotations

import logging

from vfio_user_dev.dma import Inode
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import IrqSet

log = logging.getLogger(__name__)


class DeviceOperations:
    """One platform, as a vfio-user client reaches it."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return self.platform.region_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.platform.region_write(index, offset, data)

    def dma_map(self, address: int, size: int, flags: int, fd_offset: int,
                fd: int | None) -> None:
        """A map of the client's *fd* (the map set mmap()s it and owns the fd from now on),
        or without memory (None: reached through DMA_READ/DMA_WRITE)."""
        self.platform.dma.map(address, size, flags, fd_offset, fd)
        log.debug("DMA_MAP %#x+%#x flags=%d %s", address, size, flags,
                  "fd" if fd is not None else "no-fd")

    def dma_map_view(self, address: int, size: int, flags: int, view: memoryview | None, *,
                     fd_offset: int = 0, inode: Inode | None = None) -> None:
        """A map of memory a library mmap()ed (*view*), or without memory (None); one
        announced again (identical, live) is left as it is."""
        dma = self.platform.dma
        if dma.has(address, size, flags, view is not None):
            log.debug("DMA map %#x+%#x announced again: already there", address, size)
            return
        dma.map_view(address, size, flags, view, fd_offset=fd_offset, inode=inode)
        log.debug("DMA_MAP %#x+%#x flags=%d %s", address, size, flags,
                  "mapped" if view is not None else "no-fd")

    def dma_unmap(self, address: int, size: int) -> None:
        self.platform.dma.unmap(address, size)

    def reset(self, reason: str) -> None:
        self.platform.reset(reason)

    def set_irqs(self, req: IrqSet, fds: list[int]) -> None:
        """Apply DEVICE_SET_IRQS; the fds the IRQ controller kept are removed from *fds*
        (the caller closes the rest)."""
        device = self.platform.device
        with device.lock:
            leftover = device.irq.set_irqs(req, list(fds))
            for fd in [fd for fd in fds if fd not in leftover]:
                fds.remove(fd)  # now owned by the IRQ controller

    def mask_irqs(self, index: int, vectors: range, masked: bool) -> None:
        device = self.platform.device
        with device.lock:     # an unmask may replay: device lock first, as ever
            device.irq.mask(index, vectors, masked)

    def client_gone(self, reason: str, client: int) -> None:
        """The client went away: the platform resets the device and drops its state."""
        self.platform.client_gone(reason, client)
