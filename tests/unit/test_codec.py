"""The codec core: declarations give mirror-image encode/decode, checks, raw and strategies."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings

from teeio.codec import (
    REST,
    DecodeError,
    ProtocolError,
    Reader,
    Struct,
    Writer,
    data,
    fixed,
    items,
    iter_fields,
    nested,
    raw,
    reserved,
    strategy,
    u8,
    u16,
    u32,
    u64,
)


class Kind(enum.IntEnum):
    A = 1
    B = 2


@dataclass(frozen=True)
class Range(Struct):
    first: int = u64()
    pages: int = u32()
    attrs: int = u16(reserved_mask=0xFFF0)
    rid: int = u16()


@dataclass(frozen=True)
class Ctx:
    hash_size: int


@dataclass(frozen=True)
class Msg(Struct):
    version: int = fixed(1, 0x10)
    kind: Kind = u8(kind=Kind)
    _r0: None = reserved(2)
    count: int = u16(count_of="ranges")
    length: int = u16(length_of="blob")
    digest: bytes = data(lambda known, ctx: ctx.hash_size if ctx else 48)
    ranges: tuple[Range, ...] = items(Range, "count")
    blob: bytes = data("length")
    extra: int = u32(0, when=lambda known, ctx: known["kind"] == Kind.B)
    raw: bytes = raw()


@dataclass(frozen=True)
class Outer(Struct):
    head: Range = nested(Range)
    tail: bytes = data(REST)


CTX = Ctx(hash_size=32)


def sample(kind: Kind = Kind.B) -> Msg:
    return Msg(kind=kind, digest=bytes(range(32)),
               ranges=(Range(1, 2, 3, 4), Range(5, 6, 7, 8)), blob=b"hello",
               extra=9 if kind == Kind.B else 0)


def test_layout_is_exactly_the_declaration() -> None:
    wire = sample().encode(CTX)
    assert wire[:6] == bytes([0x10, 2, 0, 0, 2, 0])
    assert wire[6:8] == (5).to_bytes(2, "little")
    assert wire[8:40] == bytes(range(32))
    assert wire[40:48] == (1).to_bytes(8, "little")
    assert wire[-9:] == b"hello" + (9).to_bytes(4, "little")
    assert len(wire) == 8 + 32 + 2 * 16 + 5 + 4


def test_round_trip_keeps_raw_and_derives_counts() -> None:
    m = sample()
    wire = m.encode(CTX)
    back = Msg.decode(wire, CTX)
    assert back == m
    assert back.raw == wire and m.raw is None or m.raw == b""
    assert back.count == 2 and back.length == 5 and m.count == 2


def test_conditional_field_absent() -> None:
    wire = sample(Kind.A).encode(CTX)
    assert len(wire) == 8 + 32 + 32 + 5
    assert Msg.decode(wire, CTX).extra == 0


@pytest.mark.parametrize("patch, offset, reason", [
    ((0, 0x11), 0, "version is 0x11, expected 0x10"),
    ((1, 7), 1, "not a known Kind"),
    ((3, 1), 3, "reserved byte is 0x01"),
    ((8 + 32 + 12, 0x10), 8 + 32 + 12, "reserved bits"),
])
def test_decode_errors_name_offset_and_reason(patch: tuple[int, int], offset: int,
                                              reason: str) -> None:
    wire = bytearray(sample().encode(CTX))
    wire[patch[0]] = patch[1]
    with pytest.raises(DecodeError) as err:
        Msg.decode(bytes(wire), CTX)
    assert err.value.offset == offset and reason in err.value.reason
    assert err.value.raw == bytes(wire)


def test_truncated_and_trailing() -> None:
    wire = sample().encode(CTX)
    with pytest.raises(DecodeError, match="truncated"):
        Msg.decode(wire[:-1], CTX)
    with pytest.raises(DecodeError, match="1 trailing byte"):
        Msg.decode(wire + b"\0", CTX)


def test_count_above_limit_is_refused_before_reading() -> None:
    wire = bytearray(sample().encode(CTX))
    wire[4:6] = (0xFFFF).to_bytes(2, "little")
    with pytest.raises(DecodeError, match="at most 4096"):
        Msg.decode(bytes(wire), CTX)


def test_construction_checks_ranges_and_types() -> None:
    with pytest.raises(ValueError, match="does not fit in 32 bits"):
        Range(0, 1 << 32, 0, 0)
    with pytest.raises(ValueError, match="reserved bits"):
        Range(0, 0, 0x10, 0)
    with pytest.raises(ValueError, match="must be an int"):
        Range(0, True, 0, 0)
    with pytest.raises(ValueError, match="tuple of Range"):
        Msg(kind=Kind.A, digest=b"", ranges=[Range(0, 0, 0, 0)], blob=b"")  # type: ignore[arg-type]


def test_context_sized_field_checked_at_encode() -> None:
    with pytest.raises(ValueError, match="must be 32"):
        Msg(kind=Kind.A, digest=b"x" * 48, ranges=(), blob=b"").encode(CTX)


def test_nested_and_rest() -> None:
    o = Outer(Range(1, 2, 3, 4), b"rest of it")
    assert Outer.decode(o.encode()) == o
    assert dict(iter_fields(o))["tail"] == b"rest of it"


def test_reader_writer_mirror() -> None:
    w = Writer()
    w.push_u8(1)
    w.push_u16(0x0203)
    w.push_u32(0x04050607)
    w.push_u64(8)
    w.push_uint(0x0A0B, 2, big=True)
    r = Reader(w.data)
    assert (r.pull_u8(), r.pull_u16(), r.pull_u32(), r.pull_u64()) == (1, 0x0203, 0x04050607, 8)
    assert r.pull_uint(2, big=True) == 0x0A0B
    r.expect_end()
    with pytest.raises(DecodeError, match="needs 1 byte"):
        r.pull_u8("x")


def test_protocol_error_carries_code() -> None:
    e = ProtocolError(0x05, "busy")
    assert e.code == 5 and str(e) == "busy"


@settings(max_examples=200, deadline=None)
@given(strategy(Msg, CTX))
def test_property_round_trip(m: Msg) -> None:
    wire = m.encode(CTX)
    back = Msg.decode(wire, CTX)
    assert back == m and back.encode(CTX) == wire


@settings(max_examples=200, deadline=None)
@given(strategy(Range))
def test_property_fixed_size(r: Any) -> None:
    assert len(r.encode()) == 16 and Range.decode(r.encode()) == r


class MyError(DecodeError):
    pass


@dataclass(frozen=True)
class Mine(Struct):
    DECODE_ERROR = MyError
    v: int = fixed(1, 7)


def test_protocol_decode_error_class() -> None:
    with pytest.raises(MyError) as err:
        Mine.decode(b"\x08")
    assert err.value.offset == 0 and "expected 0x7" in err.value.reason
    assert Mine.decode(b"\x07") == Mine()


def test_declare_says_init_as_the_kind_does() -> None:
    from teeio.codec import Fixed, declare
    with pytest.raises(TypeError, match="init=True"):
        declare(Fixed(1, 0))
    assert declare(Fixed(1, 0), 0, init=False).init is False
