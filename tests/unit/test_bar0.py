"""BAR0's register file (vfio_user_dev/bar0.py): whole-register accesses give what the
same bytes written or read one at a time give (byte enables, PCIe 6.x §2.2.5)."""

from __future__ import annotations

import pytest

from teeio.device_regs import CMD_GO, R
from vfio_user_dev.bar0 import Bar0Registers


class Rig:
    def __init__(self) -> None:
        self.gos: list[int] = []
        self.changed = 0
        self.bar = Bar0Registers(irq_count=lambda: 7, interrupts_changed=self._changed,
                                 go=self.gos.append)

    def _changed(self) -> None:
        self.changed += 1


VALUE = bytes(range(0x81, 0x81 + 16))


@pytest.mark.parametrize("offset,length", [(0x20, 4), (0x20, 8), (0x2C, 8), (0x30, 12),
                                           (0x10, 4), (0x14, 4), (0x38, 4), (0x34, 8),
                                           (0x00, 16), (0x48, 4), (0x4C, 4), (0x18, 8)])
def test_whole_register_writes_match_byte_writes(offset: int, length: int) -> None:
    data = bytearray(VALUE[:length])
    if offset <= R.DMA_CMD < offset + length:                 # make it a GO
        data[R.DMA_CMD - offset + 3] |= CMD_GO >> 24
    whole, bytewise = Rig(), Rig()
    for rig in (whole, bytewise):
        rig.bar.r[R.INT_STATUS] = 0xFF
    whole.bar.write(offset, bytes(data))
    for i, b in enumerate(data):
        bytewise.bar.write(offset + i, bytes([b]))
    assert whole.bar.r == bytewise.bar.r
    assert whole.changed == (bytewise.changed > 0) * len(
        {reg for reg in (R.INT_STATUS, R.INT_ENABLE) if offset <= reg < offset + length})
    if offset <= R.DMA_CMD < offset + length:
        assert whole.gos and whole.gos == [data[R.DMA_CMD - offset] & 0xF]
    assert whole.bar.r[R.ID] == 0x7E10_1234                  # read-only


@pytest.mark.parametrize("offset", [0x00, 0x08, 0x0C, 0x18, 0x48, 0x4C, 0xFFC])
def test_whole_register_reads_match_byte_reads(offset: int) -> None:
    rig = Rig()
    rig.bar.write(R.SCRATCH, b"\x01\x02\x03\x04")
    whole = rig.bar.read(offset, 4)
    assert whole == b"".join(rig.bar.read(offset + i, 1) for i in range(4))
    assert whole == rig.bar.read(offset & ~7, 8)[offset & 7:(offset & 7) + 4]
    if offset == R.IRQ_COUNT:
        assert whole == (7).to_bytes(4, "little")
