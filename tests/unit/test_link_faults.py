"""Fault injection on the link's taps (vfio_user_dev.link.faults): unnoticed without IDE;
with IDE (PCIe 6.x §6.33.6) every tampered, dropped or replayed TLP is caught, the stream
goes Insecure at both ends and nothing lands; selection by predicate and count."""

from __future__ import annotations

from pathlib import Path

import pytest

from teeio.tlp import TlpType
from tests.support.link_rig import GUEST, SIZE, Rig, payload
from vfio_user_dev.link.capture import CaptureFlags, read_capture
from vfio_user_dev.link.faults import Fault, FaultKind, TlpView
from vfio_user_dev.link.interfaces import LinkDirection, LinkFault

pytestmark = pytest.mark.timeout(30)


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
