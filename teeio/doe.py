"""PCI Data Object Exchange (DOE): data objects, DOE Discovery, a dispatcher, the mailbox.

Sans-IO: bytes in, bytes out; time comes in as a parameter (``now``, seconds on any
monotonic clock).  Used by the device (mailbox registers and host socket), the TSM
(requester over the socket) and the guest agent (requester over config space).

Data object (PCIe 6.3 §6.30.1, Tables 6-28/6-29), little-endian DWs::

     31        24 23          16 15                              0
    +------------+--------------+--------------------------------+
    |  reserved  | Data Obj Type|           Vendor ID            |  DW0 (Header 1)
    +--+--+------+--------------+-----+--------------------------+
    |rsvd | Connection ID (29:18)     |  Length in DW (17:0)     |  DW1 (Header 2)
    +-----+---------------------------+--------------------------+
    |                 payload, zero-padded to a DW                |  DW2 ...
    +-------------------------------------------------------------+

    Length counts the two header DWs; 0 encodes 2^18 DW (1 MiB), 1 is not allowed.

DOE Extended Capability (PCIe 6.3 §7.9.24), 0x18 bytes::

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

Also here: the framing of the DMTF spdm-emu platform socket (``spdm_emu_common/command.h``,
QEMU ``backends/spdm-socket.c``), which carries whole DOE objects between host-side tools.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag, auto
from typing import Any

from teeio.doe_pcap import DoeDirection

log = logging.getLogger(__name__)

# -- definitions (PCIe 6.3 §6.30, §7.9.24) ------------------------------------------------------

DOE_EXT_CAP_ID = 0x002E
DOE_CAP_VERSION = 2          # PCIe 6.x; version 1 devices use DOE Discovery version 0
DOE_CAP_SIZE = 0x18
DOE_TIMEOUT = 1.0            # §6.30.2: response (or Error) within 1 s of Go; Abort within 1 s
MAX_OBJECT_DW = 1 << 18      # §6.30.1: 2 DW .. 2^18 DW
MAX_OBJECT_BYTES = 4 * MAX_OBJECT_DW
HEADER_BYTES = 8
DISCOVERY_VERSION = 2        # §6.30.1.1 Table 6-30: 02h when the capability version is >= 2
PCI_SIG_VENDOR_ID = 0x0001
INVALID_VENDOR_ID = 0xFFFF   # Discovery response for an index out of range


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


class DataObjectType(IntEnum):
    """PCI-SIG defined data object types, Vendor ID 0001h (§6.30.1.1 Table 6-33)."""

    DOE_DISCOVERY = 0x00
    CMA_SPDM = 0x01
    SECURED_CMA_SPDM = 0x02
    CMA_SPDM_CONNECTION_ID = 0x03
    SECURED_CMA_SPDM_CONNECTION_ID = 0x04
    ASYNC_MESSAGE = 0x05


_CONNECTION_ID_TYPES = (DataObjectType.CMA_SPDM_CONNECTION_ID,
                        DataObjectType.SECURED_CMA_SPDM_CONNECTION_ID)


def protocol_name(vendor_id: int, data_object_type: int) -> str:
    """``VVVV:TT`` in hex, as Linux names the files in ``doe_features``."""
    return f"{vendor_id:04x}:{data_object_type:02x}"


def pad_dw(data: bytes) -> bytes:
    """Zero-pad *data* to a whole number of DWs (§6.30.1)."""
    return data + bytes(-len(data) % 4)


# -- errors -------------------------------------------------------------------------------------

class DoeError(ValueError):
    """A DOE object that cannot be processed; keeps the raw bytes and the offending offset."""

    def __init__(self, message: str, data: bytes = b"", offset: int = 0) -> None:
        super().__init__(message)
        self.data = data
        self.offset = offset


class DoeDecodeError(DoeError):
    """Malformed object (bad length, reserved bits set): silently discarded (§6.30.1)."""


class DoeUnsupportedError(DoeError):
    """No handler for the object's Vendor ID / Data Object Type."""


# -- data objects -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DoeObject:
    """One data object; *payload* is already DW-padded (use :func:`pad_dw`)."""

    vendor_id: int
    data_object_type: int
    payload: bytes = b""
    connection_id: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.vendor_id <= 0xFFFF or not 0 <= self.data_object_type <= 0xFF:
            raise ValueError(f"bad DOE protocol {self.vendor_id:#x}:{self.data_object_type:#x}")
        if len(self.payload) % 4:
            raise ValueError(f"DOE payload of {len(self.payload)} bytes is not DW-padded")
        if HEADER_BYTES + len(self.payload) > MAX_OBJECT_BYTES:
            raise ValueError(f"DOE payload of {len(self.payload)} bytes exceeds 2^18 DW")
        if not 0 <= self.connection_id <= 0xFFF:
            raise ValueError(f"connection id {self.connection_id:#x} exceeds 12 bits")
        if self.connection_id and not self._has_connection_id():
            raise ValueError("only the PCI-SIG connection-id types carry a connection id")

    def _has_connection_id(self) -> bool:
        return self.vendor_id == PCI_SIG_VENDOR_ID and self.data_object_type in _CONNECTION_ID_TYPES

    @property
    def length_dw(self) -> int:
        return 2 + len(self.payload) // 4

    @property
    def protocol(self) -> tuple[int, int]:
        return self.vendor_id, self.data_object_type

    def encode(self) -> bytes:
        length = self.length_dw & (MAX_OBJECT_DW - 1)   # 2^18 DW is encoded as 0
        return struct.pack("<HBBI", self.vendor_id, self.data_object_type, 0,
                           length | self.connection_id << 18) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> DoeObject:
        data = bytes(data)
        if len(data) < HEADER_BYTES:
            raise DoeDecodeError(f"DOE object of {len(data)} bytes is shorter than its header",
                                 data, len(data))
        if len(data) % 4:
            raise DoeDecodeError(f"DOE object of {len(data)} bytes is not a whole number of DWs",
                                 data, len(data))
        vendor, dtype, reserved, dw1 = struct.unpack_from("<HBBI", data)
        if reserved:
            raise DoeDecodeError(f"reserved bits 31:24 of header DW0 are {reserved:#x}", data, 3)
        if dw1 >> 30:
            raise DoeDecodeError(f"reserved bits 31:30 of header DW1 are set ({dw1:#010x})",
                                 data, 4)
        length = dw1 & (MAX_OBJECT_DW - 1) or MAX_OBJECT_DW
        if length == 1:
            raise DoeDecodeError("header DW1 Length 1 is not allowed", data, 4)
        if length * 4 != len(data):
            raise DoeDecodeError(f"header DW1 says {length} DW, {len(data) // 4} DW received",
                                 data, 4)
        conn = (dw1 >> 18) & 0xFFF
        obj = cls(vendor, dtype, data[HEADER_BYTES:])
        if conn:
            if not obj._has_connection_id():
                raise DoeDecodeError(f"reserved bits 29:18 of header DW1 are {conn:#x}", data, 4)
            obj = cls(vendor, dtype, data[HEADER_BYTES:], conn)
        return obj


# -- DOE Discovery (§6.30.1.1) ------------------------------------------------------------------

@dataclass(frozen=True)
class DiscoveryRequest:
    """Request DW (Table 6-30): [7:0] Index, [15:8] DOE Discovery Version, [31:16] reserved."""

    index: int
    version: int = DISCOVERY_VERSION

    def encode(self) -> bytes:
        return struct.pack("<BBH", self.index, self.version, 0)

    @classmethod
    def decode(cls, payload: bytes) -> DiscoveryRequest:
        if len(payload) != 4:
            raise DoeDecodeError(f"discovery request payload of {len(payload)} bytes, want 4",
                                 bytes(payload), 0)
        index, version, _reserved = struct.unpack("<BBH", payload)  # responders ignore 31:16
        return cls(index, version)


@dataclass(frozen=True)
class DiscoveryResponse:
    """Response DW (Table 6-31): [15:0] Vendor ID (FFFFh: bad index), [23:16] type, [31:24] next."""

    vendor_id: int
    data_object_type: int
    next_index: int

    def encode(self) -> bytes:
        return struct.pack("<HBB", self.vendor_id, self.data_object_type, self.next_index)

    @classmethod
    def decode(cls, payload: bytes) -> DiscoveryResponse:
        if len(payload) != 4:
            raise DoeDecodeError(f"discovery response payload of {len(payload)} bytes, want 4",
                                 bytes(payload), 0)
        return cls(*struct.unpack("<HBB", payload))

    @property
    def valid(self) -> bool:
        return self.vendor_id != INVALID_VENDOR_ID


def discover(exchange: Callable[[DoeObject], DoeObject | None],
             version: int = DISCOVERY_VERSION) -> list[tuple[int, int]]:
    """Walk DOE Discovery from index 0 through *exchange*; returns (vendor, type) in order.

    Raises :class:`DoeError` on a missing, mismatched or inconsistent answer.
    """
    found: list[tuple[int, int]] = []
    index = 0
    while True:
        req = DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY,
                        DiscoveryRequest(index, version).encode())
        rsp = exchange(req)
        if rsp is None:
            raise DoeError(f"no response to DOE Discovery index {index}")
        if rsp.protocol != req.protocol:
            raise DoeError(f"DOE Discovery index {index} answered by "
                           f"{protocol_name(*rsp.protocol)}", rsp.encode())
        # §6.30.1: an object longer than expected is processed up to the expected length.
        entry = DiscoveryResponse.decode(rsp.payload[:4])
        if not entry.valid:
            raise DoeError(f"DOE Discovery index {index} reported invalid", rsp.encode())
        if index == 0 and (entry.vendor_id, entry.data_object_type) != req.protocol:
            raise DoeError("DOE Discovery index 0 is not DOE Discovery itself", rsp.encode())
        found.append((entry.vendor_id, entry.data_object_type))
        if entry.next_index == 0:
            return found
        if entry.next_index != index + 1:  # Table 6-31: "increment the queried index by 1"
            raise DoeError(f"DOE Discovery index {index} says next {entry.next_index}",
                           rsp.encode())
        index = entry.next_index


# -- dispatcher ---------------------------------------------------------------------------------

Handler = Callable[[bytes], bytes | None]


class DoeDispatcher:
    """Routes whole DOE objects to per-protocol handlers and answers DOE Discovery.

    A handler gets the object's (DW-padded) payload and returns the response payload
    (padded here) or ``None`` for "no response" (the object is dropped, as SPDM and
    IDE_KM do with some requests).  The response carries the request's protocol.

    One lock serialises every object, whichever transport it came from (mailbox or
    host socket).  A device passes its own re-entrant lock so that handlers may touch
    device state without any lock-order question.

    :attr:`tap`, when set, sees every whole object under that lock, in order: the
    request as it arrived, then the response if there is one --
    whichever transport carried them (a DOE capture, :mod:`teeio.doe_pcap`).
    """

    def __init__(self, lock: contextlib.AbstractContextManager[Any] | None = None,
                 name: str = "doe") -> None:
        self._lock = lock if lock is not None else threading.RLock()
        self._handlers: dict[tuple[int, int], Handler] = {}
        self.log = log.getChild(name)
        self.objects = 0      # objects handed to handle_object
        self.responses = 0    # response objects produced
        self.tap: Callable[[DoeDirection, bytes], None] | None = None

    def register(self, vendor_id: int, data_object_type: int, handler: Handler) -> None:
        key = (vendor_id, data_object_type)
        if not 0 <= vendor_id < INVALID_VENDOR_ID or not 0 <= data_object_type <= 0xFF:
            raise ValueError(f"bad DOE protocol {vendor_id:#x}:{data_object_type:#x}")
        with self._lock:
            if key == (PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY) or key in self._handlers:
                raise ValueError(f"DOE protocol {protocol_name(*key)} is already registered")
            if len(self._handlers) + 1 >= 256:   # Discovery indices are 8 bits
                raise ValueError("a DOE instance lists at most 256 protocols")
            self._handlers[key] = handler

    def protocols(self) -> list[tuple[int, int]]:
        """What DOE Discovery reports, in index order: 0001:00 first, then registration order."""
        with self._lock:
            return [(PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY), *self._handlers]

    def handle_object(self, obj: bytes) -> bytes | None:
        """Process one whole DOE object; the whole response object, or None (no response).

        Raises :class:`DoeDecodeError` for a malformed object and
        :class:`DoeUnsupportedError` for a protocol nobody registered.  Anything a
        handler raises propagates: the transport decides (mailbox: DOE Error).
        """
        with self._lock:
            self.objects += 1
            if self.tap is not None:
                self.tap(DoeDirection.REQUEST, bytes(obj))
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("--> %d bytes: %s", len(obj), bytes(obj).hex())
            req = DoeObject.decode(obj)
            if req.protocol == (PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY):
                payload = self._discovery(req.payload)
            else:
                handler = self._handlers.get(req.protocol)
                if handler is None:
                    raise DoeUnsupportedError(
                        f"no DOE handler for {protocol_name(*req.protocol)}", bytes(obj), 0)
                payload = handler(req.payload)
            if payload is None:
                self.log.debug("<-- no response to %s", protocol_name(*req.protocol))
                return None
            rsp = DoeObject(req.vendor_id, req.data_object_type, pad_dw(payload),
                            req.connection_id).encode()
            self.responses += 1
            if self.tap is not None:
                self.tap(DoeDirection.RESPONSE, rsp)
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("<-- %d bytes: %s", len(rsp), rsp.hex())
            return rsp

    def _discovery(self, payload: bytes) -> bytes | None:
        if len(payload) < 4:
            return None   # §6.30.1: shorter than expected -> silently discarded
        # Longer than expected: the first DW is processed, the rest discarded (§6.30.1).
        # Any Discovery Version is answered: the response layout is the same.
        req = DiscoveryRequest.decode(payload[:4])
        table = self.protocols()
        if req.index >= len(table):
            return DiscoveryResponse(INVALID_VENDOR_ID, 0xFF, 0).encode()
        nxt = req.index + 1 if req.index + 1 < len(table) else 0
        return DiscoveryResponse(*table[req.index], nxt).encode()


# -- mailbox ------------------------------------------------------------------------------------

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


# -- DOE over the spdm-emu platform socket ([spdm-emu] spdm_emu_common/command.h) ---------------

class SocketCommand(IntEnum):
    NORMAL = 0x0001
    OOB_ENCAP_KEY_UPDATE = 0x8001
    OOB_ENCAP_ENDPOINT_INFO = 0x8002
    CONTINUE = 0xFFFD
    SHUTDOWN = 0xFFFE
    UNKNOWN = 0xFFFF
    TEST = 0xDEAD


class SocketTransport(IntEnum):
    NONE = 0
    MCTP = 1
    PCI_DOE = 2
    TCP = 3


SOCKET_HEADER = struct.Struct(">III")     # command, transport type, payload size (big-endian)
SOCKET_DEFAULT_PORT = 2323
CLIENT_HELLO = b"Client Hello!\0"
SERVER_HELLO = b"Server Hello!\0"
# The largest payload taken: a whole DOE object of 2^18 DW.  (QEMU's own client buffer,
# SPDM_SOCKET_MAX_MESSAGE_BUFFER_SIZE, is only 0x1200 bytes; that limits QEMU, not us.)
SOCKET_MAX_PAYLOAD = MAX_OBJECT_BYTES


@dataclass(frozen=True)
class SocketHeader:
    command: int
    transport: int
    size: int

    def encode(self) -> bytes:
        return SOCKET_HEADER.pack(self.command, self.transport, self.size)

    @classmethod
    def decode(cls, data: bytes) -> SocketHeader:
        if len(data) != SOCKET_HEADER.size:
            raise ValueError(f"socket header of {len(data)} bytes, want {SOCKET_HEADER.size}")
        return cls(*SOCKET_HEADER.unpack(data))

    def command_name(self) -> str:
        try:
            return SocketCommand(self.command).name
        except ValueError:
            return f"{self.command:#06x}"
