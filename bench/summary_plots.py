"""PNG plots of the benchmarks' JSON, written beside it by ``bench.summary``: round trips
per server, IDE throughput per MPS against raw AES-GCM and the bounce models, DMA
throughput per size against memcpy (and the fixed-cost split), LOCK → RUN by step, SPDM
connects against their crypto, CLI start-up, and a bar chart of the figures of any other
benchmark (NVMe).  matplotlib is optional (the ``bench`` extra); what each plot shows:
docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Doc = Mapping[str, Any]
Docs = Mapping[str, Doc]
SHAPE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError)
#: The files the named plots below read; any other bench-*.json gets a generic plot.
KNOWN = frozenset({"bench.json", "bench-backends.json", "bench-vfio.json", "bench-spdm.json",
                   "bench-link.json", "bench-tdi.json", "bench-cli.json"})
#: Leaf names the generic plot draws (a figure per item: throughput, rate, time).
GENERIC_SUFFIXES = ("MBps", "mbps", "iops", "IOPS", "_ms", "_us", "median")
GENERIC_LABELS = ("name", "leg", "backend", "mode", "op", "path", "workload", "rw", "size",
                  "qd", "iodepth", "bs")


def unavailable() -> str | None:
    """Why the plots cannot be drawn, or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    return None


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log2_sizes(ax: Any, sizes: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [_size(n) for n in sizes])
    ax.set_xlabel(label)


def _size(n: int) -> str:
    for unit, k in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


# -- the plots ----------------------------------------------------------------------------------
def roundtrips(plt: Any, docs: Docs) -> Any:
    """Per server, each round's register read and write round trips (median, p10–p90) and
    posted writes: bench-backends.json's legs and bench.json's child-process server."""
    servers: list[tuple[str, list[Doc]]] = []
    for name, leg in (docs.get("bench-backends.json", {}).get("backends") or {}).items():
        if leg.get("rounds"):
            servers.append((name, [r["region_access"] for r in leg["rounds"]]))
    if "region_access" in docs.get("bench.json", {}):
        servers.append(("python, child process\n(bench.json)",
                        [docs["bench.json"]["region_access"]]))
    for name, leg in (docs.get("bench-vfio.json", {}).get("legs") or {}).items():
        if leg.get("read") and leg.get("write"):     # its client in a process of its own
            servers.append((f"{name}\n(bench-vfio.json)", [leg]))
    if not servers:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, key, title in zip(axes, ("read", "write", "write_posted"),
                              ("REGION_READ round trip", "REGION_WRITE round trip",
                               "posted write, per op"), strict=True):
        for i, (_, rounds) in enumerate(servers):
            n = len(rounds)
            for j, ra in enumerate(rounds):
                x = i + (j - (n - 1) / 2) * 0.1
                s = ra.get(key)
                if s is None:
                    continue
                if key == "write_posted":
                    ax.plot([x], [s["per_op_us"]], "o", color=f"C{i}")
                    continue
                ax.errorbar([x], [s["median_us"]], yerr=[[s["median_us"] - s["p10_us"]],
                                                         [s["p90_us"] - s["median_us"]]],
                            fmt="o", color=f"C{i}", capsize=3)
        ax.set_xticks(range(len(servers)), [s[0] for s in servers], fontsize=7, rotation=30,
                      ha="right")
        ax.set_xlim(-0.6, len(servers) - 0.4)
        ax.set_yscale("log")
        ax.set_ylabel("µs")
        ax.set_title(title, fontsize=10)
    fig.suptitle("Round trips per server: each round's median, whiskers p10–p90")
    return fig


def link(plt: Any, docs: Docs) -> Any:
    """IDE on and off, the bounce models and raw AES-GCM per MPS, at the largest size."""
    doc = docs.get("bench-link.json")
    if not doc or not doc.get("results"):
        return None
    results = doc["results"]
    size = max(r["size"] for r in results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, direction in zip(axes, ("write", "read"), strict=True):
        mine = sorted((r for r in results if r["size"] == size and r["direction"] == direction),
                      key=lambda r: r["mps"])
        if not mine:
            continue
        mps = [r["mps"] for r in mine]
        models = [k for k, v in mine[0].items() if isinstance(v, Mapping) and "MBps" in v]
        for i, model in enumerate(models):
            ax.plot(mps, [r[model]["MBps"] for r in mine], "o-", color=f"C{i}", label=model)
        ax.plot(mps, [r["raw_aes_gcm_MBps"] for r in mine], "k--", label="raw AES-GCM")
        _log2_sizes(ax, mps, "Max_Payload_Size (bytes)")
        ax.set_yscale("log")
        ax.set_title(f"{direction}, {_size(size)} transfers", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MB/s")
    axes[0].legend(fontsize=8)
    fig.suptitle("DMA through the link: IDE per MPS against raw AES-GCM and the bounce models")
    return fig


def dma(plt: Any, docs: Docs) -> Any:
    """The engine's throughput per size against memcpy (median, range over rounds), and
    the fixed cost of a small job split by step."""
    doc = docs.get("bench.json")
    if not doc or not doc.get("dma_throughput"):
        return None
    points = doc["dma_throughput"]
    ops = list(dict.fromkeys(p["op"] for p in points))
    costs = doc.get("dma_fixed_cost") or []
    fig, axes = plt.subplots(1, len(ops) + bool(costs), figsize=(4.6 * (len(ops) + 1), 4.5),
                             squeeze=False)
    series = (("engine_server_MBps", "engine, server (GO → done)"),
              ("engine_end_to_end_MBps", "engine, end to end"), ("memcpy_MBps", "memcpy"),
              ("hashlib_MBps", "hashlib.sha256"))
    for ax, op in zip(axes[0], ops, strict=False):
        mine = sorted((p for p in points if p["op"] == op), key=lambda p: p["size"])
        sizes = [p["size"] for p in mine]
        for i, (key, label) in enumerate(series):
            if any(p.get(key) is None for p in mine):
                continue
            ax.plot(sizes, [p[key]["median"] for p in mine], "o-", color=f"C{i}", label=label)
            ax.fill_between(sizes, [p[key]["min"] for p in mine], [p[key]["max"] for p in mine],
                            color=f"C{i}", alpha=0.2)
        _log2_sizes(ax, sizes, "size")
        ax.set_yscale("log")
        ax.set_ylabel("MB/s")
        ax.set_title(f"COPY, {mine[0].get('jobs_per_go', 64)} jobs per GO (BATCH)"
                     if op == "COPY_BATCH" else op, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if costs:
        ax = axes[0][-1]
        for y, cost in enumerate(costs):
            left = 0.0
            for i, (step, v) in enumerate(cost["steps"].items()):
                ax.barh(y, v["cpu_us"], left=left, color=f"C{i}", label=step if y == 0 else None)
                left += v["cpu_us"]
            ax.barh(y, cost["dma_cpu_us"], left=left, color="white", edgecolor="grey",
                    hatch="//", label="transfers (not fixed)" if y == 0 else None)
        ax.set_yticks(range(len(costs)), [_cost_label(c) for c in costs], fontsize=8)
        ax.set_xlabel("server CPU per job (µs)")
        op, _, size = str(costs[0]["job"]).partition(" ")
        ax.set_title(f"fixed cost of one {op} {_size(int(size))} job", fontsize=10)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.suptitle("DMA engine: throughput per size against memcpy (band: min–max of rounds)")
    return fig


def _cost_label(cost: dict[str, Any]) -> str:
    """A fixed-cost run's short name: its writes, and where its jobs ran if not default."""
    writes = str(cost.get("writes", "")).replace("_", "-")
    where = "" if cost.get("mode") == "default" else str(cost.get("mode")).replace("_", " ")
    return "\n".join(x for x in (writes, where) if x) or str(cost.get("mode"))


def tdi(plt: Any, docs: Docs) -> Any:
    """Each step's median with its min–max; the LOCK → RUN steps coloured."""
    cycles = docs.get("bench-tdi.json", {}).get("cycles") or {}
    steps = cycles.get("steps") or {}
    if not steps:
        return None
    names = list(steps)
    med = [steps[n]["median_ms"] for n in names]
    err = [[m - steps[n]["min_ms"] for n, m in zip(names, med, strict=True)],
           [steps[n]["max_ms"] - m for n, m in zip(names, med, strict=True)]]
    colours = ["C0" if steps[n].get("share_of_lock_to_run") is not None else "grey"
               for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(range(len(names)), med, xerr=err, color=colours, capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    for y, n in enumerate(names):
        share = steps[n].get("share_of_lock_to_run")
        if share is not None:
            ax.annotate(f"{share:.0%}", (med[y], y), xytext=(4, 4), textcoords="offset points",
                        fontsize=8)
    ax.set_xlabel("ms (guest clock)")
    total = cycles.get("lock_to_run_ms") or {}
    ax.set_title(f"TDI_LOCK → RUN: {total.get('median', '?')} ms median; blue: its steps "
                 "(share), grey: beside it")
    return fig


def spdm(plt: Any, docs: Docs) -> Any:
    results = docs.get("bench-spdm.json", {}).get("results") or []
    if not results:
        return None
    labels = [f"{r['key']}\n{r['path']}" for r in results]
    med = [r["ms_per_connect"]["median_ms"] for r in results]
    err = [[m - r["ms_per_connect"]["p10_ms"] for m, r in zip(med, results, strict=True)],
           [r["ms_per_connect"]["p90_ms"] - m for m, r in zip(med, results, strict=True)]]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([x - 0.2 for x in xs], med, 0.4, yerr=err, capsize=3, label="connect (p10–p90)")
    ax.bar([x + 0.2 for x in xs], [r["crypto_ms_per_connect"] for r in results], 0.4,
           label="its crypto alone")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms per connect")
    ax.legend()
    ax.set_title("SPDM connect against the cryptography it contains")
    return fig


def cli(plt: Any, docs: Docs) -> Any:
    legs = docs.get("bench-cli.json", {}).get("legs") or []
    if not legs:
        return None
    xs = range(len(legs))
    fig, ax = plt.subplots(figsize=(9, 4))
    for off, key, label in ((-0.2, "wall", "wall (p10–p90)"), (0.2, "cpu", "CPU (p10–p90)")):
        med = [leg[key]["median_ms"] for leg in legs]
        err = [[m - leg[key]["p10_ms"] for m, leg in zip(med, legs, strict=True)],
               [leg[key]["p90_ms"] - m for m, leg in zip(med, legs, strict=True)]]
        ax.bar([x + off for x in xs], med, 0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(list(xs), [leg["name"].replace("_", "\n", 2) for leg in legs], fontsize=7)
    ax.set_ylabel("ms per process")
    ax.legend()
    ax.set_title("CLI processes, spawn to exit")
    return fig


# -- any other benchmark -------------------------------------------------------------------------
def _items(doc: Doc) -> list[tuple[str, list[tuple[str, Doc]]]]:
    """Top-level lists (or mappings) of records: [(key, [(label, record)])]."""
    out = []
    for key, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            recs = [(" ".join(str(x[k]) for k in GENERIC_LABELS if isinstance(x.get(k), str | int)
                              and not isinstance(x.get(k), bool)) or str(i), x)
                    for i, x in enumerate(v)]
        elif isinstance(v, Mapping) and v and all(isinstance(x, Mapping) for x in v.values()):
            recs = [(str(k), x) for k, x in v.items()]
        else:
            continue
        out.append((key, recs))
    return out


def _leaves(rec: Doc, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """The numeric figures of a record (two levels deep) whose names GENERIC_SUFFIXES end."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and depth < 1:
            out |= _leaves(v, name + ".", depth + 1)
        elif (isinstance(v, int | float) and not isinstance(v, bool)
              and str(k).endswith(GENERIC_SUFFIXES)):
            out[name] = float(v)
    return out


def generic(plt: Any, doc: Doc, title: str) -> Any:
    """Bars of each figure (up to four) over the records that have it."""
    panels: list[tuple[str, list[tuple[str, float]]]] = []
    for key, recs in _items(doc):
        leaves = [(label, _leaves(rec)) for label, rec in recs]
        for metric in dict.fromkeys(m for _, ls in leaves for m in ls):
            panels.append((f"{key}: {metric}", [(lb, ls[metric]) for lb, ls in leaves
                                                if metric in ls]))
    panels = panels[:4]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, bars) in zip(axes[0], panels, strict=True):
        ax.bar(range(len(bars)), [b[1] for b in bars], color=[f"C{i}" for i in range(len(bars))])
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title)
    return fig


PLOTS: tuple[tuple[str, Callable[[Any, Docs], Any]], ...] = (
    ("bench-roundtrips.png", roundtrips), ("bench-link.png", link), ("bench-dma.png", dma),
    ("bench-tdi.png", tdi), ("bench-spdm.png", spdm), ("bench-cli.png", cli),
)


def write_plots(docs: Docs, out: Path) -> tuple[list[Path], list[str]]:
    """Draw every plot whose data is in *docs* into *out*: (files written, problems)."""
    plt = _pyplot()
    jobs: list[tuple[str, Callable[[], Any]]] = [
        (name, functools.partial(fn, plt, docs)) for name, fn in PLOTS]
    for file, doc in docs.items():
        if file not in KNOWN:
            stem = file.removesuffix(".json")
            jobs.append((f"{stem}.png", functools.partial(generic, plt, doc, stem)))
    written: list[Path] = []
    problems: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in jobs:
        try:
            fig = draw()
        except SHAPE_ERRORS as exc:
            problems.append(f"{name}: not drawn ({type(exc).__name__}: {exc})")
            plt.close("all")
            continue
        if fig is None:
            continue
        try:
            fig.savefig(out / name, dpi=100, bbox_inches="tight")
            written.append(out / name)
        finally:
            plt.close(fig)
    return written, problems
