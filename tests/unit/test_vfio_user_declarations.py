"""vfio-user messages declared on teeio.codec: round trips of every declaration, and the
compiled fast paths (header, REGION_READ/WRITE) agree with the core's generic codec."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable

import pytest
from hypothesis import given, settings

from teeio import codec
from teeio.codec import Struct, strategy
from vfio_user_dev import protocol as p
from vfio_user_dev.protocol import (
    IRQ_SET,
    REGION_INFO,
    DmaMap,
    Header,
    IrqSet,
    IrqSetFlags,
    ProtocolError,
    RegionInfoRequest,
)

settings.register_profile("codec", deadline=None, max_examples=150)
settings.load_profile("codec")

ACTION_FLAGS = [IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK, IrqSetFlags.ACTION_TRIGGER]


# --- declarations: round trips, and the compiled fast paths agree with the core ------------

def _bool_or_none(s: IrqSet) -> IrqSet:
    data_flag = [IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL][s.count & 1]
    action = ACTION_FLAGS[s.index % 3]
    if data_flag == IrqSetFlags.DATA_BOOL:
        return IrqSet(int(data_flag | action), s.index, s.start, len(s.data), s.data)
    return IrqSet(int(data_flag | action), s.index, s.start, s.count)


# what decode refuses on purpose (ranges, flags, argsz) is mapped to a valid message
VALID: dict[type[Struct], Callable[[Struct], Struct]] = {
    p.DmaMap: lambda m: dataclasses.replace(m, size=1 + m.size % ((1 << 64) - m.address))
    if m.address else dataclasses.replace(m, size=max(m.size, 1)),
    p.DmaUnmap: lambda m: dataclasses.replace(m, argsz=max(m.argsz, 24), flags=0),
    p.RegionInfoRequest: lambda m: dataclasses.replace(m, argsz=max(m.argsz, 32)),
    p.IrqInfoRequest: lambda m: dataclasses.replace(m, argsz=max(m.argsz, 16)),
    p.IrqSet: _bool_or_none,  # type: ignore[dict-item]
    p.RegionAccess: lambda m: dataclasses.replace(m, count=len(m.data)),
}
DECLARED = [p.Header, p.Version, p.DmaMap, p.DmaUnmap, p.DeviceInfo, p.RegionInfo, p.IrqInfo,
            p.RegionInfoRequest, p.IrqInfoRequest, p.IrqSet, p.RegionAccess, p.DmaAccess]


@pytest.mark.parametrize("cls", DECLARED, ids=lambda k: k.__name__)
def test_declared_round_trip(cls: type[Struct]) -> None:
    """decode(encode(m)) == m and a byte-identical re-encode, for values the declaration
    itself generates (teeio.codec.strategy); fast paths agree with the core's generic
    encode/decode of the same declaration."""
    fix = VALID.get(cls, lambda m: m)
    ctx = True if cls is p.RegionAccess else None

    @settings(max_examples=60)
    @given(strategy(cls).map(fix))
    def run(m: Struct) -> None:
        wire = m.encode()
        back = cls.decode(wire, ctx)
        assert back == m and back.encode() == wire
        assert Struct.encode(m) == wire                          # the core's encoder
        assert Struct.decode.__func__(cls, wire) == m            # type: ignore[attr-defined]
    run()


def test_constants_are_compiled_from_the_declarations() -> None:
    assert (p.HEADER.format, p.DMA_MAP.format, p.DMA_UNMAP.format) == ("<HHIII", "<IIQQQ",
                                                                       "<IIQQ")
    assert (p.DEVICE_INFO.format, p.REGION_INFO.format, p.IRQ_INFO.format) == (
        "<IIII", "<IIIIQQ", "<IIII")
    assert (p.IRQ_SET.format, p.REGION_RW.format, p.DMA_RW.format) == ("<IIIII", "<QII",
                                                                        "<QQ")


def test_decode_errors_are_the_core_errors_with_einval() -> None:
    with pytest.raises(codec.DecodeError) as exc:
        DmaMap.decode(DmaMap(3, 0, 0x1000, 0x1000).encode()[:-1])
    assert isinstance(exc.value, ProtocolError) and isinstance(exc.value, codec.ProtocolError)
    assert exc.value.errno == exc.value.code == errno.EINVAL
    assert str(exc.value).startswith("DMA_MAP: truncated")
    with pytest.raises(ProtocolError) as info:
        IrqSet.decode(IRQ_SET.pack(19, 0x21, 2, 0, 1))
    assert "argsz 19 != payload 20" in str(info.value)
    with pytest.raises(ValueError):
        Header(1 << 16, 1, 16, 0)


def test_unread_request_fields_are_ignored() -> None:
    raw = REGION_INFO.pack(40, 0xFFFF, 7, 1, 2, 3) + bytes(8)
    assert RegionInfoRequest.decode(raw) == RegionInfoRequest(40, 7)
    assert RegionInfoRequest(40, 7).encode() == REGION_INFO.pack(40, 0, 7, 0, 0, 0)
