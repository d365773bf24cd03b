"""Lock-step interrupt tests: MSI-X vectors and INTx through client eventfds."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from teeio.device_regs import Irq, Op, R, St
from teeio.pcie.config import Command as PciCommand
from teeio.pcie.config import Reg, Status
from tests.support.lockstep import (
    BAR0,
    BAR1,
    CONFIG,
    enable_device,
    event_fired,
    fds_named,
    memfd,
    msix_enable,
    ok,
    run_job,
    wait_until,
)
from tests.support.servers import RunningServer, both_backends
from vfio_user_dev import protocol as p
from vfio_user_dev.client import Client
from vfio_user_dev.protocol import Command, IrqSetFlags, PciIrq

pytestmark = [pytest.mark.timeout(10), both_backends]

GUEST = 0x4000_0000
EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
NONE_MASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK
NONE_UNMASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
NO_EVENT = 0.1  # how long "no interrupt" is watched after the job is known to be done
PBA = 0x800


@pytest.fixture
def dev(server: RunningServer) -> Iterator[Client]:
    """A negotiated client with 64 KiB of memfd memory mapped at GUEST, Mem+BM enabled."""
    c = server.client()
    fd = memfd("lockstep-irq", 0x10000)
    ok(c, Command.DMA_MAP, p.DmaMap(3, 0, GUEST, 0x10000).encode(), fds=[fd])
    os.close(fd)
    enable_device(c)
    yield c
    c.close()


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    fds = [os.eventfd(0) for _ in range(4)]
    yield fds
    for fd in fds:
        os.close(fd)


def fill(c: Client) -> int:
    return run_job(c, Op.FILL, dst=GUEST, length=64, pattern=0x01020304)


def pba(c: Client) -> int:
    return c.read32(BAR1, PBA)


def config_status(c: Client) -> int:
    return int.from_bytes(c.region_read(CONFIG, Reg.STATUS, 2), "little")


# -- MSI-X ----------------------------------------------------------------------------------

def test_msix_vector0_fires_on_job_completion(server: RunningServer, dev: Client,
                                              eventfds: list[int]) -> None:
    dev.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
    msix_enable(dev)
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    assert fill(dev) == St.DONE
    assert event_fired(eventfds[0], 2.0) == 1
    assert all(event_fired(fd, 0) == 0 for fd in eventfds[1:])
    # MSI-X mode: INTx Interrupt Status stays clear.
    assert not config_status(dev) & Status.INTERRUPT_STATUS
    assert dev.read32(BAR0, R.IRQ_COUNT) == 1
    # Edge-triggered: every completion is a new message, even with INT_STATUS unacked.
    assert fill(dev) == St.DONE
    assert event_fired(eventfds[0], 2.0) == 1
    # The delivery is counted once the trigger returned, which may be just after the
    # client saw the eventfd (the libvfio-user backend triggers from its run thread).
    deadline = time.monotonic() + 2.0
    while server.machine.stats()["irq_signalled_msix"] != 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.machine.stats()["irq_signalled_msix"] == 2


def test_msix_not_fired_when_int_enable_clear(dev: Client, eventfds: list[int]) -> None:
    dev.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
    msix_enable(dev)
    assert fill(dev) == St.DONE
    assert dev.read32(BAR0, R.INT_STATUS) == Irq.DMA_DONE
    assert event_fired(eventfds[0], NO_EVENT) == 0
    assert pba(dev) == 0


def test_msix_mask_sets_pba_and_unmask_delivers(dev: Client, eventfds: list[int]) -> None:
    dev.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
    msix_enable(dev)
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    dev.set_irqs(PciIrq.MSIX, NONE_MASK, 0, 1)
    assert fill(dev) == St.DONE
    assert event_fired(eventfds[0], NO_EVENT) == 0
    assert pba(dev) & 1
    assert pba(dev) == 1  # only vector 0
    dev.set_irqs(PciIrq.MSIX, NONE_UNMASK, 0, 1)
    assert event_fired(eventfds[0], 2.0) == 1
    assert pba(dev) == 0
    # Unmasking again does not replay anything.
    dev.set_irqs(PciIrq.MSIX, NONE_UNMASK, 0, 1)
    assert event_fired(eventfds[0], NO_EVENT) == 0


def test_msix_mask_with_bool_data(server: RunningServer, dev: Client,
                                  eventfds: list[int]) -> None:
    masked = server.device.irq.masked[PciIrq.MSIX]
    dev.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
    msix_enable(dev)
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    # mask vectors 0 and 2 (bool array), leave 1 and 3 alone
    dev.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, 0, 4,
                 data=b"\1\0\1\0")
    if server.backend == "python":
        assert masked == [True, False, True, False]
    else:   # the library ignores the bools: it masks the whole range (docs/libvfio-user.md)
        assert masked == [True, True, True, True]
    assert fill(dev) == St.DONE
    assert event_fired(eventfds[0], NO_EVENT) == 0
    assert pba(dev) == 1
    dev.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_UNMASK, 0, 1,
                 data=b"\1")
    assert event_fired(eventfds[0], 2.0) == 1
    assert pba(dev) == 0
    # an UNMASK whose bools are all false changes nothing (libvfio-user: unmasks them all)
    dev.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_UNMASK, 0, 4,
                 data=b"\0\0\0\0")
    if server.backend == "python":
        assert masked == [False, False, True, False]
    else:
        assert masked == [False, False, False, False]


def test_msix_trigger_from_client(dev: Client, eventfds: list[int]) -> None:
    dev.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
    msix_enable(dev)
    dev.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 3, 1)
    assert event_fired(eventfds[3], 2.0) == 1
    assert event_fired(eventfds[0], 0) == 0


def test_msix_disable_releases_eventfds(server: RunningServer, dev: Client,
                                        eventfds: list[int]) -> None:
    base = fds_named("eventfd")  # ours (4) plus any the server holds already (none)
    dev.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
    msix_enable(dev)
    assert fds_named("eventfd") == base + 4  # the server keeps its own copies
    # DATA_NONE|TRIGGER with count 0 disables the whole index.
    dev.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0)
    assert fds_named("eventfd") == base
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    assert fill(dev) == St.DONE
    assert event_fired(eventfds[0], NO_EVENT) == 0
    if server.backend == "python":   # libvfio-user: MSI-X Enable (still set) decides
        assert not server.device.irq.msix_ready(0)


# -- INTx -----------------------------------------------------------------------------------

def test_intx_fires_and_interrupt_status_follows_int_status(server: RunningServer, dev: Client,
                                                           eventfds: list[int]) -> None:
    efd = eventfds[0]
    dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
    assert not config_status(dev) & Status.INTERRUPT_STATUS
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    assert fill(dev) == St.DONE
    assert event_fired(efd, 2.0) == 1
    assert dev.read32(BAR0, R.INT_STATUS) == Irq.DMA_DONE
    assert config_status(dev) & Status.INTERRUPT_STATUS
    assert config_status(dev) & Status.CAPABILITIES_LIST  # other bits untouched
    dev.write32(BAR0, R.INT_STATUS, Irq.DMA_DONE)  # RW1C acknowledge
    assert dev.read32(BAR0, R.INT_STATUS) == 0
    assert not config_status(dev) & Status.INTERRUPT_STATUS
    assert server.machine.stats()["irq_signalled_intx"] == 1


def test_intx_status_is_read_only_to_software(dev: Client, eventfds: list[int]) -> None:
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    assert fill(dev) == St.DONE
    assert config_status(dev) & Status.INTERRUPT_STATUS
    # writing 1 to Interrupt Status (RO) changes nothing
    dev.region_write(CONFIG, Reg.STATUS, int(Status.INTERRUPT_STATUS).to_bytes(2, "little"))
    assert config_status(dev) & Status.INTERRUPT_STATUS


def test_intx_is_automasked_until_unmask(server: RunningServer, dev: Client,
                                         eventfds: list[int]) -> None:
    efd = eventfds[0]
    dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    assert fill(dev) == St.DONE
    assert event_fired(efd, 2.0) == 1
    dev.write32(BAR0, R.INT_STATUS, Irq.DMA_DONE)
    # second completion: the line rises again, but INTx is auto-masked
    assert fill(dev) == St.DONE
    assert config_status(dev) & Status.INTERRUPT_STATUS
    if server.backend == "python":
        assert event_fired(efd, NO_EVENT) == 0
    else:   # not automasked (the library may drop the unmask eventfd): delivered
        assert event_fired(efd, 2.0) == 1
    # UNMASK (as QEMU does after the guest's EOI) with the line still asserted: fires
    dev.set_irqs(PciIrq.INTX, NONE_UNMASK, 0, 1)
    assert event_fired(efd, 2.0) == 1
    # acknowledged, then unmasked: nothing more
    dev.write32(BAR0, R.INT_STATUS, Irq.DMA_DONE)
    dev.set_irqs(PciIrq.INTX, NONE_UNMASK, 0, 1)
    assert event_fired(efd, NO_EVENT) == 0


def test_intx_keeps_coming_with_an_unmask_eventfd(server: RunningServer, dev: Client,
                                                  eventfds: list[int]) -> None:
    # As QEMU under KVM: an INTx unmask (resample) eventfd instead of UNMASK messages.
    # The pure-Python server reads it as UNMASK; libvfio-user makes it one UNMASK callback
    # and drops the fd, so that backend does not automask INTx at all.
    efd, resample = eventfds[0], eventfds[1]
    dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
    dev.set_irqs(PciIrq.INTX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK, 0, 1,
                 [resample])
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    intx_masked = server.device.irq.masked[PciIrq.INTX]
    for _ in range(3):
        assert fill(dev) == St.DONE
        assert event_fired(efd, 2.0) == 1
        dev.write32(BAR0, R.INT_STATUS, Irq.DMA_DONE)     # the guest's handler
        os.write(resample, (1).to_bytes(8, "little"))      # KVM, at the guest's EOI
        wait_until(lambda: not intx_masked[0], "INTx to be unmasked")
    assert server.machine.stats()["irq_signalled_intx"] == 3


def test_intx_disable_holds_event_until_cleared(dev: Client, eventfds: list[int]) -> None:
    efd = eventfds[0]
    dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
    enable_device(dev, PciCommand.INTERRUPT_DISABLE)
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    assert fill(dev) == St.DONE
    assert event_fired(efd, NO_EVENT) == 0
    # Interrupt Status reports the pending interrupt regardless of Interrupt Disable.
    assert config_status(dev) & Status.INTERRUPT_STATUS
    # Clearing Interrupt Disable with the line still asserted (and unmasked) delivers it.
    enable_device(dev)
    assert event_fired(efd, 2.0) == 1
    assert event_fired(efd, NO_EVENT) == 0


def test_intx_disable_then_ack_then_clear_does_not_fire(dev: Client,
                                                        eventfds: list[int]) -> None:
    efd = eventfds[0]
    dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
    enable_device(dev, PciCommand.INTERRUPT_DISABLE)
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    assert fill(dev) == St.DONE
    dev.write32(BAR0, R.INT_STATUS, Irq.DMA_DONE)  # no longer asserted
    assert not config_status(dev) & Status.INTERRUPT_STATUS
    enable_device(dev)
    assert event_fired(efd, NO_EVENT) == 0
    # and a new completion fires normally
    assert fill(dev) == St.DONE
    assert event_fired(efd, 2.0) == 1


def test_intx_level_follows_int_enable(dev: Client, eventfds: list[int]) -> None:
    efd = eventfds[0]
    dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
    assert fill(dev) == St.DONE  # INT_ENABLE clear: pending but not asserted
    assert not config_status(dev) & Status.INTERRUPT_STATUS
    assert event_fired(efd, NO_EVENT) == 0
    dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)  # enabling asserts the line
    assert config_status(dev) & Status.INTERRUPT_STATUS
    assert event_fired(efd, 2.0) == 1


def test_eventfds_closed_when_client_disconnects(server: RunningServer,
                                                 eventfds: list[int]) -> None:
    base = fds_named("eventfd")
    c = server.client()
    c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
    c.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [eventfds[0]])
    # The server holds its own copies: 5, or 4 with libvfio-user, whose one eventfd array
    # serves INTx and MSI-X (INTx's replaced MSI-X vector 0's).
    held = 5 if server.backend == "python" else 4
    assert fds_named("eventfd") == base + held
    c.close()
    wait_until(lambda: fds_named("eventfd") == base, "the server to close the eventfds")
    assert not server.device.irq.msix_ready(0)


def test_intx_level_does_not_go_stale_across_msix(dev: Client, eventfds: list[int]) -> None:
    """INTx asserted, the client switches to MSI-X, the interrupt is acknowledged there,
    then the client switches back to INTx: no spurious INTx, and the next one arrives."""
    intx = os.eventfd(0)
    try:
        dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [intx])
        dev.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
        assert fill(dev) == St.DONE
        assert event_fired(intx, 2.0) == 1  # INTx asserted (and auto-masked)
        # switch to MSI-X the way QEMU does: INTx off, MSI-X eventfds on
        dev.set_irqs(PciIrq.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0)
        dev.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 4, eventfds)
        msix_enable(dev)
        dev.write32(BAR0, R.INT_STATUS, Irq.DMA_DONE)  # acknowledged in MSI-X mode
        assert fill(dev) == St.DONE
        assert event_fired(eventfds[0], 2.0) == 1
        dev.write32(BAR0, R.INT_STATUS, Irq.DMA_DONE)
        assert dev.read32(BAR0, R.INT_STATUS) == 0
        # back to INTx: nothing is pending, so unmasking must not fire
        dev.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0)
        msix_enable(dev, False)
        dev.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [intx])
        dev.set_irqs(PciIrq.INTX, NONE_UNMASK, 0, 1)
        assert event_fired(intx, NO_EVENT) == 0, "spurious INTx with INT_STATUS clear"
        assert not config_status(dev) & Status.INTERRUPT_STATUS
        # and the next completion is delivered
        assert fill(dev) == St.DONE
        assert event_fired(intx, 2.0) == 1
    finally:
        os.close(intx)
