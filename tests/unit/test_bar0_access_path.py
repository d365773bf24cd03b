"""The CPU's BAR0 access path without the link (vfio_user_dev/platform.py direct path,
device.py unlocked_completer, tee.py T0_SERVED, bar0.py): the same gate, the same refusals
and the same register effects as the general path (PCIe 6.x §11.2.1)."""

from __future__ import annotations

import errno

import pytest

from teeio.device_regs import R
from teeio.tdisp.defs import TdiState
from vfio_user_dev.bar0 import Bar0Registers
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.enforcement import mmio_refusal
from vfio_user_dev.link.interfaces import ROOT_PORT_ID, MmioRequest
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import PciRegion, ProtocolError
from vfio_user_dev.tee import T0_SERVED


def recording_registers() -> tuple[Bar0Registers, list[object]]:
    calls: list[object] = []
    regs = Bar0Registers(irq_count=lambda: 0x1_0000_0007,
                         interrupts_changed=lambda: calls.append("irq"),
                         go=calls.append)
    return regs, calls


@pytest.mark.parametrize("offset", [*(int(r) for r in R), 0x18, 0x1C, 0x100])
@pytest.mark.parametrize("value", [0x0000_0000, 0xFFFF_FFFF, 0x8000_0013])
def test_a_whole_register_access_does_what_the_byte_enable_path_does(offset: int,
                                                                    value: int) -> None:
    fast, fast_calls = recording_registers()
    general, general_calls = recording_registers()
    for regs in (fast, general):
        regs.r[R.INT_STATUS] = 0xF0F0_F0F0
        regs.r[R.STATUS] = 0x5
    fast.write(offset, value.to_bytes(4, "little"))
    general.reg_write(offset, value, 0xFFFF_FFFF)
    assert fast.r == general.r and fast_calls == general_calls
    assert fast.read(offset, 4) == general.reg_read(offset).to_bytes(4, "little")
    assert fast.read(offset, 4) == fast.read(offset, 2) + fast.read(offset + 2, 2)


def test_the_direct_path_serves_only_what_the_completer_serves_unasked() -> None:
    """The platform takes the direct path in CONFIG_UNLOCKED only; there the completer's
    rule serves every T=0 request in the clear, so the direct path has nothing to refuse."""
    assert T0_SERVED == (TdiState.CONFIG_UNLOCKED,)
    for state in TdiState:
        served = all(mmio_refusal(state, False, None, None, access) is None
                     for access in (False, True))
        assert served == (state in T0_SERVED)


@pytest.mark.parametrize("write", [False, True])
def test_the_unlocked_completer_does_what_the_general_one_does(write: bool) -> None:
    direct, general = TeeIoDevice(), TeeIoDevice()
    try:
        assert direct.tdi_state() is TdiState.CONFIG_UNLOCKED
        read, write_reg = direct.unlocked_completer()
        value = b"\x11\x22\x33\x44"
        with direct.lock:
            got = write_reg(int(R.SCRATCH), value) if write else read(int(R.SCRATCH), 4)
        req = MmioRequest(write, ROOT_PORT_ID, general.bar0_address() + R.SCRATCH, 4,
                          value if write else b"")
        expected = general.mmio_request(req)
        assert (b"" if write else got) == expected
        assert direct.r == general.r
        assert direct.refusals.as_dict() == general.refusals.as_dict() == {}
    finally:
        direct.close()
        general.close()


def test_bar0_bounds_are_refused_as_before(machine: Platform) -> None:
    size = machine.device.REGIONS[PciRegion.BAR0].size
    for offset, count in ((size - 2, 4), (size, 1), (-4, 4), (0, 0)):
        with pytest.raises(ProtocolError, match="outside") as exc:
            machine.region_read(PciRegion.BAR0, offset, count)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(ProtocolError, match="outside"):
            machine.region_write(PciRegion.BAR0, offset, b"\0" * count)
    with pytest.raises(ProtocolError, match="not implemented"):
        machine.region_read(5, 0, 4)
    machine.region_write(PciRegion.BAR0, R.SCRATCH, bytearray(b"\x11\x22\x33\x44"))
    assert machine.region_read(PciRegion.BAR0, R.SCRATCH, 4) == b"\x11\x22\x33\x44"
    assert machine.device.r[R.SCRATCH] == 0x44332211
