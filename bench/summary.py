"""The benchmarks' one summary: every ``out/bench*.json`` that exists, read into one table
(figure, anchor, ratio, spread, goal met or not), printed as markdown and written to
``bench-summary.md`` and ``bench-summary.json``, with the plots (``bench.summary_plots``)
beside the JSON.

Run as ``python -m bench.summary [--out DIR] [--no-plots]``.  Goals are read as the JSON
states them (``goals``, ``goal``, ``target`` entries carrying ``met``); the figures behind
them come from what each benchmark reports.  How to read it: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import summary_plots

#: The benchmarks' files in the order ``make bench`` writes them; any other bench-*.json
#: found is read after them.
ORDER = ("bench.json", "bench-backends.json", "bench-vfio.json", "bench-spdm.json",
         "bench-link.json", "bench-tdi.json", "bench-cli.json", "bench-nvme.json")
SUMMARY_JSON, SUMMARY_MD = "bench-summary.json", "bench-summary.md"
COLUMNS = ("bench", "figure", "value", "anchor", "ratio", "spread", "goal", "met")
#: What a deriver may trip over when a benchmark's JSON changes shape.
SHAPE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError)
BUDGET = re.compile(r"(?:<=|≤)\s*([0-9.]+)\s*(us|µs|ms)\b")

Doc = Mapping[str, Any]


# -- formatting ---------------------------------------------------------------------------------
def num(x: float) -> str:
    """About three significant figures, thousands grouped."""
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return "0" if a == 0 else f"{x:.3g}"


def size_text(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def short_name(file: str) -> str:
    """``bench.json`` -> ``bench``, ``bench-link.json`` -> ``link``."""
    stem = file.removesuffix(".json")
    return stem.removeprefix("bench-") if stem != "bench" else stem


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


# -- goals, read generically ----------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    met: bool | None
    measured: dict[str, float]
    reason: str | None = None


def _goal(name: str, g: Mapping[str, Any]) -> Goal:
    target = g.get("target")
    if not isinstance(target, str):
        target = ", ".join(f"{k} {v:g}" for k, v in g.items()
                           if k.startswith("target") and _number(v) is not None)
    given = g.get("measured")
    measured = {str(k): float(v) for k, v in (given if isinstance(given, Mapping) else {}).items()
                if _number(v) is not None}
    measured |= {k: float(v) for k, v in g.items()
                 if _number(v) is not None and not k.startswith("target")}
    met = g.get("met")
    reason = g.get("reason")
    return Goal(name, target, met if isinstance(met, bool) else None, measured,
                reason if isinstance(reason, str) else None)


def _qualifiers(item: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """The qualifiers of a ``target`` entry: its integer and text fields."""
    leave = {"reason", "judged_on", *skip}
    return ", ".join(f"{k} {v}" for k, v in item.items()
                     if isinstance(v, int | str) and not isinstance(v, bool)
                     and not k.startswith("target") and k not in leave)


def goals_of(doc: Doc) -> list[Goal]:
    """Every goal a benchmark's JSON states: ``goals`` (a mapping of name to goal, or a list),
    ``goal`` (one), ``target`` (a list of entries); a goal is a mapping with ``met``."""
    out: list[Goal] = []
    goals = doc.get("goals")
    if isinstance(goals, Mapping):
        out += [_goal(str(k), g) for k, g in goals.items() if isinstance(g, Mapping) and "met" in g]
    elif isinstance(goals, list):
        out += [_goal(str(g.get("name", f"goals[{i}]")), g) for i, g in enumerate(goals)
                if isinstance(g, Mapping) and "met" in g]
    if isinstance(doc.get("goal"), Mapping) and "met" in doc["goal"]:
        out.append(_goal("goal", doc["goal"]))
    if isinstance(doc.get("target"), list):
        out += [_goal(f"target {_qualifiers(t)}", t) for t in doc["target"]
                if isinstance(t, Mapping) and "met" in t]
    return out


class Goals:
    """A benchmark's goals; a deriver takes those its rows carry, the rest get rows of
    their own."""

    def __init__(self, doc: Doc) -> None:
        self.all = goals_of(doc)
        self.taken: set[str] = set()

    def take(self, name: str) -> Goal | None:
        for g in self.all:
            if g.name == name:
                self.taken.add(name)
                return g
        return None

    def rest(self) -> list[Goal]:
        return [g for g in self.all if g.name not in self.taken]


# -- rows -----------------------------------------------------------------------------------------
@dataclass
class Row:
    bench: str
    figure: str
    value: float | None
    unit: str
    anchor: str = "—"
    ratio: float | None = None
    spread: str = "—"
    goal: str = "—"
    met: bool | None = None
    has_goal: bool = False
    spread_pct: float | None = None

    def with_goal(self, g: Goal | None) -> Row:
        if g is not None:
            self.goal, self.met, self.has_goal = g.target or g.name, g.met, True
        return self

    def cells(self) -> list[str]:
        met = ("yes" if self.met else "no") if self.met is not None else "n/a"
        value = "—" if self.value is None else f"{num(self.value)} {self.unit}".strip()
        return [self.bench, self.figure, value, self.anchor,
                "—" if self.ratio is None else num(self.ratio), self.spread, self.goal,
                met if self.has_goal else "—"]


def rounds_spread(s: Mapping[str, Any]) -> tuple[str, float]:
    """A ``{median, min, max, spread_pct}`` over rounds: its spread, as text and number."""
    pct = float(s["spread_pct"])
    return (f"{pct:.0f}%" if abs(pct) >= 10 else f"{pct:.1f}%"), pct


def pct_spread(s: Mapping[str, Any], unit: str) -> str:
    """p10–p90 of a distribution with ``p10_<unit>`` and ``p90_<unit>`` keys."""
    return f"p10–p90 {num(s[f'p10_{unit}'])}–{num(s[f'p90_{unit}'])} {unit}"


Deriver = Callable[[Doc, Goals, list[str]], list[Row]]


def dma_rows(doc: Doc, goals: Goals, notes: list[str]) -> list[Row]:
    """bench.json: the fixed cost of a small job, and throughput against memcpy."""
    rows: list[Row] = []
    # The goal's figure: the unprobed server's CPU per job (posted writes, as QEMU sends
    # a guest's BAR writes); older reports only have the probed split's sum.
    unprobed = doc.get("dma_unprobed_cost") or []
    costs = doc.get("dma_fixed_cost") or []
    cost = next((c for c in unprobed if c.get("mode") == "default"), None)
    split = next((c for c in costs if c.get("mode") == "default"), costs[0] if costs else None)
    if cost is not None or split is not None:
        g = goals.take("fixed_cost")
        chosen = cost if cost is not None else split
        assert chosen is not None
        job = chosen["job"].split()
        budget = BUDGET.search(g.target) if g is not None else None
        total = float(cost["server_cpu_us"] if cost is not None else chosen["total_cpu_us"])
        how = (f"server CPU, {cost.get('writes', 'posted').replace('_', '-')} writes"
               if cost is not None else "server CPU")
        row = Row("bench", f"DMA fixed cost per {job[0]} {size_text(int(job[1]))} job, {how}",
                  total, "µs")
        if budget is not None:
            limit = float(budget.group(1)) * (1000 if budget.group(2) == "ms" else 1)
            row.anchor, row.ratio = f"goal budget: {limit:g} µs", total / limit
        rows.append(row.with_goal(g))
    points = doc.get("dma_throughput") or []
    copy_goal = goals.take("copy_throughput")
    goal_sizes = {int(k.split()[-1]) for k in (copy_goal.measured if copy_goal else {})
                  if k.startswith("ratio_server ")}
    # the goal is judged on the batch leg where the run has one (older runs: single jobs)
    goal_op = "COPY_BATCH" if any(p["op"] == "COPY_BATCH" for p in points) else "COPY"
    for op in dict.fromkeys(p["op"] for p in points):
        mine = sorted((p for p in points if p["op"] == op), key=lambda p: p["size"])
        copies = op in ("COPY", "COPY_BATCH")
        chosen = [p for p in mine if copies and p["size"] in goal_sizes] or mine[-1:]
        for p in chosen:
            text, pct = rounds_spread(p["ratio_server"])
            what = (f"COPY {size_text(p['size'])}, {p['jobs_per_go']} jobs per GO (BATCH)"
                    if op == "COPY_BATCH" else f"{op} {size_text(p['size'])}")
            rows.append(Row(
                "bench", f"DMA {what}, server (GO → completion)",
                float(p["engine_server_MBps"]["median"]), "MB/s",
                f"memcpy, same run: {num(p['memcpy_MBps']['median'])} MB/s",
                float(p["ratio_server"]["median"]), text, spread_pct=pct,
            ).with_goal(copy_goal if p["size"] in goal_sizes and op == goal_op else None))
        if copies and mine:
            p = mine[-1]
            text, pct = rounds_spread(p["ratio_end_to_end"])
            how = f", {p['jobs_per_go']} jobs per GO (BATCH)" if op == "COPY_BATCH" else ""
            rows.append(Row(
                "bench", f"DMA COPY {size_text(p['size'])}{how}, end to end (client)",
                float(p["engine_end_to_end_MBps"]["median"]), "MB/s",
                f"memcpy, same run: {num(p['memcpy_MBps']['median'])} MB/s",
                float(p["ratio_end_to_end"]["median"]), text, spread_pct=pct))
    return rows


def backend_rows(doc: Doc, goals: Goals, notes: list[str]) -> list[Row]:
    """bench-backends.json: round trips per server, each against the pure-Python one."""
    rows: list[Row] = []
    legs: Mapping[str, Any] = doc["backends"]
    base = (legs.get("python") or {}).get("summary") or {}
    for name, leg in legs.items():
        if "skipped" in leg:
            notes.append(f"backends: the {name} leg was skipped: {leg['skipped']}")
            continue
        summary = leg.get("summary") or {}
        for key, what in (("read_median_us", "register read round trip"),
                          ("posted_write_per_op_us", "posted register write")):
            if key not in summary:
                continue
            text, pct = rounds_spread(summary[key])
            row = Row("backends", f"{what}, {name} server", float(summary[key]["median"]), "µs",
                      spread=text, spread_pct=pct)
            if name != "python" and key in base:
                row.anchor = f"python server, same run: {num(base[key]['median'])} µs"
                row.ratio = row.value / float(base[key]["median"]) if row.value else None
            rows.append(row)
    return rows


def vfio_rows(doc: Doc, goals: Goals, notes: list[str]) -> list[Row]:
    """bench-vfio.json: each server's round trips against libvfio-user's C sample server
    (the goal on this server's), the spread over the rounds' medians."""
    legs: Mapping[str, Any] = doc["legs"]
    c = legs.get("c-sample")
    g = goals.take("goal")
    for s in doc.get("skipped") or []:
        notes.append(f"vfio: the {s.get('name')} leg was skipped: {s.get('reason')}")
    rows: list[Row] = []
    for name, leg in legs.items():
        for kind in ("read", "write"):
            st = leg.get(kind)
            if not st or name == "c-sample":
                continue
            rounds = [float(x) for x in st.get("round_medians_us") or []]
            spread = (f"{100 * (max(rounds) - min(rounds)) / st['median_us']:.0f}%"
                      if len(rounds) > 1 and st["median_us"] else "—")
            value = float(st["median_us"])
            row = Row("vfio", f"REGION_{kind.upper()} round trip, {name} server", value, "µs",
                      spread=spread)
            if c is not None and c.get(kind):
                row.anchor = f"libvfio-user C sample, same run: {num(c[kind]['median_us'])} µs"
                row.ratio = value / float(c[kind]["median_us"])
            if name == "python":
                row = row.with_goal(g)
            rows.append(row)
    return rows


def spdm_rows(doc: Doc, goals: Goals, notes: list[str]) -> list[Row]:
    """bench-spdm.json: a full connect against the cryptography it contains."""
    return [Row("spdm", f"SPDM connect, {r['key']} {r['path']}",
                float(r["ms_per_connect"]["median_ms"]), "ms",
                f"crypto-only: {num(r['crypto_ms_per_connect'])} ms", float(r["overhead_ratio"]),
                pct_spread(r["ms_per_connect"], "ms"))
            for r in doc["results"]]


def link_rows(doc: Doc, goals: Goals, notes: list[str]) -> list[Row]:
    """bench-link.json: IDE on against raw AES-GCM at the same MPS, per direction."""
    rows: list[Row] = []
    results = doc.get("results") or []
    target_ratio = doc.get("meta", {}).get("target_ratio")
    goal_text = (f"IDE on ≥ {target_ratio:g}× raw AES-GCM" if _number(target_ratio)
                 is not None else "")
    for t in doc.get("target") or []:
        g = goals.take(f"target {_qualifiers(t)}")
        extra = _qualifiers(t, ("mps", "size"))
        for direction in ("write", "read"):
            if f"{direction}_ratio" not in t:
                continue
            match = [r for r in results if r.get("mps") == t["mps"]
                     and r.get("size") == t["size"] and r.get("direction") == direction]
            value = float(match[0]["ide_on"]["MBps"]) if match else None
            row = Row("link", f"IDE on, {direction}, MPS {t['mps']}, {size_text(t['size'])}"
                      + (f", {extra}" if extra else ""), value, "MB/s",
                      f"raw AES-GCM at MPS {t['mps']}: {num(t['raw_aes_gcm_MBps'])} MB/s",
                      float(t[f"{direction}_ratio"])).with_goal(g)
            if g is not None and goal_text:
                row.goal = goal_text
            rows.append(row)
    return rows


def tdi_rows(doc: Doc, goals: Goals, notes: list[str]) -> list[Row]:
    """bench-tdi.json: LOCK → RUN as the guest times it, and its largest step."""
    cycles = doc["cycles"]
    total = cycles.get("lock_to_run_ms") or {}
    if not total:
        return []
    rows = [Row("tdi", "TDI_LOCK → RUN, guest-timed (TCG)", float(total["median"]), "ms",
                spread=f"min–max {num(total['min'])}–{num(total['max'])} ms")]
    steps = {k: s for k, s in (cycles.get("steps") or {}).items()
             if _number(s.get("share_of_lock_to_run")) is not None}
    if steps:
        name, s = max(steps.items(), key=lambda kv: kv[1]["share_of_lock_to_run"])
        rows.append(Row("tdi", f"largest step of LOCK → RUN: {name}", float(s["median_ms"]), "ms",
                        f"LOCK → RUN: {num(total['median'])} ms",
                        float(s["share_of_lock_to_run"]),
                        f"min–max {num(s['min_ms'])}–{num(s['max_ms'])} ms"))
    return rows


def cli_rows(doc: Doc, goals: Goals, notes: list[str]) -> list[Row]:
    """bench-cli.json: ``attest --session`` against spdm-emu; start-up against the floor."""
    legs = {leg["name"]: leg for leg in doc["legs"]}
    skipped = doc.get("skipped") or []
    for s in skipped:
        notes.append(f"cli: the {s['name']} leg was skipped: {s['reason']}")
    rows: list[Row] = []
    floor = legs.get("floor")
    if "tsm_help" in legs and floor is not None:
        leg = legs["tsm_help"]
        rows.append(Row("cli", "CLI start-up: teeio-tsm --help, wall",
                        float(leg["wall"]["median_ms"]), "ms",
                        f"floor (python -c pass): {num(floor['wall']['median_ms'])} ms",
                        float(leg["ratio_to_floor"]), pct_spread(leg["wall"], "ms")))
    # The goal's leg (as installed, where the benchmark made that copy) first, then the
    # checkout's editable install beside it.
    judged = str((doc.get("goal") or {}).get("judged_on") or "tsm_attest_session")
    g = goals.take("goal")
    for name in dict.fromkeys((judged, "tsm_attest_session")):
        if name not in legs:
            continue
        leg, emu = legs[name], legs.get("spdm_emu_requester")
        how = "installed" if name != "tsm_attest_session" else "editable checkout"
        row = Row("cli", f"teeio-tsm attest --session ({how}), wall",
                  float(leg["wall"]["median_ms"]), "ms", spread=pct_spread(leg["wall"], "ms"))
        if name == judged:
            row = row.with_goal(g)
        if emu is not None:
            row.anchor = f"spdm_emu_requester: {num(emu['wall']['median_ms'])} ms"
            row.ratio = _number(leg.get("ratio_to_spdm_emu"))
        else:
            row.anchor = "spdm_emu_requester: not run"
        if g is not None and name == judged:
            target = _number(doc["goal"].get("target_ratio"))
            row.goal = f"≤ {target:g}× spdm_emu_requester" if target else row.goal
            if g.reason and all(s["reason"] != g.reason for s in skipped):
                notes.append(f"cli: goal: {g.reason}")
        rows.append(row)
    return rows


DERIVERS: dict[str, Deriver] = {
    "bench.json": dma_rows, "bench-backends.json": backend_rows, "bench-vfio.json": vfio_rows,
    "bench-spdm.json": spdm_rows,
    "bench-link.json": link_rows, "bench-tdi.json": tdi_rows, "bench-cli.json": cli_rows,
}


def goal_row(bench: str, g: Goal) -> Row:
    """A goal no deriver took: its measured figures in the row."""
    ratios = [v for k, v in g.measured.items() if "ratio" in k]
    measured = ", ".join(f"{k} {num(v)}" for k, v in g.measured.items())
    name = g.name if g.name.startswith("goal") else f"goal {g.name}"
    return Row(bench, name + (f": {measured}" if measured else ""), None, "",
               ratio=g.measured.get("ratio", ratios[0] if len(ratios) == 1 else None)
               ).with_goal(g)


def rows_of(file: str, doc: Doc, notes: list[str]) -> list[Row]:
    """One benchmark's rows: its deriver's (when it has one) and every goal left."""
    bench = short_name(file)
    goals = Goals(doc)
    rows: list[Row] = []
    deriver = DERIVERS.get(file)
    if deriver is not None:
        try:
            rows = deriver(doc, goals, notes)
        except SHAPE_ERRORS as exc:
            notes.append(f"{bench}: figures not read ({type(exc).__name__}: {exc}); "
                         "its goals are listed as the JSON states them")
            rows, goals.taken = [], set()
    rows += [goal_row(bench, g) for g in goals.rest()]
    if not rows:
        notes.append(f"{bench}: no goals and no figures this summary knows: see {file}")
    meta = doc.get("meta")
    if isinstance(meta, Mapping):
        if meta.get("affinity_verified") is False and meta.get("cpu_pinned") is not None:
            notes.append(f"{bench}: thread affinity not verified (see its meta)")
        if meta.get("quick"):
            notes.append(f"{bench}: a --quick run")
    return rows


# -- the files, the summary -----------------------------------------------------------------------
def load(out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The benchmarks' JSON in *out*: {file: document}, and {file: read | missing | why not}."""
    extra = sorted(p.name for p in out.glob("bench-*.json")
                   if p.name not in ORDER and p.name != SUMMARY_JSON)
    docs: dict[str, dict[str, Any]] = {}
    status: dict[str, str] = {}
    for name in (*ORDER, *extra):
        path = out / name
        if not path.is_file():
            status[name] = "missing"
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            status[name] = f"unreadable: {exc}"
            continue
        if isinstance(doc, dict):
            docs[name], status[name] = doc, "read"
        else:
            status[name] = "unreadable: not a JSON object"
    return docs, status


@dataclass
class Summary:
    rows: list[Row]
    files: dict[str, str]
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    plots_skipped: str | None = None

    def goal_counts(self) -> dict[str, int]:
        with_goal = [r for r in self.rows if r.has_goal]
        return {"met": sum(r.met is True for r in with_goal),
                "not_met": sum(r.met is False for r in with_goal),
                "unknown": sum(r.met is None for r in with_goal)}

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(COLUMNS), "rows": [asdict(r) for r in self.rows],
                "goals": self.goal_counts(), "files": self.files, "notes": self.notes,
                "plots": self.plots, "plots_skipped": self.plots_skipped}


def summarise(docs: Mapping[str, Doc], files: Mapping[str, str]) -> Summary:
    notes = [f"{name}: {state}" for name, state in files.items() if state != "read"]
    rows: list[Row] = []
    for name, doc in docs.items():
        rows += rows_of(name, doc, notes)
    return Summary(rows, dict(files), list(dict.fromkeys(notes)))


def table(rows: Iterable[Row]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return [line(COLUMNS), line(["---"] * len(COLUMNS)), *(line(r.cells()) for r in rows)]


def markdown(s: Summary) -> str:
    c = s.goal_counts()
    out = ["# Benchmark summary", "", *table(s.rows), "",
           f"Goals: {c['met']} met, {c['not_met']} not met, {c['unknown']} unknown."]
    if s.notes:
        out += ["", "Notes:", *(f"- {n}" for n in s.notes)]
    if s.plots_skipped is not None:
        out += ["", f"Plots skipped: {s.plots_skipped}."]
    elif s.plots:
        out += ["", "Plots: " + ", ".join(s.plots) + "."]
    return "\n".join(out) + "\n"


def run(out: Path, plots: bool = True) -> Summary:
    docs, files = load(out)
    s = summarise(docs, files)
    if not plots:
        s.plots_skipped = "--no-plots"
    else:
        reason = summary_plots.unavailable()
        if reason is not None:
            s.plots_skipped = reason
        else:
            written, problems = summary_plots.write_plots(docs, out)
            s.plots = [p.name for p in written]
            s.notes += problems
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_JSON).write_text(json.dumps(s.to_json(), indent=2) + "\n")
    (out / SUMMARY_MD).write_text(markdown(s))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.summary",
                                 description="one table of every benchmark's figures and "
                                             "goals, and their plots")
    ap.add_argument("--out", type=Path, default=Path("out"),
                    help="where the bench*.json are and the summary goes (default out)")
    ap.add_argument("--no-plots", action="store_true", help="the table only")
    args = ap.parse_args(argv)
    print(markdown(run(args.out, not args.no_plots)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
