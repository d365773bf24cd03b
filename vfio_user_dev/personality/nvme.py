"""The NVMe personality: an NVMe 1.4 I/O controller (class 01:08:02, ``nvme/``) with its
registers and doorbells as the 64-bit BAR0 (NVMe 1.4 §3.1), one MSI-X vector per
completion queue and the DOE vector above them (PCIe 6.x §6.30.3); the namespace is a host
file.  DMA and interrupts go through :class:`~vfio_user_dev.personality.nvme_bus.DeviceBus`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from teeio import personality as personalities
from vfio_user_dev.config_space import FunctionLayout
from vfio_user_dev.nvme.controller import BAR0_SIZE, NvmeController
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.spec import IO_QUEUES
from vfio_user_dev.personality import PersonalityFactory
from vfio_user_dev.personality.nvme_bus import DeviceBus

if TYPE_CHECKING:
    from vfio_user_dev.device import TeeIoDevice

#: vectors 0..IO_QUEUES for the admin and I/O completion queues, then DOE's
CQ_VECTORS = IO_QUEUES + 1
NVME_LAYOUT = FunctionLayout(personalities.NVME, BAR0_SIZE, True, CQ_VECTORS + 1,
                             CQ_VECTORS)


class NvmePersonality:
    """The controller over the device's bus; it owns the namespace (closed with it)."""

    layout: FunctionLayout = NVME_LAYOUT

    def __init__(self, device: TeeIoDevice, namespace: Namespace) -> None:
        self.namespace = namespace
        self.bus = DeviceBus(device)
        self.controller = NvmeController(self.bus, namespace, serial=f"{device.serial:016X}",
                                         vectors=CQ_VECTORS)
        self._listeners: list[Callable[[TeeIoDevice], None]] = []

    @property
    def listeners(self) -> list[Callable[[TeeIoDevice], None]]:
        """Kept for the interface: the stats file is written when the server ends."""
        return self._listeners

    def start(self) -> None:
        """The controller's worker runs from its construction."""

    def bar0_read(self, offset: int, count: int) -> bytes:
        return self.controller.read(offset, count)

    def bar0_write(self, offset: int, data: bytes) -> None:
        self.controller.write(offset, data)

    def memory_attached(self, direct: Callable[[int, int], bool]) -> None:
        """Nothing to learn: every command runs on the controller's own thread."""

    def reset(self) -> None:
        self.bus.quiesce()              # a command in flight issues no more DMA
        self.controller.reset()         # CSTS.RDY = 0, queues gone, registers to defaults

    def quiesce(self) -> None:
        self.bus.quiesce()

    def scrub(self) -> str:
        """The queues' addresses and state are the TVM's: the controller resets."""
        self.reset()
        return "NVMe controller registers and queues, commands in flight"

    def stats(self) -> dict[str, object]:
        return {"nvme": {**self.controller.status(), **self.bus.counters,
                         "namespace_path": str(self.namespace.path),
                         "namespace_bytes": self.namespace.size}}

    def close(self) -> None:
        self.controller.close()
        self.namespace.close()


def nvme_personality(namespace: Namespace) -> PersonalityFactory:
    """The factory of an NVMe personality over *namespace*."""
    def make(device: TeeIoDevice) -> NvmePersonality:
        return NvmePersonality(device, namespace)
    return make


__all__ = ["CQ_VECTORS", "NVME_LAYOUT", "NvmePersonality", "nvme_personality"]
