"""TLP headers from templates (teeio.tlp.templates) and the run parsers' predictions
(teeio.tlp.parse_runs): byte for byte and field for field what the per-TLP codec gives,
with and without aggregation (PCIe 6.x §2.2.7, §2.2.9, §6.33.6)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from teeio.ide import IdeKey, IdeTx, KeySet, SubStream
from teeio.tlp import (
    TLP_SIZES,
    CplStatus,
    Tlp,
    TlpError,
    TlpType,
    byte_span,
    completion_headers,
    completion_parts,
    completion_run,
    completion_runs,
    completion_spans,
    memory_read_headers,
    memory_read_tagged,
    memory_write_parts,
    memory_write_split,
    parse_ide_completion_runs,
    parse_ide_completions,
    parse_ide_request_runs,
    parse_ide_requests,
    split,
)

SID = 9
addresses = st.one_of(st.integers(0, (1 << 32) + 0x10000),
                      st.integers(1 << 32, 1 << 40).map(lambda a: a & ~0xFFF),
                      st.integers(1 << 32, (1 << 64) - (1 << 16)))
tlp_sizes = st.sampled_from(TLP_SIZES)


def data(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


@settings(max_examples=200)
@given(addresses, st.integers(1, 20000), tlp_sizes, st.integers(0, 0x3FF), st.integers(0, 7),
       st.integers(0, 7))
def test_write_template_is_memory_write_parts(a: int, n: int, size: int, tag: int, tc: int,
                                              attr: int) -> None:
    h1, p1 = memory_write_split(0x0100, a, data(n), size, tag=tag, tc=tc, attr=attr)
    h2, p2 = memory_write_parts(0x0100, a, data(n), split(a, n, size), tag=tag, tc=tc,
                                attr=attr)
    assert h1 == h2 and [bytes(x) for x in p1] == [bytes(x) for x in p2]


@settings(max_examples=200)
@given(addresses, st.integers(1, 30000), tlp_sizes, tlp_sizes, st.data())
def test_completion_and_read_templates(a: int, n: int, mrrs: int, mps: int,
                                       draw: st.DataObject) -> None:
    pieces = split(a, n, mrrs)
    tags = draw.draw(st.lists(st.integers(0, 0x3FF), min_size=len(pieces),
                              max_size=len(pieces)))
    tc, attr = draw.draw(st.integers(0, 7)), draw.draw(st.integers(0, 7))
    assert memory_read_tagged(0x0100, pieces, tags, tc=tc, attr=attr) == [
        memory_read_headers(0x0100, [p], first_tag=t, tc=tc, attr=attr)[0]
        for p, t in zip(pieces, tags, strict=True)]
    body = data(n)
    reads = [(pa, pn, t) for (pa, pn), t in zip(pieces, tags, strict=True)]
    headers, payloads = completion_runs(0x0100, 0x0008, reads, body, mps, tc=tc, attr=attr)
    ref_h: list[bytes] = []
    ref_p: list[bytes] = []
    for pa, pn, t in reads:
        h, p = completion_parts(0x0100, t, 0x0008, pa, body[pa - a:pa - a + pn],
                                completion_spans(pa, pn, mps), tc=tc, attr=attr)
        one = completion_run(0x0100, t, 0x0008, pa, body[pa - a:pa - a + pn], mps, tc=tc,
                             attr=attr)
        assert one[0] == h and [bytes(x) for x in one[1]] == [bytes(x) for x in p]
        ref_h += h
        ref_p += [bytes(x) for x in p]
    assert headers == ref_h and [bytes(x) for x in payloads] == ref_p
    assert completion_headers(0x0100, 0x0008, reads, mps, tc=tc, attr=attr) == (
        ref_h, [len(x) for x in ref_p])


def sender(unit: int) -> IdeTx:
    tx = IdeTx(SID)
    for s in SubStream:
        tx.program(KeySet.K0, s, IdeKey(bytes([s]) * 32))
        tx.set_aggregation(s, unit)
    tx.go(KeySet.K0)
    return tx


def decoded(wires: list[bytes], aggregation: bool) -> list[Tlp]:
    """Each wire as the per-TLP code reads it (M set, the MAC where M says), up to the
    first it does not accept."""
    out = []
    for w in wires:
        m = w[1] & 1 if len(w) > 1 else 1
        if not m and not aggregation:
            break
        try:
            out.append(Tlp.decode(bytes((w[0], w[1] | 1)) + w[2:len(w) - (12 if m else 0)]))
        except (TlpError, IndexError):
            break
    return out


@settings(max_examples=300, deadline=None)
@given(addresses, st.integers(1, 20000), tlp_sizes, st.sampled_from([1, 2, 8]),
       st.booleans(), st.integers(0, 2), st.data())
def test_run_parsers_give_the_per_tlp_fields(a: int, n: int, size: int, unit: int,
                                             aggregation: bool, kind: int,
                                             draw: st.DataObject) -> None:
    """Requests and completions, maybe aggregated, maybe one byte changed: the parsers
    (one comparison per predicted TLP) give the fields of every TLP the codec accepts, up
    to the first it does not, and all of an unchanged run."""
    tx = sender(unit)
    if kind == 0:
        h, p = memory_write_split(0x0100, a, data(n), size)
        wires = tx.protect_many(SubStream.PR, draw.draw(st.booleans()), h, p)
    elif kind == 1:
        pieces = split(a, n, size)
        first = draw.draw(st.integers(0, 255))
        tags = [(first + i) % draw.draw(st.sampled_from([32, 256])) for i in range(len(pieces))]
        wires = tx.protect_many(SubStream.NPR, False, memory_read_tagged(0x0100, pieces, tags),
                                [b""] * len(pieces))
    else:
        n = n % (4096 - a % 4096) + 1
        h, p = completion_run(0x0100, draw.draw(st.integers(0, 0x3FF)), 8, a, data(n), size)
        wires = tx.protect_many(SubStream.CPL, False, h, p)
    clean = list(wires)
    if draw.draw(st.booleans()):
        i = draw.draw(st.integers(0, len(wires) - 1))
        bad = bytearray(wires[i])
        bad[draw.draw(st.integers(0, min(len(bad), 20) - 1))] ^= 1 << draw.draw(
            st.integers(0, 7))
        wires[i] = bytes(bad)
    tlps = decoded(wires, aggregation)
    got: list[tuple[object, ...]] = []
    ref: list[tuple[object, ...]] = []
    if kind < 2:
        got += parse_ide_requests(wires, 0, SID, aggregation)
        for t in tlps:
            if t.stream_id != SID or not t.type.is_request or not t.first_be:
                break
            ref.append((t.type.has_data, t.requester_id, t.tag, t.tc, t.attr, t.t_bit,
                        t.byte_address, t.request_byte_count, byte_span(t.first_be)[0]))
    else:
        got += parse_ide_completions(wires, 0, SID, aggregation)
        for t in tlps:
            if t.stream_id != SID or t.type is not TlpType.CPLD or t.status != CplStatus.SC:
                break
            ref.append((t.requester_id, t.tag, t.byte_count, t.lower_address))
        runs = parse_ide_completion_runs(wires, 0, SID, aggregation)
        assert sum(k for _, k in runs) == len(got)
    assert got == ref[:len(got)]
    if wires == clean and (aggregation or unit == 1):
        assert len(got) == len(wires)            # the common case is never left behind


def test_a_run_is_one_entry() -> None:
    tx = sender(1)
    h, p = memory_write_split(0x0100, 1 << 32, os.urandom(1 << 16), 256)
    wires = tx.protect_many(SubStream.PR, False, h, p)
    assert [k for _, k in parse_ide_request_runs(wires, 0, SID)] == [256]
