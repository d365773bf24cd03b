"""The link's run-at-a-time IDE path (parse/open/gather without Tlp objects) against the
per-TLP path it falls back to: for the same traffic -- faults, windows, T=1, memory
faults, key refresh -- the same data, errors, counters, refusals and IDE failures."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from tests.support.link_rig import GUEST, RID, SID, SIZE, Rig
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection, LinkFault
from vfio_user_dev.link.streams import IdeStreamEnd

pytestmark = pytest.mark.timeout(120)

WIN = GUEST + 0x4000
WSIZE = 0x2000


def keys(gen: int) -> dict[tuple[SubStream, Direction], IdeKey]:
    return {(s, d): IdeKey(bytes([gen, s, d]) * 10 + b"..", ifv=1 + gen)
            for s in SubStream for d in Direction}


def key_pair(rig: Rig, dev: IdeStreamEnd, key_set: KeySet, gen: int) -> None:
    """Program and GO *key_set* at both ends with fixed keys (Rx before Tx)."""
    k = keys(gen)
    for s in SubStream:
        dev.tx.program(key_set, s, k[s, Direction.TX])
        rig.rp.program_key(SID, key_set, Direction.RX, s, k[s, Direction.TX])
        dev.rx.program(key_set, s, k[s, Direction.RX])
        rig.rp.program_key(SID, key_set, Direction.TX, s, k[s, Direction.RX])
    dev.rx.go(key_set)
    rig.rp.key_set_go(SID, key_set, Direction.RX)
    dev.tx.go(key_set)
    rig.rp.key_set_go(SID, key_set, Direction.TX)


def build(per_tlp: bool, mps: int, mrrs: int, window: str) -> tuple[Rig, IdeStreamEnd]:
    rig = Rig(None, mps=mps, mrrs=mrrs)
    rig.rp.setup_stream(SID, RID, RID)
    dev = IdeStreamEnd(SID)
    key_pair(rig, dev, KeySet.K0, 1)
    dev.enabled = True
    assert rig.rp.enable_stream(SID) == "secure"
    rig.ep.attach_stream(dev)
    if window != "none":            # T=1 DMA with a window, or T=0 DMA beside one
        rig.rp.authorise_window(RID, SID, WIN, WSIZE, write=window != "t1-read-only")
        rig.ep.tee_dma = lambda: window != "t0"
    if per_tlp:   # the reference: every TLP through Tlp objects, one by one
        rig.rp._receive_run = lambda wires, start, *_: start        # type: ignore[method-assign]
        rig.ep._receive_run = lambda wires, start: start             # type: ignore[method-assign]
    return rig, dev


def scrub(value: Any) -> Any:
    """Drop wall-clock times and inode numbers (they differ between the two runs)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in ("time", "inode")}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


ops = st.lists(st.tuples(st.sampled_from(["write", "read", "refresh"]),
                         st.integers(0, SIZE - 1), st.integers(1, 3000)),
               min_size=1, max_size=5)
faults = st.one_of(st.none(), st.tuples(
    st.sampled_from(list(FaultKind)),
    st.sampled_from(list(LinkDirection)), st.integers(1, 12)))


def run(per_tlp: bool, mps: int, mrrs: int, window: str, script: list[tuple[str, int, int]],
        fault: tuple[FaultKind, LinkDirection, int] | None) -> dict[str, Any]:
    rig, dev = build(per_tlp, mps, mrrs, window)
    try:
        armed = None
        if fault is not None:
            armed = rig.link.inject(Fault(fault[0], fault[1], nth=fault[2]))
        outcome: list[object] = []
        gen, key_set = 1, KeySet.K0
        for i, (op, off, n) in enumerate(script):
            data = bytes((i * 37 + j) & 0xFF for j in range(n))
            try:
                if op == "write":
                    rig.ep.write(GUEST + off, data)
                    outcome.append("ok")
                elif op == "read":
                    outcome.append(rig.ep.read(GUEST + off, n))
                elif dev.is_secure():
                    gen, key_set = gen + 1, KeySet(1 - key_set)
                    key_pair(rig, dev, key_set, gen)
                    outcome.append("refreshed")
            except DmaFault as exc:         # LinkFault, or the clear path's DmaFault
                outcome.append(f"{type(exc).__name__}: {exc}")
        return {
            "outcome": outcome, "memory": rig.mem(0, SIZE),
            "rp": scrub(rig.rp.status()),
            "events": scrub(rig.rp.events_since(0, ("ide_fail", "remap"))),
            "ep": rig.ep.status(), "link": rig.link.status(), "secure": dev.is_secure(),
            "failures": [(e.side, e.stream_id, e.reason, e.how) for e in rig.ep.ide_failures],
            "fault": None if armed is None else (armed.seen, len(armed.fired)),
        }
    finally:
        rig.close()


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([128, 256, 512]), st.sampled_from([128, 512, 4096]),
       st.sampled_from(["none", "t1-rw", "t1-read-only", "t0"]), ops, faults)
def test_runs_match_the_per_tlp_path(mps: int, mrrs: int, window: str,
                                     script: list[tuple[str, int, int]],
                                     fault: tuple[FaultKind, LinkDirection, int] | None) -> None:
    fast = run(False, mps, mrrs, window, script, fault)
    slow = run(True, mps, mrrs, window, script, fault)
    assert fast == slow


def test_memory_fault_inside_a_gathered_run_is_per_tlp() -> None:
    """A T=0 IDE write and read running off the end of guest memory: the TLPs inside land
    (or are answered), the others are refused one by one, as on the per-TLP path."""
    for per_tlp in (False, True):
        rig, _ = build(per_tlp, 256, 256, "none")
        try:
            with pytest.raises(LinkFault, match="refused 2 posted"):
                rig.ep.write(GUEST + SIZE - 512, b"\xAA" * 1024)
            assert rig.mem(SIZE - 512, 512) == b"\xAA" * 512
            with pytest.raises(LinkFault, match="UR"):
                rig.ep.read(GUEST + SIZE - 512, 1024)
            st_ = rig.rp.status()
            assert st_["refusals"] == {"memory": 4}
            assert st_["tlps_in"] == st_["tlps_admitted"] == 8
            assert rig.dev_stream is None or rig.dev_stream.is_secure()
        finally:
            rig.close()


def test_counters_of_a_clean_run() -> None:
    rig, dev = build(False, 256, 512, "none")
    try:
        rig.ep.write(GUEST, bytes(4096))
        assert rig.ep.read(GUEST, 4096) == bytes(4096)
        rp, ep, link = rig.rp.status(), rig.ep.status(), rig.link.status()
        assert rp["tlps_in"] == rp["tlps_admitted"] == 16 + 8
        assert rp["completions_out"] == ep["ide_tlps_rx"] == 16
        assert ep["ide_tlps_tx"] == link["tlps_upstream"] == 24
        assert link["tlps_downstream"] == 16
        assert dev.is_secure() and rig.rp.streams[SID].started == set(SubStream) - {
            SubStream.CPL}
    finally:
        rig.close()
