"""Benchmark: vfio-user region-access latency and DMA engine throughput, in one process.

Run as ``python -m bench.bench [--out FILE] [--quick] [--iterations N] [--cpu C]``.

A :class:`~vfio_user_dev.server.Server` runs in a thread of this process and the
in-process :class:`~vfio_user_dev.client.Client` talks to it over a UNIX socket.
Every thread of the process (client, server, DMA engine) is pinned to one CPU,
so a round trip includes the thread switches a single core forces.  Measured:

* REGION_READ / REGION_WRITE round trips on BAR0 SCRATCH (median, p10, p90 in us);
  posted writes (No_reply) as total time / N, fenced by one read at the end;
* DMA engine COPY at 4 KiB, 64 KiB and 1 MiB against an in-process memcpy of the
  same size between two regions of the same memfd, and FILL and SHA256 at 1 MiB
  (SHA256 against ``hashlib.sha256`` in-process).

The result is printed as JSON and, with ``--out``, written to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import gc
import hashlib
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, Self, TypedDict

from teeio.device_regs import CMD_GO, Op, R, St
from vfio_user_dev.client import Client
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import PciRegion
from vfio_user_dev.server import Server

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


# -- result types -----------------------------------------------------------------------------
class LatencyStats(TypedDict):
    n: int
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float


class PostedStats(TypedDict):
    n: int
    total_us: float
    per_op_us: float
    fence: str


class RegionAccess(TypedDict):
    register: str
    region: int
    warmup: int
    read: LatencyStats
    write: LatencyStats
    write_posted: PostedStats


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


class HostMeta(TypedDict):
    """Where and how a benchmark ran: shared by every benchmark's meta."""

    python: str
    implementation: str
    platform: str
    machine: str
    cpu_count: int | None
    cpu_pinned: int | None
    affinity_before: list[int]
    threads_pinned: int
    affinity_verified: bool


def host_meta(cpu: int | None, before: list[int], threads_pinned: int,
              verified: bool) -> HostMeta:
    return HostMeta(
        python=sys.version.split()[0], implementation=platform.python_implementation(),
        platform=platform.platform(), machine=platform.machine(), cpu_count=os.cpu_count(),
        cpu_pinned=cpu, affinity_before=before, threads_pinned=threads_pinned,
        affinity_verified=verified)


class Meta(HostMeta):
    switch_interval_s: float
    date: str
    quick: bool
    iterations: int | None
    dma_budget_s: float | None
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    region_access: RegionAccess
    dma: list[DmaResult]
    notes: str


@dataclass(frozen=True)
class Settings:
    quick: bool
    region_ops: int        # N for each region-access measurement
    region_warmup: int
    dma_budget_ns: int     # time per DMA measurement (when not a fixed count)
    dma_min_reps: int
    dma_max_reps: int
    dma_warmup: int
    fixed: int | None      # --iterations: exact counts everywhere, no time budget

    @classmethod
    def from_args(cls, quick: bool, iterations: int | None) -> Settings:
        if iterations is not None:
            return cls(quick, iterations, max(1, iterations // 10), 0, iterations, iterations,
                       1, iterations)
        if quick:
            return cls(quick, 300, 50, 80_000_000, 3, 2_000, 1, None)
        return cls(quick, 2000, 200, 600_000_000, 5, 100_000, 3, None)


# -- CPU pinning --------------------------------------------------------------------------------
def _task_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def pin_process(cpu: int) -> dict[int, set[int]]:
    """Pin every existing thread of the process to *cpu*; threads started later inherit it
    from their creator.  Returns the previous masks, for :func:`restore_affinity`."""
    saved: dict[int, set[int]] = {}
    me = threading.get_native_id()
    for tid in _task_ids():
        try:
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            if tid == me:
                raise
            saved.pop(tid, None)  # a thread that just exited
    return saved


def restore_affinity(saved: dict[int, set[int]]) -> None:
    for tid, mask in saved.items():
        with contextlib.suppress(OSError):  # threads we started are gone by now
            os.sched_setaffinity(tid, mask)


def all_threads_on(cpu: int) -> bool:
    ok = True
    for tid in _task_ids():
        with contextlib.suppress(OSError):
            ok &= os.sched_getaffinity(tid) == {cpu}
    return ok


# -- the server under test ---------------------------------------------------------------------
class BenchServer:
    """A device server on a UNIX socket, served by a thread of this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.device = Platform()
        self.server = Server(path, self.device)
        self.thread = threading.Thread(target=self.server.serve_forever, name="vfio-user-server",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)
        self.device.close()


@contextlib.contextmanager
def running_server() -> Iterator[tuple[BenchServer, Client]]:
    with tempfile.TemporaryDirectory(prefix="teeio-bench-") as tmp:
        srv = BenchServer(os.path.join(tmp, "vfio-user.sock"))
        try:
            client = Client.connect(srv.path)
            try:
                client.version()
                yield srv, client
            finally:
                client.close()
        finally:
            srv.stop()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Like timeit: collect first, then keep the collector out of the timed loop."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# -- statistics ----------------------------------------------------------------------------------
def latency_stats(samples_ns: Sequence[int]) -> LatencyStats:
    if len(samples_ns) < 2:
        raise ValueError("need at least two samples")
    us = [s / 1000.0 for s in samples_ns]
    deciles = statistics.quantiles(us, n=10, method="inclusive")
    return LatencyStats(n=len(us), median_us=round(statistics.median(us), 3),
                        p10_us=round(deciles[0], 3), p90_us=round(deciles[8], 3),
                        mean_us=round(statistics.fmean(us), 3))


def mbps(nbytes: int, ns: int) -> float:
    """Decimal megabytes per second."""
    return nbytes * 1000.0 / ns if ns > 0 else 0.0


class TimeBudget(Protocol):
    """How long one measurement point runs: a time budget bounded by repetition counts."""

    @property
    def budget_ns(self) -> int: ...
    @property
    def min_reps(self) -> int: ...
    @property
    def max_reps(self) -> int: ...
    @property
    def warmup(self) -> int: ...


@dataclass(frozen=True)
class Budget:
    budget_ns: int
    min_reps: int
    max_reps: int
    warmup: int


@dataclass(frozen=True)
class BudgetSettings:
    """Settings of a time-budgeted benchmark; subclasses set QUICK and FULL budgets."""

    QUICK: ClassVar[Budget]
    FULL: ClassVar[Budget]

    quick: bool
    budget_ns: int         # time per measurement point (when not a fixed count)
    min_reps: int
    max_reps: int
    warmup: int
    fixed: int | None      # --iterations: exact count everywhere, no time budget

    @classmethod
    def from_args(cls, quick: bool, iterations: int | None) -> Self:
        if iterations is not None:
            return cls(quick, 0, iterations, iterations, 1, iterations)
        b = cls.QUICK if quick else cls.FULL
        return cls(quick, b.budget_ns, b.min_reps, b.max_reps, b.warmup, None)


def timed(fn: Callable[[], object], b: TimeBudget) -> tuple[int, int]:
    """Run *fn* (after warm-up) for the budget's count or time; (reps, ns)."""
    for _ in range(b.warmup):
        fn()
    with gc_paused():
        reps = 0
        t0 = time.perf_counter_ns()
        elapsed = 0
        while reps < b.min_reps or (elapsed < b.budget_ns and reps < b.max_reps):
            fn()
            reps += 1
            elapsed = time.perf_counter_ns() - t0
    return reps, elapsed


def timed_loop(fn: Callable[[], None], s: Settings) -> tuple[int, int]:
    """The DMA points' budget from *s*."""
    return timed(fn, Budget(s.dma_budget_ns, s.dma_min_reps, s.dma_max_reps, s.dma_warmup))


# -- 1. region access -----------------------------------------------------------------------------
def bench_region_access(c: Client, s: Settings) -> RegionAccess:
    n = s.region_ops
    reg = int(R.SCRATCH)
    now = time.perf_counter_ns

    for i in range(s.region_warmup):
        c.write32(BAR0, reg, i)
        c.read32(BAR0, reg)
        c.write32(BAR0, reg, i, posted=True)
    c.read32(BAR0, reg)

    c.write32(BAR0, reg, 0x5A5A_1234)
    reads: list[int] = []
    with gc_paused():
        for _ in range(n):
            t0 = now()
            v = c.read32(BAR0, reg)
            reads.append(now() - t0)
    if v != 0x5A5A_1234:
        raise RuntimeError(f"SCRATCH read back {v:#x}")

    writes: list[int] = []
    with gc_paused():
        for i in range(n):
            t0 = now()
            c.write32(BAR0, reg, i)
            writes.append(now() - t0)
    if (v := c.read32(BAR0, reg)) != n - 1:
        raise RuntimeError(f"SCRATCH after non-posted writes is {v:#x}, want {n - 1:#x}")

    with gc_paused():
        t0 = now()
        for i in range(n):
            c.write32(BAR0, reg, 0x1000_0000 + i, posted=True)
        v = c.read32(BAR0, reg)  # fence: the server handles messages in order
        total = now() - t0
    if v != 0x1000_0000 + n - 1:
        raise RuntimeError(f"SCRATCH after posted writes is {v:#x}")

    return RegionAccess(
        register="BAR0 SCRATCH (0x008), 4-byte accesses", region=BAR0, warmup=s.region_warmup,
        read=latency_stats(reads), write=latency_stats(writes),
        write_posted=PostedStats(n=n, total_us=round(total / 1000, 3),
                                 per_op_us=round(total / 1000 / n, 3),
                                 fence="one REGION_READ after the last write, included"))


# -- 2. DMA ---------------------------------------------------------------------------------------
class DmaDriver:
    """Programs jobs through BAR0 like a guest driver would, polling STATUS."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.polls = 0
        self.jobs = 0

    def run(self, op: Op, src: int, dst: int, length: int, pattern: int = 0) -> None:
        c = self.c
        c.write32(BAR0, R.DMA_SRC_LO, src & 0xFFFF_FFFF)
        c.write32(BAR0, R.DMA_SRC_HI, src >> 32)
        c.write32(BAR0, R.DMA_DST_LO, dst & 0xFFFF_FFFF)
        c.write32(BAR0, R.DMA_DST_HI, dst >> 32)
        c.write32(BAR0, R.DMA_LEN, length)
        if op == Op.FILL:
            c.write32(BAR0, R.DMA_PATTERN, pattern)
        c.write32(BAR0, R.DMA_CMD, CMD_GO | int(op))
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


def bench_dma(c: Client, s: Settings) -> list[DmaResult]:
    fd = os.memfd_create("teeio-bench-guest", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, GUEST_SIZE)
        # sealed against resizing, as QEMU's memory-backend-memfd passes guest RAM
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        with mmap.mmap(fd, GUEST_SIZE, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            # The server closes the fd it receives; ours stays open for the local mmap.
            c.dma_map(GUEST_BASE, GUEST_SIZE, fd=fd)
            c.write32(CONFIG, PCI_COMMAND, COMMAND_MEMORY_BUS_MASTER)
            mm[SRC_OFF:SRC_OFF + MiB] = os.urandom(MiB)
            return _dma_points(c, mm, s)
    finally:
        os.close(fd)


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


# -- driver ---------------------------------------------------------------------------------------
NOTES = (
    "All threads of the process (client, vfio-user server, DMA engine) are pinned to "
    "meta.cpu_pinned and share the GIL. Region access: one REGION_READ/REGION_WRITE "
    "round trip each on BAR0 SCRATCH, timed per operation with perf_counter_ns; posted "
    "writes (No_reply) are timed as a batch of N plus one fencing REGION_READ, per_op_us = "
    "total / N. DMA: guest memory is an 8 MiB memfd passed with DMA_MAP (fd-mapped); each "
    "engine job is timed from the first register write (SRC/DST/LEN[/PATTERN], non-posted) "
    "through DMA_CMD=GO|op to the STATUS read that no longer shows BUSY. MB/s = bytes "
    "copied/filled/hashed (size, not the device's read+write byte counter) / wall time, "
    "1 MB = 1e6 bytes. memcpy = mm[dst:dst+n] = mm[src:src+n] on an mmap of the same memfd "
    "(the slice makes an intermediate bytes object, as the engine's read-then-write does). "
    "ratio = engine_MBps / baseline_MBps, baseline memcpy for COPY and FILL (measured next "
    "to the engine run) and hashlib.sha256 of the same 1 MiB for SHA256; memcpy_MBps is the "
    "COPY-phase memcpy at that size. Each job's result is checked once before timing. GC is "
    "paused in timed loops. Small sizes are dominated by the ~7 register round trips per job."
)


def run(s: Settings, cpu: int | None) -> Report:
    started = time.perf_counter()
    before = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = before[0]
    elif cpu not in before:
        raise SystemExit(f"cpu {cpu} is not in this process's affinity {before}")
    saved = pin_process(cpu)  # before any thread is started, so they all inherit it
    try:
        with running_server() as (_srv, client):
            verified = all_threads_on(cpu)
            region = bench_region_access(client, s)
            dma = bench_dma(client, s)
            verified &= all_threads_on(cpu)
    finally:
        restore_affinity(saved)
    meta = Meta(
        **host_meta(cpu, before, len(saved), verified), switch_interval_s=sys.getswitchinterval(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=s.quick, iterations=s.fixed,
        dma_budget_s=None if s.fixed is not None else s.dma_budget_ns / 1e9,
        elapsed_s=round(time.perf_counter() - started, 3))
    return Report(meta=meta, region_access=region, dma=dma, notes=NOTES)


def _positive(text: str) -> int:
    v = int(text)
    if v < 2:
        raise argparse.ArgumentTypeError("must be at least 2")
    return v


def emit_report(report: Mapping[str, object], out: Path | None) -> None:
    """Print the JSON report and, with *out*, also write it there (parents created)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="vfio-user region-access latency and DMA engine throughput")
    ap.add_argument("--out", type=Path, help="also write the JSON here (parent dirs are created)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer operations and a shorter DMA time budget (~seconds)")
    ap.add_argument("--iterations", type=_positive, metavar="N",
                    help="exact count for every measurement (region ops and DMA jobs per point), "
                         "overriding the defaults and the DMA time budget")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the lowest allowed one)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(Settings.from_args(args.quick, args.iterations), args.cpu)
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
