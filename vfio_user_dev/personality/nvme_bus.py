"""The NVMe controller's way out of the function (``nvme.controller.Bus``): DMA through
the device's link endpoint gated as the accelerator's engine is (PCIe 6.x §11.2.1,
``enforcement.dma_route``), MSI-X vectors and INTx through the device's IRQ controller.

Each command's route (T bit, stream, or the refusal) is decided when it is fetched; a
command fetched before the TDI changed state (QUIESCE) or before a reset issues no more
DMA, and completions of a read issued in RUN that arrive after the TDI left it are
dropped.  Every refusal is counted by kind with the device's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from teeio.pcie.config import Command, Reg, Status
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.dma_engine import DmaRefused
from vfio_user_dev.enforcement import dma_route
from vfio_user_dev.protocol import PciIrq

if TYPE_CHECKING:
    from vfio_user_dev.device import TeeIoDevice

log = logging.getLogger("vfio_user_dev.device")     # the device model's one log


@dataclass(frozen=True)
class CommandRoute:
    """How one command's DMA goes out, decided when it was fetched."""

    epoch: int
    t_bit: bool = False
    stream_id: int | None = None
    refused: str | None = None       # why TDISP does not let the device issue it


class DeviceBus:
    """The controller's bus.  ``epoch`` moves on at every TDI state change and reset
    (:meth:`quiesce`, under the device lock); one worker thread runs the commands."""

    def __init__(self, device: TeeIoDevice) -> None:
        self.device = device
        self.epoch = 0
        self.route = CommandRoute(-1, refused="no command started")
        self.counters = {"dma_reads": 0, "dma_writes": 0, "dma_bytes": 0, "dma_refused": 0,
                         "dma_faults": 0}

    def quiesce(self) -> None:
        """Commands fetched until now issue no more DMA."""
        self.epoch += 1

    # -- nvme.controller.Bus -----------------------------------------------------------------
    def begin_command(self) -> None:
        dev = self.device
        with dev.lock:
            route = dma_route(dev.tdi_state(), dev.tee.tee_access, dev.bound_stream())
            self.route = (CommandRoute(self.epoch, refused=route) if isinstance(route, str)
                          else CommandRoute(self.epoch, *route))

    def _check(self, what: str) -> CommandRoute:
        """The current command's route if it may issue *what* now; else counted, raised."""
        dev, route = self.device, self.route
        with dev.lock:
            if not dev.config.get(Reg.COMMAND, 2) & Command.BUS_MASTER:
                self.counters["dma_faults"] += 1
                raise DmaFault(f"{what}: Bus Master Enable is off")
            if route.refused is not None:       # §11.2.1: none in CONFIG_LOCKED / ERROR
                self.counters["dma_refused"] += 1
                dev.tee.refusals.add("dma_not_allowed", f"NVMe {what}: {route.refused}: "
                                                        "nothing sent")
                raise DmaRefused(f"{what}: {route.refused}")
            if route.epoch != self.epoch:
                self.counters["dma_refused"] += 1
                dev.tee.refusals.add("dma_aborted", f"NVMe {what}: the TDI changed state "
                                                    "(or the function reset) since the "
                                                    "command was fetched")
                raise DmaRefused(f"{what}: command aborted (QUIESCE)")
        return route

    def dma_read(self, address: int, length: int) -> bytes:
        what = f"read {address:#x}+{length}"
        route = self._check(what)
        try:
            data = self.device.link_end.read(address, length, t_bit=route.t_bit,
                                             stream_id=route.stream_id)
        except DmaFault:
            self.counters["dma_faults"] += 1
            raise
        if route.t_bit and route.epoch != self.epoch:
            # §11.2.1: completions of a read issued in RUN only while still in that RUN.
            with self.device.lock:
                self.counters["dma_refused"] += 1
                self.device.tee.refusals.add("dma_late_completion", f"NVMe {what}: the TDI "
                                             "left RUN before its completions arrived")
            raise DmaRefused("completions arrived after the TDI left RUN: dropped")
        self.counters["dma_reads"] += 1
        self.counters["dma_bytes"] += length
        return data

    def dma_write(self, address: int, data: bytes) -> None:
        route = self._check(f"write {address:#x}+{len(data)}")
        try:
            self.device.link_end.write(address, data, t_bit=route.t_bit,
                                       stream_id=route.stream_id)
        except DmaFault:
            self.counters["dma_faults"] += 1
            raise
        self.counters["dma_writes"] += 1
        self.counters["dma_bytes"] += len(data)

    def interrupt(self, vector: int) -> None:
        """MSI-X *vector*: signalled, or pending while masked or without an eventfd
        (§7.7.2.5)."""
        irq = self.device.irq
        if 0 <= vector < irq.counts[PciIrq.MSIX]:
            irq.raise_msix(vector)

    def msix_enabled(self) -> bool:
        return self.device.msix_enabled()

    def set_intx(self, level: bool) -> None:
        """The INTx level and Status Interrupt Status (§7.5.1.2)."""
        dev = self.device
        with dev.lock:
            status = dev.config.get(Reg.STATUS, 2) & ~Status.INTERRUPT_STATUS
            if level:
                status |= Status.INTERRUPT_STATUS
            dev.config.poke(Reg.STATUS, 2, status)
            dev.irq.set_intx(level)
