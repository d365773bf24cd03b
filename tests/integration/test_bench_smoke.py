"""Smoke test of the benchmark: a tiny run with the device server in a child process, JSON
layout and sanity of the numbers; the split arithmetic on a made-up server report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import bench, dma_cost

SIZES = [4096, 16384, 65536, 1 << 18, 1 << 20, 1 << 22]
STEPS = {"register_writes", "go_write", "status_polls", "transport", "handoff", "completion",
         "interrupt"}


@pytest.mark.timeout(120)
def test_bench_quick_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "bench.json"
    affinity = os.sched_getaffinity(0)

    assert bench.main(["--quick", "--iterations", "3", "--out", str(out)]) == 0

    assert os.sched_getaffinity(0) == affinity  # the pinning is undone
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report) == {"meta", "region_access", "dma_fixed_cost", "dma_unprobed_cost",
                           "dma_throughput", "goals", "notes"}

    meta = report["meta"]
    for key in ("python", "platform", "cpu_pinned", "date", "quick", "probe_overhead_us"):
        assert key in meta
    assert meta["quick"] is True and meta["iterations"] == 3 and meta["rounds"] == 2
    assert meta["cpu_pinned"] in affinity and meta["affinity_verified"] is True
    assert meta["server_process_pinned"] is True

    ra = report["region_access"]
    for kind in ("read", "write"):
        stats = ra[kind]
        assert stats["n"] == 3
        assert 0 < stats["p10_us"] <= stats["median_us"] <= stats["p90_us"]
    assert ra["write_posted"]["n"] == 3 and ra["write_posted"]["per_op_us"] > 0

    default, non_posted, threaded = report["dma_fixed_cost"]
    assert [(c["mode"], c["writes"]) for c in report["dma_fixed_cost"]] == [
        ("default", "posted"), ("default", "non_posted"), ("engine_thread", "posted")]
    for split in (default, non_posted, threaded):
        assert split["job"] == "COPY 4096" and split["jobs"] == 3
        assert set(split["steps"]) == STEPS
        assert split["messages_per_job"] >= 7           # SRC/DST LO+HI, LEN, GO, a poll
        assert split["steps"]["register_writes"]["per_job"] == 5
        assert all(s["cpu_us"] > 0 for s in split["steps"].values()), split["steps"]
        assert split["total_cpu_us"] == pytest.approx(
            sum(s["cpu_us"] for s in split["steps"].values()), abs=0.01)
        assert split["dma_cpu_us"] > 0 and split["client_us_per_job"] > 0
    assert default["jobs_inline"] == 3 and default["handoff_wait_wall_us"] is None
    assert threaded["jobs_engine_thread"] == 3 and threaded["handoff_wait_wall_us"] > 0
    # The same messages either way; only whether the writes are answered differs.
    assert default["messages_per_job"] == non_posted["messages_per_job"]

    unprobed = report["dma_unprobed_cost"]
    assert [(c["mode"], c["writes"]) for c in unprobed] == [
        ("default", "posted"), ("default", "non_posted"), ("engine_thread", "posted")]
    for cost in unprobed:
        assert cost["job"] == "COPY 4096" and cost["jobs"] == 3
        assert cost["server_cpu_us"] > 0 and cost["client_us_per_job"] > 0

    points = report["dma_throughput"]
    assert [(p["op"], p["size"]) for p in points] == [
        (op, size) for op in ("COPY", "FILL", "SHA256", "COPY_BATCH") for size in SIZES]
    for p in points:
        assert p["jobs_per_op"] == max(1, p["size"] >> 20)
        # a batch fills the longest list the engine takes: 64 jobs of up to 1 MiB
        assert p["jobs_per_go"] == (64 if p["op"] == "COPY_BATCH" else 1)
        for key in ("engine_end_to_end_MBps", "engine_server_MBps", "memcpy_MBps",
                    "ratio_end_to_end", "ratio_server"):
            s = p[key]
            assert 0 < s["min"] <= s["median"] <= s["max"] and s["spread_pct"] >= 0, key
        # The server's share of a job is part of what the client waits for.
        assert p["engine_server_MBps"]["median"] > p["engine_end_to_end_MBps"]["median"]
        assert (p["hashlib_MBps"] is not None) == (p["op"] == "SHA256")

    goals = report["goals"]
    assert set(goals) == {"fixed_cost", "copy_throughput"}
    assert goals["fixed_cost"]["met"] == (unprobed[0]["server_cpu_us"] <= 100)
    assert goals["fixed_cost"]["measured"]["server_cpu_us"] == unprobed[0]["server_cpu_us"]
    batch_1m = next(p for p in points if (p["op"], p["size"]) == ("COPY_BATCH", 1 << 20))
    copy_1m = next(p for p in points if (p["op"], p["size"]) == ("COPY", 1 << 20))
    measured = goals["copy_throughput"]["measured"]
    assert measured["ratio_server 1048576"] == batch_1m["ratio_server"]["median"]
    assert measured["single_job_ratio_server 1048576"] == copy_1m["ratio_server"]["median"]
    assert goals["copy_throughput"]["met"] == (
        min(measured["ratio_server 1048576"], measured["ratio_server 4194304"]) >= 0.8)
    assert isinstance(report["notes"], str) and "child process" in report["notes"]


def test_split_steps_per_job() -> None:
    def step(n: int, cpu: float, wall: float) -> dict[str, float]:
        return {"n": n, "cpu_median_us": cpu, "wall_median_us": wall}

    rep = {"steps": {"register_write": step(50, 10.0, 11.0), "go_write": step(10, 12.0, 12.0),
                     "register_read": step(15, 8.0, 9.0), "start_job": step(10, 5.0, 6.0),
                     "completion": step(10, 2.0, 2.0), "interrupt": step(10, 3.0, 3.0),
                     "dma": step(10, 40.0, 41.0)},
           "counts": {"messages": 75, "transport_cpu_ns": 75 * 4000, "jobs_inline": 10}}
    split = dma_cost.split_steps(rep, 10, "default", 900.0)
    steps = split["steps"]
    assert steps["register_writes"] == {"per_job": 5.0, "cpu_us": 50.0, "wall_us": 55.0}
    assert steps["status_polls"] == {"per_job": 1.5, "cpu_us": 12.0, "wall_us": 13.5}
    assert steps["transport"] == {"per_job": 7.5, "cpu_us": 30.0, "wall_us": None}
    assert split["total_cpu_us"] == 50 + 12 + 12 + 30 + 5 + 2 + 3
    assert split["dma_cpu_us"] == 40.0 and split["messages_per_job"] == 7.5
    assert split["handoff_wait_wall_us"] is None and split["jobs_inline"] == 10


def test_iterations_must_allow_percentiles() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--iterations", "1"])
