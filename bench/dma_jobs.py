"""DMA jobs as a guest driver programs them (BAR0 registers, STATUS polled), the guest
memory they run in (a sealed memfd passed with DMA_MAP, as QEMU passes guest RAM), and the
engine points ``bench.bench_backends`` compares across transports (COPY 4 KiB-1 MiB, FILL
and SHA-256 at 1 MiB, each beside an in-process baseline).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
from collections.abc import Callable, Iterator
from typing import TypedDict

from bench.common import Settings, mbps, timed_loop
from teeio.device_regs import CMD_GO, Op, R, St
from vfio_user_dev.client import Client
from vfio_user_dev.protocol import PciRegion

KiB = 1 << 10
MiB = 1 << 20
BAR0 = int(PciRegion.BAR0)
CONFIG = int(PciRegion.CONFIG)
PCI_COMMAND = 0x04
COMMAND_MEMORY_BUS_MASTER = 0x6

GUEST_BASE = 0x1_0000_0000   # above 4 GiB, so the *_HI address registers matter
GUEST_SIZE = 8 * MiB
SRC_OFF = 0
DST_OFF = 4 * MiB
COPY_SIZES = (4 * KiB, 64 * KiB, 1 * MiB)
FILL_PATTERN = 0xA5C3_0F5A
POLL_LIMIT = 1_000_000       # STATUS reads before a job is declared stuck


class DmaResult(TypedDict):
    op: str
    size: int
    engine_MBps: float
    memcpy_MBps: float
    baseline: str
    baseline_MBps: float
    ratio: float
    engine_reps: int
    baseline_reps: int
    engine_us_per_job: float
    polls_per_job: float



class DmaDriver:
    """Programs jobs through BAR0 like a guest driver would, polling STATUS.  *posted*:
    the register writes go as QEMU's vfio-user client sends a guest's BAR writes by
    default (no reply awaited; ``x-no-posted-writes=on`` makes each wait for one)."""

    def __init__(self, c: Client, posted: bool = False) -> None:
        self.c = c
        self.posted = posted
        self.polls = 0
        self.jobs = 0

    def run(self, op: Op, src: int, dst: int, length: int, pattern: int = 0) -> None:
        c, posted = self.c, self.posted
        c.write32(BAR0, R.DMA_SRC_LO, src & 0xFFFF_FFFF, posted)
        c.write32(BAR0, R.DMA_SRC_HI, src >> 32, posted)
        c.write32(BAR0, R.DMA_DST_LO, dst & 0xFFFF_FFFF, posted)
        c.write32(BAR0, R.DMA_DST_HI, dst >> 32, posted)
        c.write32(BAR0, R.DMA_LEN, length, posted)
        if op == Op.FILL:
            c.write32(BAR0, R.DMA_PATTERN, pattern, posted)
        c.write32(BAR0, R.DMA_CMD, CMD_GO | int(op), posted)
        for _ in range(POLL_LIMIT):
            status = c.read32(BAR0, R.STATUS)
            self.polls += 1
            if not status & St.BUSY:
                break
        else:
            raise RuntimeError(f"DMA {op.name} still BUSY after {POLL_LIMIT} polls")
        if status & St.ERROR or not status & St.DONE:
            raise RuntimeError(f"DMA {op.name} {length} bytes: STATUS {status:#x}")
        self.jobs += 1


def _engine_point(drv: DmaDriver, job: Callable[[], None],
                  s: Settings) -> tuple[int, int, float]:
    polls0, jobs0 = drv.polls, drv.jobs
    reps, ns = timed_loop(job, s)
    jobs = drv.jobs - jobs0
    return reps, ns, (drv.polls - polls0) / jobs if jobs else 0.0


def _result(op: Op, size: int, engine: tuple[int, int, float], memcpy_MBps: float,
            baseline: str, base: tuple[int, int]) -> DmaResult:
    e_reps, e_ns, polls = engine
    b_reps, b_ns = base
    e = mbps(size * e_reps, e_ns)
    b = mbps(size * b_reps, b_ns)
    return DmaResult(op=op.name, size=size, engine_MBps=round(e, 2),
                     memcpy_MBps=round(memcpy_MBps, 2), baseline=baseline,
                     baseline_MBps=round(b, 2), ratio=round(e / b, 5) if b else 0.0,
                     engine_reps=e_reps, baseline_reps=b_reps,
                     engine_us_per_job=round(e_ns / 1000 / e_reps, 3),
                     polls_per_job=round(polls, 2))


@contextlib.contextmanager
def guest_memory(c: Client, size: int = GUEST_SIZE) -> Iterator[mmap.mmap]:
    """*size* bytes of guest memory at GUEST_BASE: a memfd sealed against resizing (as
    QEMU's memory-backend-memfd passes guest RAM), passed with DMA_MAP and mapped here
    too; the function's Memory Space and Bus Master enabled."""
    fd = os.memfd_create("teeio-bench-guest", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            # The server closes the fd it receives; ours stays open for the local mmap.
            c.dma_map(GUEST_BASE, size, fd=fd)
            c.write32(CONFIG, PCI_COMMAND, COMMAND_MEMORY_BUS_MASTER)
            yield mm
    finally:
        os.close(fd)


def bench_dma(c: Client, s: Settings) -> list[DmaResult]:
    with guest_memory(c) as mm:
        mm[SRC_OFF:SRC_OFF + MiB] = os.urandom(MiB)
        return _dma_points(c, mm, s)


def _dma_points(c: Client, mm: mmap.mmap, s: Settings) -> list[DmaResult]:
    drv = DmaDriver(c)
    src, dst = GUEST_BASE + SRC_OFF, GUEST_BASE + DST_OFF
    out: list[DmaResult] = []
    memcpy_at: dict[int, float] = {}

    for size in COPY_SIZES:
        # Correctness first (this also warms the path up).
        mm[DST_OFF:DST_OFF + size] = bytes(size)
        drv.run(Op.COPY, src, dst, size)
        if mm[DST_OFF:DST_OFF + size] != mm[SRC_OFF:SRC_OFF + size]:
            raise RuntimeError(f"COPY of {size} bytes: destination differs")

        def copy_job(n: int = size) -> None:
            drv.run(Op.COPY, src, dst, n)

        def memcpy(n: int = size) -> None:
            mm[DST_OFF:DST_OFF + n] = mm[SRC_OFF:SRC_OFF + n]

        engine = _engine_point(drv, copy_job, s)
        base = timed_loop(memcpy, s)
        memcpy_at[size] = mbps(size * base[0], base[1])
        out.append(_result(Op.COPY, size, engine, memcpy_at[size], "memcpy", base))

    size = MiB
    drv.run(Op.FILL, src, dst, size, FILL_PATTERN)
    if mm[DST_OFF:DST_OFF + size] != FILL_PATTERN.to_bytes(4, "little") * (size // 4):
        raise RuntimeError("FILL: destination differs")

    def fill_job() -> None:
        drv.run(Op.FILL, src, dst, size, FILL_PATTERN)

    def memcpy_1m() -> None:
        mm[DST_OFF:DST_OFF + size] = mm[SRC_OFF:SRC_OFF + size]

    engine = _engine_point(drv, fill_job, s)
    base = timed_loop(memcpy_1m, s)  # the memcpy beside this point, measured again
    out.append(_result(Op.FILL, size, engine, memcpy_at[size], "memcpy", base))

    drv.run(Op.SHA256, src, dst, size)
    if mm[DST_OFF:DST_OFF + 32] != hashlib.sha256(mm[SRC_OFF:SRC_OFF + size]).digest():
        raise RuntimeError("SHA256: wrong digest")

    def sha_job() -> None:
        drv.run(Op.SHA256, src, dst, size)

    def sha_local() -> None:
        hashlib.sha256(mm[SRC_OFF:SRC_OFF + size]).digest()

    engine = _engine_point(drv, sha_job, s)
    base = timed_loop(sha_local, s)
    out.append(_result(Op.SHA256, size, engine, memcpy_at[size], "hashlib.sha256", base))
    return out

