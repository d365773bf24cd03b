"""TLP codec (PCIe 6.x §2.2, non-flit): property round trips, golden headers, negatives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teeio.tlp import (
    CplStatus,
    IdePrefix,
    SubStream,
    Tlp,
    TlpDecodeError,
    TlpError,
    TlpType,
)
from tests.support.vectors import load, unhex

u16 = st.integers(0, 0xFFFF)
tag10 = st.integers(0, 0x3FF)
stream = st.one_of(st.none(), st.integers(0, 0xFF))


@st.composite
def ide_fields(draw: st.DrawFn) -> dict[str, object]:
    sid = draw(stream)
    if sid is None:
        return {}
    return dict(stream_id=sid, t_bit=draw(st.booleans()), key_set=draw(st.integers(0, 1)),
                pr_sent_counter=draw(st.integers(0, 0xFF)))


@st.composite
def common(draw: st.DrawFn) -> dict[str, object]:
    return dict(tc=draw(st.integers(0, 7)), attr=draw(st.integers(0, 7)),
                poisoned=draw(st.booleans()), **draw(ide_fields()))


@st.composite
def writes(draw: st.DrawFn) -> Tlp:
    size = draw(st.integers(1, 256))
    page = draw(st.integers(0, (1 << 52) - 1)) << 12
    addr = page + draw(st.integers(0, 0x1000 - size))
    data = draw(st.binary(min_size=size, max_size=size))
    return Tlp.memory_write(draw(u16), draw(tag10), addr, data, **draw(common()))


@st.composite
def reads(draw: st.DrawFn) -> Tlp:
    size = draw(st.integers(1, 4096))
    page = draw(st.integers(0, (1 << 52) - 1)) << 12
    addr = page + draw(st.integers(0, 0x1000 - size))
    return Tlp.memory_read(draw(u16), draw(tag10), addr, size, **draw(common()))


@st.composite
def completions(draw: st.DrawFn) -> Tlp:
    req = draw(reads().filter(lambda r: r.request_byte_count <= 512))
    if draw(st.booleans()):
        data = draw(st.binary(min_size=req.request_byte_count,
                              max_size=req.request_byte_count))
        return Tlp.completion_for(req, draw(u16), data)
    return Tlp.completion_for(req, draw(u16), status=draw(st.sampled_from(
        [CplStatus.UR, CplStatus.CA, CplStatus.CRS])))


any_tlp = st.one_of(writes(), reads(), completions())


@given(any_tlp)
def test_round_trip(t: Tlp) -> None:
    wire = t.encode()
    assert Tlp.decode(wire) == t
    assert wire.startswith(t.header())
    assert len(t.header()) == (4 if t.stream_id is not None else 0) + t.type.header_dw * 4
    assert Tlp.header_length(wire) == len(t.header())


@given(st.integers(0, (1 << 48)), st.binary(min_size=1, max_size=64))
def test_memory_write_keeps_the_bytes(addr: int, data: bytes) -> None:
    if (addr & 0xFFF) + len(data) > 0x1000:
        addr &= ~0xFFF
    t = Tlp.memory_write(1, 2, addr, data)
    assert t.byte_address == addr
    assert t.request_byte_count == len(data)
    assert t.payload_bytes() == data
    assert t.type is (TlpType.MWR32 if addr < 1 << 32 else TlpType.MWR64)


@given(reads(), st.data())
def test_completion_returns_the_requested_bytes(req: Tlp, data: st.DataObject) -> None:
    n = req.request_byte_count
    payload = data.draw(st.binary(min_size=n, max_size=n))
    cpl = Tlp.completion_for(req, 0x0300, payload)
    assert cpl.payload_bytes() == payload
    assert (cpl.requester_id, cpl.tag, cpl.t_bit, cpl.stream_id) == (
        req.requester_id, req.tag, req.t_bit, req.stream_id)
    assert cpl.substream is SubStream.CPL


@given(any_tlp, st.data())
def test_truncation_and_extension_rejected(t: Tlp, data: st.DataObject) -> None:
    wire = t.encode()
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(TlpDecodeError):
        Tlp.decode(wire[:cut])
    with pytest.raises(TlpDecodeError):
        Tlp.decode(wire + b"\0\0\0\0")


# --- golden layouts (hand-derived from the §2.2 figures: tests/vectors/tlp_headers.json) ------

GOLDEN = {name: unhex(v["header"]) for name, v in load("tlp_headers")["headers"].items()}


def test_golden_mwr64_header() -> None:
    t = Tlp(TlpType.MWR64, requester_id=0x0100, tag=0x2A5, address=0x1_2345_6780,
            data=bytes(8), tc=1, attr=0b110)
    # Fmt 011 Type 00000; T9=1 TC=1 T8=0 Attr2=1; TD=0 EP=0 Attr[1:0]=10 AT=00 Len=2
    assert t.header() == GOLDEN["mwr64"]


def test_golden_mrd32_single_dw() -> None:
    t = Tlp.memory_read(0x0008, 0x05, 0xFEE0_0001, 2)
    assert t.type is TlpType.MRD32 and t.length == 1
    assert t.header() == GOLDEN["mrd32_single_dw"]


def test_golden_cpld_and_ide_prefix() -> None:
    req = Tlp.memory_read(0x0100, 0x07, 0x1000_0004, 8, stream_id=3, t_bit=True)
    cpl = Tlp.completion_for(req, 0x0200, bytes(range(8)))
    # prefix 92, byte1 = Sub-Stream CPL(2)<<4 | T<<2 | M = 0x25, stream 3, counter 0
    assert cpl.header() == GOLDEN["cpld_with_ide_prefix"]
    assert IdePrefix.decode(GOLDEN["ide_prefix"]) == IdePrefix(
        SubStream.CPL, 3, t_bit=True)


def test_length_1024_dw_encodes_as_zero() -> None:
    t = Tlp(TlpType.MWR32, 1, 1, address=0x1000_0000, data=bytes(4096))
    assert t.header()[2] & 3 == 0 and t.header()[3] == 0
    assert Tlp.decode(t.encode()) == t
    cpl = Tlp(TlpType.CPL, 1, 1, byte_count=4096, status=CplStatus.UR)
    assert cpl.header()[6] & 0xF == 0 and cpl.header()[7] == 0
    assert Tlp.decode(cpl.encode()).byte_count == 4096


# --- construction negatives ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(type=TlpType.MWR64, address=0x1000, data=bytes(4)), "64-bit form"),
    (dict(type=TlpType.MWR32, address=1 << 32, data=bytes(4)), "needs the 64-bit form"),
    (dict(type=TlpType.MWR32, address=0x1002, data=bytes(4)), "not DW aligned"),
    (dict(type=TlpType.MWR32, address=0x1000, data=bytes(3)), "whole number of DW"),
    (dict(type=TlpType.MWR32, address=0x1000, data=b""), "payload must be"),
    (dict(type=TlpType.MWR32, address=0x1000, data=bytes(4), length=1), "derived"),
    (dict(type=TlpType.MRD32, address=0x1000, length=0), "length"),
    (dict(type=TlpType.MRD32, address=0x1000, length=1, data=bytes(4)), "no payload"),
    (dict(type=TlpType.MRD32, address=0x1FFC, length=2), "4 KiB"),
    (dict(type=TlpType.MRD32, address=0x1000, length=1, last_be=0xF), "last_be = 0"),
    (dict(type=TlpType.MRD32, address=0x1000, length=2, first_be=0), "non-zero"),
    (dict(type=TlpType.MRD32, address=0x1000, length=1, byte_count=4), "completion fields"),
    (dict(type=TlpType.CPL, byte_count=0), "byte_count"),
    (dict(type=TlpType.CPL, byte_count=4, address=8), "request fields"),
    (dict(type=TlpType.CPLD, byte_count=4, data=bytes(4), status=CplStatus.UR), "status SC"),
    (dict(type=TlpType.CPL, byte_count=4, lower_address=0x80), "lower_address"),
    (dict(type=TlpType.CPL, byte_count=4, tag=0x400), "tag"),
    (dict(type=TlpType.CPL, byte_count=4, stream_id=256), "stream_id"),
])
def test_invalid_tlps_rejected(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = dict(requester_id=1, tag=1)
    base.update(kwargs)
    with pytest.raises(TlpError, match=match):
        Tlp(**base)  # type: ignore[arg-type]


def test_t_bit_needs_the_ide_prefix() -> None:
    t = Tlp.memory_write(1, 1, 0x1000, b"abcd", t_bit=True)
    with pytest.raises(TlpError, match="IDE prefix"):
        t.encode()


# --- decode negatives -------------------------------------------------------------------------

GOOD = Tlp.memory_write(0x0100, 5, 0x1000, b"abcdefgh", stream_id=1).encode()


@pytest.mark.parametrize("offset, value, match", [
    (0, 0x93, "not an IDE prefix"),
    (1, 0x80 | 0x01, "reserved bit 7"),
    (1, 0x31, "unknown sub-stream"),
    (1, 0x19, "PCRC"),
    (1, 0x00, "M = 0"),
    (1, 0x21, "does not match"),
    (4, 0x5B, "unsupported Fmt/Type"),
    (5, 0x01, "LN/TH"),
    (6, 0x80, "TD set"),
    (6, 0x04, "AT"),
    (15, 0x01, "PH bits"),
    (7, 0x03, "Length 3"),
])
def test_malformed_bytes_rejected(offset: int, value: int, match: str) -> None:
    bad = bytearray(GOOD)
    bad[offset] = value
    with pytest.raises(TlpDecodeError, match=match) as ei:
        Tlp.decode(bytes(bad))
    assert ei.value.raw == bytes(bad)


def test_completion_reserved_fields_rejected() -> None:
    cpl = bytearray(Tlp(TlpType.CPL, 1, 1, byte_count=4, status=CplStatus.UR).encode())
    bad = bytearray(cpl)
    bad[11] |= 0x80
    with pytest.raises(TlpDecodeError, match="reserved bit 7 of byte 11"):
        Tlp.decode(bytes(bad))
    bad = bytearray(cpl)
    bad[6] = 0x60 | (bad[6] & 0x1F)      # status 3: reserved
    with pytest.raises(TlpDecodeError, match="reserved completion status"):
        Tlp.decode(bytes(bad))
    bad = bytearray(cpl)
    bad[3] = 1
    with pytest.raises(TlpDecodeError, match="CPL with Length 1"):
        Tlp.decode(bytes(bad) + bytes(4))


def test_64bit_form_below_4g_rejected_on_decode() -> None:
    raw = bytes.fromhex("60000001" "0100" "01" "0f" "00000000" "00001000") + bytes(4)
    with pytest.raises(TlpDecodeError, match="64-bit form"):
        Tlp.decode(raw)
