"""The DMA engine's BATCH (``vfio_user_dev.dma_engine``) fed a malicious guest driver's
descriptor lists: the list's bytes in guest memory, the length written to DMA_LEN, Bus
Master on or off, and the link clear or watched (a tap that never fires makes every
transfer a TLP instead of one memmove).

Contract: the batch ends (STATUS no longer BUSY within :data:`SETTLE` seconds) with
DONE or one of the register map's error codes, never INTERNAL (an exception no check
foresaw); BATCH_DONE is never more than the descriptors in the list; the device still
answers a register write and read after it.  (The list's bytes past the input are zero.)
"""

from __future__ import annotations

import fcntl
import os
import threading

from fuzz.runner import Bytes, check
from teeio.device_regs import (
    CMD_GO,
    DESCRIPTOR_SIZE,
    MAX_BATCH,
    DmaError,
    Op,
    R,
    St,
    descriptor,
)
from teeio.pcie.config import Command, Reg
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import DmaFlags, PciRegion

KIND = "responder"
GUEST = 0x1_0000_0000
MEMORY = 1 << 20                # guest memory: GUEST .. GUEST + 1 MiB, one sealed memfd
LIST = 0xF0000                  # where the input's descriptor list goes
SETTLE = 5.0                    # seconds for a batch to end (a hang)


def _bar0_write(plat: Platform, reg: int, value: int) -> None:
    plat.region_write(PciRegion.BAR0, reg, (value & 0xFFFFFFFF).to_bytes(4, "little"))


def _bar0_read(plat: Platform, reg: int) -> int:
    return int.from_bytes(plat.region_read(PciRegion.BAR0, reg, 4), "little")


def seeds() -> list[bytes]:
    g = GUEST
    lists = [
        descriptor(Op.COPY, g, g + 0x1000, 0x1000) + descriptor(Op.FILL, 0, g + 0x2000, 64, 7),
        descriptor(Op.SHA256, g, g + 0x3000, 0x800) + descriptor(Op.COPY, g, g + 0x10, 9),
        descriptor(Op.FILL, 0, g, 4, 1) * MAX_BATCH,
        descriptor(Op.COPY, g, g + 0x80000, 0x80000),
        descriptor(Op.BATCH, g + LIST, 0, 32),
    ]
    out = []
    for i, table in enumerate(lists):
        sel = (i & 1) << 1 | 1          # Bus Master on; every other seed on a watched link
        out.append(bytes([sel]) + len(table).to_bytes(2, "little") + table)
    return out


def one_input(data: bytes) -> None:
    if not data:
        return
    b = Bytes(data)
    sel, length = b.u8(), b.u16()
    table = b.take(MAX_BATCH * DESCRIPTOR_SIZE + DESCRIPTOR_SIZE)
    plat = Platform()
    fd = os.memfd_create("fuzz-dma-batch", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, MEMORY)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        os.pwrite(fd, table, LIST)
        plat.dma.map(GUEST, MEMORY, DmaFlags.READ | DmaFlags.WRITE, 0, os.dup(fd))
        command = int(Command.MEMORY_SPACE) | (int(Command.BUS_MASTER) if sel & 1 else 0)
        plat.region_write(PciRegion.CONFIG, Reg.COMMAND, command.to_bytes(2, "little"))
        if sel & 2:
            plat.link.inject(Fault(FaultKind.DROP, nth=1 << 30))     # watched, never fires
        for reg, value in ((R.DMA_SRC_LO, GUEST + LIST), (R.DMA_SRC_HI, (GUEST + LIST) >> 32),
                           (R.DMA_LEN, length)):
            _bar0_write(plat, reg, value)            # the low word: masked to 32 bits
        ended = threading.Event()           # the engine calls listeners after each job
        plat.device.listeners.append(lambda _dev: ended.set())
        _bar0_write(plat, R.DMA_CMD, CMD_GO | Op.BATCH)
        ended.wait(SETTLE)
        status = _bar0_read(plat, R.STATUS)
        check(not status & St.BUSY, f"BATCH still BUSY after {SETTLE} s")
        check(bool(status & (St.DONE | St.ERROR)), f"BATCH ended with STATUS {status:#x}")
        code = status >> 8 & 0xFF
        check(code != DmaError.INTERNAL, "BATCH: INTERNAL error (an exception no check "
                                         "foresaw)")
        done = _bar0_read(plat, R.BATCH_DONE)
        check(done <= min(MAX_BATCH, length // DESCRIPTOR_SIZE),
              f"BATCH_DONE {done} for DMA_LEN {length}")
        _bar0_write(plat, R.SCRATCH, 0x5A5A_A5A5)
        check(_bar0_read(plat, R.SCRATCH) == 0x5A5A_A5A5, "SCRATCH no longer reads back")
    finally:
        plat.close()
        plat.dma.clear()
        os.close(fd)
