"""``make fuzz``: every harness under atheris/libFuzzer, one process each, then figures.

Decoder and responder harnesses run up to ``--runs`` inputs (``FUZZ_RUNS``, default one
million) within ``--seconds`` (``FUZZ_SECONDS``); stateful ones (real sockets) run for
``--stateful-seconds`` (``FUZZ_STATEFUL_SECONDS``).  Seeds are written into
``out/fuzz-corpus/<harness>/`` first; crashing inputs land in
``out/fuzz-crashes/<harness>/``; the figures go to ``out/fuzz.json`` and a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fuzz.runner import HARNESSES, load


def write_seeds(name: str, corpus: Path) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = load(name).seeds()
    for s in seeds:
        (corpus / f"seed-{hashlib.sha1(s).hexdigest()[:16]}").write_bytes(s)
    return len(seeds)


def parse(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    covs = re.findall(r"cov: (\d+)", text)
    fts = re.findall(r"ft: (\d+)", text)
    out["coverage_edges"] = int(covs[-1]) if covs else None
    out["features"] = int(fts[-1]) if fts else None
    for key in ("number_of_executed_units", "peak_rss_mb", "average_exec_per_sec"):
        m = re.search(rf"stat::{key}:\s*(\d+)", text)
        out[key] = int(m.group(1)) if m else None
    return out


def run_one(name: str, kind: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    corpus = out / "fuzz-corpus" / name
    crashes = out / "fuzz-crashes" / name
    crashes.mkdir(parents=True, exist_ok=True)
    nseeds = write_seeds(name, corpus)
    stateful = kind == "stateful"
    seconds = args.stateful_seconds if stateful else args.seconds
    cmd = [sys.executable, "-m", "fuzz.runner", name, f"-max_total_time={seconds}",
           "-print_final_stats=1", f"-artifact_prefix={crashes}/", f"-timeout={args.timeout}",
           f"-rss_limit_mb={args.rss_limit_mb}", "-max_len=4096", str(corpus)]
    if not stateful:
        cmd.insert(4, f"-runs={args.runs}")
    if args.nice:
        cmd = ["nice", "-n", "19", *cmd]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                          env={**os.environ, "PYTHONHASHSEED": "0"}, check=False)
    elapsed = time.monotonic() - started
    (out / "fuzz-logs").mkdir(parents=True, exist_ok=True)
    (out / "fuzz-logs" / f"{name}.log").write_text(proc.stdout + proc.stderr)
    figures = parse(proc.stderr + proc.stdout)
    found = sorted(p.name for p in crashes.iterdir())
    return {"harness": name, "kind": kind, "seeds": nseeds, "seconds": round(elapsed, 1),
            "inputs": figures["number_of_executed_units"],
            "coverage_edges": figures["coverage_edges"], "features": figures["features"],
            "exec_per_sec": figures["average_exec_per_sec"],
            "peak_rss_mb": figures["peak_rss_mb"], "exit_code": proc.returncode,
            "crashes": [f for f in found if f.startswith(("crash-", "oom-", "leak-"))],
            "hangs": [f for f in found if f.startswith(("timeout-", "slow-unit-"))]}


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("harness", "kind", "inputs", "seconds", "coverage_edges", "peak_rss_mb")
    lines = [f"{'harness':16} {'kind':9} {'inputs':>10} {'s':>6} {'cov':>6} {'rss MB':>7} "
             f"{'crash':>5} {'hang':>4}"]
    for r in rows:
        vals = [r[c] if r[c] is not None else "-" for c in cols]
        lines.append(f"{vals[0]:16} {vals[1]:9} {vals[2]:>10} {vals[3]:>6} {vals[4]:>6} "
                     f"{vals[5]:>7} {len(r['crashes']):>5} {len(r['hangs']):>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(env.get("FUZZ_RUNS", 1_000_000)),
                    help="inputs per decoder/responder harness (default $FUZZ_RUNS or 1000000)")
    ap.add_argument("--seconds", type=int, default=int(env.get("FUZZ_SECONDS", 600)),
                    help="time cap per decoder/responder harness (default $FUZZ_SECONDS or 600)")
    ap.add_argument("--stateful-seconds", type=int,
                    default=int(env.get("FUZZ_STATEFUL_SECONDS", 300)),
                    help="time for each stateful (socket) harness (default "
                         "$FUZZ_STATEFUL_SECONDS or 300)")
    ap.add_argument("--timeout", type=int, default=25, help="seconds per input (a hang)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048,
                    help="memory per harness process; above it counts as unbounded growth")
    ap.add_argument("--out", type=Path, default=Path("out"),
                    help="where fuzz.json, the corpora, logs and crash inputs go")
    ap.add_argument("--only", nargs="*", choices=HARNESSES, default=None,
                    help="run only these harnesses")
    ap.add_argument("--no-nice", dest="nice", action="store_false",
                    help="do not run the harnesses under nice -n 19")
    args = ap.parse_args(argv)
    rows = []
    for name in args.only or HARNESSES:
        kind = load(name).kind
        print(f"fuzz: {name} ({kind}) ...", flush=True)
        rows.append(run_one(name, kind, args, args.out))
        (args.out / "fuzz.json").write_text(json.dumps(
            {"runs": args.runs, "seconds": args.seconds,
             "stateful_seconds": args.stateful_seconds, "harnesses": rows}, indent=2) + "\n")
    print(table(rows))
    bad = [r["harness"] for r in rows if r["crashes"] or r["hangs"]]
    if bad:
        print(f"crashes or hangs in: {', '.join(bad)} (inputs under {args.out}/fuzz-crashes/)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
