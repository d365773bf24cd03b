"""Benchmark: guest-observed latency from TDI_LOCK to RUN, split by step.

Run as ``python -m bench.bench_tdi [--out FILE] [--cycles N]`` (needs the guest image:
``make image``).  One TCG boot of the whole stack (qemu_configs/tee_stack.py); the guest
agent runs its accept flow once (with the DMA validation) and then *N* more rounds of
STOP -> TDI_LOCK -> GET_EVIDENCE -> TDI_INFO -> verify -> TDI_ACCEPT, timing each step
with the guest's monotonic clock.  Each GHCx call includes the relay through QEMU's
virtio-serial port and whatever the TSM does for it (SPDM in the secured session with
the device: LOCK_INTERFACE and the report; signed GET_MEASUREMENTS with the guest's
nonce; START_INTERFACE and the platform socket).

Reported per step: median, min, max (ms) and its share of the median LOCK -> RUN total
(the steps TDI_LOCK .. TDI_ACCEPT; STOP is reported beside it).  The machine is shared
and TCG is slow, so the shares are the figures to compare between runs, not the absolute
times.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.bench import emit_report, host_meta
from qemu_configs import image
from qemu_configs.launcher import LaunchError
from qemu_configs.tee_stack import StackOptions, TeeStack

LOCK_TO_RUN = ("tdi_lock", "get_evidence", "tdi_info", "verify", "tdi_accept")


def summarise(cycles: list[list[dict[str, Any]]]) -> dict[str, Any]:
    per: dict[str, list[float]] = {}
    totals = []
    for cycle in cycles:
        total = 0.0
        for st in cycle:
            per.setdefault(st["step"], []).append(float(st["seconds"]))
            if st["step"] in LOCK_TO_RUN:
                total += float(st["seconds"])
        totals.append(total)
    total_median = statistics.median(totals) if totals else 0.0
    out: dict[str, Any] = {"lock_to_run_ms": {
        "median": round(total_median * 1000, 2), "min": round(min(totals) * 1000, 2),
        "max": round(max(totals) * 1000, 2)} if totals else {}}
    steps: dict[str, Any] = {}
    for name, vals in per.items():
        med = statistics.median(vals)
        steps[name] = {"median_ms": round(med * 1000, 2), "min_ms": round(min(vals) * 1000, 2),
                       "max_ms": round(max(vals) * 1000, 2), "n": len(vals),
                       "share_of_lock_to_run": (round(med / total_median, 3)
                                                if name in LOCK_TO_RUN and total_median
                                                else None)}
    out["steps"] = steps
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_tdi", description=__doc__)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--cycles", type=int, default=8,
                    help="accept/DMA cycles per guest run (default 8)")
    ns = ap.parse_args(argv)
    if not image.is_built():
        print("error: the guest image is not built: run 'make image'", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="teeio-bench-tdi-") as tmp:
        stack = TeeStack(StackOptions(Path(tmp), seed=1, stop=False, cycles=ns.cycles))
        try:
            res = stack.run()
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        rep = res.report or {}
        if not res.ok or not rep.get("cycles"):
            print(f"error: the guest run failed: {res.reason or rep.get('error')}",
                  file=sys.stderr)
            return 1
    report = {
        "benchmark": "tdi_lock_to_run",
        "meta": {**host_meta(None, [], 0, False), "accel": "tcg",
                 "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "cycles": len(rep["cycles"])},
        "first_accept_steps": rep.get("steps", []),
        "cycles": summarise(rep["cycles"]),
        "host_timings_s": {name: round(secs, 3) for name, secs in stack.timings},
    }
    emit_report(report, ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
