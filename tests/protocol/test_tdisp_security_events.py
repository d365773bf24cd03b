"""TDISP security events (PCIe 6.x §11.2.6), driven the way the TSM drives it
(tests/support/tee_rig.py): each event moves a locked or running TDI to ERROR, the write
itself completing; allowed writes and events in CONFIG_UNLOCKED change nothing; the host
access socket goes through the same gates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from teeio.device_regs import Op, R
from teeio.ide import KeySet
from teeio.pcie.config import Command, Reg
from teeio.tdisp.defs import TdiState
from tests.support.tdi_gates import ALL_ONES, SEL0, SEL1, record_events
from tests.support.tee_rig import BAR0_ADDR, SID, WIN, TeeRig
from vfio_user_dev.device import DEVCTL, PCIE_CAP
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection

pytestmark = pytest.mark.timeout(60)


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
    seen = record_events(rig)
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
    seen = record_events(rig)
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
