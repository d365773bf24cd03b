"""GHCx framing (docs/ghcx.md "Framing"): header round trips and rejections, response types,
VM ids, frames split anywhere, and the stream decoder's resynchronisation."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teeio.codec import DecodeError
from teeio.ghcx import (
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    REQUESTS,
    RESPONSES,
    VERSION,
    FrameDecoder,
    FramePrefix,
    GhcxReject,
    Header,
    MsgType,
    encode_frame,
    response_type,
    vm_id_bytes,
)

# -- codec ------------------------------------------------------------------------------------

@given(st.sampled_from(list(MsgType)), st.integers(0, 0xFFFF),
       st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1))
def test_header_round_trip(mtype: MsgType, flags: int, vm: bytes, seq: int, rid: int) -> None:
    h = Header(VERSION, mtype, flags, vm, seq, rid)
    raw = h.encode()
    assert len(raw) == HEADER_SIZE
    assert raw == struct.pack("<BBH16sQQ", 1, mtype, flags, vm, seq, rid)
    assert Header.decode(raw + b"payload") == h


def test_header_decode_rejects() -> None:
    good = Header(VERSION, MsgType.HELLO, 0, vm_id_bytes("vm0"), 0, 0).encode()
    for body, reason in ((good[:35], "malformed"), (b"\x02" + good[1:], "version"),
                         (good[:1] + b"\x42" + good[2:], "unknown_type")):
        with pytest.raises(GhcxReject) as e:
            Header.decode(body)
        assert e.value.reason == reason


def test_response_types() -> None:
    assert {response_type(t) for t in REQUESTS} == RESPONSES
    assert response_type(MsgType.TDI_LOCK) == 0x90
    assert response_type(MsgType.STATUS) == MsgType.STATUS_RESPONSE
    assert int(MsgType.STATUS_RESPONSE) == 0x97
    with pytest.raises(ValueError):
        response_type(MsgType.HELLO)


def test_vm_id_bytes() -> None:
    assert vm_id_bytes("vm0") == b"vm0" + bytes(13)
    assert vm_id_bytes("A.b_c-0123456789") == b"A.b_c-0123456789"
    for bad in ("", "x" * 17, "vm 0", "vm/0", "vmé"):
        with pytest.raises(ValueError):
            vm_id_bytes(bad)


@given(st.lists(st.binary(min_size=HEADER_SIZE, max_size=300), max_size=6), st.data())
def test_frames_survive_any_split(bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec = FrameDecoder()
    out: list[bytes] = []
    for a, b in itertools.pairwise([0, *cuts, len(stream)]):
        out += dec.feed(stream[a:b])
    assert out == bodies
    assert dec.dropped_bytes == 0 and dec.pending == 0
    assert dec.counters["frames"] == len(bodies)


def test_encode_frame_bounds() -> None:
    for size in (HEADER_SIZE - 1, MAX_BODY + 1):
        with pytest.raises(ValueError):
            encode_frame(bytes(size))
    assert len(encode_frame(bytes(MAX_BODY))) == MAX_BODY + 8


def test_decoder_resyncs_after_garbage() -> None:
    f1, f2 = encode_frame(b"A" * HEADER_SIZE), encode_frame(b"B" * 40)
    bad_len = MAGIC + (HEADER_SIZE - 1).to_bytes(4, "little")
    huge = MAGIC + (MAX_BODY + 1).to_bytes(4, "little")
    dec = FrameDecoder()
    out = dec.feed(b"noise" + f1 + bad_len + b"xx" + huge + f2 + b"zzGH")
    assert out == [b"A" * HEADER_SIZE, b"B" * 40]
    assert dec.counters["bad_length"] == 2
    assert dec.counters["bad_magic"] >= 2
    # everything but the two frames and the trailing partial magic was dropped
    assert dec.dropped_bytes == 5 + len(bad_len) + 2 + len(huge) + 2
    assert dec.pending == 2
    assert dec.feed(b"CX" + (40).to_bytes(4, "little") + b"C" * 40) == [b"C" * 40]


def test_decoder_discard_partial() -> None:
    dec = FrameDecoder()
    # a forged length would hold the stream until MAX_BODY bytes arrive
    assert dec.feed(MAGIC + MAX_BODY.to_bytes(4, "little") + b"junk") == []
    assert dec.discard_partial() == 12
    assert dec.feed(encode_frame(b"D" * HEADER_SIZE)) == [b"D" * HEADER_SIZE]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_decoder_never_raises(chunks: list[bytes]) -> None:
    dec = FrameDecoder()
    total = 0
    for c in chunks:
        for body in dec.feed(c):
            assert HEADER_SIZE <= len(body) <= MAX_BODY
            total += len(body) + 8
    assert total + dec.dropped_bytes + dec.pending == sum(map(len, chunks))


def test_header_and_prefix_are_declared_on_the_codec() -> None:
    """Decode errors are the codec core's DecodeError (the GhcxReject's cause, at the
    field's offset); only valid headers and prefixes can be built."""
    good = Header(VERSION, MsgType.HELLO, 0, vm_id_bytes("vm0"), 0, 0).encode()
    for body, reason, offset in ((b"\x02" + good[1:], "version", 0),
                                 (good[:1] + b"\x42" + good[2:], "unknown_type", 1)):
        with pytest.raises(GhcxReject) as e:
            Header.decode(body)
        cause = e.value.__cause__
        assert e.value.reason == reason and isinstance(cause, DecodeError)
        assert (cause.offset, cause.raw) == (offset, body)
    assert FramePrefix(length=40).encode() == MAGIC + (40).to_bytes(4, "little")
    assert FramePrefix.decode(MAGIC + (40).to_bytes(4, "little")).length == 40
    with pytest.raises(DecodeError) as d:
        FramePrefix.decode(b"GHCY" + (40).to_bytes(4, "little"))
    assert d.value.offset == 0
    with pytest.raises(DecodeError) as d:
        FramePrefix.decode(MAGIC + (MAX_BODY + 1).to_bytes(4, "little"))
    assert d.value.offset == 4
    for bad in (lambda: FramePrefix(length=HEADER_SIZE - 1),
                lambda: Header(VERSION, MsgType.HELLO, 0, b"vm0", 0, 0),
                lambda: Header(VERSION, MsgType.HELLO, 0, bytes(16), 2**64, 0),
                lambda: Header(2, MsgType.HELLO, 0, bytes(16), 0, 0)):
        with pytest.raises(ValueError):
            bad()
