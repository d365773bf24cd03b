"""The link (vfio_user_dev/link.py) with a real root port and DMA map set, in-process:
TLP splitting, clear and IDE round trips, the capture tap, fault injection."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.pcie.config import ConfigSpace
from teeio.pcie.ide_cap import STS_FAIL_MSG, IdeCapability, StreamState
from teeio.pcie.ide_cap import IdeStream as CapStream
from teeio.pcie.ide_cap import build as build_ide_cap
from teeio.tlp import Tlp, TlpType
from vfio_user_dev.dma import DmaMapSet
from vfio_user_dev.link import (
    DEFAULT_REQUESTER_ID,
    RCB,
    TLP_SIZES,
    CaptureFlags,
    CaptureRecord,
    CaptureWriter,
    Fault,
    FaultKind,
    IdeStream,
    Link,
    LinkDirection,
    LinkEndpoint,
    LinkFault,
    TlpView,
    completion_spans,
    count_completions,
    count_pieces,
    count_read_tlps,
    is_protected,
    iter_tlps,
    main,
    pcapng_header,
    peek,
    read_capture,
    split,
)
from vfio_user_dev.protocol import DmaFlags
from vfio_user_dev.root_port import RootPort

pytestmark = pytest.mark.timeout(30)

GUEST = 0x1_0000_0000
SIZE = 0x10000
RID = DEFAULT_REQUESTER_ID
SID = 3
PATTERN = b"TEE-IO-SECRET-PATTERN!"     # a known plaintext to look for on the wire


class Rig:
    """A memfd-backed guest, its root port and a device link endpoint joined by a Link."""

    def __init__(self, tmp: Path | None = None, *, mps: int = 256, mrrs: int = 512,
                 capture: bool = False) -> None:
        self.fd = os.memfd_create("link-test")
        os.ftruncate(self.fd, SIZE)
        self.dma = DmaMapSet()
        self.dma.map(GUEST, SIZE, DmaFlags.READ | DmaFlags.WRITE, 0, os.dup(self.fd))
        self.rp = RootPort(self.dma)
        self.ep = LinkEndpoint(RID)
        self.capture_path = (tmp / "link.pcap") if capture and tmp else None
        cap = CaptureWriter(self.capture_path) if self.capture_path else None
        self.link = Link(self.ep, self.rp, mps=mps, mrrs=mrrs, capture=cap)
        self.dev_stream: IdeStream | None = None

    def mem(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def poke(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def records(self) -> list[bytes]:
        assert self.capture_path is not None and self.link.capture is not None
        self.link.capture.flush()
        return [r.data for r in read_capture(self.capture_path)]

    def secure(self, sid: int = SID, key_set: KeySet = KeySet.K0) -> IdeStream:
        """Key a stream at both ends (as the TSM would, via IDE_KM and platform control):
        Rx GO at both partners first, then Tx (§6.33.3), then Enable."""
        dev = IdeStream(sid)
        if not self.rp.has_stream(sid):
            self.rp.setup_stream(sid, RID, RID)
        program_pair(self.rp, dev, sid, key_set)
        dev.enabled = True
        assert self.rp.enable_stream(sid) == "secure"
        assert dev.is_secure()
        self.ep.attach_stream(dev)
        self.dev_stream = dev
        return dev

    def close(self) -> None:
        self.link.close()
        self.dma.clear()
        os.close(self.fd)


def program_pair(rp: RootPort, dev: IdeStream, sid: int, key_set: KeySet) -> None:
    for s in SubStream:
        up, down = IdeKey.generate(), IdeKey.generate()
        dev.tx.program(key_set, s, up)
        rp.program_key(sid, key_set, Direction.RX, s, up)
        dev.rx.program(key_set, s, down)
        rp.program_key(sid, key_set, Direction.TX, s, down)
    dev.rx.go(key_set)
    rp.key_set_go(sid, key_set, Direction.RX)
    dev.tx.go(key_set)
    rp.key_set_go(sid, key_set, Direction.TX)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def cap(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, capture=True)
    yield r
    r.close()


def payload(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


# -- splitting ---------------------------------------------------------------------------------

addresses = st.integers(0, 1 << 20)
lengths = st.integers(1, 3 * 4096 + 17)
tlp_sizes = st.sampled_from(TLP_SIZES)


@given(addresses, lengths, tlp_sizes)
def test_split_pieces_are_bounded_and_never_cross_4k(a: int, n: int, size: int) -> None:
    pieces = split(a, n, size)
    assert pieces[0][0] == a and sum(k for _, k in pieces) == n
    for (pa, pn), (qa, _) in zip(pieces, pieces[1:], strict=False):
        assert pa + pn == qa
    for pa, pn in pieces:
        assert 0 < pn <= size
        assert pa // 4096 == (pa + pn - 1) // 4096
    assert count_pieces(a, n, size) == len(pieces)


@given(addresses, st.integers(1, 4096), tlp_sizes)
def test_completions_end_on_rcb_and_fit_mps(a: int, n: int, mps: int) -> None:
    spans = completion_spans(a, n, mps)
    assert sum(k for _, k in spans) == n
    for i, (pa, pn) in enumerate(spans):
        assert 0 < pn <= mps
        if i < len(spans) - 1:
            assert (pa + pn) % RCB == 0          # §2.3.1.1
    assert count_completions(a, n, mps) == len(spans)


@given(addresses, lengths, tlp_sizes, tlp_sizes)
def test_read_tlp_count_closed_form(a: int, n: int, mrrs: int, mps: int) -> None:
    pieces = split(a, n, mrrs)
    want = (len(pieces), sum(len(completion_spans(pa, pn, mps)) for pa, pn in pieces))
    assert count_read_tlps(a, n, mrrs, mps) == want


@pytest.mark.parametrize("bad", [0, 64, 100, 8192])
def test_mps_must_be_a_legal_size(bad: int) -> None:
    dma = DmaMapSet()
    with pytest.raises(ValueError, match="Max_Payload_Size"):
        Link(LinkEndpoint(), RootPort(dma), mps=bad)
    with pytest.raises(ValueError, match="Max_Read_Request_Size"):
        Link(LinkEndpoint(), RootPort(dma), mrrs=bad)


# -- clear (no IDE) ---------------------------------------------------------------------------

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


def test_capture_holds_plaintext_without_ide(cap: Rig) -> None:
    cap.ep.write(GUEST + 0x800, payload(2048))
    recs = cap.records()
    assert recs and not any(is_protected(r) for r in recs)
    assert sum(r.count(PATTERN) for r in recs) >= 2048 // len(PATTERN) - 2 * len(recs)
    assert PATTERN in b"".join(recs)


def _blocks(raw: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(raw):
        btype, total = struct.unpack_from("<II", raw, pos)
        assert total % 4 == 0 and struct.unpack_from("<I", raw, pos + total - 4)[0] == total
        out.append((btype, raw[pos + 8:pos + total - 4]))
        pos += total
    return out


def _opts(raw: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while True:
        code, n = struct.unpack_from("<HH", raw, pos)
        if code == 0:
            return out
        out[code] = raw[pos + 4:pos + 4 + n]
        pos += 4 + n + (-n % 4)


def test_capture_file_format(cap: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    """pcapng (draft-ietf-opsawg-pcapng) block by block: SHB, IDB (USER0, ns), EPBs with
    the direction in epb_flags and the bare TLP as the packet data."""
    cap.ep.write(GUEST, b"\x11" * 300)
    cap.ep.read(GUEST, 300)
    assert cap.capture_path is not None and cap.link.capture is not None
    cap.link.capture.flush()
    blocks = _blocks(cap.capture_path.read_bytes())
    (shb_t, shb), (idb_t, idb), *epbs = blocks
    assert shb_t == 0x0A0D0D0A and struct.unpack_from("<IHHq", shb) == (0x1A2B3C4D, 1, 0, -1)
    assert _opts(shb[16:])[4] == b"teeio-emu"                      # shb_userappl
    assert idb_t == 1 and struct.unpack_from("<HHI", idb) == (147, 0, 65535)   # USER0
    idb_opts = _opts(idb[8:])
    assert idb_opts[9] == b"\x09" and idb_opts[2] == b"pcie-link"  # if_tsresol, if_name
    assert [t for t, _ in epbs] == [6] * 5
    recs = read_capture(cap.capture_path)
    for (_, body), rec in zip(epbs, recs, strict=True):
        ifid, hi, lo, caplen, orig = struct.unpack_from("<IIIII", body)
        assert ifid == 0 and caplen == orig == len(rec.data)
        assert (hi << 32 | lo) == rec.timestamp_ns                  # nanoseconds
        assert body[20:20 + caplen] == rec.data                     # no pseudo-header
        flags = struct.unpack("<I", _opts(body[20 + caplen + (-caplen % 4):])[2])[0]
        assert flags == (1 if rec.direction == LinkDirection.UPSTREAM else 2)  # in / out
    dirs = [r.direction for r in recs]
    assert dirs == [LinkDirection.UPSTREAM] * 3 + [LinkDirection.DOWNSTREAM] * 2
    assert all(r.flags == 0 for r in recs)
    assert [r.timestamp_ns for r in recs] == sorted(r.timestamp_ns for r in recs)
    assert [Tlp.decode(r.data).type for r in recs] == [TlpType.MWR64, TlpType.MWR64,
                                                       TlpType.MRD64, TlpType.CPLD,
                                                       TlpType.CPLD]
    assert main([str(cap.capture_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and "MWR64" in out[0] and "down" in out[3]


def test_fault_flags_travel_in_a_comment(tmp_path: Path) -> None:
    w = CaptureWriter(tmp_path / "c.pcapng", clock=lambda: 1_700_000_000_000_000_001)
    w.write(LinkDirection.DOWNSTREAM, b"\x01\x02\x03\x04\x05",
            CaptureFlags.TAMPERED | CaptureFlags.REPLAYED)
    w.close()
    (_, body), = _blocks((tmp_path / "c.pcapng").read_bytes())[2:]
    assert _opts(body[20 + 8:])[1] == b"teeio: tampered,replayed"   # opt_comment
    rec, = read_capture(tmp_path / "c.pcapng")
    assert rec == CaptureRecord(1_700_000_000_000_000_001, LinkDirection.DOWNSTREAM,
                                CaptureFlags.TAMPERED | CaptureFlags.REPLAYED,
                                b"\x01\x02\x03\x04\x05")


def test_read_capture_still_reads_the_older_pcap(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tlp = Tlp.memory_write(0x0100, 0, GUEST, b"\xaa" * 8).encode()
    p = tmp_path / "old.pcap"
    body = struct.pack("<BBH", 1, 2, 0) + tlp
    p.write_bytes(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 147)
                  + struct.pack("<IIII", 1_700_000_000, 5, len(body), len(body)) + body)
    assert read_capture(p) == [CaptureRecord(1_700_000_000_000_000_005,
                                             LinkDirection.DOWNSTREAM, CaptureFlags.DROPPED,
                                             tlp)]
    assert main([str(p)]) == 0
    assert "MWR" in capsys.readouterr().out


def test_read_capture_rejects_other_files(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.pcap"
    p.write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(20))
    with pytest.raises(ValueError, match="not a TLP capture"):
        read_capture(p)
    ng = tmp_path / "eth.pcapng"
    ng.write_bytes(pcapng_header().replace(struct.pack("<HHI", 147, 0, 65535),
                                           struct.pack("<HHI", 1, 0, 65535)))
    with pytest.raises(ValueError, match="link type 1"):
        read_capture(ng)
    assert main([str(p)]) == 1 and main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "No such file" in err[1]


def test_t1_needs_a_secure_stream(cap: Rig) -> None:
    cap.ep.tee_dma = lambda: True
    with pytest.raises(LinkFault, match="Secure IDE stream"):
        cap.ep.write(GUEST, b"x" * 8)
    assert cap.records() == []              # never sent
    assert cap.mem(0, 8) == bytes(8)


def test_clear_faults_go_unnoticed_without_ide(cap: Rig) -> None:
    """Without IDE, nothing protects the data: a dropped write is simply lost, a flipped
    payload bit lands corrupted.  (This is what IDE is for.)"""
    cap.link.inject(Fault(FaultKind.DROP, nth=2))
    cap.ep.write(GUEST, payload(768))                       # 3 MWr; the 2nd is dropped
    assert cap.mem(0, 256) == payload(768)[:256]
    assert cap.mem(256, 256) == bytes(256)
    assert cap.mem(512, 256) == payload(768)[512:]
    cap.link.inject(Fault(FaultKind.FLIP_PAYLOAD, bit=3))
    cap.ep.write(GUEST + 0x1000, b"\x00" * 16)
    assert cap.mem(0x1000, 16) == b"\x08" + bytes(15)
    flags = [r.flags for r in read_capture(cap.capture_path or Path())]
    assert CaptureFlags.DROPPED in flags and CaptureFlags.TAMPERED in flags


# -- IDE ----------------------------------------------------------------------------------------

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


def _insecure_everywhere(r: Rig) -> None:
    assert r.dev_stream is not None and not r.dev_stream.is_secure()
    assert r.rp.status()["streams"][0]["state"] == "insecure"     # type: ignore[index]
    ev = r.rp.events_since(0, ("ide_fail", "remap"))
    assert [e["kind"] for e in ev] == ["ide_fail"]
    assert r.ep.status()["ide_failures"] == 1


UPSTREAM_FAULTS = [
    Fault(FaultKind.FLIP_PAYLOAD, bit=77),
    Fault(FaultKind.FLIP_ADDRESS),            # bit 12: the write would land a page away
    Fault(FaultKind.FLIP_T_BIT),
    Fault(FaultKind.FLIP_REQUESTER_ID, bit=3),
    Fault(FaultKind.DROP),                    # noticed at the next TLP (counter mismatch)
]


@pytest.mark.parametrize("fault", UPSTREAM_FAULTS, ids=lambda f: f.kind.value)
def test_ide_write_fault_makes_stream_insecure_and_data_never_lands(
        cap: Rig, fault: Fault) -> None:
    cap.secure()
    seen: list[str] = []
    cap.ep.on_ide_fail.append(lambda ev: seen.append(ev.how))
    cap.link.inject(fault)
    with pytest.raises(LinkFault, match="refused"):
        cap.ep.write(GUEST + 0x1000, payload(1024))          # 4 MWr TLPs
    assert fault.done
    assert cap.mem(0, SIZE) == bytes(SIZE)                  # not one byte landed anywhere
    _insecure_everywhere(cap)
    assert cap.rp.events_since(0, ("ide_fail", "remap"))[0]["how"] == "detected"
    assert seen == ["message"]                              # the device got IDE Fail
    flags = [r.flags for r in read_capture(cap.capture_path or Path())]
    assert flags[0] in (CaptureFlags.TAMPERED, CaptureFlags.DROPPED)
    # and the stream stays Insecure: later DMA is refused too
    with pytest.raises(LinkFault):
        cap.ep.tee_dma = lambda: True
        cap.ep.write(GUEST, b"later")
    assert cap.mem(0, 8) == bytes(8)


def test_ide_replayed_write_is_detected(cap: Rig) -> None:
    cap.secure()
    fault = cap.link.inject(Fault(FaultKind.REPLAY))
    with pytest.raises(LinkFault, match="MAC check failed"):
        cap.ep.write(GUEST, payload(768))                    # 3 MWr; the 1st replayed
    assert fault.done
    assert cap.mem(0, 256) == payload(256)       # the genuine first TLP landed once ...
    assert cap.mem(256, 512) == bytes(512)       # ... the copy and everything after: no
    _insecure_everywhere(cap)
    flags = [r.flags for r in read_capture(cap.capture_path or Path())]
    assert flags[:2] == [0, CaptureFlags.REPLAYED]


@pytest.mark.parametrize("kind", [FaultKind.FLIP_PAYLOAD, FaultKind.FLIP_REQUESTER_ID,
                                  FaultKind.FLIP_T_BIT, FaultKind.DROP, FaultKind.REPLAY])
def test_ide_completion_fault_detected_by_the_device(cap: Rig, kind: FaultKind) -> None:
    cap.secure()
    cap.poke(0x400, payload(1024))
    # the 2nd completion: for DROP/REPLAY the next one fails its MAC check
    cap.link.inject(Fault(kind, LinkDirection.DOWNSTREAM, nth=2))
    with pytest.raises(LinkFault):
        cap.ep.read(GUEST + 0x400, 1024)
    assert cap.dev_stream is not None and not cap.dev_stream.is_secure()
    assert cap.rp.status()["streams"][0]["state"] == "insecure"     # type: ignore[index]
    ev = cap.rp.events_since(0, ("ide_fail", "remap"))
    assert ev and ev[-1]["how"] == "message"       # the root port got the IDE Fail Message
    assert cap.link.status()["ide_fail_messages_up"] == 1


def test_fault_selection_by_predicate_and_nth(cap: Rig) -> None:
    cap.secure()

    def third_page(v: TlpView) -> bool:
        return v.tlp is not None and v.tlp.address == GUEST + 0x3000

    f = cap.link.inject(Fault(FaultKind.DROP, match=third_page))
    cap.ep.write(GUEST + 0x1000, b"x" * 64)
    cap.ep.write(GUEST + 0x2000, b"y" * 64)
    assert not f.done and cap.dev_stream is not None and cap.dev_stream.is_secure()
    cap.ep.write(GUEST + 0x3000, b"z" * 64)   # dropped; nothing follows it in this burst
    assert f.done and f.fired[0].index == 3
    with pytest.raises(LinkFault):
        cap.ep.write(GUEST + 0x3100, b"w" * 64)   # the counters disagree now: MAC fails
    assert cap.mem(0x1000, 64) == b"x" * 64 and cap.mem(0x3000, 64) == bytes(64)


def test_fault_on_a_field_the_tlp_lacks_waits_for_one_that_has_it(cap: Rig) -> None:
    cap.secure()
    f = cap.link.inject(Fault(FaultKind.FLIP_PAYLOAD))   # the first upstream payload
    cap.poke(0, b"q" * 8)
    assert cap.ep.read(GUEST, 8) == b"q" * 8             # an MRd has none: not counted
    assert not f.done and f.seen == 0
    with pytest.raises(LinkFault):
        cap.ep.write(GUEST, b"w" * 8)
    assert f.done and f.fired[0].tlp is not None and f.fired[0].tlp.type is TlpType.MWR64
    assert f.fired[0].index == 2 and cap.mem(0, 8) == b"q" * 8


def test_bad_fault_bit_is_refused(cap: Rig) -> None:
    cap.link.inject(Fault(FaultKind.FLIP_REQUESTER_ID, bit=16))
    with pytest.raises(ValueError, match="outside the field"):
        cap.ep.write(GUEST, b"1234")


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
    dev = IdeStream(SID)
    dev.enabled = True
    assert not dev.is_secure()
    rig.ep.attach_stream(dev)
    rig.ep.write(GUEST, b"clear ok")        # not Secure: in the clear, T=0
    assert rig.mem(0, 8) == b"clear ok"
    assert rig.link.status()["clear_transfers"] == 1


def test_status_is_json(rig: Rig) -> None:
    rig.secure()
    rig.ep.write(GUEST, b"x" * 4)
    for doc in (rig.link.status(), rig.ep.status(), rig.rp.status()):
        json.dumps(doc)


# -- the device's IDE capability (teeio.pcie.ide_cap) as the device end -------------------------

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
