"""What the TDISP enforcement tests share (PCIe 6.x §11.2.1, §11.2.6): the UR read value,
the bound and an unbound Selective IDE stream block in the device's IDE capability, a
TDI brought to a state the way the TSM brings it, and the events of its transitions."""

from __future__ import annotations

from teeio.tdisp.defs import TdiState
from tests.support.tee_rig import TeeRig
from vfio_user_dev.device import DEVCTL, IDE_CAP

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


def record_events(rig: TeeRig) -> list[str]:
    """The names of the events that move the rig's TDI to another state from now on."""
    seen: list[str] = []
    assert rig.device.tdisp is not None
    rig.device.tdisp.on_transition.append(
        lambda ev, before, after, _a: seen.append(ev.name) if after is not before else None)
    return seen
