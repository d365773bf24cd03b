"""A minimal NVMe host driver, for driving the controller without a VM: through any
register accessor (the controller itself, a vfio-user client's BAR0 region, the
platform's MMIO path) and any guest-memory accessor (a fake bus, a memfd)."""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from vfio_user_dev.nvme.commands import Command, decode_completion
from vfio_user_dev.nvme.controller import NvmeController
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.spec import CC_EN, DOORBELL_BASE, PAGE, Reg


class Registers(Protocol):
    """BAR0 as the host reaches it."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class Memory(Protocol):
    """Guest memory as the host reaches it (by bus address)."""

    def read(self, address: int, length: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


class MemfdMemory:
    """Guest memory in a memfd mapped at bus address *base* (as QEMU passes it)."""

    def __init__(self, fd: int, base: int) -> None:
        self.fd, self.base = fd, base

    def read(self, address: int, length: int) -> bytes:
        return os.pread(self.fd, length, address - self.base)

    def write(self, address: int, data: bytes) -> None:
        os.pwrite(self.fd, data, address - self.base)


class FakeBus:
    """Guest memory as a bytearray; records interrupts; can refuse DMA."""

    def __init__(self, size: int = 4 << 20) -> None:
        self.mem = bytearray(size)
        self.msix = True
        self.vectors: list[int] = []
        self.intx = False
        self.refuse = False
        self.reads = 0
        self.commands = 0
        self.event = threading.Event()

    def begin_command(self) -> None:
        self.commands += 1

    def dma_read(self, address: int, length: int) -> bytes:
        if self.refuse or address + length > len(self.mem):
            raise OSError(f"DMA read {address:#x}+{length} refused")
        self.reads += 1
        return bytes(self.mem[address:address + length])

    def dma_write(self, address: int, data: bytes) -> None:
        if self.refuse or address + len(data) > len(self.mem):
            raise OSError(f"DMA write {address:#x}+{len(data)} refused")
        self.mem[address:address + len(data)] = data

    def read(self, address: int, length: int) -> bytes:
        """The host's own access to memory (never refused)."""
        return bytes(self.mem[address:address + length])

    def write(self, address: int, data: bytes) -> None:
        self.mem[address:address + len(data)] = data

    def interrupt(self, vector: int) -> None:
        self.vectors.append(vector)
        self.event.set()

    def msix_enabled(self) -> bool:
        return self.msix

    def set_intx(self, level: bool) -> None:
        self.intx = level
        if level:
            self.event.set()


@dataclass
class HostQueue:
    qid: int
    sq_base: int
    cq_base: int
    size: int
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    next_cid: int = 0
    done: dict[int, tuple[int, int, int]] = field(default_factory=dict)


ASQ, ACQ = 0x10000, 0x20000
DATA = 0x100000          # where tests put buffers


@dataclass(frozen=True)
class Layout:
    """Where the host puts its queues and buffers, relative to its memory's base; every
    queue page-aligned (CC.MPS = 0)."""

    asq: int = ASQ
    acq: int = ACQ
    data: int = DATA
    io_base: int = 0x50000          # I/O SQ n at io_base + io_stride * (n - 1)
    io_stride: int = 0x10000
    cq_offset: int = 0x8000         # its CQ this far above it


#: Everything within 32 KiB at 0x8000: what fits one trusted-DMA window
COMPACT = Layout(asq=0x8000, acq=0x9000, data=0xC000, io_base=0xA000, io_stride=0x2000,
                 cq_offset=0x1000)


class Host:
    def __init__(self, ctl: Registers, bus: Memory, admin_size: int = 8, *, base: int = 0,
                 layout: Layout = Layout()) -> None:
        self.ctl, self.bus = ctl, bus
        self.base, self.layout = base, layout
        self.data = base + layout.data
        self.queues: dict[int, HostQueue] = {}
        self.admin = HostQueue(0, base + layout.asq, base + layout.acq, admin_size)
        self.queues[0] = self.admin

    def w32(self, reg: int, value: int) -> None:
        self.ctl.write(reg, value.to_bytes(4, "little"))

    def r32(self, reg: int) -> int:
        return int.from_bytes(self.ctl.read(reg, 4), "little")

    def enable(self) -> None:
        self.w32(Reg.AQA, (self.admin.size - 1) << 16 | (self.admin.size - 1))
        self.ctl.write(Reg.ASQ, self.admin.sq_base.to_bytes(8, "little"))
        self.ctl.write(Reg.ACQ, self.admin.cq_base.to_bytes(8, "little"))
        self.w32(Reg.CC, CC_EN | 6 << 16 | 4 << 20)
        deadline = time.monotonic() + 5
        while not self.r32(Reg.CSTS) & 1:
            assert time.monotonic() < deadline, "CSTS.RDY never set"
            time.sleep(0.001)

    def submit(self, q: HostQueue, opcode: int, *, nsid: int = 0, prp1: int = 0,
               prp2: int = 0, cdw: tuple[int, ...] = (), flags: int = 0,
               ring: bool = True) -> int:
        cid = q.next_cid
        q.next_cid = (q.next_cid + 1) & 0xFFFF
        d = (*cdw, 0, 0, 0, 0, 0, 0)[:6]
        raw = Command(opcode, flags, cid, nsid, 0, prp1, prp2, *d).encode()
        self.bus.write(q.sq_base + 64 * q.sq_tail, raw)
        q.sq_tail = (q.sq_tail + 1) % q.size
        if ring:
            self.ring(q)
        return cid

    def ring(self, q: HostQueue) -> None:
        self.ctl.write(DOORBELL_BASE + 8 * q.qid, q.sq_tail.to_bytes(4, "little"))

    def reap(self, q: HostQueue) -> int:
        n = 0
        while True:
            dw0, _head, _sqid, cid, phase, status = decode_completion(
                self.bus.read(q.cq_base + 16 * q.cq_head, 16))
            if phase != q.phase:
                break
            q.done[cid] = (status, dw0, _head)
            q.cq_head = (q.cq_head + 1) % q.size
            if q.cq_head == 0:
                q.phase ^= 1
            n += 1
        if n:
            self.ctl.write(DOORBELL_BASE + 8 * q.qid + 4, q.cq_head.to_bytes(4, "little"))
        return n

    def wait(self, q: HostQueue, cid: int, timeout: float = 5.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while cid not in q.done:
            self.reap(q)
            if cid in q.done:
                break
            assert time.monotonic() < deadline, f"no completion for cid {cid} on Q{q.qid}"
            time.sleep(0.0005)
        status, dw0, _ = q.done.pop(cid)
        return status, dw0

    def call(self, q: HostQueue, opcode: int, **kw: object) -> tuple[int, int]:
        return self.wait(q, self.submit(q, opcode, **kw))  # type: ignore[arg-type]

    def create_io_queue(self, qid: int, size: int, vector: int = 1) -> HostQueue:
        sq_base = self.base + self.layout.io_base + self.layout.io_stride * (qid - 1)
        cq_base = sq_base + self.layout.cq_offset
        st, _ = self.call(self.admin, 0x05, prp1=cq_base,
                          cdw=((size - 1) << 16 | qid, vector << 16 | 3))
        assert st == 0, f"create CQ {qid}: {st:#x}"
        st, _ = self.call(self.admin, 0x01, prp1=sq_base,
                          cdw=((size - 1) << 16 | qid, qid << 16 | 1))
        assert st == 0, f"create SQ {qid}: {st:#x}"
        q = HostQueue(qid, sq_base, cq_base, size)
        self.queues[qid] = q
        return q


def prp_list(bus: Memory, at: int, pages: list[int]) -> None:
    bus.write(at, b"".join(struct.pack("<Q", p) for p in pages))


def make_controller(tmp_path: object, blocks: int = 4096) -> tuple[NvmeController, FakeBus,
                                                                    Namespace]:
    from pathlib import Path
    bus = FakeBus()
    ns = Namespace(Path(str(tmp_path)) / "ns.img", blocks * 512)
    return NvmeController(bus, ns), bus, ns


__all__ = ["COMPACT", "DATA", "PAGE", "FakeBus", "Host", "HostQueue", "Layout", "MemfdMemory",
           "Memory", "Registers", "make_controller", "prp_list"]
