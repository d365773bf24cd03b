"""What the benchmarks share: where they ran (host meta, CPU pinning), timing loops under a
time budget, latency statistics and the JSON report.  ``bench.bench`` re-exports these
names, where the other benchmarks import them from.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, Self, TypedDict


class LatencyStats(TypedDict):
    n: int
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float


class Spread(TypedDict):
    """One quantity measured in several rounds: the median of the rounds, their range, and
    (max - min) / median in percent."""

    median: float
    min: float
    max: float
    spread_pct: float


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



def positive(text: str) -> int:
    """An argparse type: an integer of at least 2 (percentiles need two samples)."""
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




def spread(values: Sequence[float], digits: int = 3) -> Spread:
    mid = statistics.median(values)
    lo, hi = min(values), max(values)
    return Spread(median=round(mid, digits), min=round(lo, digits), max=round(hi, digits),
                  spread_pct=round((hi - lo) / mid * 100, 2) if mid else 0.0)
