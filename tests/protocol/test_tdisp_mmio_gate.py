"""TDISP MMIO enforcement at the device's completer (PCIe 6.x §11.2.1), driven the way the
TSM drives it (tests/support/tee_rig.py): the completer table (TDI state × T bit × read /
write), host BAR accesses, the bound stream, private MMIO on the platform socket; on the
link, T=1 MMIO never crosses in plaintext and a tampered MMIO TLP is caught (§6.33)."""

from __future__ import annotations

import pytest

from teeio.device_regs import DEVICE_ID_REG_VALUE, R
from teeio.tdisp.defs import TdiState
from teeio.tlp import IdePrefix, is_protected, peek
from tests.support.tdi_gates import ALL_ONES, record_events, to_state
from tests.support.tee_rig import SID, TeeRig
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(60)


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
    seen = record_events(rig)
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
