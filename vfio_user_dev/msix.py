"""The MSI-X BAR of the function (BAR1; BAR2 behind a 64-bit BAR0): the MSI-X Table and
Pending Bit Array (PCIe 6.x §7.7.2).

The table (16 bytes a vector) is stored as software wrote it, with only the Mask bit of
Vector Control writable (§7.7.2.4) and every vector masked after reset; the PBA is
read-only and reports the IRQ controller's pending MSI-X vectors (§7.7.2.5).  The BAR is
reported IS_NON_TEE_MEM and is not gated by TDISP.
"""

from __future__ import annotations

from collections.abc import Sequence

from vfio_user_dev.config_space import BAR1_SIZE, MSIX_PBA_OFF, MSIX_TABLE_OFF, MSIX_VECTORS

ENTRY_SIZE = 16
VECTOR_CONTROL = 12                 # offset of Vector Control in an entry; bit 0 Mask


class MsixTable:
    def __init__(self, vectors: int = MSIX_VECTORS) -> None:
        self.vectors = vectors
        self.table_end = MSIX_TABLE_OFF + ENTRY_SIZE * vectors
        self.table = bytearray(BAR1_SIZE)
        self.reset()

    def reset(self) -> None:
        self.table[:] = bytes(BAR1_SIZE)
        for v in range(self.vectors):  # vector control: masked after reset (§7.7.2)
            self.table[MSIX_TABLE_OFF + ENTRY_SIZE * v + VECTOR_CONTROL] = 1

    def read(self, offset: int, count: int, pending: Sequence[bool]) -> bytes:
        """BAR1 bytes, the PBA from *pending* (one flag a vector)."""
        pba = 0
        for v, p in enumerate(pending):
            pba |= int(p) << v
        view = bytearray(self.table)
        view[MSIX_PBA_OFF:MSIX_PBA_OFF + 8] = pba.to_bytes(8, "little")
        return bytes(view[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            o = offset + i
            if MSIX_TABLE_OFF <= o < self.table_end:  # the PBA is read-only
                self.table[o] = b & 0x01 if (o - MSIX_TABLE_OFF) % ENTRY_SIZE == VECTOR_CONTROL \
                    else b
