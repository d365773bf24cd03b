"""The DOE mailbox state machine (PCIe 6.3 §6.30.2, §7.9.24) driven through its registers:
exchanges, Abort, Error on overflow, unsupported or failed objects, byte enables,
read-only registers and the transition table."""

from __future__ import annotations

import logging

import pytest

from teeio.doe import (
    MAILBOX_TRANSITIONS,
    DiscoveryResponse,
    DoeControl,
    DoeDispatcher,
    DoeObject,
    DoeReg,
    DoeStatus,
    MailboxEvent,
    MailboxState,
)
from tests.support.doe_box import READY, Box, dw
from tests.support.doe_objects import DISCOVERY, ERROR, SECURED, SPDM, disc_obj, echo, hdr

# -- mailbox ------------------------------------------------------------------------------------

def test_mailbox_happy_path_discovery() -> None:
    b = Box()
    assert b.status() == 0 and b.state() is MailboxState.IDLE
    b.send(disc_obj(0), go=False)
    assert b.state() is MailboxState.RECEIVING and b.status() == 0
    b.wr(DoeReg.CONTROL, DoeControl.GO)
    assert b.status() == READY                    # synchronous dispatcher: Ready at once
    expected = DoeObject(*DISCOVERY, DiscoveryResponse(1, 0, 0).encode()).encode()
    assert b.receive() == expected
    assert b.status() == 0 and b.state() is MailboxState.IDLE


def test_read_mailbox_reads_without_advancing_and_write_advances() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    req = DoeObject(*SPDM, b"ABCDEFGH").encode()
    b.send(req)
    words = dw(req)
    for i, w in enumerate(words):
        assert b.rd(DoeReg.READ_MAILBOX) == w
        assert b.rd(DoeReg.READ_MAILBOX) == w      # reading twice does not advance
        assert b.status() & READY                  # Ready stays until the final DW's ack
        b.wr(DoeReg.READ_MAILBOX, 0xDEADBEEF if i % 2 else 0)   # any value advances
    assert not b.status() & READY
    assert b.rd(DoeReg.READ_MAILBOX) == 0


def test_reads_when_not_ready_return_zero_and_acks_are_ignored() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    assert b.rd(DoeReg.READ_MAILBOX) == 0
    b.wr(DoeReg.READ_MAILBOX, 0)                   # ignored: nothing is Ready
    assert b.status() == 0
    b.send(DoeObject(*SPDM, b"abcd").encode(), go=False)
    assert b.rd(DoeReg.READ_MAILBOX) == 0 and b.rd(DoeReg.WRITE_MAILBOX) == 0
    b.wr(DoeReg.READ_MAILBOX, 0)                   # ignored while receiving, too
    b.wr(DoeReg.CONTROL, DoeControl.GO)
    assert b.receive() == DoeObject(*SPDM, b"abcd").encode()
    assert b.rd(DoeReg.WRITE_MAILBOX) == 0


def test_back_to_back_exchanges() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    for i in range(5):
        req = DoeObject(*SPDM, bytes([i]) * 4 * (i + 1)).encode()
        b.send(req)
        assert b.receive() == req


def test_abort_clears_ready_error_and_both_mailboxes() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    # while receiving: the partial request is dropped
    b.send(DoeObject(*SPDM, b"abcd").encode()[:8], go=False)
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.state() is MailboxState.IDLE
    b.send(disc_obj(0))
    assert b.status() & READY                      # the aborted DWs did not prefix it
    # while Ready: the response is dropped
    b.rd(DoeReg.READ_MAILBOX)
    b.wr(DoeReg.READ_MAILBOX, 0)
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0 and b.rd(DoeReg.READ_MAILBOX) == 0
    # in Error
    b.send(DoeObject(*SECURED).encode())
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0
    b.send(disc_obj(0))
    assert DoeObject.decode(b.receive()).protocol == DISCOVERY


def test_abort_wins_over_go_in_the_same_write() -> None:
    b = Box()
    b.send(disc_obj(0), go=False)
    b.wr(DoeReg.CONTROL, DoeControl.ABORT | DoeControl.GO)
    assert b.status() == 0 and b.d.objects == 0


def test_write_mailbox_overflow_sets_error() -> None:
    b = Box(max_object_dw=4)
    for _ in range(4):
        b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == 0
    b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.GO)            # no response in Error (§6.30.2)
    assert b.status() == ERROR and b.d.objects == 0
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    b.send(disc_obj(0))                            # 3 DW fit in 4
    assert b.status() == READY


@pytest.mark.parametrize("raw", [
    disc_obj(0) + bytes(4),                        # one DW more than the Length says
    disc_obj(0)[:-4],                              # one DW fewer
    hdr(0x00000001, 0x40000003, bytes(4)),        # reserved bits: malformed
    b"",                                           # Go with nothing written
])
def test_length_mismatch_or_malformed_is_silently_discarded(raw: bytes) -> None:
    b = Box()
    b.send(raw)
    assert b.status() == 0                         # no Ready, no Error, not Busy
    assert b.state() is MailboxState.IDLE
    b.send(disc_obj(0))                            # the mailbox works on
    assert DoeObject.decode(b.receive()).protocol == DISCOVERY


def test_unsupported_type_sets_error() -> None:
    b = Box()
    b.send(DoeObject(*SPDM, b"abcd").encode())
    assert b.status() == ERROR
    assert b.rd(DoeReg.READ_MAILBOX) == 0
    b.send(disc_obj(0))                            # ignored while Error
    assert b.status() == ERROR and b.d.objects == 1
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0


def test_handler_failure_sets_error(caplog: pytest.LogCaptureFixture) -> None:
    d = DoeDispatcher()
    d.register(*SPDM, lambda _p: 1 // 0)  # type: ignore[arg-type,return-value]
    b = Box(d)
    with caplog.at_level(logging.ERROR):
        b.send(DoeObject(*SPDM).encode())
    assert b.status() == ERROR
    assert "ZeroDivisionError" in caplog.text


def test_handler_that_is_not_an_object_sets_error() -> None:
    b = Box()
    b.mb.handler = lambda _obj: b"\1\2\3\4"
    b.send(disc_obj(0))
    assert b.status() == ERROR


def test_silent_handler_means_no_response() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, lambda _p: None)
    b = Box(d)
    b.send(DoeObject(*SPDM, b"abcd").encode())
    assert b.status() == 0 and b.state() is MailboxState.IDLE


def test_new_object_while_response_unread_is_an_error() -> None:
    b = Box()
    b.send(disc_obj(0))
    b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    b.send(disc_obj(0))
    b.wr(DoeReg.CONTROL, DoeControl.GO)
    assert b.status() == ERROR


@pytest.mark.parametrize("reg", [DoeReg.WRITE_MAILBOX, DoeReg.READ_MAILBOX])
@pytest.mark.parametrize("be", [0x1, 0x3, 0xC, 0x7])
def test_mailbox_writes_without_all_bytes_enabled_set_error(reg: DoeReg, be: int) -> None:
    # §6.30.2: checking is permitted; "strongly recommended" to set Error.
    b = Box()
    b.send(disc_obj(0))
    b.wr(reg, 0, be)
    assert b.status() == ERROR


def test_sub_dword_control_and_status_writes() -> None:
    b = Box(interrupt_message_number=3)
    b.send(disc_obj(0), go=False)
    b.wr(DoeReg.CONTROL, 0x02, be=0x1)            # byte 0: Interrupt Enable
    assert b.rd(DoeReg.CONTROL) == DoeControl.INTERRUPT_ENABLE
    b.wr(DoeReg.CONTROL, 0x80 << 24, be=0x8)      # byte 3 = 0x80: Go (Enable kept)
    assert b.status() & READY
    assert b.rd(DoeReg.CONTROL) == DoeControl.INTERRUPT_ENABLE
    b.wr(DoeReg.CONTROL, 0xFFFFFFFF, be=0x2)      # only byte 1 enabled: no Abort, no Go
    assert b.status() & READY
    b.wr(DoeReg.STATUS, 0xFF, be=0x2)             # RW1C bit lives in byte 0: unaffected
    assert b.status() & DoeStatus.INTERRUPT_STATUS
    b.wr(DoeReg.CONTROL, 0x01, be=0x1)            # byte 0: Abort
    assert not b.status() & READY


def test_read_only_registers_and_control_reads() -> None:
    b = Box()
    b.wr(DoeReg.CAPABILITIES, 0xFFFFFFFF)
    assert b.rd(DoeReg.CAPABILITIES) == 0
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE | DoeControl.ATTENTION_NOT_NEEDED
         | DoeControl.ASYNC_MESSAGE_ENABLE)
    assert b.rd(DoeReg.CONTROL) == 0              # no interrupt support: RsvdP, reads 0
    b.wr(DoeReg.STATUS, 0xFFFFFFFF)
    assert b.status() == 0
    with pytest.raises(ValueError):
        b.rd(0x18)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        b.wr(0x02, 0)  # type: ignore[arg-type]


def test_transition_table_is_complete() -> None:
    completions = {MailboxEvent.RESPONSE, MailboxEvent.DISCARD, MailboxEvent.FAILURE}
    for s in MailboxState:
        for e in MailboxEvent:
            # a handler's outcome only ever arrives in BUSY (or is ignored in ERROR)
            expected = s in (MailboxState.BUSY, MailboxState.ERROR) or e not in completions
            assert ((s, e) in MAILBOX_TRANSITIONS) == expected, (s, e)
    assert all(MAILBOX_TRANSITIONS[(s, MailboxEvent.ABORT)] is MailboxState.IDLE
               for s in MailboxState)
    leave_error = {e for e in MailboxEvent
                   if MAILBOX_TRANSITIONS[(MailboxState.ERROR, e)] is not MailboxState.ERROR}
    assert leave_error == {MailboxEvent.ABORT}
