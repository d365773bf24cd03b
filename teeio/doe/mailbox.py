"""The DOE Extended Capability's mailbox (PCIe 6.3 §6.30.2–6.30.3, §7.9.24) driven DW by DW.

Sans-IO: time comes in as a parameter (``now``, seconds on any monotonic clock).

DOE Extended Capability, 0x18 bytes::

    +0x00  Extended Capability Header   ID 0x002E, version 2, next
    +0x04  DOE Capabilities      b0 Interrupt Support   b11:1 Interrupt Message Number
    +0x08  DOE Control           b0 Abort (W, reads 0)  b1 Interrupt Enable  b31 Go (W, reads 0)
    +0x0C  DOE Status            b0 Busy  b1 Interrupt Status (RW1C)  b2 Error
                                 b31 Data Object Ready
                                 Interrupt Status is set only with Interrupt Enable set,
                                 when an interrupt is generated: Data Object Ready or
                                 Error set, or Busy cleared (§6.30.3, §7.9.24.4)
    +0x10  DOE Write Data Mailbox   a write appends one DW; reads 0
    +0x14  DOE Read Data Mailbox    read = current DW (0 unless Ready); a write of any
                                    value advances to the next DW (ignored unless Ready)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum, IntEnum, IntFlag, auto

from .codec import HEADER_BYTES, MAX_OBJECT_DW, DoeDecodeError, DoeUnsupportedError

__all__ = [
    "DOE_CAP_SIZE", "DOE_CAP_VERSION", "DOE_EXT_CAP_ID", "DOE_TIMEOUT", "MAILBOX_TRANSITIONS",
    "STATE_STATUS", "DoeCapabilities", "DoeControl", "DoeMailbox", "DoeReg", "DoeStatus",
    "MailboxEvent", "MailboxState", "interrupt_condition",
]

log = logging.getLogger(__package__)

DOE_EXT_CAP_ID = 0x002E
DOE_CAP_VERSION = 2          # PCIe 6.x; version 1 devices use DOE Discovery version 0
DOE_CAP_SIZE = 0x18
DOE_TIMEOUT = 1.0            # §6.30.2: response (or Error) within 1 s of Go; Abort within 1 s


class DoeReg(IntEnum):
    """Register offsets inside the DOE Extended Capability (§7.9.24)."""

    CAP_HEADER = 0x00
    CAPABILITIES = 0x04
    CONTROL = 0x08
    STATUS = 0x0C
    WRITE_MAILBOX = 0x10
    READ_MAILBOX = 0x14


class DoeCapabilities(IntFlag):
    """DOE Capabilities register (§7.9.24.2); bits 11:1 hold the Interrupt Message Number."""

    INTERRUPT_SUPPORT = 1 << 0
    ATTENTION_MECHANISM_SUPPORT = 1 << 12
    ASYNC_MESSAGE_SUPPORT = 1 << 13


class DoeControl(IntFlag):
    """DOE Control register (§7.9.24.3)."""

    ABORT = 1 << 0
    INTERRUPT_ENABLE = 1 << 1
    ATTENTION_NOT_NEEDED = 1 << 2
    ASYNC_MESSAGE_ENABLE = 1 << 3
    GO = 1 << 31


class DoeStatus(IntFlag):
    """DOE Status register (§7.9.24.4)."""

    BUSY = 1 << 0
    INTERRUPT_STATUS = 1 << 1
    ERROR = 1 << 2
    ASYNC_MESSAGE_STATUS = 1 << 3
    AT_ATTENTION = 1 << 4
    DATA_OBJECT_READY = 1 << 31


class MailboxState(Enum):
    IDLE = auto()        # nothing in flight, write mailbox empty
    RECEIVING = auto()   # request DWs are being written
    BUSY = auto()        # Go accepted, the outcome is not visible yet (Busy = 1)
    READY = auto()       # response being read (Data Object Ready = 1)
    ERROR = auto()       # DOE Error = 1; only Abort leaves it


class MailboxEvent(Enum):
    WRITE = auto()         # a whole DW written to the Write Data Mailbox, with room for it
    OVERFLOW = auto()      # a DW written with the mailbox full (§6.30.2: Error)
    BAD_ACCESS = auto()    # a mailbox access without all bytes enabled (§6.30.2: Error)
    GO = auto()
    RESPONSE = auto()      # the handler's response is now visible
    DISCARD = auto()       # no response: malformed object or a handler that stays silent
    FAILURE = auto()       # unsupported type or internal error (§6.30.2: Error within 1 s)
    ACK = auto()           # Read Data Mailbox written, more DWs follow
    ACK_LAST = auto()      # ... the final DW was acknowledged
    ABORT = auto()


_S, _E = MailboxState, MailboxEvent
_ALL_EVENTS = tuple(MailboxEvent)

# One table (state, event) -> next state.  Entries that keep the state ignore the event.
MAILBOX_TRANSITIONS: dict[tuple[MailboxState, MailboxEvent], MailboxState] = {
    **{(s, _E.ABORT): _S.IDLE for s in MailboxState},
    **{(s, _E.BAD_ACCESS): _S.ERROR for s in MailboxState},
    **{(_S.ERROR, e): _S.ERROR for e in _ALL_EVENTS if e is not _E.ABORT},
    (_S.IDLE, _E.WRITE): _S.RECEIVING,
    (_S.IDLE, _E.OVERFLOW): _S.ERROR,
    (_S.IDLE, _E.GO): _S.IDLE,                 # nothing written: length mismatch, discarded
    (_S.IDLE, _E.ACK): _S.IDLE,                # ack while not Ready: ignored
    (_S.IDLE, _E.ACK_LAST): _S.IDLE,
    (_S.RECEIVING, _E.WRITE): _S.RECEIVING,
    (_S.RECEIVING, _E.OVERFLOW): _S.ERROR,
    (_S.RECEIVING, _E.GO): _S.BUSY,
    (_S.RECEIVING, _E.ACK): _S.RECEIVING,
    (_S.RECEIVING, _E.ACK_LAST): _S.RECEIVING,
    (_S.BUSY, _E.WRITE): _S.ERROR,             # Busy: no room for a new object -> overflow
    (_S.BUSY, _E.OVERFLOW): _S.ERROR,
    (_S.BUSY, _E.GO): _S.BUSY,                 # Go while Busy is undefined: ignored
    (_S.BUSY, _E.RESPONSE): _S.READY,
    (_S.BUSY, _E.DISCARD): _S.IDLE,
    (_S.BUSY, _E.FAILURE): _S.ERROR,
    (_S.BUSY, _E.ACK): _S.BUSY,
    (_S.BUSY, _E.ACK_LAST): _S.BUSY,
    (_S.READY, _E.WRITE): _S.ERROR,            # a new object before the response was read
    (_S.READY, _E.OVERFLOW): _S.ERROR,
    (_S.READY, _E.GO): _S.ERROR,
    (_S.READY, _E.ACK): _S.READY,
    (_S.READY, _E.ACK_LAST): _S.IDLE,          # Ready clears after the final DW's ack
}


# The Status bits each state shows (§7.9.24.4); Interrupt Status is kept apart.
STATE_STATUS: dict[MailboxState, DoeStatus] = {
    _S.IDLE: DoeStatus(0),
    _S.RECEIVING: DoeStatus(0),
    _S.BUSY: DoeStatus.BUSY,
    _S.READY: DoeStatus.DATA_OBJECT_READY,
    _S.ERROR: DoeStatus.ERROR,
}


def interrupt_condition(old: MailboxState, new: MailboxState) -> bool:
    """Whether moving from *old* to *new* is a DOE interrupt condition (§6.30.3,
    §7.9.24.4): Data Object Ready or DOE Error set, or DOE Busy cleared."""
    before, after = STATE_STATUS[old], STATE_STATUS[new]
    rose = after & ~before & (DoeStatus.DATA_OBJECT_READY | DoeStatus.ERROR)
    return bool(rose or before & ~after & DoeStatus.BUSY)


class DoeMailbox:
    """The DOE capability's registers (offsets :class:`DoeReg`) driven DW by DW.

    *handler* takes a whole request object and returns the whole response object or
    None; it raises :class:`DoeDecodeError` (object discarded), :class:`DoeUnsupportedError`
    or anything else (both: DOE Error).  It runs synchronously at Go; its outcome becomes
    visible *response_latency* seconds later (Busy until then), which must stay under the
    1-second rule of §6.30.2.  With *interrupt_message_number* the capability advertises
    DOE interrupts; :meth:`take_interrupt` then reports when one must be signalled.
    """

    def __init__(self, handler: Callable[[bytes], bytes | None], *,
                 max_object_dw: int = MAX_OBJECT_DW, response_latency: float = 0.0,
                 interrupt_message_number: int | None = None, name: str = "doe") -> None:
        if not 2 <= max_object_dw <= MAX_OBJECT_DW:
            raise ValueError(f"max object size {max_object_dw} DW outside 2..2^18")
        if not 0.0 <= response_latency < DOE_TIMEOUT:
            raise ValueError("§6.30.2: the response must be ready within 1 s of Go")
        if interrupt_message_number is not None and not 0 <= interrupt_message_number < 1 << 11:
            raise ValueError("the Interrupt Message Number has 11 bits")
        self.handler = handler
        self.max_object_dw = max_object_dw
        self.response_latency = response_latency
        self.interrupt_message_number = interrupt_message_number
        self.log = log.getChild(name)
        self.state = MailboxState.IDLE
        self.interrupt_enable = False
        self.interrupt_status = False
        self._irq = False
        self._write = bytearray()
        self._read = b""
        self._read_pos = 0
        self._due = 0.0
        self._outcome: tuple[MailboxEvent, bytes] = (MailboxEvent.DISCARD, b"")

    # -- registers ----------------------------------------------------------------------------
    @property
    def capabilities(self) -> int:
        if self.interrupt_message_number is None:
            return 0
        return DoeCapabilities.INTERRUPT_SUPPORT | self.interrupt_message_number << 1

    @property
    def status(self) -> int:
        value = int(STATE_STATUS[self.state])
        if self.interrupt_status:
            value |= DoeStatus.INTERRUPT_STATUS
        return value

    def read(self, reg: int, now: float) -> int:
        """A dword read of register *reg*; reads have no side effects beyond time passing."""
        self._advance(now)
        if reg == DoeReg.CAPABILITIES:
            return self.capabilities
        if reg == DoeReg.CONTROL:   # Abort and Go read 0; unsupported enables are RsvdP
            return DoeControl.INTERRUPT_ENABLE if self.interrupt_enable else 0
        if reg == DoeReg.STATUS:
            return self.status
        if reg == DoeReg.WRITE_MAILBOX:
            return 0
        if reg == DoeReg.READ_MAILBOX:
            if self.state is not MailboxState.READY:
                return 0
            return int.from_bytes(self._read[self._read_pos:self._read_pos + 4], "little")
        raise ValueError(f"no DOE mailbox register at +{reg:#x}")

    def write(self, reg: int, value: int, now: float, byte_enable: int = 0xF) -> None:
        """A write of register *reg*; *byte_enable* has one bit per byte written."""
        self._advance(now)
        mask = sum(0xFF << (8 * i) for i in range(4) if byte_enable >> i & 1)
        value &= mask
        if reg in (DoeReg.CAPABILITIES, DoeReg.CAP_HEADER):
            return
        if reg == DoeReg.CONTROL:
            self._control(value, mask, now)
        elif reg == DoeReg.STATUS:
            if value & DoeStatus.INTERRUPT_STATUS:
                self.interrupt_status = False
        elif reg in (DoeReg.WRITE_MAILBOX, DoeReg.READ_MAILBOX):
            if byte_enable & 0xF != 0xF:
                self.log.warning("DOE mailbox access without all bytes enabled: Error")
                self._event(MailboxEvent.BAD_ACCESS)
            elif reg == DoeReg.WRITE_MAILBOX:
                self._write_dw(value)
            else:
                self._ack()
        else:
            raise ValueError(f"no DOE mailbox register at +{reg:#x}")

    def abort(self) -> None:
        """Abort (Control bit 0, FLR, reset): clears Ready, Error and both mailboxes."""
        self._event(MailboxEvent.ABORT)

    def reset(self) -> None:
        """Conventional reset or FLR: abort the transfer, registers back to their defaults."""
        self.abort()
        self.interrupt_enable = self.interrupt_status = self._irq = False

    def take_interrupt(self) -> bool:
        """True once for every DOE interrupt the device must now signal (§6.30.3)."""
        irq, self._irq = self._irq, False
        return irq

    # -- internals ----------------------------------------------------------------------------
    def _control(self, value: int, mask: int, now: float) -> None:
        if mask & DoeControl.INTERRUPT_ENABLE and self.interrupt_message_number is not None:
            self.interrupt_enable = bool(value & DoeControl.INTERRUPT_ENABLE)
        if value & DoeControl.ABORT:
            self.abort()   # Abort wins over a Go written together with it
        elif value & DoeControl.GO:
            self._go(now)

    def _write_dw(self, value: int) -> None:
        if len(self._write) >= 4 * self.max_object_dw:
            self.log.warning("DOE write mailbox overflow at %d DW: Error", self.max_object_dw)
            self._event(MailboxEvent.OVERFLOW)
            return
        if self._event(MailboxEvent.WRITE) is MailboxState.RECEIVING:
            self._write += value.to_bytes(4, "little")

    def _ack(self) -> None:
        last = self._read_pos + 4 >= len(self._read)
        if self._event(MailboxEvent.ACK_LAST if last else MailboxEvent.ACK) is MailboxState.READY:
            self._read_pos += 4

    def _go(self, now: float) -> None:
        obj, was = bytes(self._write), self.state
        if self._event(MailboxEvent.GO) is not MailboxState.BUSY or was is MailboxState.BUSY:
            return   # nothing to send, Error, or a Go while Busy (ignored)
        self._write.clear()
        try:
            rsp = self.handler(obj)
            self._outcome = (MailboxEvent.DISCARD, b"") if rsp is None \
                else (MailboxEvent.RESPONSE, rsp)
        except DoeDecodeError as exc:
            self.log.info("DOE object discarded: %s", exc)
            self._outcome = (MailboxEvent.DISCARD, b"")
        except DoeUnsupportedError as exc:
            # §6.30.1 lets an unsupported type be silently discarded; we set Error instead
            # (§6.30.2: "Ready ... otherwise Error within 1 s"), so a requester aborts at once
            # rather than after its 1 s timeout.
            self.log.info("DOE Error: %s", exc)
            self._outcome = (MailboxEvent.FAILURE, b"")
        except Exception:   # an internal error of the device: DOE Error (§6.30.2)
            self.log.exception("DOE handler failed: DOE Error")
            self._outcome = (MailboxEvent.FAILURE, b"")
        self._due = now + self.response_latency
        self._advance(now)

    def _advance(self, now: float) -> None:
        if self.state is MailboxState.BUSY and now >= self._due:
            event, rsp = self._outcome
            self._outcome = (MailboxEvent.DISCARD, b"")
            if event is MailboxEvent.RESPONSE and len(rsp) < HEADER_BYTES:
                self.log.error("DOE handler returned %d bytes, not an object: Error", len(rsp))
                event = MailboxEvent.FAILURE
            if self._event(event) is MailboxState.READY:
                self._read, self._read_pos = rsp, 0

    def _event(self, event: MailboxEvent) -> MailboxState:
        old = self.state
        new = MAILBOX_TRANSITIONS[(old, event)]
        self.state = new
        if new is not old:
            self.log.debug("%s --%s--> %s", old.name, event.name, new.name)
            if new is MailboxState.IDLE or new is MailboxState.ERROR:
                self._write.clear()
                self._read, self._read_pos = b"", 0
            if interrupt_condition(old, new):
                self._interrupt()
        return new

    def _interrupt(self) -> None:
        """An interrupt condition (§6.30.3): with DOE Interrupt Enable set, an interrupt is
        generated and DOE Interrupt Status set (§7.9.24.4: it is Set "when an interrupt is
        generated"); with it clear, nothing happens.  While Interrupt Status is still set
        (software has not cleared it, RW1C) no further message is sent."""
        if self.interrupt_message_number is None or not self.interrupt_enable:
            return
        if not self.interrupt_status:
            self._irq = True
        self.interrupt_status = True
