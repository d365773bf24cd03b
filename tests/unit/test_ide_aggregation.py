"""IDE aggregation (PCIe 6.x §6.33.6): up to 8 TLPs of one sub-stream share one AES-GCM
invocation and one MAC, their payloads at most 256 DW; A and P are the TLPs' contents
concatenated (§6.33.4); the receiver joins the unit, checks it once, and fails the stream
on any breach of the rules."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio import ide_accel
from teeio.ide import (
    IdeIntegrityError,
    IdeKey,
    IdeKeyStateError,
    IdeRx,
    IdeTx,
    KeySet,
    SubStream,
)
from teeio.ide_runs import unit_sizes
from teeio.tlp import (
    TLP_SIZES,
    Tlp,
    memory_read_headers,
    memory_write_parts,
    memory_write_split,
    parse_ide_requests,
    split,
)

SID = 5
KEYS = {s: IdeKey(bytes([0x30 + s]) * 32, ifv=7 + s) for s in SubStream}
BASE = 0x1_0000_0000


def pair(unit_tlps: int = 8, rx_aggregation: bool = True) -> tuple[IdeTx, IdeRx]:
    tx, rx = IdeTx(SID), IdeRx(SID, rx_aggregation)
    for s, k in KEYS.items():
        tx.program(KeySet.K0, s, k)
        rx.program(KeySet.K0, s, k)
        tx.set_aggregation(s, unit_tlps)
    rx.go(KeySet.K0)
    tx.go(KeySet.K0)
    return tx, rx


@pytest.fixture(params=["c", "python"])
def ide_path(request: pytest.FixtureRequest) -> object:
    if request.param == "c" and not ide_accel.available():
        pytest.skip("the C accelerator is not built")
    before = ide_accel.set_enabled(request.param == "c")
    yield request.param
    ide_accel.set_enabled(before)


def writes(n: int, size: int = 256) -> tuple[list[bytes], list[bytes | memoryview]]:
    data = bytes(range(256)) * (n * size // 256 + 1)
    return memory_write_parts(0x0100, BASE, data[:n * size], split(BASE, n * size, size))


def test_unit_sizes_follow_the_count_and_payload_limits() -> None:
    assert unit_sizes([256] * 9, 8) == [4, 4, 1]          # 4 x 256 B = 256 DW
    assert unit_sizes([0] * 17, 8) == [8, 8, 1]             # MRds: the count limits
    assert unit_sizes([0] * 5, 2) == [2, 2, 1]
    assert unit_sizes([4096, 4096, 128], 8) == [1, 1, 1]    # alone above 256 DW
    assert unit_sizes([1024, 0, 4], 8) == [2, 1]            # 256 DW exactly, then more
    assert unit_sizes([256] * 3, 1) == [1, 1, 1]


def test_an_aggregated_unit_is_one_gcm_invocation_over_the_concatenation(
        ide_path: str) -> None:
    """Two MWrs of 256 B: A = prefix1 || header1 || prefix2 || header2, P = payload1 ||
    payload2, one IV (the unit's counter), the MAC (12 leading tag bytes) on the second
    only, M clear on the first (§6.33.4, §6.33.6); checked against AESGCM directly."""
    tx, _ = pair(unit_tlps=2)
    headers, payloads = writes(2)
    wires = tx.protect_many(SubStream.PR, False, headers, payloads)
    p1, p2 = (bytes((0x92, b1, SID, 0)) for b1 in (0x00, 0x01))
    a = p1 + headers[0] + p2 + headers[1]
    p = bytes(payloads[0]) + bytes(payloads[1])
    sealed = AESGCM(KEYS[SubStream.PR].key).encrypt(struct.pack(">4xQ", KEYS[0].ifv), p, a)
    assert wires[0] == p1 + headers[0] + sealed[:256]
    assert wires[1] == p2 + headers[1] + sealed[256:512] + sealed[512:524]
    assert tx.counter(SubStream.PR) == KEYS[SubStream.PR].ifv + 1     # one IV per unit


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.sampled_from(TLP_SIZES), st.sampled_from([1, 2, 4, 8]),
       st.integers(0, 4095))
def test_receive_joins_units_and_open_many_agrees(n: int, mps: int, unit: int,
                                                  offset: int) -> None:
    """The per-TLP reference (receive: nothing until the unit's MAC TLP, then all of it)
    and the batch path (open_many) give the same payloads and counters."""
    tx, rx_one = pair(unit)
    _, rx_many = pair(unit)
    data = bytes((i * 7) & 0xFF for i in range(n * 100))
    headers, payloads = memory_write_split(0x0100, BASE + offset, data, mps)
    wires = tx.protect_many(SubStream.PR, True, headers, payloads)
    m_bits = [w[1] & 1 for w in wires]
    sizes = unit_sizes([len(p) for p in payloads], unit)
    assert sum(m_bits) == len(sizes) and m_bits[-1] == 1
    got: list[Tlp] = []
    for w in wires:
        out = rx_one.receive(w)
        assert bool(out) == bool(w[1] & 1)
        got += out
    assert [t.data for t in got] == [bytes(p) for p in payloads]
    assert all(t.t_bit and t.stream_id == SID for t in got)
    assert rx_many.open_many(wires, 0, len(wires)) == [t.data for t in got]
    assert rx_one.counter(SubStream.PR) == rx_many.counter(SubStream.PR) == \
        tx.counter(SubStream.PR) == KEYS[SubStream.PR].ifv + len(sizes)
    assert len(parse_ide_requests(wires, 0, SID, aggregation=True)) == len(wires)


def test_other_sub_streams_may_interleave_a_unit() -> None:
    tx, rx = pair(8)
    mwr = tx.protect_many(SubStream.PR, False, *writes(3))
    mrd = tx.protect_many(SubStream.NPR, False,
                          memory_read_headers(0x0100, [(BASE, 64), (BASE + 64, 64)]),
                          [b"", b""])
    order = [mwr[0], mrd[0], mwr[1], mrd[1], mwr[2]]
    got = [[t.type.name for t in rx.receive(w)] for w in order]
    assert got == [[], [], [], ["MRD64", "MRD64"], ["MWR64"] * 3]


def test_a_tampered_or_dropped_tlp_fails_the_whole_unit(ide_path: str) -> None:
    for change in ("flip", "drop", "replay"):
        tx, rx = pair(4)
        wires = tx.protect_many(SubStream.PR, False, *writes(8))
        if change == "flip":
            bad = bytearray(wires[1])
            bad[40] ^= 1
            wires[1] = bytes(bad)
        elif change == "drop":
            del wires[2]
        else:
            wires.insert(2, wires[1])
        assert rx.open_many(wires, 0, len(wires)) == []        # the first unit is bad
        assert rx.counter(SubStream.PR) == KEYS[SubStream.PR].ifv
        with pytest.raises(IdeIntegrityError, match="MAC check failed|more than"):
            for w in wires:
                rx.receive(w)
        assert rx.insecure_reason is not None


@pytest.mark.parametrize("case, match", [
    ("nine", "more than 8 TLPs"),
    ("payload", "more than 256 DW"),
    ("k_toggle", "K toggled"),
    ("no_support", "M = 0"),
])
def test_receivers_check_the_rules(case: str, match: str) -> None:
    tx, rx = pair(8, rx_aggregation=case != "no_support")
    if case == "nine":          # a ninth TLP without a MAC: the unit is over the limit
        wires = tx.protect_many(SubStream.NPR, False,
                                memory_read_headers(1, [(BASE + 64 * i, 64) for i in range(9)]),
                                [b""] * 9)
        wires = [w[:1] + bytes((w[1] & 0xFE,)) + w[2:len(w) - (12 if w[1] & 1 else 0)]
                 for w in wires]
    elif case == "payload":     # 5 x 256 B in one unit: 320 DW
        headers, payloads = writes(5)
        wires = [bytes((0x92, 0x00, SID, 0)) + h + bytes(p) for h, p in zip(
            headers, payloads, strict=True)]
    elif case == "k_toggle":    # the unit's second TLP names K1
        for s, k in KEYS.items():
            rx.program(KeySet.K1, s, k)
        rx.go(KeySet.K1)
        wires = tx.protect_many(SubStream.PR, False, *writes(2))
        wires[1] = wires[1][:1] + bytes((wires[1][1] | 0x02,)) + wires[1][2:]
    else:                       # M clear at a receiver without Aggregation Supported
        wires = tx.protect_many(SubStream.PR, False, *writes(2))
    with pytest.raises(IdeIntegrityError, match=match):
        for w in wires:
            rx.receive(w)
    with pytest.raises(IdeIntegrityError, match="Insecure"):
        rx.receive(wires[0])


def test_unprotect_is_for_whole_tlps_only() -> None:
    tx, rx = pair(4)
    wires = tx.protect_many(SubStream.PR, False, *writes(2))
    with pytest.raises(IdeKeyStateError, match="aggregated"):
        rx.unprotect(wires[0])
    assert rx.receive(wires[0]) == []
    with pytest.raises(IdeKeyStateError, match="aggregated"):
        rx.unprotect(wires[1])                 # a unit is open on PR
    assert len(rx.receive(wires[1])) == 2
    single = tx.protect(Tlp.memory_write(0x0100, 0, BASE, b"abcd", stream_id=SID))
    assert rx.unprotect(single).data == b"abcd"


def test_aggregation_off_sends_exactly_what_protect_sends(ide_path: str) -> None:
    tx_many, _ = pair(1)
    tx_one, _ = pair(1)
    headers, payloads = writes(5)
    for h, p, w in zip(headers, payloads,
                       tx_many.protect_many(SubStream.PR, False, headers, payloads),
                       strict=True):
        assert w == tx_one.protect(replace(Tlp.decode(h + bytes(p)), stream_id=SID))


def test_modes_are_1_2_4_or_8() -> None:
    tx = IdeTx(1)
    for bad in (0, 3, 16):
        with pytest.raises(ValueError, match="TLPs per unit"):
            tx.set_aggregation(SubStream.PR, bad)
    tx.set_aggregation(SubStream.CPL, 4)
    assert tx.aggregation == {SubStream.PR: 1, SubStream.NPR: 1, SubStream.CPL: 4}
