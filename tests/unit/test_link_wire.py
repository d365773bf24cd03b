"""The link itself (vfio_user_dev.link.wire) with a real root port and DMA map set,
in-process: TLPs split by MPS / MRRS (PCIe 6.x §2.2.7), the clear fast path against the
wire path, T=1 only on a Secure stream (§11.2.1), the status documents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from teeio.tlp import TlpType, count_pieces, count_read_tlps
from tests.support.link_rig import GUEST, RID, SID, SIZE, Rig, payload
from vfio_user_dev.dma import DmaMapSet
from vfio_user_dev.link.capture import iter_tlps, read_capture
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.interfaces import ROOT_PORT_ID, LinkFault
from vfio_user_dev.link.wire import Link
from vfio_user_dev.root_port import RootPort

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("bad", [0, 64, 100, 8192])
def test_mps_must_be_a_legal_size(bad: int) -> None:
    dma = DmaMapSet()
    with pytest.raises(ValueError, match="Max_Payload_Size"):
        Link(LinkEndpoint(), RootPort(dma), mps=bad)
    with pytest.raises(ValueError, match="Max_Read_Request_Size"):
        Link(LinkEndpoint(), RootPort(dma), mrrs=bad)


def test_clear_round_trip_fast_path(rig: Rig) -> None:
    data = os.urandom(5000)
    rig.ep.write(GUEST + 0x101, data)
    assert rig.mem(0x101, len(data)) == data
    assert rig.ep.read(GUEST + 0x101, len(data)) == data
    st = rig.link.status()
    assert st["clear_transfers"] == 2
    mrd, cpl = count_read_tlps(GUEST + 0x101, 5000, 512, 256)
    assert st["tlps_upstream"] == count_pieces(GUEST + 0x101, 5000, 256) + mrd
    assert st["tlps_downstream"] == cpl
    assert rig.rp.counters["tlps_in"] == 0      # nothing serialised: nobody was watching


def test_clear_wire_path_matches_fast_path(tmp_path: Path) -> None:
    data = os.urandom(9000)
    results = []
    for capture in (False, True):
        r = Rig(tmp_path, capture=capture)
        try:
            r.poke(0, os.urandom(SIZE))
            r.ep.write(GUEST + 0x3003, data)
            got = r.ep.read(GUEST + 0x1001, 12000)
            results.append((r.mem(0, SIZE), got, r.link.status()["tlps_upstream"],
                            r.link.status()["tlps_downstream"]))
        finally:
            r.close()
    fast, wire = results
    assert fast[2:] == wire[2:]             # same TLP counts, computed vs. real
    # same memory effect: the write landed, the read returned memory as it was
    assert fast[0][0x3003:0x3003 + 9000] == wire[0][0x3003:0x3003 + 9000] == data


@pytest.mark.parametrize("mps,mrrs", [(128, 128), (256, 512), (512, 256), (4096, 4096)])
def test_tlps_respect_mps_and_mrrs(tmp_path: Path, mps: int, mrrs: int) -> None:
    r = Rig(tmp_path, mps=mps, mrrs=mrrs, capture=True)
    try:
        data = payload(10_000)
        r.ep.write(GUEST + 0x222, data)
        assert r.ep.read(GUEST + 0x222, len(data)) == data
        tlps = list(iter_tlps(read_capture(r.capture_path or Path())))
        writes = [t for t in tlps if t.type is TlpType.MWR64]
        reads = [t for t in tlps if t.type is TlpType.MRD64]
        cpls = [t for t in tlps if t.type is TlpType.CPLD]
        assert len(writes) == count_pieces(GUEST + 0x222, len(data), mps)
        assert all(len(t.data) <= mps for t in writes)
        assert all(t.request_byte_count <= mrrs for t in reads)
        assert all(len(t.data) <= mps for t in cpls)        # Length, padding included
        assert b"".join(t.payload_bytes() for t in writes) == data
        assert b"".join(t.payload_bytes() for t in cpls) == data
        assert all(not t.t_bit and t.stream_id is None for t in tlps)   # clear: T=0
    finally:
        r.close()


def test_t1_needs_a_secure_stream(cap: Rig) -> None:
    cap.ep.tee_dma = lambda: True
    with pytest.raises(LinkFault, match="Secure IDE stream"):
        cap.ep.write(GUEST, b"x" * 8)
    assert cap.records() == []              # never sent
    assert cap.mem(0, 8) == bytes(8)


@pytest.mark.parametrize("capture", [False, True])
def test_dma_beyond_2_64_is_a_link_fault(tmp_path: Path, capture: bool) -> None:
    r = Rig(tmp_path, capture=capture)
    try:
        with pytest.raises(LinkFault, match="bad DMA range"):
            r.ep.write((1 << 64) - 16, b"x" * 32)
        with pytest.raises(LinkFault, match="bad DMA range"):
            r.ep.read((1 << 64) - 16, 32)
    finally:
        r.close()


def test_status_is_json_and_counts_the_traffic(rig: Rig) -> None:
    """After one 4-byte IDE write and one 4-byte IDE read above 4 GiB: MWr64 and MRd64 up
    (prefix 4 + header 16 + payload 4 + MAC 12, then 4 + 16 + 12 bytes), one CplD down
    (4 + 12 + 4 + 12); every document survives a JSON round trip unchanged."""
    rig.secure()
    rig.ep.write(GUEST, b"x" * 4)
    rig.poke(0x100, b"abcd")
    assert rig.ep.read(GUEST + 0x100, 4) == b"abcd"
    link, ep, rp = (json.loads(json.dumps(d))
                    for d in (rig.link.status(), rig.ep.status(), rig.rp.status()))
    assert link == {
        "mps": 256, "mrrs": 512, "capture": None, "faults_armed": 0,
        "tlps_upstream": 2, "tlps_downstream": 1, "bytes_upstream": 36 + 32,
        "bytes_downstream": 32, "dropped": 0, "tampered": 0, "replayed": 0,
        "ide_fail_messages_up": 0, "ide_fail_messages_down": 0, "clear_transfers": 0,
        "mmio_bursts": 0, "payload_size_changes": 0,
    }
    assert ep == {
        "requester_id": RID, "streams": [{"id": SID, "state": "secure"}], "tag_space": 256,
        "transfers": 2, "faults": 0, "ur_completions": 0, "completion_timeouts": 0,
        "unexpected_completions": 0, "refused_posted": 0, "ide_tlps_tx": 2, "ide_tlps_rx": 1,
        "mmio_requests": 0, "mmio_ur": 0, "mmio_discarded": 0, "ide_failures": 0,
        "last_ide_failure": None,
    }
    stream, = rp["streams"]
    assert {k: stream[k] for k in ("id", "state", "enabled", "rid_base", "rid_limit",
                                   "insecure_reason")} == {
        "id": SID, "state": "secure", "enabled": True, "rid_base": RID, "rid_limit": RID,
        "insecure_reason": None}
    assert sorted(stream["started"]) == ["NPR", "PR"]
    assert {stream["keys"][d][s]["active"] for d in ("tx", "rx")
            for s in ("PR", "NPR", "CPL")} == {"K0"}
    assert (rp["completer_id"], rp["tlps_in"], rp["tlps_admitted"], rp["completions_out"],
            rp["ide_failures"], rp["refusals_total"]) == (ROOT_PORT_ID, 2, 2, 1, 0, 0)
