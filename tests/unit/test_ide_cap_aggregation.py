"""The IDE capability's aggregation registers (PCIe 6.x §7.9.26): Aggregation Supported in
the IDE Capability register, the Tx Aggregation Mode fields of each stream's Control (NPR
[3:2], PR [5:4], CPL [7:6]) writable only then, and what they do to the stream's engines
(§6.33.6)."""

from __future__ import annotations

from teeio.ide import SubStream
from teeio.pcie.config import ConfigSpace
from teeio.pcie.ide_cap import CTL_AGG_MASK, IdeCapability, IdeCapReg, build

BASE = 0x100


def make(aggregation: bool) -> tuple[ConfigSpace, IdeCapability]:
    cs = ConfigSpace()
    return cs, build(cs, BASE, name="t", aggregation=aggregation)


def wr(cap: IdeCapability, off: int, value: int) -> None:
    cap.config_write(off, value.to_bytes(4, "little"))


def test_off_by_default_the_fields_read_zero() -> None:
    cs, cap = make(False)
    assert not cs.get(BASE + 4, 4) & IdeCapReg.AGGREGATION
    for st in cap.streams:
        wr(cap, st.ctl_off, 0xFC)
        assert cs.get(st.ctl_off, 4) & CTL_AGG_MASK == 0
        assert st.tx.aggregation == dict.fromkeys(SubStream, 1) and not st.rx.aggregation


def test_supported_the_modes_drive_the_engines() -> None:
    cs, cap = make(True)
    assert cs.get(BASE + 4, 4) & IdeCapReg.AGGREGATION
    link, sel = cap.streams[0], cap.streams[1]
    # NPR 01b (2 TLPs), PR 11b (8), CPL 10b (4), Stream ID 7
    wr(cap, sel.ctl_off, 7 << 24 | 0b10_11_01 << 2)
    assert sel.tx_aggregation(SubStream.NPR) == 2
    assert sel.tx.aggregation == {SubStream.PR: 8, SubStream.NPR: 2, SubStream.CPL: 4}
    assert sel.rx.aggregation and link.rx.aggregation
    wr(cap, sel.ctl_off, 9 << 24 | 0b11 << 4)       # a new Stream ID: new engines, same rules
    assert sel.stream_id == 9 and sel.rx.aggregation
    assert sel.tx.aggregation == {SubStream.PR: 8, SubStream.NPR: 1, SubStream.CPL: 1}
    wr(cap, link.ctl_off, 0xFC)
    assert cs.get(link.ctl_off, 4) == 0xFC and link.tx.aggregation[SubStream.CPL] == 8
    cap.reset()                                     # registers back to 0: no aggregation
    assert cs.get(sel.ctl_off, 4) == 0 and sel.rx.aggregation
    assert sel.tx.aggregation == dict.fromkeys(SubStream, 1)


def test_support_can_be_withdrawn() -> None:
    cs, cap = make(True)
    sel = cap.streams[1]
    wr(cap, sel.ctl_off, 0xFC)
    cap.set_aggregation_supported(False)
    assert not cs.get(BASE + 4, 4) & IdeCapReg.AGGREGATION
    assert cs.get(sel.ctl_off, 4) & CTL_AGG_MASK == 0 and not sel.rx.aggregation
    assert sel.tx.aggregation == dict.fromkeys(SubStream, 1)
    wr(cap, sel.ctl_off, 0xFC)
    assert cs.get(sel.ctl_off, 4) & CTL_AGG_MASK == 0
