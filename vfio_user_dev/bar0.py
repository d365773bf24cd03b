"""BAR0 of the function: its register file (the map in ``teeio/device_regs.py``).

BAR0 is TEE MMIO (PCIe 6.x §11.2.1): its accesses reach this file only through the
device's completer, after the TDISP gate (``tee.py``).  32-bit registers, little-endian;
a partial access is applied with byte enables.  Reserved offsets read as zero and ignore
writes, as do the read-only registers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import cast

from teeio import device_regs as regs
from teeio.device_regs import R

#: offset -> register, for every implemented offset (anything else is reserved)
REGISTERS: dict[int, R] = {int(reg): reg for reg in R}
#: the registers a write stores as it is
READ_WRITE = frozenset({R.SCRATCH, R.INT_ENABLE, R.DMA_SRC_LO, R.DMA_SRC_HI, R.DMA_DST_LO,
                        R.DMA_DST_HI, R.DMA_LEN, R.DMA_PATTERN})
#: the registers SCRUB_SECRETS clears (TVM data and the DMA engine's job state, §11.2)
SCRUBBED = (R.SCRATCH, R.STATUS, R.INT_STATUS, R.DMA_SRC_LO, R.DMA_SRC_HI,
            R.DMA_DST_LO, R.DMA_DST_HI, R.DMA_LEN, R.DMA_PATTERN, R.BATCH_DONE)
# Plain ints for the access paths (an int compares and hashes like its register).
_IRQ_COUNT, _INT_ENABLE, _INT_STATUS, _DMA_CMD = (int(r) for r in (
    R.IRQ_COUNT, R.INT_ENABLE, R.INT_STATUS, R.DMA_CMD))
_READ_WRITE = frozenset(int(r) for r in READ_WRITE)
_STORED = _READ_WRITE - {_INT_ENABLE}      # a write stores them, and that is all it does
_U32 = struct.Struct("<I")                  # one register's bytes
_BYTES_LO, _BYTES_HI = int(R.DMA_BYTES_LO), int(R.DMA_BYTES_HI)


class Bar0Registers:
    """The register file.  *irq_count*: IRQ_COUNT's value; *interrupts_changed*: called
    after INT_ENABLE or INT_STATUS changed; *go*: called with the opcode of a DMA_CMD
    write with GO set."""

    def __init__(self, *, irq_count: Callable[[], int], interrupts_changed: Callable[[], None],
                 go: Callable[[int], None]) -> None:
        self.irq_count = irq_count
        self.interrupts_changed = interrupts_changed
        self.go = go
        self.r: dict[R, int] = {}
        #: the same dict, as looked up by offset (a plain int: no IntEnum lookup)
        self.by_offset = cast(dict[int, int], self.r)
        self.reset()

    def reset(self) -> None:
        self.r.update(dict.fromkeys(R, 0))
        self.r[R.ID] = regs.DEVICE_ID_REG_VALUE
        self.r[R.VERSION] = regs.REGMAP_VERSION

    def scrub(self) -> None:
        for reg in SCRUBBED:
            self.r[reg] = 0

    def add_bytes(self, n: int) -> None:
        """DMA_BYTES_HI:LO += *n*."""
        r = self.by_offset
        total = (r[_BYTES_HI] << 32 | r[_BYTES_LO]) + n
        r[_BYTES_LO] = total & 0xFFFFFFFF
        r[_BYTES_HI] = (total >> 32) & 0xFFFFFFFF

    def read(self, offset: int, count: int) -> bytes:
        if count == 4 and not offset & 3:       # one whole register: the common access
            return _U32.pack(self.irq_count() & 0xFFFFFFFF if offset == _IRQ_COUNT
                             else self.by_offset.get(offset, 0))
        out = bytearray()
        for pos in range(offset & ~3, offset + count, 4):
            out += self.reg_read(pos).to_bytes(4, "little")
        start = offset & 3
        return bytes(out[start:start + count])

    def reg_read(self, off: int) -> int:
        if off == _IRQ_COUNT:
            return self.irq_count() & 0xFFFFFFFF
        return self.by_offset.get(off, 0)      # every register is a key; reserved: zero

    def write(self, offset: int, data: bytes) -> None:
        if len(data) == 4 and not offset & 3:      # one whole register: the common access
            if offset in _STORED:
                self.by_offset[offset] = _U32.unpack(data)[0]
            else:
                self.reg_write(offset, _U32.unpack(data)[0], 0xFFFFFFFF)
            return
        end = offset + len(data)
        pos = offset
        while pos < end:
            base = pos & ~3
            cur = bytearray(self.reg_read(base).to_bytes(4, "little"))
            mask = bytearray(4)
            for i in range(4):
                if offset <= base + i < end:
                    cur[i] = data[base + i - offset]
                    mask[i] = 0xFF
            self.reg_write(base, int.from_bytes(cur, "little"), int.from_bytes(mask, "little"))
            pos = base + 4

    def reg_write(self, off: int, value: int, bytemask: int) -> None:
        reg = REGISTERS.get(off)
        if reg is None:
            return                      # reserved: ignores writes
        if off in _READ_WRITE:
            self.r[reg] = value
            if off == _INT_ENABLE:
                self.interrupts_changed()
        elif off == _INT_STATUS:
            self.r[R.INT_STATUS] &= ~(value & bytemask)
            self.interrupts_changed()
        elif off == _DMA_CMD and value & regs.CMD_GO:
            self.go(value & 0xF)
        # the read-only registers ignore writes
