"""Benchmark: the two vfio-user transports side by side, in one run.

Run as ``python -m bench.bench_backends [--out FILE] [--quick] [--iterations N] [--cpu C]
[--rounds N]``.  The pure-Python server and libvfio-user serve the same device model, legs
alternating; what is measured and how: docs/benchmarks.md, "The two vfio-user transports".
Without the library the libvfio-user leg is skipped and the JSON says why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from bench.bench import (
    DmaResult,
    HostMeta,
    RegionAccess,
    Settings,
    _positive,
    all_threads_on,
    bench_dma,
    bench_region_access,
    emit_report,
    host_meta,
    pin_process,
    restore_affinity,
)
from vfio_user_dev import libvfio_user
from vfio_user_dev.client import Client
from vfio_user_dev.platform import Platform
from vfio_user_dev.server import Server

BACKENDS = ("python", "libvfio-user")


class Round(TypedDict):
    region_access: RegionAccess
    dma: list[DmaResult]


class Spread(TypedDict):
    """One measurement over the rounds of a leg: the median of the per-round values, their
    range, and (max - min) / median in percent."""

    median: float
    min: float
    max: float
    spread_pct: float


class Summary(TypedDict):
    read_median_us: Spread
    write_median_us: Spread
    posted_write_per_op_us: Spread
    dma_engine_MBps: dict[str, Spread]


class BackendResult(TypedDict):
    skipped: NotRequired[str]
    rounds: NotRequired[list[Round]]
    summary: NotRequired[Summary]


class Comparison(TypedDict):
    """libvfio-user / python, of the per-leg medians over the rounds."""

    read_latency_ratio: float
    write_latency_ratio: float
    posted_write_ratio: float
    dma_mapped_memory_throughput_ratio: dict[str, float]
    dma_ratio_means: str


class Meta(HostMeta):
    date: str
    quick: bool
    iterations: int | None
    rounds: int
    order: list[str]
    library: str | None
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    backends: dict[str, BackendResult]
    comparison: Comparison | None
    notes: str


DMA_RATIO_MEANS = (
    "Both legs' engines copy into the same kind of memory, an fd-backed memfd mapped into "
    "this process (libvfio-user leg: mmap()ed by the library); no DMA data crosses either "
    "transport. Only the STATUS polls (REGION_READs) that wait for each job do, so this "
    "ratio shows the transport's share of a job through its polls, not vfio-user DMA "
    "(DMA_READ/DMA_WRITE) throughput.")


def build_notes(rounds: int, order: Sequence[str], cpu: int, verified: bool,
                skipped: str | None) -> str:
    """The notes, from what actually happened in this run."""
    notes = [
        "Both transports serve the same TeeIoDevice in this process, driven by the same "
        "in-process vfio_user_dev.client.Client over a UNIX socket.",
        f"The legs alternated ({' '.join(order)}), {rounds} round(s) each, a fresh server "
        "and client per round; each leg's summary is the median over its rounds with the "
        "range (min, max) and the spread (max - min) / median in percent.",
        "Measurements as in bench.bench: per-operation REGION_READ/REGION_WRITE round trips "
        "on BAR0 SCRATCH (posted writes as a batch fenced by one read); DMA jobs programmed "
        "through BAR0 into an 8 MiB memfd passed with DMA_MAP, polled until STATUS leaves "
        "BUSY.",
    ]
    if verified:
        notes.append(f"Every thread (client, server or libvfio-user run thread, DMA engine) "
                     f"was verified pinned to CPU {cpu}.")
    else:
        notes.append(f"Affinity NOT verified: some thread was found outside CPU {cpu}, so "
                     "the legs may not have shared one core.")
    if skipped is not None:
        notes.append(f"The libvfio-user leg was skipped ({skipped}); there is no comparison.")
    else:
        notes.append("comparison = libvfio-user / python of the leg medians (latency below "
                     "1: libvfio-user is faster). " + DMA_RATIO_MEANS)
    return " ".join(notes)


@contextlib.contextmanager
def serving(backend: str, lib: Any) -> Iterator[Client]:
    """A device served by *backend* on a temporary socket, and a negotiated client."""
    with tempfile.TemporaryDirectory(prefix="teeio-bench-backends-") as tmp:
        path = os.path.join(tmp, "vfio-user.sock")
        device = Platform()
        server: Server | libvfio_user.LibVfioUserServer
        thread: threading.Thread | None = None
        if backend == "python":
            server = Server(path, device)
            thread = threading.Thread(target=server.serve_forever, name="vfio-user-server",
                                      daemon=True)
            thread.start()
        else:
            server = libvfio_user.LibVfioUserServer(path, device, lib)
            server.start()
        try:
            client = Client.connect(path)
            try:
                client.version()
                yield client
            finally:
                client.close()
        finally:
            server.close()
            if thread is not None:
                thread.join(timeout=5)
            device.close()


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def spread(values: Sequence[float]) -> Spread:
    mid = statistics.median(values)
    lo, hi = min(values), max(values)
    return Spread(median=round(mid, 3), min=round(lo, 3), max=round(hi, 3),
                  spread_pct=round((hi - lo) / mid * 100, 2) if mid else 0.0)


def summarize(rounds: Sequence[Round]) -> Summary:
    keys = [f"{d['op']} {d['size']}" for d in rounds[0]["dma"]]
    return Summary(
        read_median_us=spread([r["region_access"]["read"]["median_us"] for r in rounds]),
        write_median_us=spread([r["region_access"]["write"]["median_us"] for r in rounds]),
        posted_write_per_op_us=spread([r["region_access"]["write_posted"]["per_op_us"]
                                       for r in rounds]),
        dma_engine_MBps={key: spread([r["dma"][i]["engine_MBps"] for r in rounds])
                         for i, key in enumerate(keys)})


def compare(py: BackendResult, lvu: BackendResult) -> Comparison | None:
    if "summary" not in py or "summary" not in lvu:
        return None
    ps, ls = py["summary"], lvu["summary"]
    return Comparison(
        read_latency_ratio=_ratio(ls["read_median_us"]["median"],
                                  ps["read_median_us"]["median"]),
        write_latency_ratio=_ratio(ls["write_median_us"]["median"],
                                   ps["write_median_us"]["median"]),
        posted_write_ratio=_ratio(ls["posted_write_per_op_us"]["median"],
                                  ps["posted_write_per_op_us"]["median"]),
        dma_mapped_memory_throughput_ratio={
            key: _ratio(ls["dma_engine_MBps"][key]["median"], d["median"])
            for key, d in ps["dma_engine_MBps"].items()},
        dma_ratio_means=DMA_RATIO_MEANS)


def run(s: Settings, cpu: int | None, rounds: int = 3) -> Report:
    started = time.perf_counter()
    before = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = before[0]
    elif cpu not in before:
        raise SystemExit(f"cpu {cpu} is not in this process's affinity {before}")
    lib: Any = None
    missing: str | None = None
    try:
        lib = libvfio_user.load()
    except libvfio_user.LibraryMissing as exc:
        missing = str(exc)
    legs = [b for b in BACKENDS if not (b == "libvfio-user" and missing is not None)]
    measured: dict[str, list[Round]] = {b: [] for b in legs}
    order: list[str] = []
    saved = pin_process(cpu)  # before any thread is started, so they all inherit it
    verified = True
    try:
        for _ in range(rounds):         # ABAB...: drift on the host hits both legs alike
            for backend in legs:
                with serving(backend, lib) as client:
                    verified &= all_threads_on(cpu)
                    region = bench_region_access(client, s)
                    dma = bench_dma(client, s)
                    verified &= all_threads_on(cpu)
                measured[backend].append(Round(region_access=region, dma=dma))
                order.append(backend)
    finally:
        restore_affinity(saved)
    results: dict[str, BackendResult] = {
        b: BackendResult(rounds=measured[b], summary=summarize(measured[b])) for b in legs}
    if missing is not None:
        results["libvfio-user"] = BackendResult(skipped=missing)
    meta = Meta(
        **host_meta(cpu, before, len(saved), verified),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=s.quick, iterations=s.fixed, rounds=rounds, order=order,
        library=None if lib is None else str(lib._name),
        elapsed_s=round(time.perf_counter() - started, 3))
    return Report(meta=meta, backends={b: results[b] for b in BACKENDS},
                  comparison=compare(results["python"], results["libvfio-user"]),
                  notes=build_notes(rounds, order, cpu, verified, missing))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_backends",
        description="region-access latency and DMA throughput of both vfio-user transports")
    ap.add_argument("--out", type=Path, help="also write the JSON here (parent dirs are created)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer operations and a shorter DMA time budget (~seconds)")
    ap.add_argument("--iterations", type=_positive, metavar="N",
                    help="exact count for every measurement, overriding the defaults")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the lowest allowed one)")
    ap.add_argument("--rounds", type=_positive, default=3, metavar="N",
                    help="rounds per leg, the legs alternating (default 3)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(Settings.from_args(args.quick, args.iterations), args.cpu, args.rounds)
    emit_report(report, args.out)
    skipped = report["backends"]["libvfio-user"].get("skipped")
    if skipped:
        print(f"note: libvfio-user leg skipped: {skipped}", file=sys.stderr)
    if not report["meta"]["affinity_verified"]:
        print("note: thread affinity not verified (see notes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

