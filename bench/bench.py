"""Benchmark: vfio-user register round trips and the DMA engine's cost, with the device
server in a child process.

Run as ``python -m bench.bench [--out FILE] [--quick] [--iterations N] [--rounds N]
[--cpu C]``.

The device server runs in its own process (``bench.dma_server``, with probes on the steps
of a job) and the :class:`~vfio_user_dev.client.Client` of this process talks to it over
a UNIX socket; both are pinned to one CPU.  Measured:

* REGION_READ / REGION_WRITE round trips on BAR0 SCRATCH (median, p10, p90 in us);
  posted writes (No_reply) as total time / N, fenced by one read at the end;
* the fixed cost of a small DMA job split by step on the server side (register writes,
  the GO write, STATUS polls, the socket, the hand-off to the engine, completion,
  interrupt), with jobs where the engine runs them and all on the engine thread;
* COPY, FILL and SHA-256 throughput per size (4 KiB to 4 MiB; above 1 MiB as jobs of
  1 MiB) end to end and on the server, against memcpy measured alternately in the same
  run, with the spread over the rounds; COPY again as BATCH descriptors, 64 per GO;
  and whether the goals are met.

The result is printed as JSON and, with ``--out``, written to a file.  The names the
other benchmarks share live in ``bench.common`` and are re-exported here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from bench.common import (
    Budget,
    BudgetSettings,
    HostMeta,
    LatencyStats,
    Settings,
    TimeBudget,
    all_threads_on,
    emit_report,
    gc_paused,
    host_meta,
    latency_stats,
    mbps,
    pin_process,
    positive,
    restore_affinity,
    timed,
    timed_loop,
)
from bench.dma_cost import (
    CostSettings,
    FixedCost,
    Goal,
    ThroughputPoint,
    UnprobedCost,
    bench_dma_cost,
    out_of_process,
)
from bench.dma_jobs import BAR0, DmaDriver, DmaResult, bench_dma
from teeio.device_regs import R
from vfio_user_dev.client import Client

# The names the other benchmarks import from here (their home is bench.common or
# bench.dma_jobs).
__all__ = ["Budget", "BudgetSettings", "DmaDriver", "DmaResult", "HostMeta", "LatencyStats",
           "RegionAccess", "Settings", "TimeBudget", "all_threads_on", "bench_dma",
           "bench_region_access", "emit_report", "gc_paused", "host_meta", "latency_stats",
           "main", "mbps", "pin_process", "positive", "restore_affinity", "run", "timed",
           "timed_loop"]
_positive = positive        # the name bench_backends imports


# -- result types -----------------------------------------------------------------------------
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


class Meta(HostMeta):
    server_process_pinned: bool
    probe_overhead_us: float
    date: str
    quick: bool
    iterations: int | None
    rounds: int
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    region_access: RegionAccess
    dma_fixed_cost: list[FixedCost]
    dma_unprobed_cost: list[UnprobedCost]
    dma_throughput: list[ThroughputPoint]
    goals: dict[str, Goal]
    notes: str



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


# -- driver ---------------------------------------------------------------------------------------
NOTES = (
    "The device server runs in a child process (bench.dma_server) pinned, like this "
    "client, to meta.cpu_pinned; client and server threads never share a GIL. Region "
    "access, dma_unprobed_cost and dma_throughput use a server with no probe but the "
    "job's wall clock (two clock reads per job); dma_fixed_cost uses a second server "
    "with every probe. Region "
    "access: one REGION_READ/REGION_WRITE round trip each on BAR0 SCRATCH, timed per "
    "operation with perf_counter_ns; posted writes (No_reply) are timed as a batch of N "
    "plus one fencing REGION_READ, per_op_us = total / N. DMA: guest memory is a 16 MiB "
    "memfd sealed against resizing, passed with DMA_MAP (fd-mapped), IDE off; a job is "
    "programmed like guest_agent's driver does (32-bit writes of SRC_LO/HI, DST_LO/HI, "
    "LEN[, PATTERN], then DMA_CMD=GO|op) and STATUS polled until BUSY clears; the writes "
    "are posted (NO_REPLY) as QEMU's vfio-user client sends a guest's BAR writes by "
    "default, and also non-posted (x-no-posted-writes=on) in the cost runs, whose "
    "'writes' field says which. "
    "dma_fixed_cost: the server's probes (CPU time of the server's threads, and wall time) "
    "per step of a small job, median per occurrence times occurrences per job: "
    "register_writes, go_write (without the job), status_polls (REGION_READ handling), "
    "transport (reading the messages off the socket and sending the replies), handoff "
    "(the engine's start_job without the job's transfers and completion), completion "
    "(STATUS, counters, INT_STATUS), interrupt (update_irq); the DMA transfers themselves "
    "(dma_cpu_us) are not part of the fixed cost. Mode default: jobs run where the engine "
    "puts them (a short job on the clear path at once, on the thread that wrote GO); mode "
    "engine_thread: every job goes to the engine thread, handoff_wait_wall_us being the "
    "wait until that thread starts it. Probes add about meta.probe_overhead_us each "
    "(two CPU clock reads, a system call each). dma_unprobed_cost: the unprobed server "
    "process's CPU time (all threads) per small job, from its process_time_ns before and "
    "after split_jobs jobs: every message, the job, completion and interrupt; the goal "
    "is judged on it. "
    "dma_throughput: per op and size, engine end to end (client: first register write to "
    "the STATUS read without BUSY) and on the server (median probe time from the GO "
    "reaching the engine to the job's completion, times jobs per op), each against memcpy "
    "= one slice assignment between the two ranges of a memoryview of the same memfd in "
    "this process (one copy, no intermediate object), measured right after the engine "
    "point in each of meta.rounds rounds; SHA256 also against hashlib.sha256 of the same "
    "bytes. Sizes above 1 MiB (the register map's DMA_LEN limit) run as consecutive jobs "
    "of 1 MiB. COPY_BATCH: the same COPY as BATCH descriptors of at most 1 MiB, the "
    "transfer repeated to fill one batch of 64 (jobs_per_go), one GO per batch with "
    "posted writes, the client sleeping on the MSI-X eventfd until the batch's interrupt, "
    "then one STATUS read; the server's time is from the GO reaching the engine to the "
    "batch's completion. The COPY goal is judged on it (ratio_server), with the single "
    "jobs' ratio beside it. MB/s = size / time, 1 MB = 1e6 bytes; each value is the "
    "median over the rounds with min, max and spread = (max - min) / median; ratios are "
    "per round. Each op's result is checked once before timing. GC is paused in timed "
    "loops."
)


def process_threads_on(pid: int, cpu: int) -> bool:
    """Whether every thread of process *pid* is pinned to *cpu* alone."""
    ok = True
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                ok &= os.sched_getaffinity(int(tid)) == {cpu}
    return ok


def run(s: Settings, cpu: int | None, rounds: int | None = None) -> Report:
    started = time.perf_counter()
    before = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = before[0]
    elif cpu not in before:
        raise SystemExit(f"cpu {cpu} is not in this process's affinity {before}")
    cost = CostSettings.from_args(s.quick, s.fixed, rounds)
    saved = pin_process(cpu)  # before the server is started, so that it inherits it
    try:
        with out_of_process("job") as (srv, client):
            verified = all_threads_on(cpu)
            region = bench_region_access(client, s)
            server_pinned = process_threads_on(srv.proc.pid, cpu)
            overhead = float(srv.hello.get("probe_overhead_us", 0.0))
        splits, unprobed, points, met = bench_dma_cost(cost)
        verified &= all_threads_on(cpu)
    finally:
        restore_affinity(saved)
    meta = Meta(
        **host_meta(cpu, before, len(saved), verified), server_process_pinned=server_pinned,
        probe_overhead_us=overhead,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=s.quick, iterations=s.fixed, rounds=cost.rounds,
        elapsed_s=round(time.perf_counter() - started, 3))
    return Report(meta=meta, region_access=region, dma_fixed_cost=splits,
                  dma_unprobed_cost=unprobed,
                  dma_throughput=points, goals=met, notes=NOTES)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="vfio-user register round trips and the DMA engine's cost, the device "
                    "server in a child process")
    ap.add_argument("--out", type=Path, help="also write the JSON here (parent dirs are created)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer operations and shorter time budgets (~a minute)")
    ap.add_argument("--iterations", type=positive, metavar="N",
                    help="exact count for every measurement (region ops, split jobs, DMA ops "
                         "per point), overriding the defaults and the time budgets")
    ap.add_argument("--rounds", type=positive, metavar="N",
                    help="engine and memcpy points alternate N times per size (default 5, "
                         "2 with --quick or --iterations)")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the lowest allowed one)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(Settings.from_args(args.quick, args.iterations), args.cpu, args.rounds)
    emit_report(report, args.out)
    if not report["meta"]["affinity_verified"] or not report["meta"]["server_process_pinned"]:
        print("note: thread affinity not verified (see meta)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
