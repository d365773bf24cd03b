"""BAR0 register map of the emulated TEE-IO device (4 KiB, 32-bit registers, LE).

::

    0x000 ID           RO   0x7E10_1234  (device ID << 16 | vendor ID)
    0x004 VERSION      RO   0x0001_0000  (major.minor of this register map)
    0x008 SCRATCH      RW   any value; reads back what was written
    0x00C STATUS       RO   bit0 BUSY  bit1 DONE  bit2 ERROR  bits 15:8 ERROR_CODE
    0x010 INT_STATUS   RW1C bit0 DMA_DONE  bit1 DMA_ERROR     (INTx level = STATUS & ENABLE)
    0x014 INT_ENABLE   RW   bit0 DMA_DONE  bit1 DMA_ERROR
    0x018 (reserved)
    0x020 DMA_SRC_LO   RW   source bus address, bits 31:0
    0x024 DMA_SRC_HI   RW   source bus address, bits 63:32
    0x028 DMA_DST_LO   RW   destination bus address, bits 31:0
    0x02C DMA_DST_HI   RW   destination bus address, bits 63:32
    0x030 DMA_LEN      RW   bytes (1 .. 1 MiB)
    0x034 DMA_PATTERN  RW   32-bit fill pattern (FILL), repeated little-endian
    0x038 DMA_CMD      WO   bits 3:0 opcode, bit 31 GO (write with GO starts the job)
    0x03C DMA_JOBS     RO   jobs completed since reset
    0x040 DMA_BYTES_LO RO   bytes moved (read+written) since reset, bits 31:0
    0x044 DMA_BYTES_HI RO   ... bits 63:32
    0x048 IRQ_COUNT    RO   interrupts signalled since reset
    0x04C BATCH_DONE   RO   descriptors the last BATCH completed (all of them, or the
                            index of the one that failed)

    opcodes: 1 COPY  (SRC -> DST, LEN bytes)
             2 FILL  (PATTERN -> DST, LEN bytes)
             3 SHA256 (hash of SRC[0:LEN] -> DST, 32 bytes)
             4 BATCH (SRC: a list of LEN / 32 descriptors, 1 .. 64, run in order)

    descriptor (32 bytes, little-endian), one COPY, FILL or SHA256 job:
      +0x00 u32 opcode  +0x04 u32 length  +0x08 u64 source  +0x10 u64 destination
      +0x18 u32 pattern +0x1C u32 reserved, zero

A job runs asynchronously in the device's engine: STATUS.BUSY is set while it
runs; on completion DONE (or ERROR with a code) is set, INT_STATUS gets DMA_DONE
(or DMA_ERROR), and if enabled in INT_ENABLE an interrupt is raised: MSI-X
vector 0 when the client configured it, INTx otherwise.

A BATCH reads its descriptor list from memory (one DMA read, gated like the job's own
requests), then runs the descriptors one after the other as if each had its own GO,
with one completion and one interrupt for all of them: it is how a driver keeps the
engine busy without a register round trip and an interrupt per transfer (as Intel DSA's
Batch descriptor does).  The first descriptor that fails stops the batch: STATUS has its
error code and BATCH_DONE its index; the ones before it took effect.  A descriptor with a
BATCH opcode, or a non-zero reserved field, is BAD_OPCODE.  DMA_JOBS counts a batch as
one job; DMA_BYTES counts the list read and every descriptor's bytes.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

BAR0_SIZE = 4096
DEVICE_ID_REG_VALUE = 0x7E10_1234
REGMAP_VERSION = 0x0001_0001     # 1.1: BATCH and BATCH_DONE
MAX_DMA_LEN = 1 << 20
#: BATCH: bytes per descriptor, and descriptors per batch at most
DESCRIPTOR_SIZE = 32
MAX_BATCH = 64


class R(IntEnum):
    ID = 0x000
    VERSION = 0x004
    SCRATCH = 0x008
    STATUS = 0x00C
    INT_STATUS = 0x010
    INT_ENABLE = 0x014
    DMA_SRC_LO = 0x020
    DMA_SRC_HI = 0x024
    DMA_DST_LO = 0x028
    DMA_DST_HI = 0x02C
    DMA_LEN = 0x030
    DMA_PATTERN = 0x034
    DMA_CMD = 0x038
    DMA_JOBS = 0x03C
    DMA_BYTES_LO = 0x040
    DMA_BYTES_HI = 0x044
    IRQ_COUNT = 0x048
    BATCH_DONE = 0x04C


class St(IntFlag):
    BUSY = 1 << 0
    DONE = 1 << 1
    ERROR = 1 << 2


class Irq(IntFlag):
    DMA_DONE = 1 << 0
    DMA_ERROR = 1 << 1


class Op(IntEnum):
    COPY = 1
    FILL = 2
    SHA256 = 3
    BATCH = 4


CMD_GO = 1 << 31


class DmaError(IntEnum):
    """STATUS.ERROR_CODE values."""

    NONE = 0
    BAD_OPCODE = 1
    BAD_LENGTH = 2
    FAULT = 3          # an address outside every DMA map (or not read/writable)
    BUS_MASTER_OFF = 4  # Command.Bus Master Enable clear
    BUSY = 5           # GO while a job was running
    INTERNAL = 6       # an emulator bug (logged with its traceback); the device keeps serving


#: one BATCH descriptor: opcode, length, source, destination, pattern, reserved
DESCRIPTOR = struct.Struct("<IIQQII")


def descriptor(op: int, src: int, dst: int, length: int, pattern: int = 0) -> bytes:
    """One BATCH descriptor's 32 bytes."""
    return DESCRIPTOR.pack(op, length, src, dst, pattern, 0)
