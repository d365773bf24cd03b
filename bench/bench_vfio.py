"""Benchmark: one vfio-user round trip, this server against libvfio-user's C sample server.

Run as ``python -m bench.bench_vfio [--out FILE] [--quick] [--iterations N] [--rounds N]
[--cpu C]``.  Each leg is a server process and a separate client process
(``bench/vfio_peers.py``, the same client for every leg), all pinned to one CPU; the legs
alternate in one run.  REGION_READ / REGION_WRITE round trips of 4 bytes (vfio-user spec
"VFIO_USER_REGION_READ/WRITE").  What is measured and how: docs/benchmarks.md, "One round
trip against libvfio-user's C server".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, NamedTuple, NotRequired, TypedDict

from bench.bench import HostMeta, _positive, emit_report, host_meta
from teeio.device_regs import R
from vfio_user_dev import libvfio_user

#: the gpio-pci-idio-16 sample server binary from libvfio-user's samples/
SAMPLE_ENV_VAR = "TEEIO_LIBVFIO_USER_SAMPLE"
GOAL = 1.5                   # this server's median round trip / the C sample server's
LEGS = ("python", "echo", "libvfio-user", "c-sample")
OPS = ("read", "write")
#: (region, offset) each leg's client accesses: BAR0 SCRATCH of our device; the C sample
#: has one region, BAR2 of 256 bytes (its GPIO ports), whose offset 0 is a plain register
TARGET = {"python": (0, int(R.SCRATCH)), "echo": (0, int(R.SCRATCH)),
          "libvfio-user": (0, int(R.SCRATCH)), "c-sample": (2, 0)}
ROOT = Path(__file__).resolve().parents[1]


class OpStats(TypedDict):
    n: int
    median_us: float
    p10_us: float
    p90_us: float
    round_medians_us: list[float]
    server_cpu_us: float | None     # median over the rounds of CPU time per round trip
    client_cpu_us: float


class LegResult(TypedDict):
    skipped: NotRequired[str]
    server: NotRequired[str]
    read: NotRequired[OpStats]
    write: NotRequired[OpStats]


class Goal(TypedDict):
    target: float
    met: bool | None
    read_ratio: float | None
    write_ratio: float | None
    why: str


class Meta(HostMeta):
    date: str
    iterations: int
    warmup: int
    rounds: int
    order: list[str]
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    legs: dict[str, LegResult]
    ratios: dict[str, dict[str, float]]
    goal: Goal
    notes: str


def skipped_legs() -> dict[str, str]:
    """The legs that cannot run here, each with why."""
    out: dict[str, str] = {}
    try:
        libvfio_user.load()
    except libvfio_user.LibraryMissing as exc:
        out["libvfio-user"] = str(exc)
    sample = os.environ.get(SAMPLE_ENV_VAR)
    if not sample:
        out["c-sample"] = (f"{SAMPLE_ENV_VAR} is not set: point it to the gpio-pci-idio-16 "
                           "sample server built from nutanix/libvfio-user (samples/)")
    elif not os.access(sample, os.X_OK):
        out["c-sample"] = f"{SAMPLE_ENV_VAR}={sample} is not an executable file"
    return out


def server_command(leg: str, path: str) -> list[str]:
    if leg == "c-sample":
        return [os.environ[SAMPLE_ENV_VAR], path]
    return [sys.executable, "-m", "bench.vfio_peers", "serve", leg, path]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """This process on *cpu* alone while it starts the peers (they inherit it)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server(NamedTuple):
    path: str
    proc: subprocess.Popen[bytes]
    errlog: IO[bytes]


@contextlib.contextmanager
def servers(legs: Sequence[str], cpu: int) -> Iterator[dict[str, Server]]:
    """Every leg's server, started pinned to *cpu*, serving clients one after the other
    (idle between its rounds) until the run is over."""
    with tempfile.TemporaryDirectory(prefix="teeio-bench-vfio-") as tmp, \
            contextlib.ExitStack() as stack:
        out: dict[str, Server] = {}
        with pinned(cpu):
            for leg in legs:
                path = os.path.join(tmp, f"{leg}.sock")
                errlog = stack.enter_context(open(os.path.join(tmp, f"{leg}.err"), "w+b"))
                proc = subprocess.Popen(server_command(leg, path), env=_env(),
                                        stdout=subprocess.DEVNULL, stderr=errlog)
                stack.callback(stop, proc)
                out[leg] = Server(path, proc, errlog)
        yield out


class Round(TypedDict):
    samples_ns: list[int]
    server_cpu_us: float | None
    client_cpu_us: float


def run_leg(leg: str, server: Server, cpu: int, n: int, warmup: int
            ) -> tuple[dict[str, Round], bool, int]:
    """One round of *leg*: a new client of its server; per operation the samples and CPU
    times, whether every thread of both was pinned to *cpu*, and how many threads the
    server had."""
    region, offset = TARGET[leg]
    with pinned(cpu):
        got = subprocess.run(
            [sys.executable, "-m", "bench.vfio_peers", "client", server.path, str(region),
             str(offset), str(n), str(warmup), str(server.proc.pid)],
            env=_env(), capture_output=True, timeout=600, check=False)
    if got.returncode != 0:
        server.errlog.seek(0)
        raise RuntimeError(f"{leg} leg failed: client: {got.stderr.decode()[-2000:]}"
                           f" server: {server.errlog.read().decode()[-2000:]}")
    result = json.loads(got.stdout)
    threads = result["server_threads"]   # the client looked while the server served it
    verified = result["affinity"] == [cpu] and bool(threads) and all(
        t == [cpu] for t in threads)
    return {op: Round(samples_ns=result[f"{op}_ns"], server_cpu_us=result["server_cpu_us"][op],
                      client_cpu_us=result["client_cpu_us"][op])
            for op in OPS}, verified, len(threads) + 1


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def op_stats(rounds: Sequence[Round]) -> OpStats:
    pooled = sorted(v for r in rounds for v in r["samples_ns"])
    server = [r["server_cpu_us"] for r in rounds if r["server_cpu_us"] is not None]
    return OpStats(n=len(pooled), median_us=round(statistics.median(pooled) / 1000, 3),
                   p10_us=round(percentile(pooled, 0.10), 3),
                   p90_us=round(percentile(pooled, 0.90), 3),
                   round_medians_us=[round(statistics.median(r["samples_ns"]) / 1000, 3)
                                     for r in rounds],
                   server_cpu_us=round(statistics.median(server), 3) if server else None,
                   client_cpu_us=round(statistics.median(r["client_cpu_us"] for r in rounds),
                                       3))


PAIRS = (("python", "c-sample"), ("python", "echo"), ("libvfio-user", "c-sample"),
         ("echo", "c-sample"), ("python", "libvfio-user"))


def ratios(legs: dict[str, LegResult]) -> dict[str, dict[str, float]]:
    """a/b of the median round trips (``read``, ``write``), and the median over the rounds
    of a/b of the round medians (``read_paired``, ``write_paired``: a's and b's rounds
    ran next to each other, so load on the host hits both), for each pair that ran."""
    out: dict[str, dict[str, float]] = {}
    for a, b in PAIRS:
        sa, sb = legs[a], legs[b]
        if "read" not in sa or "read" not in sb:
            continue
        out[f"{a}/{b}"] = row = {}
        for op in OPS:
            oa, ob = sa[op], sb[op]     # type: ignore[literal-required]
            row[op] = round(oa["median_us"] / ob["median_us"], 3)
            row[f"{op}_paired"] = round(statistics.median(
                x / y for x, y in zip(oa["round_medians_us"], ob["round_medians_us"],
                                      strict=True)), 3)
    return out


def goal(r: dict[str, dict[str, float]], skipped: dict[str, str]) -> Goal:
    got = r.get("python/c-sample")
    if got is None:
        why = skipped.get("c-sample") or skipped.get("python") or "no C leg"
        return Goal(target=GOAL, met=None, read_ratio=None, write_ratio=None,
                    why=f"not measured: {why}")
    met = got["read"] <= GOAL and got["write"] <= GOAL
    return Goal(target=GOAL, met=met, read_ratio=got["read"], write_ratio=got["write"],
                why=(f"this server's median REGION_READ/REGION_WRITE round trips are "
                     f"{got['read']}x/{got['write']}x the C sample server's "
                     f"({'within' if met else 'beyond'} {GOAL}x)"))


def build_notes(order: Sequence[str], cpu: int, verified: bool,
                skipped: dict[str, str]) -> str:
    notes = [
        "Each leg is a server process, started once and idle between its rounds, and a new "
        "client process each round (bench/vfio_peers.py, the same client for every leg, "
        "importing no project module).",
        f"The legs alternated ({' '.join(order)}); a leg's median and p10/p90 are over "
        "all its samples, round_medians_us per round.",
        "The client negotiates VERSION, then times one 4-byte REGION_READ or REGION_WRITE "
        "per round trip (send, then receive the whole reply), gc disabled: BAR0 SCRATCH "
        "of this device; BAR2 offset 0 of the C sample server (its only region).",
        "echo: a trivial Python server answering each message from its bytes, no device "
        "model (the floor of a Python server); libvfio-user: this device model behind "
        "libvfio-user through ctypes; c-sample: libvfio-user's gpio-pci-idio-16 sample.",
    ]
    notes.append(f"Every thread of every server and client was verified pinned to CPU {cpu}."
                 if verified else
                 f"Affinity NOT verified: some thread was found outside CPU {cpu}.")
    notes += [f"The {leg} leg was skipped: {why}" for leg, why in skipped.items()]
    return " ".join(notes)


def run(n: int, warmup: int, rounds: int, cpu: int | None) -> Report:
    started = time.perf_counter()
    before = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = before[0]
    elif cpu not in before:
        raise SystemExit(f"cpu {cpu} is not in this process's affinity {before}")
    skipped = skipped_legs()
    legs = [leg for leg in LEGS if leg not in skipped]
    samples: dict[str, dict[str, list[Round]]] = {leg: {op: [] for op in OPS}
                                                  for leg in legs}
    order: list[str] = []
    verified, threads = True, 0
    with servers(legs, cpu) as running:
        for _ in range(rounds):      # ABCD ABCD ...: drift on the host hits every leg alike
            for leg in legs:
                got, ok, count = run_leg(leg, running[leg], cpu, n, warmup)
                verified &= ok
                threads = max(threads, count)
                for op in OPS:
                    samples[leg][op].append(got[op])
                order.append(leg)
    results: dict[str, LegResult] = {}
    for leg in LEGS:
        if leg in skipped:
            results[leg] = LegResult(skipped=skipped[leg])
        else:
            results[leg] = LegResult(server=" ".join(server_command(leg, "SOCKET")[-3:]),
                                     read=op_stats(samples[leg]["read"]),
                                     write=op_stats(samples[leg]["write"]))
    r = ratios(results)
    meta = Meta(**host_meta(cpu, before, threads, verified),
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                iterations=n, warmup=warmup, rounds=rounds, order=order,
                elapsed_s=round(time.perf_counter() - started, 3))
    return Report(meta=meta, legs=results, ratios=r, goal=goal(r, skipped),
                  notes=build_notes(order, cpu, verified, skipped))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_vfio",
        description="vfio-user round trips: this server, a Python floor, libvfio-user, and "
                    "libvfio-user's C sample server, each with a client process")
    ap.add_argument("--out", type=Path, help="also write the JSON here (parent dirs are created)")
    ap.add_argument("--quick", action="store_true", help="1000 round trips a round, 3 rounds")
    ap.add_argument("--iterations", type=_positive, metavar="N",
                    help="round trips of each kind per round (default 2000)")
    ap.add_argument("--rounds", type=_positive, metavar="N",
                    help="rounds per leg, the legs alternating (default 20)")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the lowest allowed one)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.iterations or (1000 if args.quick else 2000)
    rounds = args.rounds or (3 if args.quick else 20)
    report = run(n, max(1, min(n // 10, 500)), rounds, args.cpu)
    emit_report(report, args.out)
    for leg, result in report["legs"].items():
        if "skipped" in result:
            print(f"note: {leg} leg skipped: {result['skipped']}", file=sys.stderr)
    print(f"goal: {report['goal']['why']}", file=sys.stderr)
    if not report["meta"]["affinity_verified"]:
        print("note: thread affinity not verified (see notes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
