"""IDE over the link (PCIe 6.x §6.33) at both ends (vfio_user_dev.link.streams, .endpoint):
no plaintext on the wire, the T bit (§11.2.1), key refresh, a clear TLP after IDE started
(§6.33.6), the device's IDE capability (§7.9.26) as its end of the stream."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.pcie.config import ConfigSpace
from teeio.pcie.ide_cap import STS_FAIL_MSG, IdeCapability, StreamState
from teeio.pcie.ide_cap import IdeStream as CapStream
from teeio.pcie.ide_cap import build as build_ide_cap
from teeio.tlp import is_protected, peek
from tests.support.link_rig import GUEST, PATTERN, RID, SID, Rig, payload, program_pair
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection, LinkFault
from vfio_user_dev.link.streams import IdeStreamEnd

pytestmark = pytest.mark.timeout(30)


def test_ide_round_trip_and_no_plaintext_on_the_wire(cap: Rig) -> None:
    dev = cap.secure()
    data = payload(6000)
    cap.ep.write(GUEST + 0x2001, data)
    assert cap.mem(0x2001, len(data)) == data
    assert cap.ep.read(GUEST + 0x2001, len(data)) == data
    recs = cap.records()
    assert recs and all(is_protected(r) for r in recs)
    wire = b"".join(recs)
    assert PATTERN not in wire
    for chunk in (PATTERN[i:i + 8] for i in range(0, len(PATTERN) - 8)):
        assert chunk not in wire          # not even 8 bytes of it
    assert dev.is_secure() and cap.rp.status()["streams"][0]["state"] == "secure"   # type: ignore[index]
    ep = cap.ep.status()
    assert ep["ide_tlps_tx"] == cap.link.status()["tlps_upstream"]
    assert ep["ide_tlps_rx"] == cap.link.status()["tlps_downstream"]
    assert ep["faults"] == 0 and ep["ide_failures"] == 0


def test_ide_round_trip_without_taps_uses_real_tlps(rig: Rig) -> None:
    rig.secure()
    data = os.urandom(3000)
    rig.ep.write(GUEST + 5, data)
    assert rig.ep.read(GUEST + 5, len(data)) == data
    assert rig.link.status()["clear_transfers"] == 0
    assert rig.rp.counters["tlps_in"] == rig.link.status()["tlps_upstream"]


def test_ide_tlps_carry_t_bit_from_the_device(cap: Rig) -> None:
    cap.secure()
    cap.ep.write(GUEST, b"a" * 8)                   # T=0 over IDE: allowed outside windows
    cap.rp.authorise_window(RID, SID, GUEST + 0x1000, 0x1000)
    cap.ep.tee_dma = lambda: True
    cap.ep.write(GUEST + 0x1000, b"b" * 8)
    tlps = [peek(w) for w in cap.records()]
    assert [t.t_bit for t in tlps if t] == [False, True]
    assert all(t and t.stream_id == SID for t in tlps)
    assert cap.mem(0x1000, 8) == b"b" * 8


def test_key_refresh_to_k1_keeps_traffic_flowing(rig: Rig) -> None:
    dev = rig.secure()
    rig.ep.write(GUEST, b"before!!")
    program_pair(rig.rp, dev, SID, KeySet.K1)      # KEY_PROG K1, GO Rx then Tx
    rig.ep.write(GUEST + 8, b"after!!!")
    assert rig.ep.read(GUEST, 16) == b"before!!after!!!"
    assert dev.is_secure()
    keys = rig.rp.status()["streams"][0]["keys"]   # type: ignore[index]
    assert keys["tx"]["CPL"]["active"] == "K1" and keys["rx"]["PR"]["active"] == "K1"


def test_clear_tlp_after_ide_started_is_an_ide_failure(rig: Rig) -> None:
    dev = rig.secure()
    rig.ep.write(GUEST, b"ide-1st!")
    dev.enabled = False          # the device stops using IDE; the root port still Secure
    with pytest.raises(LinkFault, match="after IDE started"):
        rig.ep.write(GUEST + 8, b"clear!!!")
    assert rig.mem(8, 8) == bytes(8)
    ev = rig.rp.events_since(0, ("ide_fail", "remap"))
    assert ev[0]["kind"] == "ide_fail" and "non-IDE MWr" in str(ev[0]["reason"])
    assert rig.ep.status()["ide_failures"] == 1          # IDE Fail Message reached it


def test_stream_never_secure_without_keys(rig: Rig) -> None:
    rig.rp.setup_stream(SID, RID, RID)
    dev = IdeStreamEnd(SID)
    dev.enabled = True
    assert not dev.is_secure()
    rig.ep.attach_stream(dev)
    rig.ep.write(GUEST, b"clear ok")        # not Secure: in the clear, T=0
    assert rig.mem(0, 8) == b"clear ok"
    assert rig.link.status()["clear_transfers"] == 1


def cap_rig(tmp_path: Path) -> tuple[Rig, IdeCapability, CapStream]:
    """The device's streams live in its IDE extended capability: keys as IDE_KM programs
    them, Enable as the host writes it; the root port keyed to match."""
    r = Rig(tmp_path, capture=True)
    cs = ConfigSpace()
    cap = build_ide_cap(cs, 0x100, name="dev")
    block = cap.streams[1]                        # selective stream 0
    cap.config_write(block.ctl_off, (SID << 24).to_bytes(4, "little"))
    r.rp.setup_stream(SID, RID, RID)
    for s in SubStream:
        up, down = IdeKey.generate(), IdeKey.generate()
        cap.program_key(SID, KeySet.K0, Direction.TX, s, up)
        r.rp.program_key(SID, KeySet.K0, Direction.RX, s, up)
        cap.program_key(SID, KeySet.K0, Direction.RX, s, down)
        r.rp.program_key(SID, KeySet.K0, Direction.TX, s, down)
    for s in SubStream:
        cap.key_set_go(SID, KeySet.K0, Direction.RX, s)
    r.rp.key_set_go(SID, KeySet.K0, Direction.RX)
    for s in SubStream:
        cap.key_set_go(SID, KeySet.K0, Direction.TX, s)
    r.rp.key_set_go(SID, KeySet.K0, Direction.TX)
    r.rp.enable_stream(SID)
    r.ep.attach_ide_capability(cap)
    return r, cap, block


def test_device_ide_capability_stream(tmp_path: Path) -> None:
    r, cap, block = cap_rig(tmp_path)
    try:
        r.ep.write(GUEST, payload(300))           # Enable not set yet: in the clear
        cap.config_write(block.ctl_off, (SID << 24 | 1).to_bytes(4, "little"))
        assert block.secure
        r.ep.write(GUEST + 0x1000, payload(300))
        assert r.ep.read(GUEST + 0x1000, 300) == payload(300)
        recs = r.records()
        assert len(recs) == 2 + 2 + 1 + 2       # 2 clear MWr; 2 MWr, 1 MRd, 2 CplD over IDE
        assert not any(map(is_protected, recs[:2])) and all(map(is_protected, recs[2:]))
        assert r.ep.status()["streams"][0] == {"id": SID, "state": "secure"}  # type: ignore[index]
    finally:
        r.close()


def test_device_ide_capability_reports_failures(tmp_path: Path) -> None:
    r, cap, block = cap_rig(tmp_path)
    try:
        cap.config_write(block.ctl_off, (SID << 24 | 1).to_bytes(4, "little"))
        r.link.inject(Fault(FaultKind.FLIP_PAYLOAD))
        with pytest.raises(LinkFault):
            r.ep.write(GUEST, payload(64))
        # the root port detected it; its IDE Fail Message reached the capability:
        status = cap.cs.get(block.sts_off, 4)
        assert status & 0xF == StreamState.INSECURE and status & STS_FAIL_MSG
        assert not block.secure and "IDE Fail Message" in str(block.failure)
        # the device's own check: a tampered completion on a fresh stream
        (tmp_path / "2").mkdir()
        r2, cap2, block2 = cap_rig(tmp_path / "2")
        try:
            cap2.config_write(block2.ctl_off, (SID << 24 | 1).to_bytes(4, "little"))
            r2.link.inject(Fault(FaultKind.FLIP_PAYLOAD, LinkDirection.DOWNSTREAM))
            with pytest.raises(LinkFault):
                r2.ep.read(GUEST, 64)
            assert not block2.secure and "MAC" in str(block2.failure)
            assert not cap2.cs.get(block2.sts_off, 4) & STS_FAIL_MSG
            assert r2.rp.status()["streams"][0]["state"] == "insecure"  # type: ignore[index]
        finally:
            r2.close()
    finally:
        r.close()
