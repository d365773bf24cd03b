"""A device COPY on the link's clear path (vfio_user_dev/link/endpoint.py ``copy_clear``):
one memmove between two mappings when the root port admits both halves whole, else its
read then its write; either way the same bytes land, the same counts move, and every
root-port check applies (PCIe 6.x §11.2.1: T=0 never into a trusted window)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.link_rig import GUEST, RID, SID, SIZE, Rig
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.link.interfaces import LinkFault

pytestmark = pytest.mark.timeout(30)

SRC, DST = GUEST + 0x1003, GUEST + 0x8005      # unaligned: uneven TLP counts
N = 20_000


@pytest.fixture(params=["mapped", "fd"])
def copy_rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Guest memory this process maps (a sealed memfd) or reaches through its fd."""
    r = Rig(sealed=request.param == "mapped")
    yield r
    r.close()


def counts(r: Rig) -> dict[str, object]:
    """The link's and the root port's counters, and the endpoint's transfers."""
    rp = {k: v for k, v in r.rp.status().items() if isinstance(v, int)}
    return {"link": dict(r.link.counters), "rp": rp, "ep": r.ep.counters["transfers"]}


def pattern(n: int, seed: int = 7) -> bytes:
    return bytes((i * seed + (i >> 8)) & 0xFF for i in range(n))


def test_copy_lands_and_counts_as_its_read_and_write(copy_rig: Rig) -> None:
    r = copy_rig
    data = pattern(N)
    r.poke(SRC - GUEST, data)
    with Rig(sealed=False) as ref:          # the same transfer as a read then a write
        ref.poke(SRC - GUEST, data)
        ref.ep.write(DST, ref.ep.read(SRC, N))
        assert r.ep.copy_clear(SRC, DST, N) is True
        assert r.mem(DST - GUEST, N) == data == ref.mem(DST - GUEST, N)
        assert counts(r) == counts(ref)


def test_direct_only_copies_only_between_mappings(copy_rig: Rig) -> None:
    r = copy_rig
    data = pattern(4096, 3)
    r.poke(SRC - GUEST, data)
    before = counts(r)
    done = r.ep.copy_clear(SRC, DST, 4096, direct_only=True)
    if fcntl.fcntl(r.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:     # mapped
        assert done is True and r.mem(DST - GUEST, 4096) == data
    else:                                    # reached through the fd: nothing done
        assert done is False
        assert r.mem(DST - GUEST, 4096) == bytes(4096) and counts(r) == before


@pytest.mark.parametrize("shift", [100, -100, 0])
def test_overlapping_copy_is_a_read_then_a_write(copy_rig: Rig, shift: int) -> None:
    r = copy_rig
    data = pattern(8192, 5)
    r.poke(SRC - GUEST, data)
    assert r.ep.copy_clear(SRC, SRC + shift, 8192)
    assert r.mem(SRC + shift - GUEST, 8192) == data


def test_t0_copy_into_a_window_is_refused_whatever_the_memory(copy_rig: Rig) -> None:
    r = copy_rig
    win = DST & ~0xFFF
    r.rp.setup_stream(SID, RID, RID)
    r.rp.authorise_window(RID, SID, win, 0x2000)
    private = b"private!" * 128
    r.poke(DST - GUEST, private)
    r.poke(SRC - GUEST, b"evil" * 256)
    assert r.ep.copy_clear(SRC, DST, 1024, direct_only=True) is False   # not as a memmove
    with pytest.raises(LinkFault, match="refused"):
        r.ep.copy_clear(SRC, DST, 1024)
    assert r.mem(DST - GUEST, 1024) == private
    assert r.rp.status()["refusals_total"] > 0


def test_t0_copy_out_of_a_window_is_refused_too(copy_rig: Rig) -> None:
    r = copy_rig
    win = SRC & ~0xFFF
    r.rp.setup_stream(SID, RID, RID)
    r.rp.authorise_window(RID, SID, win, 0x2000)
    r.poke(SRC - GUEST, b"secret" * 100)
    with pytest.raises(LinkFault, match="refused"):
        r.ep.copy_clear(SRC, DST, 600)
    assert r.mem(DST - GUEST, 600) == bytes(600)


def test_a_secure_stream_or_a_tap_sends_tlps_instead(tmp_path: Path) -> None:
    with Rig(tmp_path, capture=True, sealed=True) as tapped:
        assert tapped.ep.copy_clear(SRC, DST, 64) is False     # the caller reads and writes
    with Rig(sealed=True) as secure:
        secure.secure()
        assert secure.ep.copy_clear(SRC, DST, 64) is False
        assert secure.link.counters["clear_transfers"] == 0


def test_a_copy_past_the_mapped_memory_faults_before_touching_anything(copy_rig: Rig) -> None:
    r = copy_rig
    r.poke(SRC - GUEST, b"x" * 16)
    end = GUEST + SIZE
    assert r.ep.copy_clear(SRC, end - 8, 16, direct_only=True) is False
    with pytest.raises(DmaFault, match="unmapped"):
        r.ep.copy_clear(SRC, end - 8, 16)
    with pytest.raises(LinkFault, match="bad DMA range"):
        r.ep.copy_clear(-1, DST, 16)
    assert r.mem(SIZE - 8, 8) == bytes(8)


# -- several copies at once (a BATCH's run of COPYs) -------------------------------------------

def test_many_copies_land_and_count_as_the_same_copies_one_by_one() -> None:
    copies = [(SRC, DST, 4096), (SRC + 5, DST + 0x3000, 1000), (DST, SRC + 0x6000, 4096)]
    with Rig(sealed=True) as many, Rig(sealed=True) as single:
        for r in (many, single):
            r.poke(SRC - GUEST, pattern(0x7000))
        assert many.ep.copy_clear_many(copies) == 3
        for src, dst, n in copies:
            assert single.ep.copy_clear(src, dst, n, direct_only=True)
        assert many.mem(0, SIZE) == single.mem(0, SIZE)
        assert counts(many) == counts(single)


def test_many_copies_stop_where_one_could_not_be_a_memmove() -> None:
    """A copy into a trusted window, past the memory or with a bad range ends the run
    there: those before it are done and counted, it and the rest are not touched."""
    with Rig(sealed=True) as r:
        r.rp.setup_stream(SID, RID, RID)
        r.rp.authorise_window(RID, SID, GUEST + 0xC000, 0x1000)
        r.poke(SRC - GUEST, pattern(64))
        ends = {GUEST + 0xC000: "window", GUEST + SIZE - 8: "past the memory", -1: "bad"}
        for bad_dst in ends:
            before = counts(r)
            copies = [(SRC, DST, 64), (SRC, bad_dst, 16), (SRC, DST + 0x100, 64)]
            assert r.ep.copy_clear_many(copies) == 1, ends[bad_dst]
            assert r.ep.counters["transfers"] - before["ep"] == 2     # type: ignore[operator]
            assert r.mem(DST + 0x100 - GUEST, 64) == bytes(64)
        assert r.mem(0xC000, 16) == bytes(16)


def test_many_copies_ask_before_each_and_stop_when_told() -> None:
    asked = 0

    def proceed() -> bool:
        nonlocal asked
        asked += 1
        return asked <= 2
    with Rig(sealed=True) as r:
        r.poke(SRC - GUEST, pattern(64))
        copies = [(SRC, DST + i * 0x100, 64) for i in range(4)]
        assert r.ep.copy_clear_many(copies, proceed) == 2
        assert asked == 3
        assert [r.mem(DST + i * 0x100 - GUEST, 64) == pattern(64) for i in range(4)] == [
            True, True, False, False]
        assert r.link.counters["clear_transfers"] == 4


def test_many_copies_on_a_watched_link_or_a_secure_stream_are_none(tmp_path: Path) -> None:
    with Rig(tmp_path, capture=True, sealed=True) as tapped:
        assert tapped.ep.copy_clear_many([(SRC, DST, 64)]) == 0
    with Rig(sealed=True) as secure:
        secure.secure()
        assert secure.ep.copy_clear_many([(SRC, DST, 64)]) == 0
        assert secure.link.counters["clear_transfers"] == 0


def test_a_window_granted_while_copies_run_stops_the_rest() -> None:
    """The windows were looked at before the first copy: one granted between two copies
    stops the run, and the copy into it is refused when done the ordinary way."""
    asked = 0
    with Rig(sealed=True) as r:
        r.rp.setup_stream(SID, RID, RID)

        def grant_before_second() -> bool:
            nonlocal asked
            asked += 1
            if asked == 2:
                r.rp.authorise_window(RID, SID, GUEST + 0xC000, 0x1000)
            return True
        r.poke(SRC - GUEST, b"evil" * 16)
        copies = [(SRC, DST, 64), (SRC, GUEST + 0xC000, 64)]
        assert r.ep.copy_clear_many(copies, grant_before_second) == 1
        with pytest.raises(LinkFault, match="refused"):
            r.ep.copy_clear(SRC, GUEST + 0xC000, 64)
        assert r.mem(0xC000, 64) == bytes(64)
