"""Benchmark: the two vfio-user transports side by side, in one run.

Run as ``python -m bench.bench_backends [--out FILE] [--quick] [--iterations N] [--cpu C]``.

The same device model is served by the pure-Python server and by libvfio-user (through
ctypes), one after the other, in this process; the same in-process
:class:`~vfio_user_dev.client.Client` drives both, and every thread (client, server or
library run thread, DMA engine) is pinned to one CPU.  For each transport it measures what
``bench.bench`` measures: REGION_READ / REGION_WRITE round trips on BAR0 and the DMA
engine's throughput into fd-mapped memory (COPY 4 KiB-1 MiB, FILL and SHA-256 at 1 MiB).

Without the library (``$TEEIO_LIBVFIO_USER`` or the loader's search path) the
libvfio-user leg is skipped and the JSON says why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
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
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.server import Server

BACKENDS = ("python", "libvfio-user")


class BackendResult(TypedDict):
    skipped: NotRequired[str]
    region_access: NotRequired[RegionAccess]
    dma: NotRequired[list[DmaResult]]


class Comparison(TypedDict):
    """libvfio-user / python, per measurement (medians for round trips)."""

    read_latency_ratio: float
    write_latency_ratio: float
    dma_throughput_ratio: dict[str, float]


class Meta(HostMeta):
    date: str
    quick: bool
    iterations: int | None
    library: str | None
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    backends: dict[str, BackendResult]
    comparison: Comparison | None
    notes: str


NOTES = (
    "Both transports serve the same TeeIoDevice, one after the other in this process, "
    "driven by the same in-process vfio_user_dev.client.Client over a UNIX socket; all "
    "threads (client, server or libvfio-user run thread, DMA engine) are pinned to "
    "meta.cpu_pinned. Measurements as in bench.bench: per-operation REGION_READ/"
    "REGION_WRITE round trips on BAR0 SCRATCH (posted writes as a batch fenced by one read); "
    "DMA jobs programmed through BAR0 into an 8 MiB memfd passed with DMA_MAP (the "
    "libvfio-user leg: mmap()ed by the library, reached through the DMA register callback), "
    "polled until STATUS leaves BUSY. comparison = libvfio-user / python: latency ratios of "
    "the medians (below 1: libvfio-user is faster), throughput ratios of engine MB/s."
)


@contextlib.contextmanager
def serving(backend: str, lib: Any) -> Iterator[Client]:
    """A device served by *backend* on a temporary socket, and a negotiated client."""
    with tempfile.TemporaryDirectory(prefix="teeio-bench-backends-") as tmp:
        path = os.path.join(tmp, "vfio-user.sock")
        device = TeeIoDevice()
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


def compare(py: BackendResult, lvu: BackendResult) -> Comparison | None:
    if "region_access" not in py or "region_access" not in lvu:
        return None
    pr, lr = py["region_access"], lvu["region_access"]
    return Comparison(
        read_latency_ratio=_ratio(lr["read"]["median_us"], pr["read"]["median_us"]),
        write_latency_ratio=_ratio(lr["write"]["median_us"], pr["write"]["median_us"]),
        dma_throughput_ratio={f"{d['op']} {d['size']}": _ratio(e["engine_MBps"], d["engine_MBps"])
                              for d, e in zip(py.get("dma", []), lvu.get("dma", []), strict=True)})


def run(s: Settings, cpu: int | None) -> Report:
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
    results: dict[str, BackendResult] = {}
    saved = pin_process(cpu)  # before any thread is started, so they all inherit it
    verified = True
    try:
        for backend in BACKENDS:
            if backend == "libvfio-user" and missing is not None:
                results[backend] = BackendResult(skipped=missing)
                continue
            with serving(backend, lib) as client:
                verified &= all_threads_on(cpu)
                region = bench_region_access(client, s)
                dma = bench_dma(client, s)
                verified &= all_threads_on(cpu)
            results[backend] = BackendResult(region_access=region, dma=dma)
    finally:
        restore_affinity(saved)
    meta = Meta(
        **host_meta(cpu, before, len(saved), verified),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=s.quick, iterations=s.fixed,
        library=None if lib is None else str(lib._name),
        elapsed_s=round(time.perf_counter() - started, 3))
    return Report(meta=meta, backends=results,
                  comparison=compare(results["python"], results["libvfio-user"]), notes=NOTES)


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
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(Settings.from_args(args.quick, args.iterations), args.cpu)
    emit_report(report, args.out)
    skipped = report["backends"]["libvfio-user"].get("skipped")
    if skipped:
        print(f"note: libvfio-user leg skipped: {skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

