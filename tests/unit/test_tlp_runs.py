"""Runs of TLPs without Tlp objects (teeio.tlp *_parts / parse_ide_*, IdeTx.protect_many,
IdeRx.open_many): the same bytes, fields and checks as the per-TLP code."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio.ide import (
    COUNTER_MAX,
    IdeIntegrityError,
    IdeKey,
    IdeKeyStateError,
    IdeRx,
    IdeTx,
    KeySet,
    SubStream,
)
from teeio.tlp import (
    MAC_BYTES,
    TLP_SIZES,
    CplStatus,
    Tlp,
    TlpError,
    TlpType,
    byte_span,
    completion_parts,
    completion_spans,
    memory_read_headers,
    memory_write_parts,
    parse_ide_completions,
    parse_ide_requests,
    split,
)

SID = 9
KEYS = {s: IdeKey(bytes([0x40 + s]) * 32, ifv=1 + s) for s in SubStream}

addresses = st.one_of(st.integers(0, (1 << 32) - 1),
                      st.integers(1 << 32, (1 << 64) - (1 << 14)))
sizes = st.integers(1, 3 * 4096 + 5)
tlp_sizes = st.sampled_from(TLP_SIZES)
tags = st.integers(0, 0x3FF)
tcs = st.integers(0, 7)


def pair(key_set: KeySet = KeySet.K0, keys: dict[SubStream, IdeKey] = KEYS
         ) -> tuple[IdeTx, IdeRx]:
    tx, rx = IdeTx(SID), IdeRx(SID)
    for s, k in keys.items():
        tx.program(key_set, s, k)
        rx.program(key_set, s, k)
    rx.go(key_set)
    tx.go(key_set)
    return tx, rx


# -- building ---------------------------------------------------------------------------------

@given(addresses, sizes, tlp_sizes, st.integers(0, 0xFFFF), tags, tcs, tcs, st.data())
def test_memory_write_parts_are_tlp_bytes(address: int, n: int, size: int, rid: int, tag: int,
                                          tc: int, attr: int, data: st.DataObject) -> None:
    payload = data.draw(st.binary(min_size=n, max_size=n))
    pieces = split(address, n, size)
    headers, payloads = memory_write_parts(rid, address, payload, pieces, tag=tag, tc=tc,
                                           attr=attr)
    assert len(headers) == len(payloads) == len(pieces)
    for (a, k), h, p in zip(pieces, headers, payloads, strict=True):
        off = a - address
        ref = Tlp.memory_write(rid, tag, a, payload[off:off + k], tc=tc, attr=attr)
        assert h == ref.header() and bytes(p) == ref.data


@given(addresses, sizes, tlp_sizes, st.integers(0, 0xFFFF), st.integers(0, 0x3FF - 64), tcs,
       tcs)
def test_memory_read_headers_are_tlp_bytes(address: int, n: int, size: int, rid: int,
                                           first: int, tc: int, attr: int) -> None:
    pieces = split(address, n, size)[:64]
    headers = memory_read_headers(rid, pieces, first_tag=first, tc=tc, attr=attr)
    for i, ((a, k), h) in enumerate(zip(pieces, headers, strict=True)):
        assert h == Tlp.memory_read(rid, first + i, a, k, tc=tc, attr=attr).header()


@given(st.integers(0, 1 << 40), st.integers(1, 4096), tlp_sizes, tags, tcs, tcs, st.data())
def test_completion_parts_are_tlp_bytes(address: int, n: int, mps: int, tag: int, tc: int,
                                        attr: int, data: st.DataObject) -> None:
    payload = data.draw(st.binary(min_size=n, max_size=n))
    spans = completion_spans(address, n, mps)
    headers, payloads = completion_parts(0x0100, tag, 0x0008, address, payload, spans, tc=tc,
                                         attr=attr)
    remaining = n
    for (a, k), h, p in zip(spans, headers, payloads, strict=True):
        off = a - address
        body = bytes(a & 3) + payload[off:off + k]
        body += bytes(-len(body) % 4)
        ref = Tlp(TlpType.CPLD, 0x0100, tag, data=body, completer_id=0x0008,
                  byte_count=remaining, lower_address=a & 0x7F, tc=tc, attr=attr)
        assert h == ref.header() and bytes(p) == ref.data
        remaining -= k


# -- protecting and checking ------------------------------------------------------------------

@settings(max_examples=60)
@given(addresses, st.integers(1, 2 * 4096), tlp_sizes, st.booleans(), st.data())
def test_protect_many_and_open_many_match_the_per_tlp_engines(
        address: int, n: int, size: int, t_bit: bool, data: st.DataObject) -> None:
    payload = data.draw(st.binary(min_size=n, max_size=n))
    pieces = split(address, n, size)
    headers, payloads = memory_write_parts(0x0100, address, payload, pieces)
    tx_many, rx_many = pair()
    tx_one, rx_one = pair()
    wires = tx_many.protect_many(SubStream.PR, t_bit, headers, payloads, SID)
    for h, p, wire in zip(headers, payloads, wires, strict=True):
        ref = tx_one.protect(replace(Tlp.decode(h + bytes(p)), t_bit=t_bit, stream_id=SID))
        assert wire == ref
    assert tx_many.counter(SubStream.PR) == tx_one.counter(SubStream.PR)
    fields = parse_ide_requests(wires, 0, SID)
    assert len(fields) == len(wires)
    plains = rx_many.open_many(wires, 0, len(wires))
    assert len(plains) == len(wires)
    got = b""
    for wire, f, plain in zip(wires, fields, plains, strict=True):
        ref = rx_one.unprotect(wire)
        assert plain == ref.data
        write, rid, tag, tc, attr, t, byte_address, count, lo = f
        assert (write, rid, tag, tc, attr, t, byte_address, count, lo) == (
            True, ref.requester_id, ref.tag, ref.tc, ref.attr, ref.t_bit, ref.byte_address,
            ref.request_byte_count, byte_span(ref.first_be)[0])
        got += plain[lo:lo + count]
    assert got == payload
    assert rx_many.counter(SubStream.PR) == rx_one.counter(SubStream.PR)


def test_open_many_checks_empty_payloads_and_completions() -> None:
    tx, rx = pair()
    pieces = [(0x1_0000_0000 + 512 * i, 512) for i in range(4)]
    mrds = tx.protect_many(SubStream.NPR, True, memory_read_headers(7, pieces),
                           [b""] * 4)
    assert [f[1:3] for f in parse_ide_requests(mrds, 0, SID)] == [(7, i) for i in range(4)]
    assert rx.open_many(mrds, 0, 4) == [b""] * 4
    h, p = completion_parts(7, 3, 8, 0x1000, bytes(range(200)), completion_spans(
        0x1000, 200, 128))
    cpls = tx.protect_many(SubStream.CPL, True, h, p)
    assert parse_ide_completions(cpls, 0, SID) == [(7, 3, 200, 0), (7, 3, 72, 0x80 & 0x7F)]
    assert b"".join(rx.open_many(cpls, 0, 2)) == bytes(range(200))
    assert rx.counter(SubStream.CPL) == KEYS[SubStream.CPL].ifv + 2


def test_open_many_stops_before_a_bad_tlp_and_changes_nothing_for_it() -> None:
    tx, rx = pair()
    headers, payloads = memory_write_parts(1, 0x2000, bytes(1024), split(0x2000, 1024, 256))
    wires = tx.protect_many(SubStream.PR, False, headers, payloads)
    bad = bytearray(wires[2])
    bad[-1] ^= 1
    wires[2] = bytes(bad)
    assert len(rx.open_many(wires, 0, 4)) == 2
    assert rx.counter(SubStream.PR) == KEYS[SubStream.PR].ifv + 2
    assert rx.insecure_reason is None                    # for unprotect to decide
    with pytest.raises(IdeIntegrityError, match="MAC"):
        rx.unprotect(wires[2])
    assert rx.open_many(wires, 3, 4) == []               # Insecure: nothing more


def test_open_many_leaves_a_key_set_switch_to_unprotect() -> None:
    tx, rx = pair()
    new = {s: IdeKey(bytes([0x70 + s]) * 32) for s in SubStream}
    headers, payloads = memory_write_parts(1, 0x2000, bytes(512), split(0x2000, 512, 256))
    first = tx.protect_many(SubStream.PR, False, headers, payloads)
    for s, k in new.items():
        tx.program(KeySet.K1, s, k)
        rx.program(KeySet.K1, s, k)
    rx.go(KeySet.K1)
    tx.go(KeySet.K1)
    second = tx.protect_many(SubStream.PR, False, headers, payloads)
    wires = first + second
    assert len(rx.open_many(wires, 0, 4)) == 2           # stops at the first K1 TLP
    assert rx.active_key_set(SubStream.PR) == KeySet.K0
    rx.unprotect(wires[2])                               # switches (and drops K0)
    assert rx.active_key_set(SubStream.PR) == KeySet.K1
    assert len(rx.open_many(wires, 3, 4)) == 1


def test_protect_many_is_all_or_nothing() -> None:
    keys = {s: IdeKey(bytes(32), ifv=COUNTER_MAX - 1) for s in SubStream}
    tx, _ = pair(keys=keys)
    headers, payloads = memory_write_parts(1, 0, bytes(12), split(0, 12, 4))
    with pytest.raises(IdeKeyStateError, match="exhausted"):
        tx.protect_many(SubStream.PR, False, headers, payloads)
    assert tx.counter(SubStream.PR) == COUNTER_MAX - 1
    assert len(tx.protect_many(SubStream.PR, False, headers[:2], payloads[:2])) == 2
    with pytest.raises(IdeKeyStateError, match="stream 3"):
        tx.protect_many(SubStream.PR, False, headers, payloads, stream_id=3)
    with pytest.raises(IdeKeyStateError, match="no key set"):
        IdeTx(SID).protect_many(SubStream.PR, False, headers, payloads)


# -- parsing: only what Tlp.decode accepts, with the same fields ------------------------------

@st.composite
def ide_wires(draw: st.DrawFn) -> bytes:
    """A protected request or completion, perhaps with a byte of its prefix or header (or
    its length) changed."""
    tx, _ = pair()
    address = draw(addresses)
    n = draw(st.integers(1, 4096 - address % 4096))
    kind = draw(st.integers(0, 2))
    t_bit = draw(st.booleans())
    req = Tlp.memory_read(draw(st.integers(0, 0xFFFF)), draw(tags), address, n,
                          tc=draw(tcs), attr=draw(tcs), t_bit=t_bit, stream_id=SID)
    if kind == 0:
        tlp = Tlp.memory_write(req.requester_id, req.tag, address, bytes(n), tc=req.tc,
                               attr=req.attr, t_bit=t_bit, stream_id=SID)
    elif kind == 1:
        tlp = req
    else:
        tlp = Tlp.completion_for(req, 0x0008, bytes(n))
    wire = bytearray(tx.protect(tlp))
    change = draw(st.integers(0, 3))
    hlen = Tlp.header_length(bytes(wire))
    if change == 1:
        i = draw(st.integers(0, hlen - 1))
        wire[i] = draw(st.integers(0, 255))
    elif change == 2:
        i = draw(st.integers(0, hlen - 1))
        wire[i] ^= 1 << draw(st.integers(0, 7))
    elif change == 3:
        del wire[-draw(st.integers(1, 8)):]
    return bytes(wire)


@settings(max_examples=400)
@given(ide_wires())
def test_parsers_accept_only_what_decode_accepts(wire: bytes) -> None:
    image = wire[:-MAC_BYTES]
    try:
        ref: Tlp | None = Tlp.decode(image)
    except (TlpError, IndexError):
        ref = None
    reqs = parse_ide_requests([wire], 0, SID)
    cpls = parse_ide_completions([wire], 0, SID)
    assert not (reqs and cpls)
    if reqs:
        assert ref is not None and ref.stream_id == SID and ref.type.is_request
        assert reqs[0] == (ref.type.has_data, ref.requester_id, ref.tag, ref.tc, ref.attr,
                           ref.t_bit, ref.byte_address, ref.request_byte_count,
                           byte_span(ref.first_be)[0])
    if cpls:
        assert ref is not None and ref.stream_id == SID and ref.type is TlpType.CPLD
        assert ref.status == CplStatus.SC
        assert cpls[0] == (ref.requester_id, ref.tag, ref.byte_count, ref.lower_address)
    if ref is not None and ref.stream_id == SID and ref.first_be:
        # The common case is never left to the slow path.
        if ref.type.is_request:
            assert reqs
        elif ref.type is TlpType.CPLD:
            assert cpls


def test_parsers_stop_at_the_first_other_tlp() -> None:
    tx, _ = pair()
    headers, payloads = memory_write_parts(1, 0x2000, bytes(1024), split(0x2000, 1024, 256))
    wires = tx.protect_many(SubStream.PR, False, headers, payloads)
    clear = headers[0] + bytes(payloads[0])
    assert len(parse_ide_requests(wires + [clear] + wires, 0, SID)) == 4
    assert parse_ide_requests(wires, 0, SID + 1) == []
    assert parse_ide_completions(wires, 0, SID) == []
    assert len(parse_ide_requests(wires, 1, SID)) == 3
