"""IDE_KM: the IDE key management protocol (PCIe 6.x §6.33.3) — codecs, device-side
responder, requester helpers.

Transport (§6.33.3, reference notes §3.1): an IDE_KM object is the payload of an SPDM
VENDOR_DEFINED_REQUEST/RESPONSE with StandardID 3 (PCI-SIG) and VendorID 0x0001,
inside a secured session.  The vendor payload starts with the PCI-SIG Protocol ID
(0x00 = IDE_KM; TDISP is 0x01), so one handler per (StandardID, VendorID) must
dispatch on that byte: :class:`PciSigProtocolMux`.

Objects (offsets from the Protocol ID byte; multi-byte fields little-endian)::

    QUERY       00 00 rsvd Port                                                    4 B
    QUERY_RESP  00 01 rsvd Port DevFn Bus Seg MaxPort | IDE cap registers (DWs)    8+4n B
    KEY_PROG    00 02 rsvd rsvd Stream rsvd KSS Port | Key (8 DW) | IFV (2 DW)     48 B
    KP_ACK      00 03 rsvd rsvd Stream Status KSS Port                             8 B
    K_SET_GO    00 04 rsvd rsvd Stream rsvd KSS Port                               8 B
    K_SET_STOP  00 05 (as K_SET_GO)                                                8 B
    K_GOSTOP_ACK 00 06 (as K_SET_GO)                                               8 B

    KSS (KeySubStream) = [7:4] Sub-Stream (0 PR, 1 NPR, 2 CPL) | [3:2] rsvd |
                         [1] RxTxB (0 Rx, 1 Tx) | [0] Key Set (0 K0, 1 K1)

Key and IFV byte order (reference §3.2, tee-io-validator ``key_byte_order.md``, PCIe
Appendix L): the key's DWs go most significant first, each a LE u32, so the wire holds
``k[3] k[2] k[1] k[0] k[7] ...``; the IFV is two LE u32s, bits 63:32 then 31:0.

Responder rules (§6.33.3) and the choices made where the spec leaves room:

* not inside a secured session → no response (:class:`DropRequest`);
* wrong size → no response, except a KEY_PROG whose 8-byte head parses: that gets
  KP_ACK *Incorrect Length* (the status exists for it);
* QUERY / KEY_PROG bind the port to the session; IDE_KM from any other session is dropped
  while it is open; when it closes (:meth:`IdeKmResponder.session_closed`) every key is
  invalidated at once (streams Insecure), then a new session may bind;
* KEY_PROG: PortIndex other than the accepted ones → *Unsupported PortIndex*; unknown
  stream, reserved KSS bits, sub-stream > 2 → *Unsupported Value*; reprogramming the
  key set in use → *Unspecified Failure*;
* K_SET_GO / K_SET_STOP that are malformed (bad port, unknown stream, bad KSS) → no
  K_GOSTOP_ACK (the spec's recommendation); K_SET_GO also needs the key it names (that
  key set, direction and sub-stream) programmed first, else no K_GOSTOP_ACK either.  That
  is the spec's per-sub-stream minimum: DMTF spdm-emu's requester programs and GOes only
  the PR sub-stream.  A stream still turns Secure only once all six (Rx/Tx × PR/NPR/CPL)
  have a GO key set (``ide_cap``), so a partial GO never protects anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Protocol, Self, TypeVar

from .ide import Direction, IdeKey, IdeKeyStateError, KeySet, SubStream
from .spdm.defs import PCI_SIG_VENDOR_ID, ErrorCode, RegistryId, RequestCode
from .spdm.errors import DropRequest, SpdmError

__all__ = [
    "IDE_KM_PROTOCOL_ID", "PCI_SIG_STANDARD_ID", "PCI_SIG_VENDOR_ID", "IdeKeyStore",
    "IdeKmClient", "IdeKmDecodeError", "IdeKmError", "IdeKmObject", "IdeKmResponder",
    "IdeKmResponseError", "KGoStopAck", "KSetGo", "KSetStop", "KeyProg", "KpAck",
    "KpStatus", "ObjectId", "PciSigProtocol", "PciSigProtocolMux", "Query", "QueryResp",
    "decode_object", "expected_reg_count", "key_from_wire", "key_to_wire",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

PCI_SIG_STANDARD_ID = RegistryId.PCISIG
IDE_KM_PROTOCOL_ID = 0x00


class PciSigProtocol(IntEnum):
    """Protocol ID, byte 0 of PCI-SIG vendor-defined payloads (§6.31.3)."""

    IDE_KM = 0x00
    TDISP = 0x01


class ObjectId(IntEnum):
    """IDE_KM Object IDs (§6.33.3; libspdm ``pci_idekm.h``)."""

    QUERY = 0x00
    QUERY_RESP = 0x01
    KEY_PROG = 0x02
    KP_ACK = 0x03
    K_SET_GO = 0x04
    K_SET_STOP = 0x05
    K_GOSTOP_ACK = 0x06


class KpStatus(IntEnum):
    """KP_ACK Status (§6.33.3); 5..FF are reserved and read as UNSPECIFIED_FAILURE."""

    SUCCESS = 0
    INCORRECT_LENGTH = 1
    UNSUPPORTED_PORT_INDEX = 2
    UNSUPPORTED_VALUE = 3
    UNSPECIFIED_FAILURE = 4


class IdeKmError(Exception):
    """Base of IDE_KM errors."""


class IdeKmDecodeError(IdeKmError, ValueError):
    """A malformed IDE_KM object; keeps the raw bytes and the failing offset."""

    def __init__(self, message: str, raw: bytes = b"", offset: int = 0) -> None:
        self.raw = bytes(raw)
        self.offset = offset
        super().__init__(f"IDE_KM: {message} (at offset {offset} of {len(raw)} bytes)")


class IdeKmResponseError(IdeKmError):
    """Requester side: the response is not the one the request calls for, or KP_ACK
    reports a failure (``status`` set)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


# --- field helpers --------------------------------------------------------------------------------

def key_to_wire(key: bytes) -> bytes:
    """AES key (crypto-library order) -> KEY_PROG byte stream: each DW's bytes reversed."""
    if len(key) % 4:
        raise ValueError("key length must be a multiple of 4")
    return b"".join(key[i:i + 4][::-1] for i in range(0, len(key), 4))


key_from_wire = key_to_wire     # the transformation is its own inverse


def _ifv_to_wire(ifv: int) -> bytes:
    return (ifv >> 32).to_bytes(4, "little") + (ifv & 0xFFFFFFFF).to_bytes(4, "little")


def _ifv_from_wire(b: bytes) -> int:
    return int.from_bytes(b[0:4], "little") << 32 | int.from_bytes(b[4:8], "little")


def _kss(key_set: KeySet, direction: Direction, substream: SubStream) -> int:
    return int(key_set) | int(direction) << 1 | int(substream) << 4


def _parse_kss(kss: int, raw: bytes, off: int) -> tuple[KeySet, Direction, SubStream]:
    if kss & 0x0C:
        raise IdeKmDecodeError(f"KeySubStream 0x{kss:02x}: reserved bits 3:2 set", raw, off)
    try:
        sub = SubStream(kss >> 4)
    except ValueError:
        raise IdeKmDecodeError(f"KeySubStream 0x{kss:02x}: unknown sub-stream {kss >> 4}",
                               raw, off) from None
    return KeySet(kss & 1), Direction(kss >> 1 & 1), sub


def _check_u8(name: str, v: int) -> None:
    if not 0 <= v <= 0xFF:
        raise ValueError(f"{name} = {v} out of range 0..255")


def _head(data: bytes, oid: ObjectId, size: int | None) -> None:
    """Protocol ID, Object ID and (if fixed) exact size of an object."""
    if len(data) < 2:
        raise IdeKmDecodeError("truncated: no IDE_KM header", data, len(data))
    if data[0] != IDE_KM_PROTOCOL_ID:
        raise IdeKmDecodeError(f"Protocol ID 0x{data[0]:02x} is not IDE_KM", data, 0)
    if data[1] != oid:
        raise IdeKmDecodeError(f"Object ID 0x{data[1]:02x}, expected {oid.name}", data, 1)
    if size is not None and len(data) != size:
        raise IdeKmDecodeError(f"{oid.name} must be {size} bytes, got {len(data)}", data,
                               min(len(data), size))


def _zero(data: bytes, start: int, end: int, what: str) -> None:
    for i in range(start, end):
        if data[i]:
            raise IdeKmDecodeError(f"reserved byte {what} is 0x{data[i]:02x}", data, i)


def expected_reg_count(regs: tuple[int, ...] | list[int]) -> int:
    """DW count of IDE cap contents (minus header) implied by its own capability
    registers (§7.9.26): cap + control, 2 per Link IDE TC, 5 + 3·nAddr per selective
    stream.  Raises ValueError if *regs* ends before a selective block's capability."""
    if len(regs) < 2:
        raise ValueError("IDE registers need at least the capability and control DWs")
    cap = regs[0]
    n = 2
    if cap & 0x1:
        n += 2 * ((cap >> 13 & 7) + 1)
    if cap & 0x2:
        for _ in range((cap >> 16 & 0xFF) + 1):
            if n >= len(regs):
                raise ValueError(f"IDE registers end at DW {len(regs)} inside the "
                                 "selective stream blocks")
            n += 5 + 3 * (regs[n] & 0xF)
    return n


# --- objects --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.QUERY
    port_index: int = 0

    def __post_init__(self) -> None:
        _check_u8("port_index", self.port_index)

    def encode(self) -> bytes:
        return bytes((IDE_KM_PROTOCOL_ID, self.OBJECT_ID, 0, self.port_index))

    @classmethod
    def decode(cls, data: bytes) -> Query:
        data = bytes(data)
        _head(data, cls.OBJECT_ID, 4)
        _zero(data, 2, 3, "2")
        return cls(data[3])


@dataclass(frozen=True)
class QueryResp:
    """QUERY_RESP: routing identity and the IDE capability contents (minus its header)."""

    OBJECT_ID: ClassVar[ObjectId] = ObjectId.QUERY_RESP
    port_index: int
    dev_func: int
    bus: int
    segment: int
    max_port_index: int
    regs: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("port_index", "dev_func", "bus", "segment", "max_port_index"):
            _check_u8(name, getattr(self, name))
        object.__setattr__(self, "regs", tuple(self.regs))
        if any(not 0 <= r <= 0xFFFFFFFF for r in self.regs):
            raise ValueError("IDE register values must be u32")
        want = expected_reg_count(self.regs)
        if want != len(self.regs):
            raise ValueError(f"IDE registers: the capability describes {want} DWs, "
                             f"got {len(self.regs)}")

    @property
    def capability(self) -> int:
        return self.regs[0]

    @property
    def control(self) -> int:
        return self.regs[1]

    def encode(self) -> bytes:
        return (bytes((IDE_KM_PROTOCOL_ID, self.OBJECT_ID, 0, self.port_index, self.dev_func,
                       self.bus, self.segment, self.max_port_index))
                + b"".join(r.to_bytes(4, "little") for r in self.regs))

    @classmethod
    def decode(cls, data: bytes) -> QueryResp:
        data = bytes(data)
        _head(data, cls.OBJECT_ID, None)
        if len(data) < 16 or len(data) % 4:
            raise IdeKmDecodeError("QUERY_RESP must be 8 bytes plus at least 2 whole DWs, "
                                   f"got {len(data)} bytes", data, len(data))
        _zero(data, 2, 3, "2")
        regs = tuple(int.from_bytes(data[i:i + 4], "little") for i in range(8, len(data), 4))
        try:
            return cls(data[3], data[4], data[5], data[6], data[7], regs)
        except ValueError as e:
            raise IdeKmDecodeError(str(e), data, 8) from None


@dataclass(frozen=True)
class KeyProg:
    """KEY_PROG: one key (and IFV) for one stream / key set / direction / sub-stream."""

    OBJECT_ID: ClassVar[ObjectId] = ObjectId.KEY_PROG
    SIZE: ClassVar[int] = 48
    stream_id: int
    key_set: KeySet
    direction: Direction
    substream: SubStream
    key: bytes = field(repr=False)
    ifv: int = field(default=1, repr=False)
    port_index: int = 0

    def __post_init__(self) -> None:
        _check_u8("stream_id", self.stream_id)
        _check_u8("port_index", self.port_index)
        object.__setattr__(self, "key_set", KeySet(self.key_set))
        object.__setattr__(self, "direction", Direction(self.direction))
        object.__setattr__(self, "substream", SubStream(self.substream))
        object.__setattr__(self, "key", bytes(self.key))
        if len(self.key) != 32:
            raise ValueError(f"KEY_PROG key must be 32 bytes, got {len(self.key)}")
        if not 0 <= self.ifv < 1 << 64:
            raise ValueError("IFV must fit in 64 bits")

    @classmethod
    def for_key(cls, stream_id: int, key_set: KeySet, direction: Direction,
                substream: SubStream, key: IdeKey, port_index: int = 0) -> KeyProg:
        return cls(stream_id, key_set, direction, substream, key.key, key.ifv, port_index)

    @property
    def ide_key(self) -> IdeKey:
        return IdeKey(self.key, self.ifv)

    def encode(self) -> bytes:
        return (bytes((IDE_KM_PROTOCOL_ID, self.OBJECT_ID, 0, 0, self.stream_id, 0,
                       _kss(self.key_set, self.direction, self.substream), self.port_index))
                + key_to_wire(self.key) + _ifv_to_wire(self.ifv))

    @classmethod
    def decode(cls, data: bytes) -> KeyProg:
        data = bytes(data)
        _head(data, cls.OBJECT_ID, cls.SIZE)
        _zero(data, 2, 4, "2..3")
        _zero(data, 5, 6, "5")
        ks, d, s = _parse_kss(data[6], data, 6)
        return cls(data[4], ks, d, s, key_from_wire(data[8:40]), _ifv_from_wire(data[40:48]),
                   data[7])


@dataclass(frozen=True)
class _StreamObject:
    """The 8-byte objects: Stream ID at 4, byte 5 (status or reserved), KSS at 6, Port at 7."""

    OBJECT_ID: ClassVar[ObjectId]
    stream_id: int
    key_set: KeySet
    direction: Direction
    substream: SubStream
    port_index: int = 0

    def __post_init__(self) -> None:
        _check_u8("stream_id", self.stream_id)
        _check_u8("port_index", self.port_index)
        object.__setattr__(self, "key_set", KeySet(self.key_set))
        object.__setattr__(self, "direction", Direction(self.direction))
        object.__setattr__(self, "substream", SubStream(self.substream))

    def _byte5(self) -> int:
        return 0

    def encode(self) -> bytes:
        return bytes((IDE_KM_PROTOCOL_ID, self.OBJECT_ID, 0, 0, self.stream_id, self._byte5(),
                      _kss(self.key_set, self.direction, self.substream), self.port_index))

    @classmethod
    def _fields(cls, data: bytes, byte5_reserved: bool) -> tuple[
            int, KeySet, Direction, SubStream, int]:
        _head(data, cls.OBJECT_ID, 8)
        _zero(data, 2, 4, "2..3")
        if byte5_reserved:
            _zero(data, 5, 6, "5")
        ks, d, s = _parse_kss(data[6], data, 6)
        return data[4], ks, d, s, data[7]

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """The plain stream objects (K_SET_GO, K_SET_STOP, K_GOSTOP_ACK): byte 5 reserved."""
        return cls(*cls._fields(bytes(data), True))

    def same_target(self, other: _StreamObject) -> bool:
        return ((self.stream_id, self.key_set, self.direction, self.substream, self.port_index)
                == (other.stream_id, other.key_set, other.direction, other.substream,
                    other.port_index))


@dataclass(frozen=True)
class KSetGo(_StreamObject):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.K_SET_GO


@dataclass(frozen=True)
class KSetStop(_StreamObject):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.K_SET_STOP


@dataclass(frozen=True)
class KGoStopAck(_StreamObject):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.K_GOSTOP_ACK


@dataclass(frozen=True)
class KpAck(_StreamObject):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.KP_ACK
    status: int = KpStatus.SUCCESS

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_u8("status", self.status)

    def _byte5(self) -> int:
        return self.status

    @property
    def status_code(self) -> KpStatus:
        """The status, reserved values (5..FF) read as UNSPECIFIED_FAILURE (§6.33.3)."""
        try:
            return KpStatus(self.status)
        except ValueError:
            return KpStatus.UNSPECIFIED_FAILURE

    @classmethod
    def decode(cls, data: bytes) -> KpAck:
        data = bytes(data)
        sid, ks, d, s, port = cls._fields(data, False)
        return cls(sid, ks, d, s, port, data[5])


IdeKmObject = Query | QueryResp | KeyProg | KpAck | KSetGo | KSetStop | KGoStopAck

_CODECS: dict[int, Callable[[bytes], IdeKmObject]] = {
    ObjectId.QUERY: Query.decode, ObjectId.QUERY_RESP: QueryResp.decode,
    ObjectId.KEY_PROG: KeyProg.decode, ObjectId.KP_ACK: KpAck.decode,
    ObjectId.K_SET_GO: KSetGo.decode, ObjectId.K_SET_STOP: KSetStop.decode,
    ObjectId.K_GOSTOP_ACK: KGoStopAck.decode,
}


def decode_object(data: bytes) -> IdeKmObject:
    """Decode any IDE_KM object by its Object ID."""
    data = bytes(data)
    if len(data) < 2:
        raise IdeKmDecodeError("truncated: no IDE_KM header", data, len(data))
    if data[0] != IDE_KM_PROTOCOL_ID:
        raise IdeKmDecodeError(f"Protocol ID 0x{data[0]:02x} is not IDE_KM", data, 0)
    codec = _CODECS.get(data[1])
    if codec is None:
        raise IdeKmDecodeError(f"unknown Object ID 0x{data[1]:02x}", data, 1)
    return codec(data)


# --- PCI-SIG vendor-defined dispatch --------------------------------------------------------------

VendorHandler = Callable[[bytes, "int | None"], bytes]


class PciSigProtocolMux:
    """The handler for VENDOR_DEFINED (StandardID PCI-SIG, VendorID 0x0001): routes the
    payload by its Protocol ID byte (IDE_KM, TDISP) to the registered handler, which gets
    the whole payload (Protocol ID included) and the session id.

    ``responder.register_vendor_handler(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, mux)``."""

    def __init__(self) -> None:
        self.handlers: dict[int, VendorHandler] = {}

    def register(self, protocol_id: int, handler: VendorHandler) -> None:
        self.handlers[protocol_id] = handler

    def __call__(self, payload: bytes, session_id: int | None) -> bytes:
        if not payload:
            raise SpdmError(ErrorCode.InvalidRequest, "PCI-SIG vendor payload without a "
                            "Protocol ID")
        handler = self.handlers.get(payload[0])
        if handler is None:
            raise SpdmError(ErrorCode.UnsupportedRequest,
                            f"PCI-SIG Protocol ID 0x{payload[0]:02x} not supported",
                            data=RequestCode.VENDOR_DEFINED_REQUEST)
        return handler(payload, session_id)


# --- device side ----------------------------------------------------------------------------------

class IdeKeyStore(Protocol):
    """What the device supplies to :class:`IdeKmResponder` (``ide_cap.IdeCapability`` is one).

    ``program_key`` may raise :class:`~teeio.ide.IdeKeyStateError` (KP_ACK Unspecified
    Failure), e.g. for the key set in use."""

    def ide_registers(self) -> tuple[int, ...]:
        """The IDE extended capability contents minus its header (for QUERY_RESP)."""
        ...

    def has_stream(self, stream_id: int) -> bool:
        """Whether *stream_id* is configured in one of the stream blocks."""
        ...

    def program_key(self, stream_id: int, key_set: KeySet, direction: Direction,
                    substream: SubStream, key: IdeKey) -> None: ...

    def key_programmed(self, stream_id: int, key_set: KeySet, direction: Direction,
                       substream: SubStream) -> bool: ...

    def key_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream) -> None: ...

    def key_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                     substream: SubStream) -> None: ...

    def invalidate_all(self, reason: str) -> None:
        """Every key of every stream invalid, streams Insecure (session loss)."""
        ...


class IdeKmResponder:
    """Device side of IDE_KM: ``handle(payload, session_id) -> response payload``, in the
    shape ``Responder.register_vendor_handler`` (or :class:`PciSigProtocolMux`) expects.
    Raises :class:`DropRequest` whenever the spec says "no response"."""

    def __init__(self, store: IdeKeyStore, *, dev_func: int = 0, bus: int = 0,
                 segment: int = 0, ports: tuple[int, ...] = (0,), max_port_index: int = 0,
                 name: str = "") -> None:
        self.store = store
        self.dev_func = dev_func
        self.bus = bus
        self.segment = segment
        self.ports = ports
        self.max_port_index = max_port_index
        self.bound_session: int | None = None
        #: (stream, key set, direction, sub-stream) of every key the bound session programmed
        #: (KP_ACK Success); cleared with the binding.  TDISP's LOCK checks it.
        self.programmed: set[tuple[int, KeySet, Direction, SubStream]] = set()
        self.log = log.getChild(name) if name else log

    def _drop(self, why: str) -> DropRequest:
        self.log.info("IDE_KM request dropped, no response: %s", why)
        return DropRequest(why)

    def session_closed(self, session_id: int) -> None:
        """The SPDM session *session_id* ended: if it was the one IDE_KM was bound to,
        every key is invalidated now and the streams go Insecure (§6.33.3)."""
        if session_id == self.bound_session:
            self.bound_session = None
            self.programmed.clear()
            self.store.invalidate_all(f"SPDM session 0x{session_id:08x} closed")

    def keys_programmed_by(self, session_id: int, stream_id: int
                           ) -> set[tuple[KeySet, Direction, SubStream]]:
        """The keys of *stream_id* that session *session_id* programmed and that are still
        programmed in the store (empty unless it is the session IDE_KM is bound to)."""
        if session_id != self.bound_session:
            return set()
        return {(k, d, s) for (sid, k, d, s) in self.programmed
                if sid == stream_id and self.store.key_programmed(sid, k, d, s)}

    def handle(self, payload: bytes, session_id: int | None) -> bytes:
        payload = bytes(payload)
        # Sizes only: KEY_PROG carries the key and IFV in the clear of the session.
        self.log.debug("--> %d bytes (session %s)", len(payload), session_id)
        rsp = self._handle(payload, session_id)
        self.log.debug("<-- %d bytes", len(rsp))
        return rsp

    __call__ = handle

    def _handle(self, payload: bytes, session_id: int | None) -> bytes:
        if session_id is None:
            raise self._drop("IDE_KM outside a secured session")
        if len(payload) < 2 or payload[0] != IDE_KM_PROTOCOL_ID:
            raise self._drop("not an IDE_KM object")
        if self.bound_session is not None and self.bound_session != session_id:
            raise self._drop(f"IDE_KM is bound to session 0x{self.bound_session:08x}")
        oid = payload[1]
        if oid == ObjectId.QUERY:
            return self._query(payload, session_id)
        if oid == ObjectId.KEY_PROG:
            return self._key_prog(payload, session_id)
        if oid in (ObjectId.K_SET_GO, ObjectId.K_SET_STOP):
            return self._go_stop(payload)
        raise self._drop(f"Object ID 0x{oid:02x} is not a request")

    def _query(self, payload: bytes, session_id: int) -> bytes:
        try:
            req = Query.decode(payload)
        except IdeKmDecodeError as e:
            raise self._drop(str(e)) from None
        if req.port_index not in self.ports:
            raise self._drop(f"QUERY for PortIndex {req.port_index}")
        self.bound_session = session_id
        return QueryResp(req.port_index, self.dev_func, self.bus, self.segment,
                         self.max_port_index, self.store.ide_registers()).encode()

    def _key_prog(self, payload: bytes, session_id: int) -> bytes:
        if len(payload) < 8:
            raise self._drop(f"KEY_PROG of {len(payload)} bytes")
        sid, kss, port = payload[4], payload[6], payload[7]

        def ack(status: KpStatus) -> bytes:
            # KSS is echoed as received, even if it is the field we refuse.
            self.log.info("KEY_PROG stream %d KSS 0x%02x port %d -> %s", sid, kss, port,
                          status.name)
            return bytes((IDE_KM_PROTOCOL_ID, ObjectId.KP_ACK, 0, 0, sid, status, kss, port))

        if len(payload) != KeyProg.SIZE:
            return ack(KpStatus.INCORRECT_LENGTH)
        if port not in self.ports:
            return ack(KpStatus.UNSUPPORTED_PORT_INDEX)
        try:
            req = KeyProg.decode(payload)
        except IdeKmDecodeError as e:
            self.log.info("KEY_PROG refused: %s", e)
            return ack(KpStatus.UNSUPPORTED_VALUE)
        if not self.store.has_stream(req.stream_id):
            return ack(KpStatus.UNSUPPORTED_VALUE)
        self.bound_session = session_id
        try:
            self.store.program_key(req.stream_id, req.key_set, req.direction, req.substream,
                                   req.ide_key)
        except IdeKeyStateError as e:
            self.log.info("KEY_PROG refused: %s", e)
            return ack(KpStatus.UNSPECIFIED_FAILURE)
        self.programmed.add((req.stream_id, req.key_set, req.direction, req.substream))
        return ack(KpStatus.SUCCESS)

    def _go_stop(self, payload: bytes) -> bytes:
        try:
            req: KSetGo | KSetStop = (KSetGo.decode(payload) if payload[1] == ObjectId.K_SET_GO
                                      else KSetStop.decode(payload))
        except IdeKmDecodeError as e:
            raise self._drop(str(e)) from None
        name = req.OBJECT_ID.name
        if req.port_index not in self.ports:
            raise self._drop(f"{name} for PortIndex {req.port_index}")
        if not self.store.has_stream(req.stream_id):
            raise self._drop(f"{name} for unknown stream {req.stream_id}")
        target = (req.stream_id, req.key_set, req.direction)
        if isinstance(req, KSetGo):
            if not self.store.key_programmed(*target, req.substream):
                raise self._drop(f"K_SET_GO stream {req.stream_id} {req.key_set.name} "
                                 f"{req.direction.name} {req.substream.name} before its key "
                                 "was programmed")
            self.store.key_set_go(*target, req.substream)
        else:
            self.store.key_set_stop(*target, req.substream)
        self.log.info("%s stream %d %s %s %s", name, req.stream_id, req.key_set.name,
                      req.direction.name, req.substream.name)
        return KGoStopAck(req.stream_id, req.key_set, req.direction, req.substream,
                          req.port_index).encode()


# --- requester side -------------------------------------------------------------------------------

def _expect(data: bytes, decoder: Callable[[bytes], _T], what: str) -> _T:
    try:
        return decoder(data)
    except IdeKmDecodeError as e:
        raise IdeKmResponseError(f"{what}: {e}") from None


class IdeKmClient:
    """Requester side (the TSM): builds requests, checks each response against its request.

    *exchange* sends one IDE_KM payload inside the secured session and returns the response
    payload — e.g. ``lambda p: requester.vendor_request(PCI_SIG_STANDARD_ID,
    PCI_SIG_VENDOR_ID, p, session_id)``; a silent drop surfaces as the transport's timeout."""

    def __init__(self, exchange: Callable[[bytes], bytes], port_index: int = 0) -> None:
        self.exchange = exchange
        self.port_index = port_index

    def query(self) -> QueryResp:
        rsp = _expect(self.exchange(Query(self.port_index).encode()), QueryResp.decode,
                      "QUERY")
        if rsp.port_index != self.port_index:
            raise IdeKmResponseError(f"QUERY_RESP for PortIndex {rsp.port_index}, asked "
                                     f"{self.port_index}")
        return rsp

    def key_prog(self, stream_id: int, key_set: KeySet, direction: Direction,
                 substream: SubStream, key: IdeKey) -> None:
        req = KeyProg.for_key(stream_id, key_set, direction, substream, key, self.port_index)
        rsp = _expect(self.exchange(req.encode()), KpAck.decode, "KEY_PROG")
        if not (rsp.stream_id, rsp.key_set, rsp.direction, rsp.substream, rsp.port_index) == (
                req.stream_id, req.key_set, req.direction, req.substream, req.port_index):
            raise IdeKmResponseError(f"KP_ACK {rsp} does not answer KEY_PROG {req}")
        if rsp.status != KpStatus.SUCCESS:
            raise IdeKmResponseError(f"KEY_PROG {req}: KP_ACK status {rsp.status_code.name}",
                                     status=rsp.status)

    def _go_stop(self, req: KSetGo | KSetStop) -> None:
        rsp = _expect(self.exchange(req.encode()), KGoStopAck.decode, req.OBJECT_ID.name)
        if not rsp.same_target(req):
            raise IdeKmResponseError(f"K_GOSTOP_ACK {rsp} does not answer {req}")

    def k_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                 substream: SubStream) -> None:
        self._go_stop(KSetGo(stream_id, key_set, direction, substream, self.port_index))

    def k_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream) -> None:
        self._go_stop(KSetStop(stream_id, key_set, direction, substream, self.port_index))

    def program_keys(self, stream_id: int, key_set: KeySet,
                     keys: dict[tuple[Direction, SubStream], IdeKey]) -> None:
        """KEY_PROG for each (direction, sub-stream) key of *key_set*."""
        for (d, s), k in keys.items():
            self.key_prog(stream_id, key_set, d, s, k)

    def go_all(self, stream_id: int, key_set: KeySet, direction: Direction) -> None:
        """K_SET_GO for the three sub-streams of one direction.  §6.33.3 order: Rx at
        both partners first, then Tx at both."""
        for s in SubStream:
            self.k_set_go(stream_id, key_set, direction, s)

    def stop_all(self, stream_id: int, key_set: KeySet) -> None:
        """K_SET_STOP for every sub-stream and direction of *key_set*."""
        for d in Direction:
            for s in SubStream:
                self.k_set_stop(stream_id, key_set, d, s)
