"""The root port (vfio_user_dev/root_port/): trusted-DMA windows checked after IDE,
refusal accounting, remaps by the client as security events, stream configuration,
revocation of windows and private MMIO by requester or stream."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from tests.support.link_rig import GUEST, RID, SID, SIZE, Rig, program_pair
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.link.interfaces import LinkFault
from vfio_user_dev.link.streams import IdeStreamEnd
from vfio_user_dev.protocol import DmaFlags
from vfio_user_dev.root_port import RootPortError

pytestmark = pytest.mark.timeout(30)

WIN = GUEST + 0x4000
WSIZE = 0x2000
RW = DmaFlags.READ | DmaFlags.WRITE

#: the platform events these tests look at (not the stream-state ones)
SECURITY_EVENTS = ("remap", "ide_fail", "window_revoked")


@pytest.fixture(params=["fast", "wire"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    """Both paths of clear (T=0) DMA: the fast path, and real TLPs (a capture tap on)."""
    r = Rig(tmp_path, capture=request.param == "wire")
    yield r
    r.close()


@pytest.fixture
def srig(tmp_path: Path) -> Iterator[Rig]:
    """A rig with a Secure stream and a window; the device's DMA is T=1."""
    r = Rig(tmp_path)
    r.secure()
    r.rp.authorise_window(RID, SID, WIN, WSIZE)
    r.ep.tee_dma = lambda: True
    yield r
    r.close()


# -- T=0 -------------------------------------------------------------------------------------

def test_t0_outside_windows_is_unaffected(rig: Rig) -> None:
    rig.rp.setup_stream(SID, RID, RID)
    rig.rp.authorise_window(RID, SID, WIN, WSIZE)
    rig.ep.write(GUEST, b"ordinary")
    assert rig.ep.read(GUEST, 8) == b"ordinary"
    assert rig.rp.status()["refusals_total"] == 0


def test_t0_into_a_window_is_refused_and_counted(rig: Rig,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    rig.rp.setup_stream(SID, RID, RID)
    rig.rp.authorise_window(RID, SID, WIN, WSIZE)
    rig.poke(WIN - GUEST, b"private!")
    with caplog.at_level(logging.WARNING, "vfio_user_dev.root_port"), \
            pytest.raises(LinkFault, match="refused"):
        rig.ep.write(WIN + 0x100, b"evil" * 100)
    assert rig.mem(WIN - GUEST + 0x100, 400) == bytes(400)
    with pytest.raises(LinkFault):
        rig.ep.read(WIN, 8)                             # no T=0 read of private memory
    st = rig.rp.status()
    assert st["refusals"] == {"t0_into_window": 3}      # 2 MWr (MPS 256) + 1 MRd
    recent = st["recent_refusals"]
    assert isinstance(recent, list) and recent[0]["reason"] == "t0_into_window"
    assert recent[0]["address"] == WIN + 0x100 and recent[0]["t_bit"] is False
    assert any("t0_into_window" in r.message and "window 1" in r.message
               for r in caplog.records)


def test_t0_write_straddling_a_window_lands_only_outside(rig: Rig) -> None:
    rig.rp.setup_stream(SID, RID, RID)
    rig.rp.authorise_window(RID, SID, WIN, WSIZE)
    start = WIN - 0x200                       # 2 TLPs before the window, 2 inside
    with pytest.raises(LinkFault):
        rig.ep.write(start, b"\xEE" * 0x400)
    assert rig.mem(start - GUEST, 0x200) == b"\xEE" * 0x200
    assert rig.mem(WIN - GUEST, 0x200) == bytes(0x200)
    assert rig.rp.refusals["t0_into_window"] == 2


def test_dma_to_unmapped_memory_is_a_counted_fault(rig: Rig) -> None:
    with pytest.raises(DmaFault, match="unmapped"):
        rig.ep.write(GUEST + SIZE - 8, b"x" * 16)
    with pytest.raises(DmaFault):
        rig.ep.read(GUEST - 16, 32)
    assert rig.rp.refusals["memory"] >= 2


# -- T=1 -------------------------------------------------------------------------------------

def test_t1_inside_its_window_lands(srig: Rig) -> None:
    srig.ep.write(WIN + 0x10, b"tee data")
    assert srig.mem(WIN - GUEST + 0x10, 8) == b"tee data"
    assert srig.ep.read(WIN + 0x10, 8) == b"tee data"
    assert srig.rp.status()["refusals_total"] == 0


def test_t1_outside_any_window_is_refused(srig: Rig) -> None:
    with pytest.raises(LinkFault, match="no window"):
        srig.ep.write(GUEST, b"shared??")
    assert srig.mem(0, 8) == bytes(8)
    with pytest.raises(LinkFault, match="UR"):          # MRd: Unsupported Request
        srig.ep.read(WIN + WSIZE - 4, 8)                 # runs off the window's end
    assert srig.rp.refusals["t1_outside_window"] == 2
    assert srig.ep.status()["ur_completions"] == 1
    assert srig.dev_stream is not None and srig.dev_stream.is_secure()   # not an IDE error


def test_t1_window_of_another_requester_or_stream(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        r.secure()
        r.rp.setup_stream(SID + 1, 0x0200, 0x02FF)
        r.rp.authorise_window(0x0200, SID + 1, WIN, 0x1000)     # someone else's
        r.rp.authorise_window(RID, SID, WIN + 0x1000, 0x1000)   # ours
        r.ep.tee_dma = lambda: True
        with pytest.raises(LinkFault):
            r.ep.write(WIN, b"not mine")
        r.ep.write(WIN + 0x1000, b"mine!!!!")
        assert r.mem(WIN - GUEST, 8) == bytes(8)
        assert r.mem(WIN - GUEST + 0x1000, 8) == b"mine!!!!"
    finally:
        r.close()


def test_read_only_window_refuses_writes(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        r.secure()
        r.rp.authorise_window(RID, SID, WIN, 0x1000, read=True, write=False)
        r.ep.tee_dma = lambda: True
        r.poke(WIN - GUEST, b"readable")
        assert r.ep.read(WIN, 8) == b"readable"
        with pytest.raises(LinkFault, match="does not allow writes"):
            r.ep.write(WIN, b"writable")
        assert r.rp.refusals == {"window_access": 1}
    finally:
        r.close()


def test_requester_outside_the_streams_rid_range(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        r.rp.setup_stream(SID, 0x0300, 0x0300)       # the stream is for another function
        dev = IdeStreamEnd(SID)
        program_pair(r.rp, dev, SID, KeySet.K0)
        dev.enabled = True
        r.rp.enable_stream(SID)
        r.ep.attach_stream(dev)
        with pytest.raises(LinkFault):
            r.ep.write(GUEST, b"x" * 8)
        assert r.rp.refusals["rid_outside_stream"] == 1
        assert r.mem(0, 8) == bytes(8)
    finally:
        r.close()


def test_ide_tlp_for_an_unknown_stream_is_misrouted(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        dev = r.secure()
        r.rp.remove_stream(SID)
        with pytest.raises(LinkFault, match="completion timeout"):
            r.ep.read(GUEST, 8)                 # no completion ever comes
        with pytest.raises(LinkFault, match="unknown stream"):
            r.ep.write(GUEST, b"lost?")         # a discarded posted write is reported
        assert r.rp.refusals["misrouted"] == 2
        assert r.ep.status()["completion_timeouts"] == 1
        assert dev.is_secure()                   # no IDE check failed anywhere
        assert r.mem(0, 8) == bytes(8)
    finally:
        r.close()


# -- remaps: security events -----------------------------------------------------------------

def test_window_records_its_backing(srig: Rig) -> None:
    (w,) = json.loads(json.dumps(srig.rp.status()))["windows"]
    st = os.fstat(srig.fd)
    (b,) = w["backing"]
    assert b["map_id"] == 1 and b["address"] == GUEST and b["fd_offset"] == 0
    assert b["inode"] == [st.st_dev, st.st_ino]
    assert w["state"] == "active" and w["access"] == "rw"


def test_unmap_under_a_window_is_a_security_event(srig: Rig,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "vfio_user_dev.root_port"):
        srig.dma.unmap(GUEST, SIZE)
    ev = srig.rp.events_since(0, SECURITY_EVENTS)
    assert [e["kind"] for e in ev] == ["remap"]
    assert ev[0]["window"] == 1 and ev[0]["op"] == "unmap" and ev[0]["window_suspended"]
    assert any("SECURITY" in r.message for r in caplog.records)
    # The client maps other memory at the same guest address: not followed.
    other = os.memfd_create("evil")
    os.ftruncate(other, SIZE)
    srig.dma.map(GUEST, SIZE, RW, 0, os.dup(other))
    try:
        later = srig.rp.events_since(ev[0]["seq"], SECURITY_EVENTS)
        assert [e["op"] for e in later] == ["map"]  # type: ignore[arg-type]
        with pytest.raises(LinkFault, match="suspended"):
            srig.ep.write(WIN, b"secret!!")
        assert os.pread(other, 8, WIN - GUEST) == bytes(8)
        assert srig.rp.refusals["window_suspended"] == 1
        assert srig.rp.counters["security_events"] == 2
        # The TSM looks at the new backing and re-authorises: DMA flows again.
        w = srig.rp.reauthorise_window(1)
        assert w.map_ids == {2} and w.suspended is None
        srig.ep.write(WIN, b"secret!!")
        assert os.pread(other, 8, WIN - GUEST) == b"secret!!"
    finally:
        os.close(other)


def test_maps_elsewhere_are_no_event(srig: Rig) -> None:
    fd = os.memfd_create("elsewhere")
    os.ftruncate(fd, 0x1000)
    srig.dma.map(GUEST + SIZE, 0x1000, RW, 0, fd)
    srig.dma.unmap(GUEST + SIZE, 0x1000)
    assert srig.rp.events_since(0, SECURITY_EVENTS) == []


def test_accesses_are_pinned_to_the_recorded_maps(srig: Rig) -> None:
    """Defence in depth: even if a remap were not reported, the access does not follow."""
    srig.dma.listeners.clear()
    srig.dma.unmap(GUEST, SIZE)
    srig.dma.map(GUEST, SIZE, RW, 0, os.dup(srig.fd))      # same memfd, new map id
    with pytest.raises(DmaFault, match="pinned"):
        srig.ep.write(WIN, b"12345678")
    assert srig.rp.refusals["memory"] == 1


def test_client_disconnect_suspends_every_window(srig: Rig) -> None:
    srig.dma.clear()
    (w,) = json.loads(json.dumps(srig.rp.status()))["windows"]
    assert w["state"] == "suspended" and "unmapped" in w["suspended_reason"]


def test_window_over_socket_dma_memory(tmp_path: Path) -> None:
    """Memory the client serves over the socket (no fd) can be a window too."""
    r = Rig(tmp_path)
    try:
        local = bytearray(0x1000)
        r.dma.remote_read = lambda a, n: bytes(local[a - 0x8000:a - 0x8000 + n])

        def remote_write(a: int, d: bytes) -> None:
            local[a - 0x8000:a - 0x8000 + len(d)] = d

        r.dma.remote_write = remote_write
        r.dma.map(0x8000, 0x1000, RW, 0, None)
        r.secure()
        w = r.rp.authorise_window(RID, SID, 0x8000, 0x1000)
        assert w.backing[0].inode is None
        r.ep.tee_dma = lambda: True
        r.ep.write(0x8100, b"over the socket")
        assert bytes(local[0x100:0x10F]) == b"over the socket"
    finally:
        r.close()


# -- revocation: by requester or by stream, without the TSM ---------------------------------

OTHER_RID, OTHER_SID = 0x0200, SID + 1


def two_streams(r: Rig) -> None:
    """Our stream (keyed) with a window and private MMIO; another function's stream with a
    window of its own."""
    r.secure()
    r.rp.setup_stream(OTHER_SID, OTHER_RID, OTHER_RID)
    assert r.rp.authorise_window(RID, SID, WIN, 0x1000).window_id == 1
    assert r.rp.authorise_window(OTHER_RID, OTHER_SID, WIN + 0x1000, 0x1000).window_id == 2
    r.rp.set_mmio_private(RID, SID, True)


def test_stream_leaving_secure_revokes_what_rides_on_it(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        two_streams(r)
        seq = r.rp.platform_events.last_seq
        r.rp.ide_fail_message(SID, "test")
        assert sorted(r.rp.windows) == [2] and r.rp.mmio_private == {}
        kinds = [e["kind"] for e in r.rp.events_since(seq)]
        assert kinds == ["ide_fail", "rp_stream", "window_revoked", "mmio_private"]
        (win,) = r.rp.events_since(seq, ("window_revoked",))
        assert win["window"] == 1 and win["requester_id"] == RID
        assert f"stream {SID} insecure" in str(win["reason"])
        (mmio,) = r.rp.events_since(seq, ("mmio_private",))
        assert mmio["enabled"] is False and mmio["stream"] == SID
        r.rp.remove_stream(OTHER_SID)                       # removal revokes too
        assert r.rp.windows == {}
    finally:
        r.close()


def test_revoke_requester_leaves_other_requesters_alone(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    r = Rig(tmp_path)
    try:
        two_streams(r)
        with caplog.at_level(logging.WARNING, "vfio_user_dev.root_port"):
            assert r.rp.revoke_requester(RID, "TDI left RUN") == 1
        assert sorted(r.rp.windows) == [2] and r.rp.mmio_private == {}
        assert r.rp.status()["streams"][0]["state"] == "secure"     # type: ignore[index]
        assert any("1 window(s) revoked, private MMIO off" in m for m in caplog.messages)
        assert r.rp.revoke_requester(RID, "again") == 0             # nothing left
    finally:
        r.close()


def test_device_reset_resets_the_streams_carrying_it(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        two_streams(r)
        r.rp.device_reset(RID, "device reset (flr)")
        assert sorted(r.rp.windows) == [2] and r.rp.mmio_private == {}
        ours, other = r.rp.status()["streams"]                      # type: ignore[misc]
        assert ours["state"] == "insecure" and not ours["enabled"]
        assert not r.rp.key_programmed(SID, KeySet.K0, Direction.RX, SubStream.PR)
        assert other["id"] == OTHER_SID
        (ev,) = [e for e in r.rp.events_since(0, ("rp_stream",))
                 if e["reason"] == "device reset (flr)"]
        assert ev["stream"] == SID
    finally:
        r.close()


def test_window_gate_refuses_a_window(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        r.rp.setup_stream(SID, RID, RID)
        r.rp.window_gate = lambda rid: "its TDI is LOCKED, not RUN" if rid == RID else None
        with pytest.raises(RootPortError, match="LOCKED, not RUN"):
            r.rp.authorise_window(RID, SID, WIN, WSIZE)
        assert r.rp.windows == {}
        r.rp.window_gate = None
        assert r.rp.authorise_window(RID, SID, WIN, WSIZE).window_id == 1
    finally:
        r.close()


# -- configuration ---------------------------------------------------------------------------

def test_window_authorisation_rules(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        with pytest.raises(RootPortError, match="no stream"):
            r.rp.authorise_window(RID, SID, WIN, WSIZE)
        r.rp.setup_stream(SID, RID, RID)
        with pytest.raises(RootPortError, match="not wholly mapped"):
            r.rp.authorise_window(RID, SID, GUEST + SIZE - 0x1000, 0x2000)
        r.rp.authorise_window(RID, SID, WIN, WSIZE)
        with pytest.raises(RootPortError, match="overlaps window 1"):
            r.rp.authorise_window(RID, SID, WIN + WSIZE - 1, 0x10)
        with pytest.raises(RootPortError):
            r.rp.authorise_window(RID, SID, WIN + WSIZE, 0x10, read=False, write=False)
        with pytest.raises(RootPortError, match="no window 9"):
            r.rp.revoke_window(9)
        r.rp.revoke_window(1)
        assert r.rp.status()["windows"] == []
    finally:
        r.close()


def test_stream_configuration_rules(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        with pytest.raises(RootPortError):
            r.rp.setup_stream(256)
        r.rp.setup_stream(1, 0x100, 0x1FF)
        with pytest.raises(RootPortError, match="overlaps"):
            r.rp.setup_stream(2, 0x180, 0x180)
        with pytest.raises(RootPortError, match="GO key set"):
            r.rp.enable_stream(1)
        key = IdeKey.generate()
        r.rp.program_key(1, KeySet.K0, Direction.TX, SubStream.PR, key)
        assert r.rp.key_programmed(1, KeySet.K0, Direction.TX, SubStream.PR)
        with pytest.raises(RootPortError, match="not programmed"):
            r.rp.key_set_go(1, KeySet.K0, Direction.TX)        # NPR, CPL missing
        r.rp.key_set_go(1, KeySet.K0, Direction.TX, SubStream.PR)
        with pytest.raises(RootPortError, match="in use"):
            r.rp.program_key(1, KeySet.K0, Direction.TX, SubStream.PR, key)
        r.rp.key_set_stop(1, KeySet.K0, Direction.TX)
        assert not r.rp.key_programmed(1, KeySet.K0, Direction.TX, SubStream.PR)
        with pytest.raises(RootPortError, match="no stream 7"):
            r.rp.reset_stream(7)
    finally:
        r.close()


def test_insecure_stream_needs_reset_and_new_keys(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        dev = r.secure()
        r.rp.ide_fail_message(SID, "test")
        assert r.rp.status()["streams"][0]["state"] == "insecure"       # type: ignore[index]
        with pytest.raises(RootPortError, match="Insecure"):
            r.rp.enable_stream(SID)
        r.rp.reset_stream(SID)
        dev.reset()
        r.secure()
        r.ep.write(GUEST, b"again ok")
        assert r.mem(0, 8) == b"again ok"
    finally:
        r.close()


def test_status_has_no_key_material(srig: Rig) -> None:
    keys: list[bytes] = []
    real = srig.rp.program_key

    def spy(sid: int, ks: KeySet, d: Direction, s: SubStream, key: IdeKey) -> None:
        keys.append(key.key)
        real(sid, ks, d, s, key)

    srig.rp.program_key = spy          # type: ignore[method-assign,assignment]
    assert srig.dev_stream is not None
    program_pair(srig.rp, srig.dev_stream, SID, KeySet.K1)
    text = json.dumps(srig.rp.status())
    assert len(keys) == 6
    for k in keys:
        assert k.hex() not in text and repr(k) not in text
    assert "programmed" in text or "go" in text


def test_concurrent_dma_maps_windows_and_status(srig: Rig) -> None:
    """DMA over IDE in one thread while others map/unmap elsewhere, authorise and revoke
    windows and read status: no deadlock, no lost or misplaced data."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                while not stop.is_set():
                    fn()
            except BaseException as exc:      # reported below
                errors.append(exc)
        return run

    fd = os.memfd_create("churn")
    os.ftruncate(fd, 0x1000)

    def churn_maps() -> None:
        srig.dma.map(GUEST + SIZE, 0x1000, RW, 0, os.dup(fd))
        srig.dma.unmap(GUEST + SIZE, 0x1000)

    def churn_windows() -> None:
        w = srig.rp.authorise_window(RID, SID, GUEST + 0x1000, 0x1000)
        json.dumps(srig.rp.status())
        srig.rp.revoke_window(w.window_id)
        json.dumps(srig.ep.status())

    threads = [threading.Thread(target=guard(f)) for f in (churn_maps, churn_windows)]
    for t in threads:
        t.start()
    try:
        for i in range(200):
            data = i.to_bytes(2, "little") * 150
            srig.ep.write(WIN + 0x100, data)
            assert srig.ep.read(WIN + 0x100, len(data)) == data
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        os.close(fd)
    assert not errors and not any(t.is_alive() for t in threads)
    assert srig.rp.events_since(0, SECURITY_EVENTS) == []
    assert srig.rp.status()["refusals_total"] == 0
