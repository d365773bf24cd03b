"""The CPU's BAR0 access path without the link (vfio_user_dev/platform.py direct path,
device.py mmio_direct, tee.py mmio_t0_allowed, bar0.py): the same gate, the same refusals
and the same register effects as the general path (PCIe 6.x §11.2.1)."""

from __future__ import annotations

import errno
import logging

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


@pytest.mark.parametrize("state", list(TdiState))
def test_the_direct_gate_is_the_completer_rule(state: TdiState, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    served = mmio_refusal(state, False, None, None, False) is None
    assert (state in T0_SERVED) == served
    direct, general = TeeIoDevice(), TeeIoDevice()
    try:
        for dev in (direct, general):
            monkeypatch.setattr(dev, "tdi_state", lambda: state)
        caplog.set_level(logging.INFO, logger="vfio_user_dev.device")
        with direct.lock:
            got = direct.mmio_direct(state, False, int(R.SCRATCH), 4, b"")
        req = MmioRequest(False, ROOT_PORT_ID, general.bar0_address() + R.SCRATCH, 4)
        assert (got is not None) == served == (general.mmio_request(req) is not None)
        assert direct.refusals.as_dict() == general.refusals.as_dict()
        texts = [r.getMessage() for r in caplog.records if "refusal" in r.getMessage()]
        assert len(texts) == (0 if served else 2) and len(set(texts)) <= 1
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
