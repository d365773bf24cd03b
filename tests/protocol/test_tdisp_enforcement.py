"""TDISP enforcement in the device (PCIe 6.x §11.2.1, §11.2.6),
driven the way the TSM drives it (tests/support/tee_rig.py: SPDM session, Selective IDE
stream through IDE_KM and the platform socket, LOCK/START with TdispClient, windows and
private MMIO on the platform socket).

* the completer table: each TDI state × T=0/T=1 × MMIO read/write;
* the requester table: DMA in each state (T=0 / T=1 on the bound stream / not issued),
  and the root port's window rules behind it (T=0 into a window, revoked window,
  remapped window, after STOP);
* each security event → ERROR, the write itself completing; allowed writes change
  nothing;
* heartbeat timeout (injected clock), watchdog thread; STOP scrubs; QUIESCE aborts;
  completions after RUN are dropped; firmware update with and without NO_FW_UPDATE;
* the link: MMIO under T=1 never crosses in plaintext, a tampered MMIO TLP makes the
  stream Insecure and the TDI go to ERROR; refusals are counted and logged without
  flooding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from teeio import pki
from teeio.device_regs import DEVICE_ID_REG_VALUE, DmaError, Op, R
from teeio.ide import KeySet
from teeio.measurements import measure_elf
from teeio.pcie.config import Command, Reg
from teeio.tdisp.defs import LockInterfaceFlags, TdiState
from teeio.tlp import IdePrefix, is_protected, peek
from tests.support.tee_rig import (
    BAR0_ADDR,
    GUEST,
    SID,
    WIN,
    WIN_SIZE,
    TeeRig,
    status_error,
)
from vfio_user_dev import firmware_build
from vfio_user_dev.device import DEVCTL, IDE_CAP, PCIE_CAP
from vfio_user_dev.dsm import FirmwareUpdateError
from vfio_user_dev.enforcement import LOG_EVERY, LOG_FIRST, Refusals
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(60)

ALL_ONES = 0xFFFF_FFFF
SEL0 = IDE_CAP + 0x14                     # selective block 0 = the bound stream SID
SEL1 = SEL0 + 0x20                        # selective block 1 (not bound)


def to_state(rig: TeeRig, state: TdiState) -> None:
    """Bring the rig's TDI to *state* the way it happens for real (the stream is set up
    in every case, so T=1 requests can be sent)."""
    rig.setup_stream()
    if state is TdiState.CONFIG_LOCKED:
        rig.lock()
    elif state is TdiState.RUN:
        rig.run()
    elif state is TdiState.ERROR:
        rig.run()
        rig.cfg_write(DEVCTL, rig.cfg_read(DEVCTL, 2) ^ (1 << 11), 2)    # No Snoop toggled
    assert rig.state() is state


# -- the completer table (§11.2.1) ------------------------------------------------------------

# (state, T) -> served?
COMPLETER = {
    (TdiState.CONFIG_UNLOCKED, 0): True, (TdiState.CONFIG_UNLOCKED, 1): False,
    (TdiState.CONFIG_LOCKED, 0): False, (TdiState.CONFIG_LOCKED, 1): False,
    (TdiState.RUN, 0): False, (TdiState.RUN, 1): True,
    (TdiState.ERROR, 0): False, (TdiState.ERROR, 1): False,
}


@pytest.mark.parametrize(("state", "t_bit"), list(COMPLETER))
@pytest.mark.parametrize("access", ["read", "write"])
def test_mmio_completer_table(tee_rig: TeeRig, state: TdiState, t_bit: int,
                              access: str) -> None:
    rig = tee_rig
    to_state(rig, state)
    rig.private_mmio(bool(t_bit))            # the root port sends BAR0 accesses T=1 or T=0
    served = COMPLETER[(state, t_bit)]
    rig.device.r[R.SCRATCH] = 0x5A5A_0001
    before = rig.machine.root_port.counters["mmio_t1"]
    if access == "read":
        got = rig.bar0_read(R.SCRATCH)
        assert got == (0x5A5A_0001 if served else ALL_ONES)
    else:
        rig.bar0_write(R.SCRATCH, 0x0BAD_F00D)
        assert rig.device.r[R.SCRATCH] == (0x0BAD_F00D if served else 0x5A5A_0001)
    # It crossed the link as a TLP with that T bit (not the direct path).
    assert rig.machine.root_port.counters["mmio_t1"] - before == t_bit
    refusals = rig.machine.stats()["tdisp_refusals"]
    assert isinstance(refusals, dict)
    ur = {k: v for k, v in refusals.items() if k.startswith("mmio_")}
    if served:
        assert not ur
    else:
        kind = "mmio_t0_not_unlocked" if not t_bit else "mmio_t1_not_run"
        assert ur == {kind: 1}


def test_host_bar_accesses_are_always_t0(tee_rig: TeeRig) -> None:
    rig = tee_rig
    assert rig.bar0_read(R.ID, host=True) == 0x7E10_1234          # CONFIG_UNLOCKED: served
    rig.run()
    assert rig.bar0_read(R.ID) == 0x7E10_1234                     # the VMM's path: T=1
    assert rig.bar0_read(R.ID, host=True) == ALL_ONES             # the host's: T=0 → UR
    rig.bar0_write(R.SCRATCH, 0x1234, host=True)
    assert rig.device.r[R.SCRATCH] == 0
    # BAR1 (MSI-X table, IS_NON_TEE_MEM) is not gated.
    rig.machine.region_write(PciRegion.BAR1, 0, b"\x11\x22\x33\x44", host=True)
    assert rig.machine.region_read(PciRegion.BAR1, 0, 4, host=True) == b"\x11\x22\x33\x44"
    assert rig.machine.stats()["tdisp_refusals"] == {"mmio_t0_not_unlocked": 2}


def test_t1_on_a_stream_other_than_the_bound_one_is_ur(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.run()
    assert rig.device.tdisp is not None and rig.device.tdisp.lock_request is not None
    # LOCK bound stream SID; pretend the TDI were bound to another one: same TLPs, UR.
    rig.device.tdisp.lock_request = type(rig.device.tdisp.lock_request)(
        rig.device.tdisp.lock_request.function_id, rig.device.tdisp.lock_request.flags,
        SID + 1, rig.device.tdisp.lock_request.mmio_reporting_offset,
        rig.device.tdisp.lock_request.bind_p2p_address_mask)
    assert rig.bar0_read(R.ID) == ALL_ONES
    assert rig.machine.stats()["tdisp_refusals"] == {"mmio_t1_wrong_stream": 1}


def test_private_mmio_needs_the_platform_credential_path_and_a_stream(tee_rig: TeeRig
                                                                      ) -> None:
    from teeio.platform_channel import PlatformCtlError
    rig = tee_rig
    with pytest.raises(PlatformCtlError) as e:          # no such stream at the root port
        rig.rp.call("mmio_private", requester_id=rig.rid, stream_id=7, enable=True)
    assert e.value.code == "refused"
    with pytest.raises(PlatformCtlError) as e:
        rig.rp.call("mmio_private", requester_id=rig.rid, stream_id=SID, enable="yes")
    assert e.value.code == "bad_args"
    rig.setup_stream()
    rig.private_mmio(True)
    assert rig.machine.stats()["tdi"] == {"state": "CONFIG_UNLOCKED", "bound_session": None,
                                         "lock_flags": 0, "default_stream_id": None,
                                         "private_mmio": SID, "tee_access": False}
    # The stream leaves Secure: the root port switches private MMIO off itself (an
    # event for the TSM), so MMIO goes T=0 in the clear -- served in CONFIG_UNLOCKED.
    seq = rig.device.events.last_seq
    rig.rp.call("stream_enable", stream_id=SID, enable=False)
    assert rig.machine.root_port.mmio_private == {}
    (ev,) = rig.machine.root_port.events_since(seq, ("mmio_private",))
    assert ev["enabled"] is False and ev["requester_id"] == rig.rid
    assert rig.bar0_read(R.ID) == DEVICE_ID_REG_VALUE
    assert rig.machine.root_port.counters["mmio_not_sent"] == 0


# -- the requester table (§11.2.1) ------------------------------------------------------------

@pytest.mark.parametrize("state", list(TdiState))
def test_dma_requester_table(tee_rig: TeeRig, state: TdiState) -> None:
    rig = tee_rig
    to_state(rig, state)
    link = rig.machine.link.counters
    before = link["tlps_upstream"]
    target = WIN if state is TdiState.RUN else GUEST + 0x100   # private buffer vs shared
    status = rig.dma_direct(Op.FILL, 0, target, 256, 0xC0FFEE11)
    data = rig.mem(target - GUEST, 4)
    if state in (TdiState.CONFIG_UNLOCKED, TdiState.RUN):
        assert status_error(status) is None
        assert data == (0xC0FFEE11).to_bytes(4, "little")
        assert link["tlps_upstream"] > before
    else:
        assert status_error(status) == DmaError.FAULT
        assert data == bytes(4)
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


# -- security events → ERROR (§11.2.6), the write completing -----------------------------------

def _bar0(rig: TeeRig) -> None:
    rig.cfg_write(Reg.BAR0, BAR0_ADDR)


def _rom(rig: TeeRig) -> None:
    rig.cfg_write(Reg.ROM_ADDRESS, 0)


def _bist(rig: TeeRig) -> None:
    rig.cfg_write(0x0F, 0, 1)


def _cmd(bit: int) -> Callable[[TeeRig], None]:
    return lambda rig: rig.cfg_write(Reg.COMMAND,
                                     (Command.MEMORY_SPACE | Command.BUS_MASTER) & ~bit, 2)


def _devctl(bit: int) -> Callable[[TeeRig], None]:
    return lambda rig: rig.cfg_write(DEVCTL, rig.cfg_read(DEVCTL, 2) ^ bit, 2)


def _initiate_flr(rig: TeeRig) -> None:
    rig.cfg_write(DEVCTL, rig.cfg_read(DEVCTL, 2) | 1 << 15, 2)


def _ide_reg(rel: int) -> Callable[[TeeRig], None]:
    return lambda rig: rig.cfg_write(SEL0 + rel, rig.cfg_read(SEL0 + rel))


def _ide_disable(rig: TeeRig) -> None:
    rig.cfg_write(SEL0 + 4, SID << 24)


def _flr(rig: TeeRig) -> None:
    rig.machine.reset()


def _session_end(rig: TeeRig) -> None:
    rig.req.end_session(rig.sid)


def _k_set_stop(rig: TeeRig) -> None:
    rig.km().stop_all(SID, KeySet.K0)


def _mmio_mac_failure(rig: TeeRig) -> None:
    rig.machine.link.inject(Fault(FaultKind.FLIP_ADDRESS, LinkDirection.DOWNSTREAM))
    rig.bar0_read(R.ID, host=True)


def _dma_mac_failure(rig: TeeRig) -> None:
    rig.machine.link.inject(Fault(FaultKind.FLIP_PAYLOAD, LinkDirection.UPSTREAM))
    rig.dma_direct(Op.FILL, 0, WIN, 64, 0x99)


EVENTS: dict[str, tuple[Callable[[TeeRig], None], str]] = {
    "bar0": (_bar0, "BAR_WRITE"),
    "rom": (_rom, "BAR_WRITE"),
    "bist": (_bist, "BAR_WRITE"),
    "memory_space_cleared": (_cmd(Command.MEMORY_SPACE), "MEMORY_SPACE_DISABLED"),
    "bus_master_cleared": (_cmd(Command.BUS_MASTER), "BUS_MASTER_DISABLED"),
    "extended_tag": (_devctl(1 << 8), "PROTECTED_CONFIG_WRITE"),
    "phantom_functions": (_devctl(1 << 9), "PROTECTED_CONFIG_WRITE"),
    "no_snoop": (_devctl(1 << 11), "PROTECTED_CONFIG_WRITE"),
    "initiate_flr": (_initiate_flr, "PROTECTED_CONFIG_WRITE"),
    "ide_control": (_ide_reg(4), "IDE_STREAM_REGISTERS_CHANGED"),
    "ide_rid_association": (_ide_reg(0x0C), "IDE_STREAM_REGISTERS_CHANGED"),
    "ide_address_association": (_ide_reg(0x14), "IDE_STREAM_REGISTERS_CHANGED"),
    "ide_enable_cleared": (_ide_disable, "IDE_STREAM_REGISTERS_CHANGED"),
    "k_set_stop": (_k_set_stop, "IDE_STREAM_INSECURE"),
    "mmio_mac_failure": (_mmio_mac_failure, "IDE_STREAM_INSECURE"),
    "dma_mac_failure": (_dma_mac_failure, "IDE_STREAM_INSECURE"),
    "flr": (_flr, "FLR"),
    "session_end": (_session_end, "SPDM_SESSION_TERMINATED"),
}


def _events(rig: TeeRig) -> list[str]:
    seen: list[str] = []
    assert rig.device.tdisp is not None
    rig.device.tdisp.on_transition.append(
        lambda ev, before, after, _a: seen.append(ev.name) if after is not before else None)
    return seen


@pytest.mark.parametrize(("name", "when"), [
    (name, when) for name in EVENTS for when in (TdiState.CONFIG_LOCKED, TdiState.RUN)
    if not (name == "dma_mac_failure" and when is TdiState.CONFIG_LOCKED)])  # no DMA then
def test_security_event_moves_the_tdi_to_error(tee_rig: TeeRig, name: str,
                                               when: TdiState) -> None:
    rig = tee_rig
    if when is TdiState.RUN:
        rig.run()
    else:
        rig.lock()
    seen = _events(rig)
    cmd = rig.cfg_read(Reg.COMMAND, 2)
    devctl = rig.cfg_read(DEVCTL, 2)
    action, event = EVENTS[name]
    action(rig)
    assert rig.state() is TdiState.ERROR
    assert seen == [event]
    # The write itself completed (§11.2.6: "the completion status is unaffected").
    if name.endswith("_cleared") and name.startswith(("memory", "bus")):
        assert rig.cfg_read(Reg.COMMAND, 2) != cmd
    if name == "no_snoop":        # (Extended Tag, Phantom Functions: read-only here)
        assert rig.cfg_read(DEVCTL, 2) == devctl ^ 1 << 11
    if name == "ide_enable_cleared":
        assert not rig.cfg_read(SEL0 + 4) & 1
    # In ERROR: no T=1 access, no DMA.
    assert rig.bar0_read(R.ID) == ALL_ONES
    # ... and STOP brings it back (scrubbing).
    if name != "session_end":
        rig.tdisp.stop()
        assert rig.state() is TdiState.CONFIG_UNLOCKED


def test_allowed_writes_change_nothing(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.run()
    seen = _events(rig)
    rig.cfg_write(Reg.COMMAND, Command.MEMORY_SPACE | Command.BUS_MASTER
                  | Command.INTERRUPT_DISABLE, 2)
    rig.cfg_write(Reg.CACHE_LINE_SIZE, 0x10, 1)
    rig.cfg_write(DEVCTL, rig.cfg_read(DEVCTL, 2) ^ (1 << 4), 2)  # Relaxed Ordering: allowed
    rig.cfg_write(SEL1 + 4, 9 << 24)                                 # another stream block
    rig.cfg_write(SEL0 + 8, 0)                                       # bound stream's Status
    rig.cfg_write(PCIE_CAP + 0x10, 0, 2)                             # Link Control
    assert rig.state() is TdiState.RUN and seen == []
    assert rig.bar0_read(R.ID) == 0x7E10_1234


def test_events_in_config_unlocked_change_nothing(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.setup_stream()
    for name in ("bar0", "no_snoop", "ide_control", "flr"):
        EVENTS[name][0](rig)
    assert rig.state() is TdiState.CONFIG_UNLOCKED
    assert rig.machine.stats()["scrubs"] == 0


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
    seen = _events(rig)
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


# -- firmware update ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fw_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("fw")
    try:
        return (firmware_build.build(d / "fw.elf"),
                firmware_build.build(d / "fw2.elf", {"TEEIO_FW_PATCH": "1"}))
    except firmware_build.FirmwareBuildError as exc:    # gcc is a declared dependency
        pytest.fail(f"the firmware images do not build: {exc}")


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


# -- the link: confidentiality and integrity of TEE MMIO ------------------------------------------

def test_t1_mmio_never_crosses_in_plaintext(tee_rig_captured: TeeRig) -> None:
    rig = tee_rig_captured
    rig.run()
    secret = 0xC0DE_5EC7
    rig.bar0_write(R.SCRATCH, secret)
    assert rig.bar0_read(R.SCRATCH) == secret
    records = rig.records()
    assert all(secret.to_bytes(4, "little") not in r and secret.to_bytes(4, "big") not in r
               for r in records)
    # Every MMIO TLP after private MMIO went on (root port → device requests, and the
    # device's completions) is IDE-protected, T=1, on the bound stream.
    mmio = [r for r in records if (t := peek(r)) is not None
            and (t.type.is_request and t.requester_id == 0x0008
                 or t.type.is_completion and t.completer_id == rig.rid)]
    assert len(mmio) >= 3          # MWr, MRd, CplD
    assert all(is_protected(r) and IdePrefix.decode(r[:4]).t_bit
               and IdePrefix.decode(r[:4]).stream_id == SID for r in mmio[-3:])
    assert rig.machine.root_port.counters["mmio_t1"] >= 2


def test_tampered_mmio_tlp_makes_the_stream_insecure_and_the_tdi_error(tee_rig: TeeRig
                                                                       ) -> None:
    rig = tee_rig
    rig.run()
    seen = _events(rig)
    rig.machine.link.inject(Fault(FaultKind.FLIP_PAYLOAD, LinkDirection.DOWNSTREAM))
    rig.bar0_write(R.SCRATCH, 0x1234_5678)
    assert rig.device.r[R.SCRATCH] == 0                 # the tampered write was discarded
    assert rig.state() is TdiState.ERROR and seen == ["IDE_STREAM_INSECURE"]
    assert rig.device.ide_status()[1]["state"] == "insecure"
    rp = rig.machine.root_port.status()["streams"]
    assert isinstance(rp, list) and rp[0]["state"] == "insecure"   # IDE Fail Message
    assert rig.bar0_read(R.ID) == ALL_ONES


def test_tampered_mmio_completion_is_caught_by_the_root_port(tee_rig: TeeRig) -> None:
    rig = tee_rig
    rig.run()
    rig.machine.link.inject(Fault(FaultKind.FLIP_PAYLOAD, LinkDirection.UPSTREAM))
    assert rig.bar0_read(R.ID) == ALL_ONES
    assert rig.state() is TdiState.ERROR                 # the device got the Fail Message
    assert rig.machine.root_port.counters["ide_failures"] >= 1


def test_unlocked_mmio_takes_the_link_when_tapped_or_keyed(tee_rig: TeeRig) -> None:
    rig = tee_rig
    link = rig.machine.link.counters
    rig.bar0_read(R.ID)
    assert link["mmio_bursts"] == 0                      # plain: the direct path
    rig.setup_stream()
    assert rig.bar0_read(R.ID) == 0x7E10_1234
    assert link["mmio_bursts"] == 1                      # a Secure stream: IDE, T=0
    assert rig.device.link_end.counters["ide_tlps_rx"] >= 1


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


# -- the host access socket: the same gates --------------------------------------------------

def test_host_access_socket_goes_through_the_same_gates(tee_rig: TeeRig, tmp_path: Path,
                                                        fw_images: tuple[Path, Path]) -> None:
    from vfio_user_dev.host_access import HostAccessClient, HostAccessError, HostAccessServer
    rig = tee_rig
    rig.run()
    server = HostAccessServer(str(tmp_path / "host.sock"), rig.machine).start()
    try:
        with HostAccessClient(str(tmp_path / "host.sock")) as c:
            assert c.call("bar_read", bar=0, offset=R.ID, size=4) == {"value": ALL_ONES}
            with pytest.raises(HostAccessError) as e:
                c.call("fw_update", path=str(fw_images[1]))
            assert e.value.code == "refused" and "NO_FW_UPDATE" in e.value.message
            assert c.call("stats")["tdi"]["state"] == "RUN"
            # The host rewrites BAR0 behind the guest's back: the write completes, ERROR.
            assert c.call("config_write", offset=Reg.BAR0, size=4,
                          value=BAR0_ADDR) == {"value": BAR0_ADDR}
            stats = c.call("stats")
            assert stats["tdi"]["state"] == "ERROR"
            assert stats["tdisp_refusals"] == {"fw_update": 1, "mmio_t0_not_unlocked": 1}
            # The untrusted link: the next MMIO TLP is tampered with, and IDE catches it.
            assert c.call("link_inject", kind="FLIP_ADDRESS", direction="downstream") \
                == {"armed": 1}
    finally:
        server.close()
    assert rig.device.ide_status()[1]["state"] == "secure"
    assert rig.bar0_read(R.ID) == ALL_ONES
    assert rig.device.ide_status()[1]["state"] == "insecure"
