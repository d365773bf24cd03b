"""TDISP state transitions and their actions (PCIe 6.x §11.2.6), driven the way the TSM
drives it (tests/support/tee_rig.py): heartbeat timeout (DSP0274 §10.17) with an injected
clock and the watchdog thread, STOP scrubbing, firmware update with and without
NO_FW_UPDATE, DOE traffic in every state and refusal accounting."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from teeio import pki
from teeio.device_regs import Op, R
from teeio.measurements import measure_elf
from teeio.tdisp.defs import LockInterfaceFlags, TdiState
from tests.support.tdi_gates import ALL_ONES, record_events, to_state
from tests.support.tee_rig import SID, WIN, TeeRig, status_error
from vfio_user_dev.device import IDE_CAP
from vfio_user_dev.dsm import FirmwareUpdateError
from vfio_user_dev.enforcement import LOG_EVERY, LOG_FIRST, Refusals
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(60)


# -- heartbeat (DSP0274 §10.17) -------------------------------------------------------------

@pytest.fixture
def hb_rig(tmp_path: Path, identity: pki.Identity) -> Iterator[TeeRig]:
    rig = TeeRig(tmp_path, identity, heartbeat_period=2)
    yield rig
    rig.close()


def test_heartbeat_period_is_advertised(hb_rig: TeeRig) -> None:
    assert hb_rig.req.sessions[hb_rig.sid].heartbeat_period == 2


def test_heartbeat_timeout_terminates_the_session(hb_rig: TeeRig) -> None:
    rig = hb_rig
    rig.run()
    seen = record_events(rig)
    rig.clock.advance(3)
    rig.req.heartbeat(rig.sid)                 # activity resets the timer
    rig.clock.advance(3)
    assert rig.dsm.check_heartbeats() == []
    assert rig.state() is TdiState.RUN
    rig.clock.advance(4.01)                    # > 2 × HeartbeatPeriod of silence
    assert rig.dsm.check_heartbeats() == [rig.sid]
    assert rig.state() is TdiState.ERROR and seen == ["HEARTBEAT_TIMEOUT"]
    assert rig.sid not in rig.dsm.responder.sessions
    blocks = rig.device.ide_status()
    assert blocks[1]["stream_id"] == SID and blocks[1]["state"] == "insecure"
    assert rig.bar0_read(R.ID) == ALL_ONES
    # A new session can STOP it back.
    req = rig.requester()
    sid = req.start_session(0)
    from teeio.tdisp.codec import function_id
    from tsm.tdisp import TdispClient
    TdispClient(req, sid, function_id(rig.rid)).stop()
    assert rig.state() is TdiState.CONFIG_UNLOCKED


def test_heartbeat_watchdog_thread(hb_rig: TeeRig) -> None:
    rig = hb_rig
    rig.lock()
    rig.dsm.start_watchdog(interval=0.01)
    rig.clock.advance(5)
    deadline = time.monotonic() + 5
    while rig.state() is not TdiState.ERROR and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.state() is TdiState.ERROR
    assert rig.dsm.heartbeat_timeouts == 1


def test_heartbeat_off(tmp_path: Path, identity: pki.Identity) -> None:
    rig = TeeRig(tmp_path, identity, heartbeat_period=0)
    try:
        rig.lock()
        rig.clock.advance(10_000)
        assert rig.dsm.check_heartbeats() == []
        assert rig.state() is TdiState.CONFIG_LOCKED
        assert rig.req.sessions[rig.sid].heartbeat_period == 0
    finally:
        rig.close()


# -- actions: SCRUB, QUIESCE, late completions ---------------------------------------------------

def test_stop_scrubs_bar0_and_job_state(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.run()
    rig.bar0_write(R.SCRATCH, 0x5EC2E7)
    rig.dma_mmio(Op.FILL, 0, WIN, 64, 0xABCD)
    assert status_error(rig.wait_job()) is None
    assert rig.bar0_read(R.SCRATCH) == 0x5EC2E7 and rig.bar0_read(R.DMA_DST_LO) != 0
    rig.private_mmio(False)
    assert rig.window_id is not None
    rig.rp.call("window_revoke", window_id=rig.window_id)
    rig.tdisp.stop()
    st = rig.machine.stats()
    assert st["scrubs"] == 1
    assert st["tdi"] == {"state": "CONFIG_UNLOCKED", "bound_session": None, "lock_flags": 0,
                         "default_stream_id": None, "private_mmio": None,
                         "tee_access": False}
    for reg in (R.SCRATCH, R.DMA_SRC_LO, R.DMA_DST_LO, R.DMA_LEN, R.DMA_PATTERN, R.STATUS,
                R.INT_STATUS):
        assert rig.bar0_read(reg) == 0, reg.name
    assert rig.bar0_read(R.ID) == 0x7E10_1234               # T=0 served again


# -- firmware update ------------------------------------------------------------------------

def _reported(rig: TeeRig) -> list[bytes]:
    """What GET_MEASUREMENTS (in the session) reports now."""
    return [b.value for b in rig.req.get_measurements(session_id=rig.sid).blocks]


@pytest.mark.parametrize("state", [TdiState.CONFIG_LOCKED, TdiState.RUN])
def test_fw_update_refused_with_no_fw_update(tee_rig: TeeRig, fw_images: tuple[Path, Path],
                                             state: TdiState,
                                             caplog: pytest.LogCaptureFixture) -> None:
    rig = tee_rig
    if state is TdiState.RUN:
        rig.run(LockInterfaceFlags.NO_FW_UPDATE)
    else:
        rig.lock(LockInterfaceFlags.NO_FW_UPDATE)
    before = _reported(rig)
    with caplog.at_level(logging.INFO), pytest.raises(FirmwareUpdateError) as e:
        rig.device.firmware_update(fw_images[1])
    assert e.value.refused
    assert _reported(rig) == before
    assert rig.state() is state                      # refused, so nothing happened
    assert rig.machine.stats()["tdisp_refusals"] == {"fw_update": 1}
    assert any("fw_update" in r.message and "NO_FW_UPDATE" in r.message
               for r in caplog.records)


@pytest.mark.parametrize("state", [TdiState.CONFIG_UNLOCKED, TdiState.RUN])
def test_fw_update_allowed_without_no_fw_update(tee_rig: TeeRig,
                                                fw_images: tuple[Path, Path],
                                                state: TdiState) -> None:
    rig = tee_rig
    if state is TdiState.RUN:
        rig.run(flags=0)
    rig.device.firmware_update(fw_images[0])
    old = _reported(rig)
    new = rig.device.firmware_update(fw_images[1])
    assert new == tuple(measure_elf(fw_images[1])) != tuple(measure_elf(fw_images[0]))
    # Later GET_MEASUREMENTS report the new image.
    now = _reported(rig)
    assert len(now) == len(new) and now != old
    assert rig.state() is state                      # the guard: no NO_FW_UPDATE, no event


def test_fw_update_of_a_bad_image_is_an_error(tee_rig: TeeRig, tmp_path: Path) -> None:
    bad = tmp_path / "not.elf"
    bad.write_bytes(b"not an ELF")
    with pytest.raises(FirmwareUpdateError) as e:
        tee_rig.device.firmware_update(bad)
    assert not e.value.refused
    assert tee_rig.machine.stats()["tdisp_refusals"] == {}


# -- refusal accounting ------------------------------------------------------------------------

def test_refusals_are_logged_without_flooding(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.refusals")
    r = Refusals(log)
    with caplog.at_level(logging.INFO, "test.refusals"):
        for _ in range(2 * LOG_EVERY):
            r.add("mmio_t0_not_unlocked", "detail")
    assert r.as_dict() == {"mmio_t0_not_unlocked": 2 * LOG_EVERY}
    assert len(caplog.records) == LOG_FIRST + 2
    assert all(rec.levelno == logging.INFO for rec in caplog.records)


@pytest.mark.parametrize("state", list(TdiState))
def test_doe_traffic_is_allowed_in_every_state(tee_rig: TeeRig, state: TdiState) -> None:
    rig = tee_rig
    to_state(rig, state)
    rig.req.heartbeat(rig.sid)
    assert rig.tdisp.get_state() is state                # SPDM/TDISP over DOE answered
    assert rig.req.get_measurements(session_id=rig.sid).blocks
    assert rig.machine.region_read(PciRegion.CONFIG, IDE_CAP, 2) == b"\x30\x00"
