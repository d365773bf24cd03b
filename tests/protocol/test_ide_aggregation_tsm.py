"""IDE aggregation set up by the TSM (PCIe 6.x §6.33.6): ``SelectiveStream(aggregation=N)``
turns it on at both ends -- the device's Tx Aggregation Mode fields through the host's
config writes, the root port's through the platform socket -- only when both support it;
the device's DMA then crosses the link one MAC per unit."""

from __future__ import annotations

from teeio.device_regs import Op
from teeio.pcie.ide_cap import CTL_AGG_MASK, IdeCapReg
from teeio.tlp import IDE_PREFIX_BYTE0, SubStream
from tests.support.tee_rig import GUEST, SID, TeeRig, status_error
from tsm.ide import SelectiveStream


def setup(rig: TeeRig, aggregation: int) -> tuple[SelectiveStream, list[str]]:
    lines: list[str] = []
    rig.stream = SelectiveStream(rig.rp, rig.km(), stream_id=SID, block=0, out=lines.append,
                                 aggregation=aggregation)
    rig.stream.setup()
    return rig.stream, lines


def test_off_unless_the_device_supports_it(tee_rig: TeeRig) -> None:
    rig = tee_rig
    stream, lines = setup(rig, 8)
    assert any("not supported by the device" in line for line in lines)
    assert stream.aggregation_used == 1 and stream.status()["aggregation"] == 1
    block = rig.device.ide.streams[1]            # selective block 0
    assert block.control & CTL_AGG_MASK == 0
    assert rig.rp.call("status")["root_port"]["streams"][0]["aggregation"] == {
        "PR": 1, "NPR": 1, "CPL": 1}


def test_both_ends_aggregate_and_dma_lands(tee_rig_captured: TeeRig) -> None:
    rig = tee_rig_captured
    rig.device.ide.set_aggregation_supported(True)
    assert rig.device.ide.cs.get(rig.device.ide.offset + 4, 4) & IdeCapReg.AGGREGATION
    stream, lines = setup(rig, 4)
    assert stream.aggregation_used == 4 and any("up to 4 TLPs" in line for line in lines)
    block = rig.device.ide.streams[1]
    assert block.enabled and block.secure and block.control & CTL_AGG_MASK == 0xA8
    assert all(block.tx.aggregation[s] == 4 for s in SubStream) and block.rx.aggregation
    assert rig.rp.call("status")["root_port"]["streams"][0]["aggregation"] == {
        "PR": 4, "NPR": 4, "CPL": 4}
    rig.poke(0, bytes(range(256)) * 16)
    assert status_error(rig.dma_direct(Op.COPY, GUEST, GUEST + 0x8000, 4096)) is None
    assert rig.mem(0x8000, 4096) == bytes(range(256)) * 16
    ide = [w for w in rig.records() if w[0] == IDE_PREFIX_BYTE0]
    writes = [w for w in ide if w[1] >> 4 == SubStream.PR]
    assert writes and sum(w[1] & 1 for w in writes) * 4 == len(writes)  # one MAC per 4
    assert block.secure and rig.machine.root_port.streams[SID].is_secure()
