"""IDE_KM objects (PCIe 6.x §6.33.3), declared on the codec core (:mod:`teeio.codec`).

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
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ..codec import DecodeError, Struct, fixed, reserved, u8
from ..ide import Direction, IdeKey, KeySet, SubStream
from .defs import IDE_KM_PROTOCOL_ID, IdeKmError, KpStatus, ObjectId
from .fields import DwordReversed, Dwords, Ifv, KeySubStream, KssPart, declare, reverse_dwords

__all__ = ["IdeKmDecodeError", "IdeKmObject", "KGoStopAck", "KSetGo", "KSetStop", "KeyProg",
           "KpAck", "Query", "QueryResp", "decode_object", "expected_reg_count",
           "key_from_wire", "key_to_wire"]


class IdeKmDecodeError(IdeKmError, DecodeError):
    """A malformed IDE_KM object (raw bytes, offset, reason).  The responder answers it
    with no response at all, except a KEY_PROG, which gets KP_ACK (§6.33.3)."""

    def __str__(self) -> str:
        return f"IDE_KM: {super().__str__()}"


def key_to_wire(key: bytes) -> bytes:
    """AES key (crypto-library order) -> KEY_PROG byte stream: each DW's bytes reversed."""
    return reverse_dwords(key)


key_from_wire = key_to_wire     # the transformation is its own inverse


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


def _check_regs(regs: tuple[int, ...]) -> None:
    want = expected_reg_count(regs)
    if want != len(regs):
        raise ValueError(f"IDE registers: the capability describes {want} DWs, "
                         f"got {len(regs)}")


def _head(data: bytes, oid: ObjectId, size: int | None) -> None:
    """Protocol ID, Object ID and (if fixed) exact size of an object."""
    if len(data) < 2:
        raise IdeKmDecodeError(data, len(data), "truncated: no IDE_KM header")
    if data[0] != IDE_KM_PROTOCOL_ID:
        raise IdeKmDecodeError(data, 0, f"Protocol ID 0x{data[0]:02x} is not IDE_KM")
    if data[1] != oid:
        raise IdeKmDecodeError(data, 1, f"Object ID 0x{data[1]:02x}, expected {oid.name}")
    if size is not None and len(data) != size:
        raise IdeKmDecodeError(data, min(len(data), size),
                               f"{oid.name} must be {size} bytes, got {len(data)}")


def _init(obj: Struct, **values: Any) -> None:
    """An object's constructor: each is written out (the constructor arguments are the
    API; the declarations, in wire order, also hold the constant and reserved fields)."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    obj.__post_init__()


class _Object(Struct):
    """An IDE_KM object: the header checked with the spec's words before the fields."""

    OBJECT_ID: ClassVar[ObjectId]
    SIZE: ClassVar[int | None] = None
    DECODE_ERROR: ClassVar[type[DecodeError]] = IdeKmDecodeError

    def __post_init__(self) -> None:
        for spec in self.fields_spec():
            coerce = getattr(spec, "coerce", None)
            if spec.init and coerce is not None:
                object.__setattr__(self, spec.name, coerce(getattr(self, spec.name)))
        super().__post_init__()

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None) -> Self:
        data = bytes(buf)
        _head(data, cls.OBJECT_ID, cls.SIZE)
        return super().decode(data, ctx)


@dataclass(frozen=True, init=False)
class Query(_Object):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.QUERY
    SIZE: ClassVar[int | None] = 4
    protocol_id: int = fixed(1, IDE_KM_PROTOCOL_ID)
    object_id: int = fixed(1, ObjectId.QUERY)
    _rsvd: None = reserved(1)
    port_index: int = u8(0)

    def __init__(self, port_index: int = 0) -> None:
        _init(self, port_index=port_index)


@dataclass(frozen=True, init=False)
class QueryResp(_Object):
    """QUERY_RESP: routing identity and the IDE capability contents (minus its header)."""

    OBJECT_ID: ClassVar[ObjectId] = ObjectId.QUERY_RESP
    protocol_id: int = fixed(1, IDE_KM_PROTOCOL_ID)
    object_id: int = fixed(1, ObjectId.QUERY_RESP)
    _rsvd: None = reserved(1)
    port_index: int = u8()
    dev_func: int = u8()
    bus: int = u8()
    segment: int = u8()
    max_port_index: int = u8()
    regs: tuple[int, ...] = declare(Dwords("IDE registers", 2, _check_regs))

    def __init__(self, port_index: int, dev_func: int, bus: int, segment: int,
                 max_port_index: int, regs: tuple[int, ...]) -> None:
        _init(self, port_index=port_index, dev_func=dev_func, bus=bus, segment=segment,
              max_port_index=max_port_index, regs=regs)

    @property
    def capability(self) -> int:
        return self.regs[0]

    @property
    def control(self) -> int:
        return self.regs[1]


class _StreamFields(_Object):
    """What every object but QUERY/QUERY_RESP has (each declares them in its wire order):
    the Stream ID, the KSS byte's three parts, the PortIndex."""

    stream_id: int
    key_set: KeySet
    direction: Direction
    substream: SubStream
    port_index: int

    def same_target(self, other: _StreamFields) -> bool:
        return ((self.stream_id, self.key_set, self.direction, self.substream, self.port_index)
                == (other.stream_id, other.key_set, other.direction, other.substream,
                    other.port_index))


@dataclass(frozen=True, init=False)
class KeyProg(_StreamFields):
    """KEY_PROG: one key (and IFV) for one stream / key set / direction / sub-stream."""

    OBJECT_ID: ClassVar[ObjectId] = ObjectId.KEY_PROG
    SIZE: ClassVar[int | None] = 48
    protocol_id: int = fixed(1, IDE_KM_PROTOCOL_ID)
    object_id: int = fixed(1, ObjectId.KEY_PROG)
    _rsvd0: None = reserved(2)
    stream_id: int = u8()
    _rsvd1: None = reserved(1)
    kss: int = declare(KeySubStream())
    key_set: KeySet = declare(KssPart(KeySet, 0, 1))
    direction: Direction = declare(KssPart(Direction, 1, 1))
    substream: SubStream = declare(KssPart(SubStream, 4, 0xF))
    port_index: int = u8(0)
    key: bytes = declare(DwordReversed(32, "KEY_PROG key"), repr=False)
    ifv: int = declare(Ifv(), 1, repr=False)

    def __init__(self, stream_id: int, key_set: KeySet, direction: Direction,
                 substream: SubStream, key: bytes, ifv: int = 1, port_index: int = 0) -> None:
        _init(self, stream_id=stream_id, key_set=key_set, direction=direction,
              substream=substream, key=key, ifv=ifv, port_index=port_index)

    @classmethod
    def for_key(cls, stream_id: int, key_set: KeySet, direction: Direction,
                substream: SubStream, key: IdeKey, port_index: int = 0) -> KeyProg:
        return cls(stream_id, key_set, direction, substream, key.key, key.ifv, port_index)

    @property
    def ide_key(self) -> IdeKey:
        return IdeKey(self.key, self.ifv)


@dataclass(frozen=True, init=False)
class _StreamObject(_StreamFields):
    """K_SET_GO, K_SET_STOP, K_GOSTOP_ACK: 8 bytes, byte 5 reserved."""

    SIZE: ClassVar[int | None] = 8
    protocol_id: int = fixed(1, IDE_KM_PROTOCOL_ID)
    object_id: int = fixed(1, 0xFF)                 # each object's own, below
    _rsvd0: None = reserved(2)
    stream_id: int = u8()
    _rsvd1: None = reserved(1)
    kss: int = declare(KeySubStream())
    key_set: KeySet = declare(KssPart(KeySet, 0, 1))
    direction: Direction = declare(KssPart(Direction, 1, 1))
    substream: SubStream = declare(KssPart(SubStream, 4, 0xF))
    port_index: int = u8(0)

    def __init__(self, stream_id: int, key_set: KeySet, direction: Direction,
                 substream: SubStream, port_index: int = 0) -> None:
        _init(self, stream_id=stream_id, key_set=key_set, direction=direction,
              substream=substream, port_index=port_index)


@dataclass(frozen=True, init=False)
class KSetGo(_StreamObject):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.K_SET_GO
    object_id: int = fixed(1, ObjectId.K_SET_GO)


@dataclass(frozen=True, init=False)
class KSetStop(_StreamObject):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.K_SET_STOP
    object_id: int = fixed(1, ObjectId.K_SET_STOP)


@dataclass(frozen=True, init=False)
class KGoStopAck(_StreamObject):
    OBJECT_ID: ClassVar[ObjectId] = ObjectId.K_GOSTOP_ACK
    object_id: int = fixed(1, ObjectId.K_GOSTOP_ACK)


@dataclass(frozen=True, init=False)
class KpAck(_StreamFields):
    """KP_ACK: byte 5 is the Status; reserved values (5..FF) are kept as received."""

    OBJECT_ID: ClassVar[ObjectId] = ObjectId.KP_ACK
    SIZE: ClassVar[int | None] = 8
    protocol_id: int = fixed(1, IDE_KM_PROTOCOL_ID)
    object_id: int = fixed(1, ObjectId.KP_ACK)
    _rsvd0: None = reserved(2)
    stream_id: int = u8()
    status: int = u8(KpStatus.SUCCESS)
    kss: int = declare(KeySubStream())
    key_set: KeySet = declare(KssPart(KeySet, 0, 1))
    direction: Direction = declare(KssPart(Direction, 1, 1))
    substream: SubStream = declare(KssPart(SubStream, 4, 0xF))
    port_index: int = u8(0)

    def __init__(self, stream_id: int, key_set: KeySet, direction: Direction,
                 substream: SubStream, port_index: int = 0,
                 status: int = KpStatus.SUCCESS) -> None:
        _init(self, stream_id=stream_id, key_set=key_set, direction=direction,
              substream=substream, port_index=port_index, status=status)

    @property
    def status_code(self) -> KpStatus:
        """The status, reserved values (5..FF) read as UNSPECIFIED_FAILURE (§6.33.3)."""
        try:
            return KpStatus(self.status)
        except ValueError:
            return KpStatus.UNSPECIFIED_FAILURE


IdeKmObject = Query | QueryResp | KeyProg | KpAck | KSetGo | KSetStop | KGoStopAck

_CODECS: dict[int, Callable[[bytes], IdeKmObject]] = {
    cls.OBJECT_ID: cls.decode
    for cls in (Query, QueryResp, KeyProg, KpAck, KSetGo, KSetStop, KGoStopAck)
}


def decode_object(data: bytes) -> IdeKmObject:
    """Decode any IDE_KM object by its Object ID."""
    data = bytes(data)
    if len(data) < 2:
        raise IdeKmDecodeError(data, len(data), "truncated: no IDE_KM header")
    if data[0] != IDE_KM_PROTOCOL_ID:
        raise IdeKmDecodeError(data, 0, f"Protocol ID 0x{data[0]:02x} is not IDE_KM")
    codec = _CODECS.get(data[1])
    if codec is None:
        raise IdeKmDecodeError(data, 1, f"unknown Object ID 0x{data[1]:02x}")
    return codec(data)
