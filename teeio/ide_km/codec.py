"""IDE_KM objects (PCIe 6.x §6.33.3): frozen dataclasses with encode/decode.

Offsets from the Protocol ID byte; multi-byte fields little-endian::

    QUERY       00 00 rsvd Port                                                    4 B
    QUERY_RESP  00 01 rsvd Port DevFn Bus Seg MaxPort | IDE cap registers (DWs)    8+4n B
    KEY_PROG    00 02 rsvd rsvd Stream rsvd KSS Port | Key (8 DW) | IFV (2 DW)     48 B
    KP_ACK      00 03 rsvd rsvd Stream Status KSS Port                             8 B
    K_SET_GO / K_SET_STOP / K_GOSTOP_ACK  00 04/05/06 (as KP_ACK, byte 5 rsvd)     8 B

    KSS = [7:4] Sub-Stream (0 PR, 1 NPR, 2 CPL) | [3:2] rsvd | [1] RxTxB | [0] Key Set

Key and IFV byte order (PCIe Appendix L): the key's DWs go most significant first, each a
LE u32 (``k[3] k[2] k[1] k[0] k[7] ...``); the IFV is two LE u32s, bits 63:32 then 31:0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Self

from ..ide import Direction, IdeKey, KeySet, SubStream
from .defs import IDE_KM_PROTOCOL_ID, IdeKmError, KpStatus, ObjectId

__all__ = ["IdeKmDecodeError", "IdeKmObject", "KGoStopAck", "KSetGo", "KSetStop", "KeyProg",
           "KpAck", "Query", "QueryResp", "decode_object", "expected_reg_count",
           "key_from_wire", "key_to_wire"]


class IdeKmDecodeError(IdeKmError, ValueError):
    """A malformed IDE_KM object; keeps the raw bytes and the failing offset."""

    def __init__(self, message: str, raw: bytes = b"", offset: int = 0) -> None:
        self.raw = bytes(raw)
        self.offset = offset
        super().__init__(f"IDE_KM: {message} (at offset {offset} of {len(raw)} bytes)")


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

