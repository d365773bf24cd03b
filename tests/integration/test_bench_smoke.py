"""Smoke test of the benchmark: a tiny run in-process, JSON layout and sanity of the numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import bench


@pytest.mark.timeout(60)
def test_bench_quick_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "bench.json"
    affinity = os.sched_getaffinity(0)

    assert bench.main(["--quick", "--iterations", "5", "--out", str(out)]) == 0

    assert os.sched_getaffinity(0) == affinity  # the pinning is undone
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report) == {"meta", "region_access", "dma", "notes"}

    meta = report["meta"]
    for key in ("python", "platform", "cpu_pinned", "date", "quick"):
        assert key in meta
    assert meta["quick"] is True and meta["iterations"] == 5
    assert meta["cpu_pinned"] in affinity and meta["affinity_verified"] is True

    ra = report["region_access"]
    for kind in ("read", "write"):
        stats = ra[kind]
        assert stats["n"] == 5
        assert 0 < stats["p10_us"] <= stats["median_us"] <= stats["p90_us"]
    assert ra["write_posted"]["n"] == 5
    assert ra["write_posted"]["per_op_us"] > 0

    dma = report["dma"]
    assert [(d["op"], d["size"]) for d in dma] == [
        ("COPY", 4096), ("COPY", 65536), ("COPY", 1 << 20), ("FILL", 1 << 20),
        ("SHA256", 1 << 20)]
    for d in dma:
        for key in ("engine_MBps", "memcpy_MBps", "baseline_MBps", "ratio"):
            assert d[key] > 0, (d["op"], d["size"], key)
        assert d["engine_reps"] == 5 and d["baseline_reps"] == 5
    assert dma[-1]["baseline"] == "hashlib.sha256"
    assert isinstance(report["notes"], str) and report["notes"]


def test_iterations_must_allow_percentiles() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--iterations", "1"])
