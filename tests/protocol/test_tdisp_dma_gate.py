"""TDISP DMA enforcement at the device's requester (PCIe 6.x §11.2.1), driven the way the
TSM drives it (tests/support/tee_rig.py): DMA in each TDI state (T=0, T=1 on the bound
stream, not issued), the root port's window rules behind it, QUIESCE aborting a queued
job and completions arriving after RUN dropped."""

from __future__ import annotations

import threading
import time

import pytest

from teeio.device_regs import DmaError, Op, R, descriptor
from teeio.tdisp.defs import TdiState
from teeio.tlp import IdePrefix, TlpType, is_protected, peek
from tests.support.tdi_gates import to_state
from tests.support.tee_rig import GUEST, SID, WIN, WIN_SIZE, TeeRig, status_error
from vfio_user_dev.device import DEVCTL

pytestmark = pytest.mark.timeout(60)
REQUESTS = (TlpType.MRD32, TlpType.MRD64, TlpType.MWR32, TlpType.MWR64)


# -- the requester table (§11.2.1) ------------------------------------------------------------

@pytest.mark.parametrize("op", [Op.FILL, Op.COPY])
@pytest.mark.parametrize("state", list(TdiState))
def test_dma_requester_table(tee_rig: TeeRig, state: TdiState, op: Op) -> None:
    """FILL, and COPY (in CONFIG_UNLOCKED one memmove where the memory is mapped)."""
    rig = tee_rig
    to_state(rig, state)
    link = rig.machine.link.counters
    before = link["tlps_upstream"]
    base = WIN if state is TdiState.RUN else GUEST + 0x100   # private buffer vs shared
    expect = b"copied!!" * 8 if op == Op.COPY else (0xC0FFEE11).to_bytes(4, "little") * 16
    rig.poke(base - GUEST, expect)
    status = rig.dma_direct(op, base, base + 0x200, 64, 0xC0FFEE11)
    data = rig.mem(base + 0x200 - GUEST, 64)
    if state in (TdiState.CONFIG_UNLOCKED, TdiState.RUN):
        assert status_error(status) is None
        assert data == expect
        assert link["tlps_upstream"] > before
    else:
        assert status_error(status) == DmaError.FAULT
        assert data == bytes(64)
        assert link["tlps_upstream"] == before                 # nothing crossed
        assert rig.machine.stats()["tdisp_refusals"] == {"dma_not_allowed": 1}


def test_dma_in_run_is_t1_on_the_bound_stream(tee_rig_captured: TeeRig) -> None:
    rig = tee_rig_captured
    rig.run()
    assert status_error(rig.dma_direct(Op.FILL, 0, WIN, 64, 0x01020304)) is None
    ups = [peek(w) for w in rig.records() if is_protected(w)
           and IdePrefix.decode(w[:4]).substream == 0]          # PR: the DMA writes
    assert ups and all(t is not None and t.t_bit and t.stream_id == SID for t in ups)


def test_root_port_window_rules_behind_the_device(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.run()
    # RUN: T=1 outside the window is refused at the root port.
    assert status_error(rig.dma_direct(Op.FILL, 0, GUEST, 64, 1)) == DmaError.FAULT
    # The TSM revokes the window: T=1 into the old window is refused too.
    assert rig.window_id is not None
    rig.rp.call("window_revoke", window_id=rig.window_id)
    assert status_error(rig.dma_direct(Op.FILL, 0, WIN, 64, 2)) == DmaError.FAULT
    assert rig.mem(WIN - GUEST, 4) == bytes(4)
    # A new window, then the VMM remaps under it: suspended, refused until re-authorised.
    wid = rig.rp.call("window_authorise", requester_id=rig.rid, stream_id=SID, base=WIN,
                      size=WIN_SIZE, access="rw")["id"]
    import os

    from vfio_user_dev.protocol import DmaFlags
    rig.machine.dma.unmap(GUEST, 0x20000)
    rig.machine.dma.map(GUEST, 0x20000, DmaFlags.READ | DmaFlags.WRITE, 0, os.dup(rig.fd))
    assert status_error(rig.dma_direct(Op.FILL, 0, WIN, 64, 3)) == DmaError.FAULT
    rig.rp.call("window_reauthorise", window_id=wid)
    assert status_error(rig.dma_direct(Op.FILL, 0, WIN, 64, 4)) is None
    refusals = rig.machine.stats()["tdisp_refusals"]
    assert isinstance(refusals, dict)
    assert refusals["root_port.t1_outside_window"] == 2
    assert refusals["root_port.window_suspended"] >= 1
    # STOP: the root port revokes the window itself the moment the TDI leaves RUN, and
    # says so in its events, without waiting for the TSM.
    seq = rig.device.events.last_seq
    rig.tdisp.stop()
    assert rig.state() is TdiState.CONFIG_UNLOCKED
    assert rig.machine.root_port.windows == {}
    assert rig.machine.root_port.mmio_private == {}
    revoked = rig.machine.root_port.events_since(seq, ("window_revoked",))
    assert [e["window"] for e in revoked] == [wid]
    assert "RUN -> CONFIG_UNLOCKED on STOP" in str(revoked[0]["reason"])
    # and grants no new one until the TDI is RUN again (the TSM's table says so too)
    from teeio.platform_channel import PlatformCtlError
    with pytest.raises(PlatformCtlError, match="its TDI is CONFIG_UNLOCKED, not RUN"):
        rig.rp.call("window_authorise", requester_id=rig.rid, stream_id=SID, base=WIN,
                    size=WIN_SIZE, access="rw")


def test_dma_go_written_while_locked_is_ur_and_starts_nothing(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.lock()
    before = dict(rig.machine.stats()["tdisp_refusals"])  # type: ignore[call-overload]
    rig.dma_mmio(Op.FILL, 0, GUEST, 64, 0x77)
    after = rig.machine.stats()["tdisp_refusals"]
    assert isinstance(after, dict)
    # Every register write was refused at the completer (T=0 in CONFIG_LOCKED is UR), so
    # the GO never reached the engine: synchronously, no waiting needed.
    assert after.get("mmio_t0_not_unlocked", 0) - before.get("mmio_t0_not_unlocked", 0) >= 7
    assert rig.device.total["jobs"] == rig.device.total["errors"] == 0
    assert rig.device.r[R.STATUS] == 0
    assert rig.mem(0, 4) == bytes(4)


# -- QUIESCE, late completions ----------------------------------------------------------------

def _block_engine(rig: TeeRig) -> threading.Event:
    """Make the engine wait after its next job, so the one after it stays queued."""
    release = threading.Event()
    first = [True]

    def hold(_dev: object) -> None:
        if first[0]:
            first[0] = False
            release.wait(10)
    rig.device.listeners.insert(0, hold)
    return release


def test_lock_quiesces_a_queued_job(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.setup_stream()
    release = _block_engine(rig)
    rig.dma_mmio(Op.FILL, 0, GUEST, 64, 0x1111)          # runs, then the engine waits
    deadline = time.monotonic() + 5
    while rig.device.total["jobs"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    rig.dma_mmio(Op.FILL, 0, GUEST + 0x100, 64, 0x2222)  # queued, started in UNLOCKED
    rig.lock()                                           # QUIESCE
    release.set()
    deadline = time.monotonic() + 5
    while rig.device.total["errors"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert rig.mem(0, 4) == (0x1111).to_bytes(4, "little")
    assert rig.mem(0x100, 4) == bytes(4)                 # never issued
    assert status_error(rig.device.r[R.STATUS]) == DmaError.FAULT
    assert rig.machine.stats()["tdisp_refusals"] == {"dma_aborted": 1}


def test_completions_after_run_are_dropped(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.run()
    rig.poke(WIN - GUEST, b"private!" * 8)
    real_read = rig.device.link_end.read

    def read_then_error(address: int, length: int, **kw: object) -> bytes:
        data = real_read(address, length, **kw)  # type: ignore[arg-type]
        # The TDI leaves RUN while the completions are in flight.
        rig.cfg_write(DEVCTL, rig.cfg_read(DEVCTL, 2) ^ (1 << 11), 2)
        return data
    rig.device.link_end.read = read_then_error  # type: ignore[method-assign]
    status = rig.dma_direct(Op.COPY, WIN, WIN + 0x100, 64)
    assert status_error(status) == DmaError.FAULT
    assert rig.mem(WIN - GUEST + 0x100, 8) == bytes(8)    # the data went nowhere
    assert rig.machine.stats()["tdisp_refusals"]["dma_late_completion"] == 1  # type: ignore[index]


# -- BATCH: its list read and every descriptor gated like the job's own requests -------------

@pytest.mark.parametrize("state", list(TdiState))
def test_batch_follows_the_requester_table(tee_rig: TeeRig, state: TdiState) -> None:
    """The descriptor list is read, and each descriptor issued, as the TDI state allows:
    in the clear in CONFIG_UNLOCKED, T=1 into the private window in RUN, not at all in
    CONFIG_LOCKED or ERROR (one refusal for the batch, nothing crosses the link)."""
    rig = tee_rig
    to_state(rig, state)
    link = rig.machine.link.counters
    base = WIN if state is TdiState.RUN else GUEST + 0x100
    rig.poke(base - GUEST, b"batched!" * 8)
    rig.poke(base + 0x800 - GUEST,
             descriptor(Op.COPY, base, base + 0x200, 64)
             + descriptor(Op.FILL, 0, base + 0x300, 16, 0xA1B2C3D4))
    before = link["tlps_upstream"]
    status = rig.dma_direct(Op.BATCH, base + 0x800, 0, 64)
    if state in (TdiState.CONFIG_UNLOCKED, TdiState.RUN):
        assert status_error(status) is None
        assert rig.mem(base + 0x200 - GUEST, 64) == b"batched!" * 8
        assert rig.mem(base + 0x300 - GUEST, 16) == (0xA1B2C3D4).to_bytes(4, "little") * 4
        assert rig.device.r[R.BATCH_DONE] == 2
    else:
        assert status_error(status) == DmaError.FAULT
        assert rig.mem(base + 0x200 - GUEST, 64) == bytes(64)
        assert link["tlps_upstream"] == before
        assert rig.machine.stats()["tdisp_refusals"] == {"dma_not_allowed": 1}
        assert rig.device.r[R.BATCH_DONE] == 0


def test_batch_in_run_reads_its_list_and_writes_t1_on_the_bound_stream(
        tee_rig_captured: TeeRig) -> None:
    rig = tee_rig_captured
    rig.run()
    rig.poke(WIN + 0x800 - GUEST, descriptor(Op.FILL, 0, WIN, 64, 0x01020304))
    assert status_error(rig.dma_direct(Op.BATCH, WIN + 0x800, 0, 32)) is None
    requests = [t for w in rig.records() if is_protected(w)
                and (t := peek(w)) is not None and t.type in REQUESTS]
    assert all(t.t_bit and t.stream_id == SID for t in requests)
    # the list read and the FILL's write, both T=1 on the bound stream
    assert {t.type for t in requests} == {TlpType.MRD64, TlpType.MWR64}
    # The same list outside the window: its read is refused at the root port.
    rig.poke(0x800, descriptor(Op.FILL, 0, WIN, 64, 5))
    assert status_error(rig.dma_direct(Op.BATCH, GUEST + 0x800, 0, 32)) == DmaError.FAULT
    assert rig.device.r[R.BATCH_DONE] == 0
    assert rig.mem(WIN - GUEST, 4) == (0x01020304).to_bytes(4, "little")


def test_lock_during_a_batch_stops_its_remaining_descriptors(tee_rig: TeeRig) -> None:
    """QUIESCE (§11.2.1): the TDI locked while a batch runs; the descriptor that was being
    issued finishes, the next one issues nothing."""
    rig = tee_rig
    rig.setup_stream()
    real_write = rig.device.link_end.write
    locked = [False]

    def write_then_lock(address: int, data: bytes, **kw: object) -> None:
        real_write(address, data, **kw)  # type: ignore[arg-type]
        if not locked[0]:
            locked[0] = True
            rig.lock()
    rig.device.link_end.write = write_then_lock  # type: ignore[method-assign]
    rig.poke(0x800, descriptor(Op.FILL, 0, GUEST, 4, 0x1111)
             + descriptor(Op.FILL, 0, GUEST + 0x100, 4, 0x2222))
    status = rig.dma_direct(Op.BATCH, GUEST + 0x800, 0, 64)
    assert status_error(status) == DmaError.FAULT
    assert rig.device.r[R.BATCH_DONE] == 1
    assert rig.mem(0, 4) == (0x1111).to_bytes(4, "little")
    assert rig.mem(0x100, 4) == bytes(4)                 # never issued
    assert rig.machine.stats()["tdisp_refusals"] == {"dma_aborted": 1}
