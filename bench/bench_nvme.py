"""Benchmark: Linux's stock nvme driver under fio in a TCG guest, four ways.

Run as ``python -m bench.bench_nvme [--out FILE] [--rounds N] [--runtime S] [--quick]``
(needs the guest image: ``make image``).  The same fio jobs (sequential 128 KiB write and
read, random 4 KiB write and read; libaio, direct I/O on the raw namespace) on:

* ``no_tee``: the TDISP NVMe function not locked (``accept --no-tee``): T=0 DMA, no IDE;
* ``swiotlb``: the same at T=0 in a guest booted with ``swiotlb=force``: every DMA goes
  through the shared bounce buffer, as a confidential VM's driver does today;
* ``tee_io``: the accepted TDI (``accept``): T=1 DMA on the IDE stream into private memory;
* ``qemu_nvme``: QEMU's own emulated NVMe controller in the same guest (the anchor), and
  ``qemu_nvme_swiotlb`` the same under ``swiotlb=force``.

Two boots (bench/nvme_boot.py): ``plain`` runs no_tee and qemu_nvme alternately, then
accepts the TDI and runs tee_io; ``swiotlb`` runs swiotlb and qemu_nvme_swiotlb.  Per leg
and job: IOPS, MB/s, the guest's CPU time per I/O (fio's usr+sys x runtime / I/Os), mean
completion latency, the host CPU of the device server and QEMU, each the median of the
rounds with its range, and ratios to no_tee.  The reading: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import emit_report, host_meta, spread
from bench.nvme_boot import BOOTS, QEMU_NVME_IDS, BootError, FioPlan, NvmeBoot
from qemu_configs import image
from qemu_configs.launcher import LaunchError
from teeio import personality as personalities

#: job -> (fio --rw, --bs); the guest script runs them in this order
JOBS: dict[str, tuple[str, int]] = {
    "seq_write": ("write", 128 << 10), "seq_read": ("read", 128 << 10),
    "rand_write": ("randwrite", 4 << 10), "rand_read": ("randread", 4 << 10)}
BASELINE = "no_tee"
LEGS: dict[str, dict[str, Any]] = {
    "no_tee": {"label": "(a) TDISP NVMe, not locked: T=0, no IDE", "device": "teeio-nvme",
               "t_bit": 0, "ide": False, "bounce": False, "boot": "plain"},
    "swiotlb": {"label": "(b) TDISP NVMe at T=0, guest swiotlb=force (bounce buffer)",
                "device": "teeio-nvme", "t_bit": 0, "ide": False, "bounce": True,
                "boot": "swiotlb"},
    "tee_io": {"label": "(c) TEE-IO: accepted TDI, T=1 DMA on the IDE stream",
               "device": "teeio-nvme", "t_bit": 1, "ide": True, "bounce": False,
               "boot": "plain"},
    "qemu_nvme": {"label": "(d) QEMU's emulated NVMe (anchor)", "device": "qemu-nvme",
                  "t_bit": None, "ide": False, "bounce": False, "boot": "plain"},
    "qemu_nvme_swiotlb": {"label": "QEMU's emulated NVMe, guest swiotlb=force",
                          "device": "qemu-nvme", "t_bit": None, "ide": False, "bounce": True,
                          "boot": "swiotlb"},
}
COMMANDS = ("nvme.namespace.read_commands", "nvme.namespace.write_commands")
#: device counters reported per command (those that moved)
PER_COMMAND = ("link.tlps_upstream", "link.tlps_downstream", "link_endpoint.ide_tlps_tx",
               "link_endpoint.ide_tlps_rx", "irq_signalled")
RATIOS = ("iops", "mb_s", "guest_cpu_us_per_io", "device_cpu_us_per_command")
HIGH_SPREAD_PCT = 25.0


# -- one fio job's figures ----------------------------------------------------------------------
def fio_figures(doc: dict[str, Any]) -> dict[str, float]:
    """IOPS, MB/s, the guest's CPU time per I/O and the mean completion latency of the one
    job in fio's JSON output *doc*."""
    job = doc["jobs"][0]
    if job.get("error"):
        raise ValueError(f"fio job {job.get('jobname')}: error {job['error']}")
    dirs = [job[d] for d in ("read", "write") if job[d]["total_ios"] > 0]
    ios = sum(d["total_ios"] for d in dirs)
    if ios == 0:
        raise ValueError(f"fio job {job.get('jobname')}: no I/O completed")
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    clat = sum(d["clat_ns"]["mean"] * d["total_ios"] for d in dirs) / ios
    return {"iops": sum(d["iops"] for d in dirs),
            "mb_s": sum(d["bw_bytes"] for d in dirs) / 1e6,
            "guest_cpu_us_per_io": cpu_s * 1e6 / ios, "clat_mean_us": clat / 1000,
            "ios": float(ios), "runtime_s": job["job_runtime"] / 1000}


def host_figures(go: dict[str, Any], done: dict[str, Any]) -> dict[str, float]:
    """What the host spent between a job's two pauses: cores busy in the device server and
    QEMU, and with the device's own command count, device CPU and counters per command."""
    wall = done["t"] - go["t"]
    dev_cpu = done["device_cpu_s"] - go["device_cpu_s"]
    out = {"wall_s": wall, "device_cores": dev_cpu / wall,
           "qemu_cores": (done["qemu_cpu_s"] - go["qemu_cpu_s"]) / wall}
    delta = {k: done["counters"].get(k, 0.0) - go["counters"].get(k, 0.0)
             for k in set(done["counters"]) | set(go["counters"])}
    commands = sum(delta.get(k, 0.0) for k in COMMANDS)
    if commands > 0:
        out["device_commands"] = commands
        out["device_cpu_us_per_command"] = dev_cpu * 1e6 / commands
        # what the device model could serve with a core of its own
        out["device_bound_iops"] = commands / dev_cpu if dev_cpu > 0 else 0.0
        for k in PER_COMMAND:
            if delta.get(k):
                out[f"per_command.{k}"] = delta[k] / commands
    return out


# -- a whole run --------------------------------------------------------------------------------
def collect(boot_dir: Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    """leg -> job -> [figures of each round] from one boot's folder."""
    info = json.loads((boot_dir / "snapshots.json").read_text())
    snaps = {s["point"]: s for s in info["snapshots"]}
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for path in sorted((boot_dir / "results" / "fio").glob("*.json"),
                       key=lambda p: snaps.get(f"go-{p.stem}", {}).get("t", 0.0)):
        leg, _round, job = path.stem.split("-")
        figures = fio_figures(json.loads(path.read_text()))
        go, done = snaps.get(f"go-{path.stem}"), snaps.get(f"done-{path.stem}")
        if go is not None and done is not None:
            figures.update(host_figures(go, done))
        out.setdefault(leg, {}).setdefault(job, []).append(figures)
    return out


def summarise_leg(jobs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for job in JOBS:
        rounds = jobs.get(job, [])
        if not rounds:
            continue
        keys = sorted({k for r in rounds for k in r if all(k in x for x in rounds)})
        out[job] = {"rounds": len(rounds),
                    **{k: spread([r[k] for r in rounds], 3) for k in keys if k != "ios"}}
    return out


def ratios(legs: dict[str, Any]) -> dict[str, Any]:
    """Each leg's medians over no_tee's: IOPS, MB/s, guest CPU per I/O, and for the TDISP
    NVMe the device server's CPU per command."""
    base = legs.get(BASELINE, {})
    out: dict[str, Any] = {}
    for leg, jobs in legs.items():
        out[leg] = {}
        for job, fig in jobs["jobs"].items():
            b = base.get("jobs", {}).get(job)
            if b is None:
                continue
            out[leg][job] = {k: round(fig[k]["median"] / b[k]["median"], 3)
                             if b[k]["median"] else None for k in RATIOS
                             if k in fig and k in b}
    return out


def bounces(res: Path) -> dict[str, int] | None:
    """Pages swiotlb bounced (its trace event) while the guest read 1 MiB from each
    device, by device; None if the guest did not count them."""
    counted, ids = res / "swiotlb-bounced.txt", res / "pci-ids.txt"
    if not counted.exists() or not ids.exists():
        return None
    names = {f"{personalities.VENDOR_ID:04x}:{personalities.NVME.device_id:04x}": "teeio-nvme",
             QEMU_NVME_IDS: "qemu-nvme"}
    by_bdf = {bdf: names.get(pid.replace("0x", ""), bdf)
              for bdf, pid in (line.split() for line in ids.read_text().splitlines())}
    out = {name: 0 for name in names.values()}
    for line in counted.read_text().splitlines():
        n, bdf = line.split()
        out[by_bdf.get(bdf, bdf)] = out.get(by_bdf.get(bdf, bdf), 0) + int(n)
    return out


def boot_facts(boot_dir: Path) -> dict[str, Any]:
    info = json.loads((boot_dir / "snapshots.json").read_text())
    res = boot_dir / "results"
    facts: dict[str, Any] = {"boot": info["boot"], "seconds": info["seconds"],
                             "kernel_params_added": info["kernel_params_added"],
                             "legs": list(BOOTS[info["boot"]]["legs"])}
    for name in ("kernel.txt", "fio-version.txt", "namespaces.txt"):
        if (res / name).exists():
            facts[name.split(".")[0].replace("-", "_")] = (res / name).read_text().strip()
    facts["swiotlb_bounces_reading_1mib"] = bounces(res)
    return facts


def build_report(boot_dirs: Sequence[Path], plan: FioPlan) -> dict[str, Any]:
    legs: dict[str, Any] = {}
    boots = []
    for d in boot_dirs:
        boots.append(boot_facts(d))
        for leg, jobs in collect(d).items():
            legs[leg] = {**LEGS[leg], "jobs": summarise_leg(jobs)}
    ordered = {leg: legs[leg] for leg in LEGS if leg in legs}
    return {
        "benchmark": "nvme_fio",
        "meta": {**host_meta(None, [], 0, False), "accel": "tcg",
                 "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "guest": {"vcpus": 1, "memory_mb": plan.memory_mb},
                 "fio": {"ioengine": "libaio", "direct": True, "iodepth": plan.iodepth,
                         "runtime_s": plan.runtime, "ramp_s": plan.ramp, "size": plan.size,
                         "time_based": True},
                 "jobs": {k: {"rw": rw, "bs": bs} for k, (rw, bs) in JOBS.items()},
                 "rounds": plan.rounds, "nvme_size": plan.nvme_size, "boots": boots},
        "legs": ordered,
        "ratios_to_no_tee": ratios(ordered),
        "notes": notes(ordered, boots),
    }


def notes(legs: dict[str, Any], boots: list[dict[str, Any]]) -> list[str]:
    out = ["Figures are medians of the rounds with min, max and spread; legs of one boot "
           "alternate round by round (no_tee, qemu_nvme; then tee_io after the accept).",
           "guest_cpu_us_per_io = fio (usr_cpu + sys_cpu) x job_runtime / I/Os; in a TCG "
           "guest it is guest time, which runs about as fast as the emulated CPU.",
           "device_cores / qemu_cores: host CPU seconds per second of the job (pause to "
           "pause, fio's start-up in the guest included); device_cpu_us_per_command: the "
           "device server's CPU over the commands its namespace served; device_bound_iops: "
           "the commands it would serve per second with one core of its own.",
           "On a shared machine a descheduled QEMU stretches the guest's clock: IOPS and "
           "guest CPU per I/O move with the load; the device's CPU per command much less."]
    missing = [leg for leg in LEGS if leg not in legs]
    if missing:
        out.append(f"Legs not measured: {', '.join(missing)}.")
    for b in boots:
        bounced = b.get("swiotlb_bounces_reading_1mib")
        if bounced is not None:
            out.append(f"{b['boot']} boot: swiotlb bounced " + ", ".join(
                f"{n} pages of {dev}" for dev, n in sorted(bounced.items()))
                + " while the guest read 1 MiB from each (its trace event).")
    wide = sorted({f"{leg}/{job}" for leg, v in legs.items() for job, f in v["jobs"].items()
                   if f["iops"]["spread_pct"] > HIGH_SPREAD_PCT})
    if wide:
        out.append(f"IOPS spread above {HIGH_SPREAD_PCT:g}% (a shared machine): "
                   + ", ".join(wide) + ".")
    return out


# -- plots ---------------------------------------------------------------------------------------
def plot(report: dict[str, Any], out: Path) -> list[str]:
    """PNG bar charts beside *out* (IOPS, guest CPU per I/O); [] and a note if matplotlib
    is not importable."""
    try:
        mpl: Any = importlib.import_module("matplotlib")
    except ImportError:
        report["notes"].append("matplotlib is not installed: no plots.")
        return []
    mpl.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    out.parent.mkdir(parents=True, exist_ok=True)     # beside the JSON, written after them
    written = []
    for key, title, log in (("iops", "IOPS", True), ("mb_s", "MB/s", True),
                            ("guest_cpu_us_per_io", "guest CPU µs per I/O", True)):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        legs = list(report["legs"])
        width = 0.8 / max(1, len(legs))
        for i, leg in enumerate(legs):
            jobs = report["legs"][leg]["jobs"]
            xs = [j + i * width for j, _ in enumerate(JOBS)]
            ys = [jobs[job][key]["median"] if job in jobs else 0 for job in JOBS]
            ax.bar(xs, ys, width, label=leg)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(JOBS))], list(JOBS))
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.set_title(f"NVMe under fio, TCG guest: {title}")
        ax.legend(fontsize=8)
        path = out.with_name(f"{out.stem}-{key.replace('_', '-')}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# -- CLI -----------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return v


def _size(text: str) -> str:
    try:
        personalities.namespace_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_nvme", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results as JSON here (plots beside)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every job (default 3)")
    ap.add_argument("--runtime", type=_positive_float, default=3.0,
                    help="seconds of each fio job after its ramp (default 3)")
    ap.add_argument("--ramp", type=float, default=1.0, help="fio --ramp_time (default 1)")
    ap.add_argument("--iodepth", type=int, default=8, help="fio --iodepth (default 8)")
    ap.add_argument("--size", type=_size, default="32M",
                    help="the region of the namespace the jobs cover (default 32M)")
    ap.add_argument("--boots", default="plain,swiotlb",
                    help="which boots: plain (no_tee, qemu_nvme, tee_io), swiotlb "
                         "(swiotlb, qemu_nvme_swiotlb); default both")
    ap.add_argument("--quick", action="store_true",
                    help="one round of 1 s jobs, no ramp (a smoke run)")
    ap.add_argument("--workdir", type=Path,
                    help="keep each boot's folder (logs, fio JSON, snapshots) under here")
    ap.add_argument("--from-workdir", type=Path, metavar="DIR",
                    help="no boot: summarise the boots a --workdir run kept in DIR")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    boots = [b.strip() for b in ns.boots.split(",") if b.strip()]
    bad = [b for b in boots if b not in BOOTS]
    if bad or not boots or ns.rounds < 1 or ns.iodepth < 1 or ns.ramp < 0:
        print(f"error: --boots takes {', '.join(BOOTS)}; --rounds and --iodepth at least 1, "
              "--ramp not negative", file=sys.stderr)
        return 2
    plan = (FioPlan(rounds=1, runtime=1.0, ramp=0.0, size=ns.size, iodepth=ns.iodepth)
            if ns.quick else FioPlan(rounds=ns.rounds, runtime=ns.runtime, ramp=ns.ramp,
                                     size=ns.size, iodepth=ns.iodepth))
    if ns.from_workdir is not None:
        dirs = [ns.from_workdir / b for b in BOOTS if (ns.from_workdir / b /
                                                       "snapshots.json").exists()]
        if not dirs:
            print(f"error: no boot folder with snapshots.json in {ns.from_workdir}",
                  file=sys.stderr)
            return 1
        return _report(dirs, _plan_of(dirs[0], plan), ns.out)
    if not image.is_built():
        print("error: the guest image is not built: run 'make image'", file=sys.stderr)
        return 1
    root = ns.workdir or Path(tempfile.mkdtemp(prefix="teeio-bench-nvme-"))
    try:
        dirs = []
        for b in boots:
            wd = root / b
            if wd.exists():
                shutil.rmtree(wd)
            wd.mkdir(parents=True)
            (wd / "plan.json").write_text(json.dumps(plan.__dict__))
            try:
                NvmeBoot(wd, b, plan).run()
            except (BootError, LaunchError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            dirs.append(wd)
        return _report(dirs, plan, ns.out)
    finally:
        if ns.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _plan_of(boot_dir: Path, default: FioPlan) -> FioPlan:
    p = boot_dir / "plan.json"
    return FioPlan(**json.loads(p.read_text())) if p.exists() else default


def _report(dirs: list[Path], plan: FioPlan, out: Path | None) -> int:
    try:
        report = build_report(dirs, plan)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: the runs' results: {exc}", file=sys.stderr)
        return 1
    report["plots"] = plot(report, out) if out is not None else []
    emit_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
