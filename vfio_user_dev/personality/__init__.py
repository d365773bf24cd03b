"""The device's personality: what its BAR0 does behind the same config space, link, DOE
and TDISP machinery (PCIe 6.x §7.5.1 identity; §11.2 actions on TDI state changes).

The accelerator (``accelerator.py``, the default) and the NVMe controller (``nvme.py``)
implement :class:`Personality`; :class:`~vfio_user_dev.device.TeeIoDevice` composes one.
Options and what is emulated: docs/nvme.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from vfio_user_dev.config_space import FunctionLayout

if TYPE_CHECKING:
    from vfio_user_dev.device import TeeIoDevice


class Personality(Protocol):
    """One implementation of the function's BAR0 and what it does.  The device calls every
    method under its lock, except :meth:`start` and :meth:`close`."""

    #: identity, BAR0 size and type, MSI-X vectors (config space)
    layout: FunctionLayout

    @property
    def listeners(self) -> list[Callable[[TeeIoDevice], None]]:
        """Called (with the device) after a unit of work completed (a DMA job)."""
        ...

    def start(self) -> None:
        """Start any thread of its own (once the device is complete)."""

    def bar0_read(self, offset: int, count: int) -> bytes:
        """A TEE MMIO read of BAR0 the TDISP gate let through (§11.2.1)."""
        ...

    def bar0_write(self, offset: int, data: bytes) -> None:
        """A TEE MMIO write to BAR0 the TDISP gate let through (§11.2.1)."""

    def memory_attached(self, direct: Callable[[int, int], bool]) -> None:
        """The platform's DMA map set is in place: *direct* says whether a guest range is
        reached without waiting for the client (work that may run inline)."""

    def reset(self) -> None:
        """Function-level or device reset (§6.6.2): work in flight issues no more DMA and
        is dropped; registers to their defaults."""

    def quiesce(self) -> None:
        """The TDI changed state (QUIESCE, §11.2): work started before issues no more
        DMA."""

    def scrub(self) -> str:
        """SCRUB_SECRETS (§11.2): TVM data in the function's state is gone; what was (for
        the log)."""
        ...

    def stats(self) -> dict[str, object]:
        """Counters for ``teeio-device`` stats."""
        ...

    def close(self) -> None:
        """Stop its threads and release what it holds."""


#: Builds the device's personality (called once, early in the device's construction: it
#: may keep the device but must not use it yet).
PersonalityFactory = Callable[["TeeIoDevice"], Personality]

__all__ = ["Personality", "PersonalityFactory"]
