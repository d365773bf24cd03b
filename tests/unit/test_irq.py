"""IRQ signalling through real eventfds (vfio_user_dev/irq.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from vfio_user_dev.irq import IrqController
from vfio_user_dev.protocol import IrqInfoFlags, IrqSet, IrqSetFlags, PciIrq, ProtocolError

NONE = IrqSetFlags.DATA_NONE
BOOL = IrqSetFlags.DATA_BOOL
EVENTFD = IrqSetFlags.DATA_EVENTFD
MASK = IrqSetFlags.ACTION_MASK
UNMASK = IrqSetFlags.ACTION_UNMASK
TRIGGER = IrqSetFlags.ACTION_TRIGGER
VECTORS = 4

pytestmark = pytest.mark.usefixtures("no_fd_leak")


class Intx:
    """The Command register's Interrupt Disable bit, as the device exposes it."""

    def __init__(self) -> None:
        self.allowed = True

    def __call__(self) -> bool:
        return self.allowed


@pytest.fixture
def gate() -> Intx:
    return Intx()


@pytest.fixture
def irq(gate: Intx) -> Iterator[IrqController]:
    ctl = IrqController(VECTORS, gate)
    yield ctl
    ctl.close_all()


@pytest.fixture
def efds() -> Iterator[list[int]]:
    """Eventfds the test reads; the controller gets dups of them."""
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(VECTORS)]
    yield fds
    for fd in fds:
        os.close(fd)


def count(fd: int) -> int:
    """Read and reset an eventfd counter; 0 if it was never written."""
    try:
        data = os.read(fd, 8)
    except BlockingIOError:
        return 0
    assert len(data) == 8
    return int.from_bytes(data, "little")


def req(flags: int, index: int, start: int, n: int, data: bytes = b"") -> IrqSet:
    # Built through the codec so every request is one a client could send.
    return IrqSet.decode(IrqSet(int(flags), int(index), start, n, data).encode())


def attach(irq: IrqController, index: int, start: int, fds: list[int]) -> list[int]:
    dups = [os.dup(fd) for fd in fds]
    left = irq.set_irqs(req(EVENTFD | TRIGGER, index, start, len(dups)), dups)
    assert left == []               # the controller keeps every eventfd
    return dups


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def test_info_flags(irq: IrqController) -> None:
    assert irq.counts[PciIrq.INTX] == 1
    assert irq.counts[PciIrq.MSIX] == VECTORS
    assert irq.counts[PciIrq.MSI] == 0
    assert irq.info_flags(PciIrq.INTX) == (IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE
                                           | IrqInfoFlags.AUTOMASKED)
    assert irq.info_flags(PciIrq.MSIX) == (IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE
                                           | IrqInfoFlags.NORESIZE)
    assert irq.info_flags(PciIrq.ERR) == IrqInfoFlags.EVENTFD


# --- MSI-X ------------------------------------------------------------------------------


def test_msix_eventfd_trigger(irq: IrqController, efds: list[int]) -> None:
    assert not irq.msix_ready(0)
    attach(irq, PciIrq.MSIX, 0, efds[:1])
    assert irq.msix_ready(0)
    assert not irq.msix_ready(1)
    irq.raise_msix(0)
    assert count(efds[0]) == 1
    assert count(efds[0]) == 0
    assert irq.signalled == 1
    assert irq.signalled_by_type == {"intx": 0, "msix": 1}


def test_msix_raises_accumulate(irq: IrqController, efds: list[int]) -> None:
    attach(irq, PciIrq.MSIX, 0, efds[:1])
    for _ in range(3):
        irq.raise_msix(0)
    assert count(efds[0]) == 3
    assert irq.signalled == 3


def test_msix_each_vector_has_its_own_eventfd(irq: IrqController, efds: list[int]) -> None:
    attach(irq, PciIrq.MSIX, 0, efds)
    assert all(irq.msix_ready(v) for v in range(VECTORS))
    assert not irq.msix_ready(VECTORS)
    irq.raise_msix(2)
    assert [count(fd) for fd in efds] == [0, 0, 1, 0]
    irq.raise_msix(3)
    irq.raise_msix(0)
    assert [count(fd) for fd in efds] == [1, 0, 0, 1]


def test_msix_partial_range(irq: IrqController, efds: list[int]) -> None:
    attach(irq, PciIrq.MSIX, 2, efds[:1])
    assert [irq.msix_ready(v) for v in range(VECTORS)] == [False, False, True, False]
    irq.raise_msix(2)
    assert count(efds[0]) == 1


def test_replacing_an_eventfd_closes_the_old_one(irq: IrqController, efds: list[int]) -> None:
    (old,) = attach(irq, PciIrq.MSIX, 0, efds[:1])
    attach(irq, PciIrq.MSIX, 0, efds[1:2])
    assert_closed(old)
    irq.raise_msix(0)
    assert (count(efds[0]), count(efds[1])) == (0, 1)


def test_eventfd_minus_one_deassigns(irq: IrqController, efds: list[int]) -> None:
    dups = attach(irq, PciIrq.MSIX, 0, efds[:2])
    assert irq.set_irqs(req(EVENTFD | TRIGGER, PciIrq.MSIX, 1, 1), [-1]) == []
    assert_closed(dups[1])
    assert irq.msix_ready(0) and not irq.msix_ready(1)
    irq.raise_msix(1)
    assert count(efds[1]) == 0
    assert irq.pending[PciIrq.MSIX][1]        # nowhere to deliver: stays pending


def test_masked_vector_pends_and_fires_on_unmask(irq: IrqController, efds: list[int]) -> None:
    attach(irq, PciIrq.MSIX, 0, efds)
    assert irq.set_irqs(req(NONE | MASK, PciIrq.MSIX, 1, 1), []) == []
    irq.raise_msix(1)
    irq.raise_msix(1)
    assert count(efds[1]) == 0
    assert irq.pending[PciIrq.MSIX][1]
    assert irq.signalled == 0
    irq.raise_msix(0)                          # other vectors are unaffected
    assert count(efds[0]) == 1
    irq.set_irqs(req(NONE | UNMASK, PciIrq.MSIX, 1, 1), [])
    assert count(efds[1]) == 1                 # one message for the pending bit
    assert not irq.pending[PciIrq.MSIX][1]
    irq.set_irqs(req(NONE | UNMASK, PciIrq.MSIX, 1, 1), [])
    assert count(efds[1]) == 0                 # nothing pending: no replay
    irq.raise_msix(1)
    assert count(efds[1]) == 1


def test_unmask_without_pending_does_not_fire(irq: IrqController, efds: list[int]) -> None:
    attach(irq, PciIrq.MSIX, 0, efds)
    irq.set_irqs(req(NONE | MASK, PciIrq.MSIX, 0, VECTORS), [])
    irq.set_irqs(req(NONE | UNMASK, PciIrq.MSIX, 0, VECTORS), [])
    assert [count(fd) for fd in efds] == [0] * VECTORS


def test_bool_mask_selects_vectors(irq: IrqController, efds: list[int]) -> None:
    attach(irq, PciIrq.MSIX, 0, efds)
    irq.set_irqs(req(BOOL | MASK, PciIrq.MSIX, 0, 4, b"\x01\x00\x01\x00"), [])
    assert irq.masked[PciIrq.MSIX] == [True, False, True, False]
    for v in range(VECTORS):
        irq.raise_msix(v)
    assert [count(fd) for fd in efds] == [0, 1, 0, 1]
    assert irq.pending[PciIrq.MSIX] == [True, False, True, False]
    irq.set_irqs(req(BOOL | UNMASK, PciIrq.MSIX, 2, 2, b"\x01\x01"), [])
    assert irq.masked[PciIrq.MSIX] == [True, False, False, False]
    assert [count(fd) for fd in efds] == [0, 0, 1, 0]


def test_trigger_action_fires_vectors(irq: IrqController, efds: list[int]) -> None:
    attach(irq, PciIrq.MSIX, 0, efds)
    irq.set_irqs(req(NONE | TRIGGER, PciIrq.MSIX, 1, 2), [])
    assert [count(fd) for fd in efds] == [0, 1, 1, 0]
    irq.set_irqs(req(BOOL | TRIGGER, PciIrq.MSIX, 0, 4, b"\x00\x00\x00\x01"), [])
    assert [count(fd) for fd in efds] == [0, 0, 0, 1]


def test_raise_without_eventfd_sets_pending(irq: IrqController, efds: list[int]) -> None:
    irq.raise_msix(3)
    assert irq.pending[PciIrq.MSIX] == [False, False, False, True]
    assert irq.signalled == 0
    attach(irq, PciIrq.MSIX, 0, efds)
    irq.set_irqs(req(NONE | UNMASK, PciIrq.MSIX, 3, 1), [])
    assert count(efds[3]) == 1
    assert not irq.pending[PciIrq.MSIX][3]


def test_pipe_is_not_a_trigger_eventfd(irq: IrqController, efds: list[int]) -> None:
    r, w = os.pipe()
    other = os.dup(efds[1])
    try:
        dup = attach(irq, PciIrq.MSIX, 0, efds[:1])[0]
        with pytest.raises(ProtocolError) as exc:
            irq.set_irqs(req(EVENTFD | TRIGGER, PciIrq.MSIX, 0, 2), [other, w])
        assert exc.value.errno == errno.EINVAL
        assert irq.trigger[PciIrq.MSIX][:2] == [dup, None]   # nothing changed
    finally:
        # A refused request's fds stay the caller's to close, as after any refusal.
        for fd in (r, w, other):
            os.close(fd)


def test_full_eventfd_drops_the_interrupt_without_blocking(irq: IrqController,
                                                           efds: list[int]) -> None:
    blocking = os.eventfd(0)                   # the client's own fd may well block
    dup = os.dup(blocking)
    try:
        irq.set_irqs(req(EVENTFD | TRIGGER, PciIrq.MSIX, 0, 1), [dup])
        os.write(blocking, (0xFFFF_FFFF_FFFF_FFFE).to_bytes(8, "little"))  # counter at max
        irq.raise_msix(0)                      # would block forever on a blocking fd
        assert irq.signalled == 0
        assert irq.dropped == 1
        assert int.from_bytes(os.read(blocking, 8), "little") == 0xFFFF_FFFF_FFFF_FFFE
        irq.raise_msix(0)
        assert irq.signalled == 1
    finally:
        irq.close_all()
        os.close(blocking)


# --- INTx -------------------------------------------------------------------------------


def test_intx_automask(irq: IrqController, efds: list[int]) -> None:
    efd = efds[0]
    attach(irq, PciIrq.INTX, 0, [efd])
    irq.set_intx(True)
    assert count(efd) == 1
    assert irq.masked[PciIrq.INTX][0]            # automasked
    irq.set_intx(True)                            # still asserted: no new edge
    irq.update_intx()                             # masked: nothing
    assert count(efd) == 0
    irq.set_irqs(req(NONE | UNMASK, PciIrq.INTX, 0, 1), [])
    assert count(efd) == 1                        # still asserted after EOI: fires again
    assert irq.masked[PciIrq.INTX][0]
    irq.set_intx(False)
    irq.set_irqs(req(NONE | UNMASK, PciIrq.INTX, 0, 1), [])
    assert count(efd) == 0                        # deasserted: unmask is silent
    assert not irq.masked[PciIrq.INTX][0]
    irq.set_intx(True)
    assert count(efd) == 1
    assert irq.signalled_by_type == {"intx": 3, "msix": 0}


def test_intx_disabled_by_command_register(irq: IrqController, gate: Intx,
                                          efds: list[int]) -> None:
    efd = efds[0]
    attach(irq, PciIrq.INTX, 0, [efd])
    gate.allowed = False
    irq.set_intx(True)
    assert count(efd) == 0
    assert not irq.masked[PciIrq.INTX][0]
    irq.update_intx()
    irq.set_irqs(req(NONE | UNMASK, PciIrq.INTX, 0, 1), [])
    assert count(efd) == 0
    gate.allowed = True                           # guest clears Interrupt Disable
    irq.update_intx()
    assert count(efd) == 1
    assert irq.signalled == 1


def test_intx_masked_by_client(irq: IrqController, efds: list[int]) -> None:
    efd = efds[0]
    attach(irq, PciIrq.INTX, 0, [efd])
    irq.set_irqs(req(NONE | MASK, PciIrq.INTX, 0, 1), [])
    irq.set_intx(True)
    assert count(efd) == 0
    irq.set_irqs(req(NONE | UNMASK, PciIrq.INTX, 0, 1), [])
    assert count(efd) == 1


def test_intx_without_eventfd(irq: IrqController) -> None:
    irq.set_intx(True)
    assert irq.intx_asserted
    assert irq.signalled == 0
    assert not irq.masked[PciIrq.INTX][0]


# --- disabling ------------------------------------------------------------------------


def test_data_none_count_zero_disables_all(irq: IrqController, efds: list[int]) -> None:
    dups = attach(irq, PciIrq.MSIX, 0, efds)
    sentinel = [os.dup(efds[0])]
    try:
        left = irq.set_irqs(req(NONE | TRIGGER, PciIrq.MSIX, 0, 0), sentinel)
        assert left == sentinel                   # unused fds go back to the caller
    finally:
        os.close(sentinel[0])
    for fd in dups:
        assert_closed(fd)
    assert irq.trigger[PciIrq.MSIX] == [None] * VECTORS
    assert not any(irq.msix_ready(v) for v in range(VECTORS))
    irq.raise_msix(0)
    assert [count(fd) for fd in efds] == [0] * VECTORS


def test_data_none_count_zero_disables_intx(irq: IrqController, efds: list[int]) -> None:
    (dup,) = attach(irq, PciIrq.INTX, 0, efds[:1])
    irq.set_irqs(req(NONE | TRIGGER, PciIrq.INTX, 0, 0), [])
    assert_closed(dup)
    irq.set_intx(True)
    assert count(efds[0]) == 0


def test_close_all(irq: IrqController, efds: list[int]) -> None:
    msix = attach(irq, PciIrq.MSIX, 0, efds[:2])
    intx = attach(irq, PciIrq.INTX, 0, efds[2:3])
    irq.set_irqs(req(NONE | MASK, PciIrq.MSIX, 0, 2), [])
    irq.raise_msix(1)
    irq.set_intx(True)
    irq.close_all()
    for fd in msix + intx:
        assert_closed(fd)
    assert irq.masked[PciIrq.MSIX] == [False] * VECTORS
    assert irq.pending[PciIrq.MSIX] == [False] * VECTORS
    assert not irq.intx_asserted


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "index", "start", "n"), [
    (NONE | TRIGGER, PciIrq.MSIX, 3, 2),     # runs past the last vector
    (NONE | TRIGGER, PciIrq.MSIX, 4, 1),     # starts past it
    (NONE | MASK, PciIrq.MSIX, 0, 5),
    (NONE | TRIGGER, PciIrq.MSIX, 1, 0),     # count 0 only disables from 0
    (NONE | MASK, PciIrq.MSIX, 0, 0),        # count 0 only with TRIGGER
    (NONE | UNMASK, PciIrq.INTX, 0, 2),      # INTx has one line
    (NONE | TRIGGER, PciIrq.MSI, 0, 1),      # no MSI vectors
    (NONE | TRIGGER, 7, 0, 1),               # no such index
    (EVENTFD | TRIGGER, PciIrq.MSIX, 2, 3),
    (NONE | TRIGGER, PciIrq.MSIX, 0xFFFF_FFFF, 1),
])
def test_bad_ranges(irq: IrqController, efds: list[int], flags: int, index: int, start: int,
                    n: int) -> None:
    attach(irq, PciIrq.MSIX, 0, efds)
    with pytest.raises(ProtocolError) as info:
        irq.set_irqs(req(flags, index, start, n), [])
    assert info.value.errno == errno.EINVAL
    assert all(irq.msix_ready(v) for v in range(VECTORS))   # nothing changed
    assert irq.masked[PciIrq.MSIX] == [False] * VECTORS
    assert [count(fd) for fd in efds] == [0] * VECTORS


def test_eventfd_count_mismatch(irq: IrqController, efds: list[int]) -> None:
    (dup,) = attach(irq, PciIrq.MSIX, 0, efds[:1])
    fds = [os.dup(efds[1]), os.dup(efds[2])]
    try:
        with pytest.raises(ProtocolError) as info:
            irq.set_irqs(req(EVENTFD | TRIGGER, PciIrq.MSIX, 0, 1), fds)
        assert info.value.errno == errno.EINVAL
        for fd in fds:
            os.fstat(fd)                      # refused fds still belong to the caller
    finally:
        for fd in fds:
            os.close(fd)
    os.fstat(dup)                             # the old eventfd is still in place
    irq.raise_msix(0)
    assert count(efds[0]) == 1


@pytest.mark.parametrize("action", [MASK, UNMASK])
def test_eventfd_only_for_trigger(irq: IrqController, efds: list[int],
                                  action: IrqSetFlags) -> None:
    fd = os.dup(efds[0])
    try:
        with pytest.raises(ProtocolError) as info:
            irq.set_irqs(req(EVENTFD | action, PciIrq.MSIX, 0, 1), [fd])
        assert info.value.errno == errno.ENOTSUP
        assert not irq.msix_ready(0)
    finally:
        os.close(fd)
