"""The accelerator personality (the default): the BAR0 register file (``bar0.py``, map in
``teeio/device_regs.py``) and the DMA engine (``dma_engine.py``); class 12:00:00."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vfio_user_dev.bar0 import Bar0Registers
from vfio_user_dev.config_space import ACCELERATOR_LAYOUT, FunctionLayout
from vfio_user_dev.dma_engine import DmaEngine

if TYPE_CHECKING:
    from vfio_user_dev.device import TeeIoDevice


class AcceleratorPersonality:
    """The register file and the engine it starts jobs in.  The engine sees TDI state
    changes through the device's epoch (``tee.py``), so :meth:`quiesce` has nothing to do."""

    layout: FunctionLayout = ACCELERATOR_LAYOUT

    def __init__(self, device: TeeIoDevice) -> None:
        self.engine = DmaEngine(device)
        self.bar0 = Bar0Registers(irq_count=lambda: device.irq.signalled,
                                  interrupts_changed=lambda: self.engine.update_irq(0),
                                  go=self.engine.start_job)
        self.engine.bar0 = self.bar0
        # TEE MMIO the TDISP gate let through: straight to the register file (one call
        # less on every access)
        self.bar0_read: Callable[[int, int], bytes] = self.bar0.read
        self.bar0_write: Callable[[int, bytes], None] = self.bar0.write

    @property
    def listeners(self) -> list[Callable[[TeeIoDevice], None]]:
        return self.engine.listeners

    def start(self) -> None:
        self.engine.start()


    def memory_attached(self, direct: Callable[[int, int], bool]) -> None:
        self.engine.direct_memory = direct      # which jobs may run inline, on GO's thread

    def reset(self) -> None:
        self.engine.drop_jobs()
        self.bar0.reset()

    def quiesce(self) -> None:
        """Queued and running jobs compare the device's epoch themselves."""

    def scrub(self) -> str:
        self.engine.drop_jobs()          # a running or queued job's result is dropped
        self.bar0.scrub()
        self.engine.update_irq(new_bits=0)
        return "BAR0 data and DMA registers, job state"

    def stats(self) -> dict[str, object]:
        total = self.engine.total
        return {"dma_jobs": total["jobs"], "dma_bytes": total["bytes"],
                "dma_errors": total["errors"]}

    def close(self) -> None:
        self.engine.close()
