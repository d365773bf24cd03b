"""DOE mailbox timing and interrupts (PCIe 6.3 §6.30.2, §6.30.3, §7.9.24): Busy until the
response latency has passed, the one-second rule, interrupt conditions and Interrupt
Status, reset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teeio.doe import (
    DOE_TIMEOUT,
    MAX_OBJECT_DW,
    DoeCapabilities,
    DoeControl,
    DoeDispatcher,
    DoeMailbox,
    DoeObject,
    DoeReg,
    DoeStatus,
    MailboxState,
    interrupt_condition,
)
from tests.support.doe_box import READY, Box
from tests.support.doe_objects import BUSY, DISCOVERY, ERROR, SPDM, disc_obj


def test_busy_until_the_response_latency_has_passed() -> None:
    b = Box(response_latency=0.25)
    b.send(disc_obj(0))
    assert b.status() == BUSY
    b.wr(DoeReg.CONTROL, DoeControl.GO)            # Go while Busy: ignored
    b.wr(DoeReg.READ_MAILBOX, 0)                   # ack while Busy: ignored
    assert b.rd(DoeReg.READ_MAILBOX) == 0
    b.now += 0.2499
    assert b.status() == BUSY
    b.now += 0.0001
    assert b.status() == READY
    assert DoeObject.decode(b.receive()).protocol == DISCOVERY
    assert b.d.objects == 1


def test_writing_while_busy_overflows() -> None:
    b = Box(response_latency=0.5)
    b.send(disc_obj(0))
    b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == ERROR
    b.now += 1
    assert b.status() == ERROR                     # the late response is not delivered


def test_abort_while_busy_drops_the_pending_response() -> None:
    b = Box(response_latency=0.5)
    b.send(disc_obj(0))
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0
    b.now += 1
    assert b.status() == 0 and b.rd(DoeReg.READ_MAILBOX) == 0


@given(latency=st.floats(0.0, 0.999), unsupported=st.booleans())
def test_one_second_rule(latency: float, unsupported: bool) -> None:
    # §6.30.2: Ready (or Error) within 1 s of Go.
    b = Box(response_latency=latency)
    b.send(DoeObject(*SPDM).encode() if unsupported else disc_obj(0))
    b.now += DOE_TIMEOUT
    assert b.status() & (ERROR if unsupported else READY)
    assert not b.status() & BUSY


@pytest.mark.parametrize("latency", [1.0, 2.5, -0.1])
def test_latency_beyond_the_one_second_rule_is_refused(latency: float) -> None:
    with pytest.raises(ValueError, match="1 s"):
        DoeMailbox(DoeDispatcher().handle_object, response_latency=latency)


@pytest.mark.parametrize("kw", [{"max_object_dw": 1}, {"max_object_dw": MAX_OBJECT_DW + 1},
                                {"interrupt_message_number": 1 << 11}])
def test_mailbox_constructor_bounds(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        DoeMailbox(DoeDispatcher().handle_object, **kw)  # type: ignore[arg-type]


def test_interrupts() -> None:
    b = Box(interrupt_message_number=5)
    assert b.rd(DoeReg.CAPABILITIES) == DoeCapabilities.INTERRUPT_SUPPORT | 5 << 1
    # Interrupt Enable clear: no interrupt is generated, so Interrupt Status stays clear
    # (§7.9.24.4: it is Set when an interrupt is generated).
    b.send(disc_obj(0))
    assert b.status() == READY
    assert not b.mb.take_interrupt()
    b.receive()
    assert b.status() == 0
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    assert b.status() == READY | DoeStatus.INTERRUPT_STATUS
    assert b.mb.take_interrupt() and not b.mb.take_interrupt()   # once per 0 -> 1
    b.receive()
    b.send(disc_obj(0))                                # status still set: no new interrupt
    assert not b.mb.take_interrupt()
    b.receive()
    b.wr(DoeReg.STATUS, DoeStatus.INTERRUPT_STATUS)
    b.send(DoeObject(*SPDM).encode())                  # Error raises it too
    assert b.status() == ERROR | DoeStatus.INTERRUPT_STATUS
    assert b.mb.take_interrupt()


def test_interrupt_status_is_rw1c_and_needs_interrupt_enable() -> None:
    b = Box(interrupt_message_number=1)
    b.send(DoeObject(*SPDM).encode())                  # Error, interrupts disabled
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)  # enabling later raises nothing
    assert b.status() == ERROR and not b.mb.take_interrupt()
    b.wr(DoeReg.CONTROL, DoeControl.ABORT | DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    assert b.status() == READY | DoeStatus.INTERRUPT_STATUS and b.mb.take_interrupt()
    b.wr(DoeReg.STATUS, 0)                             # writing 0: no effect
    assert b.status() & DoeStatus.INTERRUPT_STATUS
    b.wr(DoeReg.CONTROL, 0)                            # disabling does not clear it
    assert b.status() & DoeStatus.INTERRUPT_STATUS
    b.wr(DoeReg.STATUS, DoeStatus.INTERRUPT_STATUS | DoeStatus.DATA_OBJECT_READY)  # RW1C
    assert b.status() == READY                         # Ready is RO: still set


def test_busy_cleared_is_an_interrupt_condition() -> None:
    # A request with no response (silently discarded): Busy set, then cleared (§6.30.3).
    b = Box(interrupt_message_number=2, response_latency=0.5)
    b.d.register(*SPDM, lambda _p: None)
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(DoeObject(*SPDM, b"abcd").encode())
    assert b.status() == BUSY and not b.mb.take_interrupt()
    b.now += 0.5
    assert b.status() == DoeStatus.INTERRUPT_STATUS and b.mb.take_interrupt()


@pytest.mark.parametrize(("old", "new", "irq"), [
    (MailboxState.RECEIVING, MailboxState.BUSY, False),
    (MailboxState.BUSY, MailboxState.READY, True),
    (MailboxState.BUSY, MailboxState.IDLE, True),       # Busy cleared
    (MailboxState.BUSY, MailboxState.ERROR, True),
    (MailboxState.READY, MailboxState.IDLE, False),     # Ready cleared by the last ack
    (MailboxState.RECEIVING, MailboxState.ERROR, True),
    (MailboxState.ERROR, MailboxState.IDLE, False),     # Abort
    (MailboxState.IDLE, MailboxState.RECEIVING, False),
])
def test_interrupt_conditions(old: MailboxState, new: MailboxState, irq: bool) -> None:
    assert interrupt_condition(old, new) is irq


def test_no_interrupt_support_never_sets_interrupt_status() -> None:
    b = Box()
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    assert b.status() == READY and not b.mb.take_interrupt()


def test_reset_aborts_and_restores_register_defaults() -> None:
    b = Box(interrupt_message_number=1)
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    b.mb.reset()
    assert b.status() == 0 and b.rd(DoeReg.CONTROL) == 0
    assert not b.mb.take_interrupt()
