"""IDE aggregation on the link (PCIe 6.x §6.33.6): DMA with aggregation at both ends
delivers the same data, counters and failures on the run-at-a-time path as on the
per-TLP path, and with the C accelerator as with the pure-Python reference; off unless
both ends are set up for it; the wire carries one MAC per unit."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio import ide_accel
from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.tlp import MAC_BYTES, PREFIX_LEN
from tests.support.link_rig import GUEST, RID, SID, SIZE, Rig
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection
from vfio_user_dev.link.streams import IdeStreamEnd
from vfio_user_dev.root_port.context import RootPortError

pytestmark = pytest.mark.timeout(180)


def key_pair(rig: Rig, dev: IdeStreamEnd, key_set: KeySet, gen: int) -> None:
    """Program and GO *key_set* at both ends with fixed keys (Rx before Tx)."""
    for s in SubStream:
        up = IdeKey(bytes([gen, s, 1]) * 10 + b"..", ifv=gen)
        down = IdeKey(bytes([gen, s, 0]) * 10 + b"..", ifv=gen)
        dev.tx.program(key_set, s, up)
        rig.rp.program_key(SID, key_set, Direction.RX, s, up)
        dev.rx.program(key_set, s, down)
        rig.rp.program_key(SID, key_set, Direction.TX, s, down)
    dev.rx.go(key_set)
    rig.rp.key_set_go(SID, key_set, Direction.RX)
    dev.tx.go(key_set)
    rig.rp.key_set_go(SID, key_set, Direction.TX)


def build(unit: int, per_tlp: bool = False, mps: int = 256, mrrs: int = 512,
          capture: bool = False, tmp: Any = None) -> tuple[Rig, IdeStreamEnd]:
    rig = Rig(tmp, mps=mps, mrrs=mrrs, capture=capture)
    rig.rp.setup_stream(SID, RID, RID)
    dev = IdeStreamEnd(SID, aggregation=True)
    key_pair(rig, dev, KeySet.K0, 1)
    modes = dict.fromkeys(SubStream, unit)
    dev.set_aggregation(modes)
    rig.rp.set_aggregation(SID, modes)
    dev.enabled = True
    assert rig.rp.enable_stream(SID) == "secure"
    rig.ep.attach_stream(dev)
    rig.dev_stream = dev
    if per_tlp:   # the reference: every TLP through Tlp objects, one by one
        rig.rp._receive_run = lambda wires, start, *_: start        # type: ignore[method-assign]
        rig.ep._receive_run = lambda wires, start: start             # type: ignore[method-assign]
    return rig, dev


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in ("time", "inode")}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def run(per_tlp: bool, c: bool, unit: int, mps: int, mrrs: int,
        script: list[tuple[str, int, int]],
        fault: tuple[FaultKind, LinkDirection, int] | None) -> dict[str, Any]:
    before = ide_accel.set_enabled(c)
    rig, dev = build(unit, per_tlp, mps, mrrs)
    try:
        armed = None if fault is None else rig.link.inject(Fault(fault[0], fault[1],
                                                                 nth=fault[2]))
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
            except DmaFault as exc:
                outcome.append(f"{type(exc).__name__}: {exc}")
        return {
            "outcome": outcome, "memory": rig.mem(0, SIZE), "rp": scrub(rig.rp.status()),
            "events": scrub(rig.rp.events_since(0, ("ide_fail",))),
            "ep": rig.ep.status(), "link": rig.link.status(), "secure": dev.is_secure(),
            "failures": [(e.side, e.reason, e.how) for e in rig.ep.ide_failures],
            "fault": None if armed is None else (armed.seen, len(armed.fired)),
        }
    finally:
        rig.close()
        ide_accel.set_enabled(before)


ops = st.lists(st.tuples(st.sampled_from(["write", "read", "refresh"]),
                         st.integers(0, SIZE - 1), st.integers(1, 3000)),
               min_size=1, max_size=4)
faults = st.one_of(st.none(), st.tuples(st.sampled_from(list(FaultKind)),
                                        st.sampled_from(list(LinkDirection)),
                                        st.integers(1, 12)))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.sampled_from([128, 256, 1024]),
       st.sampled_from([128, 512, 4096]), ops, faults)
def test_aggregated_runs_match_the_per_tlp_path(unit: int, mps: int, mrrs: int,
                                                script: list[tuple[str, int, int]],
                                                fault: tuple[FaultKind, LinkDirection, int]
                                                | None) -> None:
    fast = run(False, ide_accel.available(), unit, mps, mrrs, script, fault)
    assert fast == run(True, False, unit, mps, mrrs, script, fault)
    if ide_accel.available():
        assert fast == run(False, False, unit, mps, mrrs, script, fault)


def test_one_mac_per_unit_on_the_wire(tmp_path: Any) -> None:
    rig, dev = build(4, capture=True, tmp=tmp_path, mps=256, mrrs=4096)
    try:
        rig.ep.write(GUEST, bytes(range(256)) * 16)       # 16 MWr: 4 units of 4
        assert rig.ep.read(GUEST, 4096) == bytes(range(256)) * 16
        records = rig.records()
        mwr = [r for r in records if r[1] >> 4 == SubStream.PR]
        cpl = [r for r in records if r[1] >> 4 == SubStream.CPL]
        assert [r[1] & 1 for r in mwr] == [0, 0, 0, 1] * 4
        assert [len(r) for r in mwr] == ([PREFIX_LEN + 16 + 256] * 3 + [
            PREFIX_LEN + 16 + 256 + MAC_BYTES]) * 4
        assert [r[1] & 1 for r in cpl] == [0, 0, 0, 1] * 4
        assert dev.tx.counter(SubStream.PR) == 1 + 4
        assert rig.rp.streams[SID].tx.counter(SubStream.CPL) == 1 + 4
        assert rig.rp.status()["streams"][0]["aggregation"] == {"PR": 4, "NPR": 4, "CPL": 4}
    finally:
        rig.close()


def test_tampering_inside_a_unit_fails_the_stream() -> None:
    rig, dev = build(8, mps=128)
    try:
        rig.link.inject(Fault(FaultKind.FLIP_PAYLOAD, LinkDirection.UPSTREAM, nth=3))
        with pytest.raises(DmaFault, match="refused|Insecure"):
            rig.ep.write(GUEST, bytes(1024))
        assert not dev.is_secure()
        assert "MAC check failed" in str(rig.rp.status()["streams"][0]["insecure_reason"])
        assert rig.mem(0, 1024) == bytes(1024)      # nothing of the unit landed
    finally:
        rig.close()


def test_aggregation_is_set_before_enable_and_needs_support() -> None:
    rig, dev = build(1)
    try:
        with pytest.raises(RootPortError, match="before Enable"):
            rig.rp.set_aggregation(SID, {SubStream.PR: 8})
        plain = IdeStreamEnd(9)
        with pytest.raises(ValueError, match="not supported"):
            plain.set_aggregation({SubStream.PR: 2})
        plain.set_aggregation({SubStream.PR: 1})
    finally:
        rig.close()
