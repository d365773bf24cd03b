"""The NVMe personality's controller (``vfio_user_dev.nvme``) fed a malicious guest
driver's commands: submission queue entries (admin or I/O), the guest memory they point
at (PRP lists, data, DSM ranges) and register and doorbell writes, after a driver's usual
start (admin queues, Identify, one I/O queue pair).

Contract: every command fetched completes with one of the spec's statuses (§4.6.1) --
Internal Error means an exception no check foresaw -- or is held (an Asynchronous Event
Request); the worker does not hang and stops on close; the registers and the status
still read.  A controller that refuses its own queues (Controller Fatal Status) is an
answer too, when a queue sits where the guest's memory is not.
"""

from __future__ import annotations

import struct
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from fuzz.runner import Bytes, check
from vfio_user_dev.nvme.commands import Command, decode_completion
from vfio_user_dev.nvme.controller import NvmeController
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.spec import (
    CC_EN,
    CSTS_CFS,
    CSTS_RDY,
    DOORBELL_BASE,
    AdminOp,
    IoOp,
    Reg,
    Status,
)

KIND = "responder"
MEMORY = 1 << 20                # guest memory (bus addresses 0 .. 1 MiB)
ASQ, ACQ, IOSQ, IOCQ = 0x1000, 0x2000, 0x3000, 0x4000
DATA = 0x10000                  # what the input writes into guest memory, and buffers
QSIZE = 16
MAX_COMMANDS = QSIZE - 1
SETTLE = 2.0                    # seconds for the worker to take every command (a hang)
BLOCKS = 256                    # a 128 KiB namespace


class Bus:
    """Guest memory as a bytearray: DMA outside it is refused (as the link would)."""

    def __init__(self) -> None:
        self.mem = bytearray(MEMORY)

    def begin_command(self) -> None:
        pass

    def dma_read(self, address: int, length: int) -> bytes:
        if address < 0 or length < 0 or address + length > MEMORY:
            raise OSError(f"DMA read {address:#x}+{length} outside guest memory")
        return bytes(self.mem[address:address + length])

    def dma_write(self, address: int, data: bytes) -> None:
        if address < 0 or address + len(data) > MEMORY:
            raise OSError(f"DMA write {address:#x}+{len(data)} outside guest memory")
        self.mem[address:address + len(data)] = data

    def interrupt(self, vector: int) -> None:
        pass

    def msix_enabled(self) -> bool:
        return True

    def set_intx(self, level: bool) -> None:
        pass


@lru_cache(maxsize=1)
def namespace() -> Namespace:
    return Namespace(Path(tempfile.mkdtemp(prefix="fuzz-nvme-")) / "ns.img", BLOCKS * 512)


class Driver:
    """A guest driver's view: registers, queues in guest memory, completions."""

    def __init__(self) -> None:
        self.bus = Bus()
        self.ctl = NvmeController(self.bus, namespace())
        self.tails = {0: 0, 1: 0}
        self.heads = {0: 0, 1: 0}
        self.phases = {0: 1, 1: 1}

    def w32(self, reg: int, value: int) -> None:
        self.ctl.write(reg, struct.pack("<I", value))

    def start(self) -> None:
        """Admin queues, enable, then an I/O CQ/SQ pair (qid 1), as Linux's driver does."""
        self.w32(Reg.AQA, (QSIZE - 1) << 16 | (QSIZE - 1))
        self.ctl.write(Reg.ASQ, struct.pack("<Q", ASQ))
        self.ctl.write(Reg.ACQ, struct.pack("<Q", ACQ))
        self.w32(Reg.CC, CC_EN | 6 << 16 | 4 << 20)
        check(bool(self.csts() & CSTS_RDY), "CSTS.RDY not set after CC.EN")
        self.submit(0, [Command(AdminOp.CREATE_IO_CQ, 0, 1, 0, 0, IOCQ, 0,
                                (QSIZE - 1) << 16 | 1, 1 << 16 | 0b11, 0, 0, 0, 0).encode(),
                        Command(AdminOp.CREATE_IO_SQ, 0, 2, 0, 0, IOSQ, 0,
                                (QSIZE - 1) << 16 | 1, 1 << 16 | 0b1, 0, 0, 0, 0).encode()])
        done = self.reap(0)
        check([st for _, st in done] == [0, 0], f"I/O queue pair not created: {done}")

    def csts(self) -> int:
        return int.from_bytes(self.ctl.read(Reg.CSTS, 4), "little")

    def submit(self, qid: int, entries: list[bytes]) -> None:
        base = ASQ if qid == 0 else IOSQ
        for raw in entries:
            at = base + 64 * self.tails[qid]
            self.bus.mem[at:at + 64] = raw
            self.tails[qid] = (self.tails[qid] + 1) % QSIZE
        self.ctl.write(DOORBELL_BASE + 8 * qid, struct.pack("<I", self.tails[qid]))
        deadline = time.monotonic() + SETTLE
        while self.busy():
            check(time.monotonic() < deadline, f"commands still waiting after {SETTLE} s")
            time.sleep(0.0002)

    def busy(self) -> bool:
        """Whether the worker has a command it can take (§4.1: an SQ entry and room in its
        CQ, the controller ready): what it is processing completes before close()."""
        ctl = self.ctl
        with ctl._lock:
            if not ctl.csts & CSTS_RDY or ctl.csts & CSTS_CFS:
                return False
            return any(not sq.empty() and (cq := ctl.cqs.get(sq.cqid)) is not None
                       and not cq.full() for sq in ctl.sqs.values())

    def reap(self, qid: int) -> list[tuple[int, int]]:
        """(cid, status) of the completions posted on CQ *qid* since the last reap; the
        head doorbell tells the controller."""
        base, out = ACQ if qid == 0 else IOCQ, []
        while True:
            _, _, _, cid, phase, status = decode_completion(
                self.bus.dma_read(base + 16 * self.heads[qid], 16))
            if phase != self.phases[qid]:
                break
            out.append((cid, status))
            self.heads[qid] = (self.heads[qid] + 1) % QSIZE
            if self.heads[qid] == 0:
                self.phases[qid] ^= 1
        if out and qid in self.ctl.cqs:
            self.ctl.write(DOORBELL_BASE + 8 * qid + 4, struct.pack("<I", self.heads[qid]))
        return out


def sqe(op: int, cid: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
        cdw: tuple[int, ...] = ()) -> bytes:
    d = (*cdw, 0, 0, 0, 0, 0, 0)[:6]
    return Command(op, 0, cid, nsid, 0, prp1, prp2, *d).encode()


def seeds() -> list[bytes]:
    prp_list = struct.pack("<QQ", DATA + 0x2000, DATA + 0x3000)
    admin = [sqe(AdminOp.IDENTIFY, 9, prp1=DATA, cdw=(1,)),
             sqe(AdminOp.IDENTIFY, 10, nsid=1, prp1=DATA, cdw=(0,)),
             sqe(AdminOp.GET_FEATURES, 11, cdw=(7,)),
             sqe(AdminOp.SET_FEATURES, 12, cdw=(7, 0x0001_0001)),
             sqe(AdminOp.GET_LOG_PAGE, 13, prp1=DATA, cdw=(0x00FF_0002,)),
             sqe(AdminOp.ASYNC_EVENT_REQUEST, 14),
             sqe(AdminOp.ABORT, 15, cdw=(1 << 16 | 1,)),
             sqe(AdminOp.DELETE_IO_SQ, 16, cdw=(1,))]
    io = [sqe(IoOp.WRITE, 1, nsid=1, prp1=DATA + 0x1000, prp2=DATA, cdw=(0, 0, 23)),
          sqe(IoOp.READ, 2, nsid=1, prp1=DATA + 0x1000, prp2=DATA, cdw=(0, 0, 23)),
          sqe(IoOp.WRITE, 3, nsid=1, prp1=DATA + 0x1000, prp2=DATA + 0x2000, cdw=(8, 0, 15)),
          sqe(IoOp.FLUSH, 4, nsid=1),
          sqe(IoOp.WRITE_ZEROES, 5, nsid=1, cdw=(16, 0, 7)),
          sqe(IoOp.DATASET_MANAGEMENT, 6, nsid=1, prp1=DATA, cdw=(0, 1 << 2))]
    mem = prp_list
    return [bytes([0]) + frame(mem) + b"".join(admin),
            bytes([1]) + frame(mem) + b"".join(io),
            bytes([1]) + frame(struct.pack("<IIQ", 0, 8, 4)) + io[-1],
            bytes([3]) + frame(b"") + struct.pack("<HI", DOORBELL_BASE + 8, 3) + b"".join(io[:3])]


def frame(part: bytes) -> bytes:
    return len(part).to_bytes(2, "little") + part


def one_input(data: bytes) -> None:
    if not data:
        return
    b = Bytes(data)
    sel = b.u8()
    qid = sel & 1
    drv = Driver()
    try:
        drv.start()
        drv.bus.mem[DATA:DATA + 0x8000] = b.chunk()[:0x8000].ljust(0x8000, b"\0")
        if sel & 2:             # a register or doorbell write first, as the guest likes
            reg, value = b.u16(), b.u32()
            drv.ctl.write(reg % (DOORBELL_BASE + 0x100) & ~3, struct.pack("<I", value))
        entries: list[bytes] = []
        while b.left and len(entries) < MAX_COMMANDS:
            entries.append(b.take(64).ljust(64, b"\0"))
        if drv.csts() & CSTS_RDY and not drv.csts() & CSTS_CFS and entries:
            sq = drv.ctl.sqs.get(qid)
            if sq is not None and sq.size == QSIZE and sq.base == (ASQ if qid == 0 else IOSQ):
                drv.submit(qid, entries)
        drv.ctl.read(Reg.CSTS, 4)
        drv.ctl.status()
    finally:
        drv.ctl.close()     # after the command it is processing, if any
    check(not drv.ctl._worker.is_alive(), "the controller's worker did not stop")
    for q in (0, 1):
        for cid, status in drv.reap(q):
            check(status != Status.INTERNAL_ERROR, f"command {cid} on queue {q}: Internal "
                                                   "Error (an exception no check foresaw)")
