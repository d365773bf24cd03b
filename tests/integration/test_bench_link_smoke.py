"""Smoke test of the link DMA benchmark: a tiny run in-process, JSON layout, sane numbers;
the IDE legs (every path, aggregation off and on) and the goal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import bench_link
from teeio import ide_accel

MODELS = ("ide_off", "ide_on", "bounce", "bounce_aes_gcm")


@pytest.mark.timeout(90)
def test_bench_link_quick_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "bench-link.json"
    affinity = os.sched_getaffinity(0)

    assert bench_link.main(["--quick", "--iterations", "2", "--mps", "256,4096",
                            "--sizes", "4096,12288", "--out", str(out)]) == 0

    assert os.sched_getaffinity(0) == affinity  # the pinning is undone
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report) == {"meta", "raw_aes_gcm", "results", "ide_legs", "target", "goal",
                           "notes"}

    meta = report["meta"]
    for key in ("python", "platform", "date", "cryptography", "openssl", "cpu_pinned"):
        assert key in meta
    assert meta["quick"] is True and meta["iterations"] == 2
    assert meta["mps"] == [256, 4096] and meta["sizes"] == [4096, 12288]
    assert meta["mrrs"] == 4096 and meta["target_ratio"] == 0.5
    assert meta["cpu_pinned"] in affinity and meta["affinity_verified"] is True
    assert meta["accelerator"]["available"] == ide_accel.available()

    raw = {r["payload"]: r for r in report["raw_aes_gcm"]}
    assert set(raw) == {256, 4096}
    assert all(r["MBps"] > 0 and r["us_per_payload"] > 0 for r in raw.values())

    results = report["results"]
    assert [(r["mps"], r["size"], r["direction"]) for r in results] == [
        (mps, size, d) for mps in (256, 4096) for size in (4096, 12288)
        for d in ("write", "read")]
    for r in results:
        where = (r["mps"], r["size"], r["direction"])
        for m in MODELS:
            assert r[m]["MBps"] > 0 and r[m]["reps"] == 2, (where, m)
        assert r["raw_aes_gcm_MBps"] == raw[r["mps"]]["MBps"]
        assert r["ratio"] == pytest.approx(r["ide_on"]["MBps"] / r["raw_aes_gcm_MBps"],
                                           abs=1e-4)
        assert r["target_met"] == (r["ratio"] >= 0.5)
        assert r["tlps"] >= r["size"] // r["mps"]
    w = next(r for r in results if r["mps"] == 256 and r["size"] == 12288
             and r["direction"] == "write")
    assert w["tlps"] == 48

    paths = ["c", "python"] if ide_accel.enabled() else ["python"]
    legs = report["ide_legs"]
    assert [(g["mps"], g["backend"], g["aggregation"], g["direction"]) for g in legs] == [
        (mps, b, agg, d) for mps in (256, 4096) for b in paths for agg in (1, 8)
        for d in ("write", "read")]
    for g in legs:
        assert g["size"] == 12288 and g["pairs"] == 2
        assert g["ide_MBps"] > 0 and g["raw_MBps"] > 0 and g["ratio"] > 0
        assert g["met"] == (g["ratio"] >= 0.5)
    by = {(g["mps"], g["backend"], g["aggregation"], g["direction"]): g for g in legs}
    assert by[256, "python", 1, "write"]["gcm_invocations"] == 48     # one per TLP
    assert by[256, "python", 8, "write"]["gcm_invocations"] == 12     # 4 x 256 B per MAC
    assert by[4096, "python", 8, "read"]["gcm_invocations"] == 1 + 3  # 3 MRds, 3 CplDs

    assert [(t["mps"], t["size"]) for t in report["target"]] == [(256, 12288), (4096, 12288)]
    for t in report["target"]:
        assert (t["backend"], t["aggregation"]) == (paths[0], 8)
        assert t["met"] == (t["write_ratio"] >= 0.5 and t["read_ratio"] >= 0.5)
        assert t["write_ratio"] == by[t["mps"], paths[0], 8, "write"]["ratio"]
    goal = report["goal"]
    assert goal["met"] == all(t["met"] for t in report["target"])
    assert set(goal["met_by_path"]) == {f"{b}, aggregation {a}" for b in paths for a in (1, 8)}
    assert isinstance(report["notes"], str) and report["notes"]


@pytest.mark.parametrize("argv", [["--mps", "300"], ["--mps", ""], ["--sizes", "0"],
                                  ["--mrrs", "8192"], ["--iterations", "0"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench_link.parse_args(argv)
