"""bench.summary: synthetic benchmark JSON in, exact table rows out; missing and changed
files tolerated, goal flags carried; the plots when matplotlib is there."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from bench import summary, summary_plots
from bench.summary import load, markdown, run, summarise, table

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def spread(median: float, lo: float, hi: float, pct: float) -> dict[str, float]:
    return {"median": median, "min": lo, "max": hi, "spread_pct": pct}


def point(op: str, size: int, server: float, memcpy: float, pct: float = 5.0) -> dict[str, Any]:
    return {"op": op, "size": size, "jobs_per_op": 1,
            "engine_end_to_end_MBps": spread(server / 10, server / 11, server / 9, 20.0),
            "engine_server_MBps": spread(server, server, server, 0.0),
            "memcpy_MBps": spread(memcpy, memcpy, memcpy, 0.0), "hashlib_MBps": None,
            "ratio_end_to_end": spread(server / 10 / memcpy, 0, 1, 21.5),
            "ratio_server": spread(server / memcpy, 0, 1, pct)}


def bench_doc() -> dict[str, Any]:
    step = {"per_job": 1.0, "cpu_us": 100.0, "wall_us": 90.0}
    latency = {"n": 10, "median_us": 50.0, "p10_us": 40.0, "p90_us": 70.0, "mean_us": 52.0}
    return {
        "meta": {"quick": False, "affinity_verified": True, "cpu_pinned": 0, "rounds": 5},
        "region_access": {"read": latency, "write": latency,
                          "write_posted": {"n": 10, "total_us": 300.0, "per_op_us": 30.0}},
        "dma_fixed_cost": [
            {"job": "COPY 4096", "mode": "default", "steps": {"register_writes": step},
             "total_cpu_us": 540.0, "total_wall_us": 400.0, "dma_cpu_us": 100.0},
            {"job": "COPY 4096", "mode": "engine_thread", "steps": {"register_writes": step},
             "total_cpu_us": 600.0, "total_wall_us": 450.0, "dma_cpu_us": 100.0}],
        "dma_throughput": [point("COPY", 4096, 20.0, 4000.0),
                           point("COPY", 1 << 20, 2400.0, 20000.0, 1.4),
                           point("COPY", 4 << 20, 2000.0, 16000.0, 12.34),
                           point("FILL", 4 << 20, 5000.0, 20000.0)],
        "goals": {
            "fixed_cost": {"target": "server-side fixed cost per job <= 100 us",
                           "judged_on": "...", "measured": {"total_cpu_us": 540.0}, "met": False},
            "copy_throughput": {"target": "COPY >= 0.8x memcpy at >= 1 MiB",
                                "measured": {"ratio_server 1048576": 0.12,
                                             "ratio_server 4194304": 0.125},
                                "met": False}},
    }


def write(out: Path, name: str, doc: object) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(doc))


def rows_for(tmp_path: Path, name: str, doc: object) -> tuple[list[str], summary.Summary]:
    write(tmp_path, name, doc)
    s = summarise(*load(tmp_path))
    return table(s.rows)[2:], s


HEADER = "| bench | figure | value | anchor | ratio | spread | goal | met |"


def test_copy_goal_goes_to_the_batch_rows(tmp_path: Path) -> None:
    """With a batch leg the COPY goal is judged there; single jobs keep their rows."""
    doc = bench_doc()
    batch = [dict(point("COPY_BATCH", n, server, 20000.0), jobs_per_go=64)
             for n, server in ((1 << 20, 17000.0), (4 << 20, 16500.0))]
    doc["dma_throughput"] = doc["dma_throughput"][:3] + batch
    doc["goals"]["copy_throughput"] = {
        "target": "COPY >= 0.8x memcpy at >= 1 MiB",
        "measured": {"ratio_server 1048576": 0.85, "ratio_server 4194304": 0.825,
                     "single_job_ratio_server 1048576": 0.12}, "met": True}
    rows, s = rows_for(tmp_path, "bench.json", doc)
    goal = "COPY >= 0.8x memcpy at >= 1 MiB"
    assert rows[1:] == [
        "| bench | DMA COPY 1 MiB, server (GO → completion) | 2,400 MB/s | memcpy, same run: "
        "20,000 MB/s | 0.12 | 1.4% | — | — |",
        "| bench | DMA COPY 4 MiB, server (GO → completion) | 2,000 MB/s | memcpy, same run: "
        "16,000 MB/s | 0.125 | 12% | — | — |",
        "| bench | DMA COPY 4 MiB, end to end (client) | 200 MB/s | memcpy, same run: "
        "16,000 MB/s | 0.0125 | 22% | — | — |",
        "| bench | DMA COPY 1 MiB, 64 jobs per GO (BATCH), server (GO → completion) "
        f"| 17,000 MB/s | memcpy, same run: 20,000 MB/s | 0.85 | 5.0% | {goal} | yes |",
        "| bench | DMA COPY 4 MiB, 64 jobs per GO (BATCH), server (GO → completion) "
        f"| 16,500 MB/s | memcpy, same run: 20,000 MB/s | 0.825 | 5.0% | {goal} | yes |",
        "| bench | DMA COPY 4 MiB, 64 jobs per GO (BATCH), end to end (client) | 1,650 MB/s "
        "| memcpy, same run: 20,000 MB/s | 0.0825 | 22% | — | — |",
    ]
    assert s.goal_counts()["met"] == 2


def test_dma_rows_exact(tmp_path: Path) -> None:
    rows, s = rows_for(tmp_path, "bench.json", bench_doc())
    copy_goal = "COPY >= 0.8x memcpy at >= 1 MiB"
    assert rows == [
        "| bench | DMA fixed cost per COPY 4 KiB job, server CPU | 540 µs | goal budget: 100 µs "
        "| 5.40 | — | server-side fixed cost per job <= 100 us | no |",
        "| bench | DMA COPY 1 MiB, server (GO → completion) | 2,400 MB/s | memcpy, same run: "
        f"20,000 MB/s | 0.12 | 1.4% | {copy_goal} | no |",
        "| bench | DMA COPY 4 MiB, server (GO → completion) | 2,000 MB/s | memcpy, same run: "
        f"16,000 MB/s | 0.125 | 12% | {copy_goal} | no |",
        "| bench | DMA COPY 4 MiB, end to end (client) | 200 MB/s | memcpy, same run: "
        "16,000 MB/s | 0.0125 | 22% | — | — |",
        "| bench | DMA FILL 4 MiB, server (GO → completion) | 5,000 MB/s | memcpy, same run: "
        "20,000 MB/s | 0.25 | 5.0% | — | — |",
    ]
    assert s.goal_counts() == {"met": 0, "not_met": 3, "unknown": 0}
    assert s.notes == [f"{n}: missing" for n in summary.ORDER if n != "bench.json"]


def test_dma_fixed_cost_row_takes_the_unprobed_server(tmp_path: Path) -> None:
    doc = bench_doc()
    doc["dma_unprobed_cost"] = [
        {"job": "COPY 4096", "mode": "default", "writes": "posted", "jobs": 300,
         "server_cpu_us": 80.0, "client_us_per_job": 200.0},
        {"job": "COPY 4096", "mode": "default", "writes": "non_posted", "jobs": 300,
         "server_cpu_us": 150.0, "client_us_per_job": 400.0}]
    doc["goals"]["fixed_cost"]["measured"] = {"server_cpu_us": 80.0, "total_cpu_us": 540.0}
    doc["goals"]["fixed_cost"]["met"] = True
    rows, _ = rows_for(tmp_path, "bench.json", doc)
    assert rows[0] == ("| bench | DMA fixed cost per COPY 4 KiB job, server CPU, posted writes "
                       "| 80.0 µs | goal budget: 100 µs | 0.8 | — | server-side fixed cost per "
                       "job <= 100 us | yes |")


def test_goal_met_flags_carried_and_new_goals_listed(tmp_path: Path) -> None:
    doc = bench_doc()
    doc["goals"]["copy_throughput"]["met"] = True
    doc["goals"]["probe_overhead"] = {"target": "probes <= 5 us", "measured": {"probe_us": 2.5},
                                      "met": True, "added_later": [1, 2]}
    doc["new_section"] = {"anything": 1}
    rows, s = rows_for(tmp_path, "bench.json", doc)
    assert [r.split(" | ")[-1] for r in rows] == ["no |", "yes |", "yes |", "— |", "— |",
                                                  "yes |"]
    assert rows[-1] == ("| bench | goal probe_overhead: probe_us 2.50 | — | — | — | — "
                        "| probes <= 5 us | yes |")
    assert s.goal_counts() == {"met": 3, "not_met": 1, "unknown": 0}


def test_backend_rows_against_the_python_server(tmp_path: Path) -> None:
    def leg(read: float, posted: float) -> dict[str, Any]:
        return {"summary": {"read_median_us": spread(read, read, read, 2.0),
                            "write_median_us": spread(read, read, read, 2.0),
                            "posted_write_per_op_us": spread(posted, posted, posted, 30.0)}}
    doc = {"backends": {"python": leg(44.0, 26.0), "libvfio-user": leg(44.0, 22.0),
                        "c-echo": {"skipped": "not built"}}}
    rows, s = rows_for(tmp_path, "bench-backends.json", doc)
    assert rows == [
        "| backends | register read round trip, python server | 44.0 µs | — | — | 2.0% | — | — |",
        "| backends | posted register write, python server | 26.0 µs | — | — | 30% | — | — |",
        "| backends | register read round trip, libvfio-user server | 44.0 µs | python server, "
        "same run: 44.0 µs | 1.00 | 2.0% | — | — |",
        "| backends | posted register write, libvfio-user server | 22.0 µs | python server, "
        "same run: 26.0 µs | 0.846 | 30% | — | — |",
    ]
    assert "backends: the c-echo leg was skipped: not built" in s.notes


def test_link_rows_carry_each_mps_target(tmp_path: Path) -> None:
    def result(direction: str, mbps: float) -> dict[str, Any]:
        return {"mps": 256, "size": 1 << 20, "direction": direction,
                "ide_on": {"MBps": mbps}, "ide_off": {"MBps": 9000.0}}
    doc = {"meta": {"target_ratio": 0.5},
           "results": [result("write", 76.0), result("read", 60.0)],
           "target": [{"mps": 256, "size": 1 << 20, "raw_aes_gcm_MBps": 369.0,
                       "write_ratio": 0.206, "read_ratio": 0.163, "met": False},
                      {"mps": 4096, "size": 1 << 20, "aggregation": 4, "raw_aes_gcm_MBps": 2800.0,
                       "write_ratio": 0.6, "read_ratio": 0.55, "met": True}]}
    rows, _ = rows_for(tmp_path, "bench-link.json", doc)
    assert rows == [
        "| link | IDE on, write, MPS 256, 1 MiB | 76.0 MB/s | raw AES-GCM at MPS 256: 369 MB/s "
        "| 0.206 | — | IDE on ≥ 0.5× raw AES-GCM | no |",
        "| link | IDE on, read, MPS 256, 1 MiB | 60.0 MB/s | raw AES-GCM at MPS 256: 369 MB/s "
        "| 0.163 | — | IDE on ≥ 0.5× raw AES-GCM | no |",
        "| link | IDE on, write, MPS 4096, 1 MiB, aggregation 4 | — | raw AES-GCM at MPS 4096: "
        "2,800 MB/s | 0.6 | — | IDE on ≥ 0.5× raw AES-GCM | yes |",
        "| link | IDE on, read, MPS 4096, 1 MiB, aggregation 4 | — | raw AES-GCM at MPS 4096: "
        "2,800 MB/s | 0.55 | — | IDE on ≥ 0.5× raw AES-GCM | yes |",
    ]


def test_spdm_and_tdi_rows_from_their_figures(tmp_path: Path) -> None:
    spdm = {"results": [{"key": "P-384", "path": "socket", "crypto_ms_per_connect": 2.6,
                         "overhead_ratio": 1.7, "ms_per_connect": {
                             "median_ms": 4.4, "p10_ms": 4.1, "p90_ms": 5.0}}]}
    step = {"min_ms": 20.0, "max_ms": 30.0, "n": 8}
    tdi = {"cycles": {"lock_to_run_ms": {"median": 41.0, "min": 38.0, "max": 48.0},
                      "steps": {"tdi_stop": {**step, "median_ms": 30.0,
                                             "share_of_lock_to_run": None},
                                "tdi_lock": {**step, "median_ms": 4.5,
                                             "share_of_lock_to_run": 0.11},
                                "verify": {**step, "median_ms": 24.3,
                                           "share_of_lock_to_run": 0.59}}}}
    write(tmp_path, "bench-spdm.json", spdm)
    rows, _ = rows_for(tmp_path, "bench-tdi.json", tdi)
    assert rows == [
        "| spdm | SPDM connect, P-384 socket | 4.40 ms | crypto-only: 2.60 ms | 1.70 "
        "| p10–p90 4.10–5.00 ms | — | — |",
        "| tdi | TDI_LOCK → RUN, guest-timed (TCG) | 41.0 ms | — | — | min–max 38.0–48.0 ms "
        "| — | — |",
        "| tdi | largest step of LOCK → RUN: verify | 24.3 ms | LOCK → RUN: 41.0 ms | 0.59 "
        "| min–max 20.0–30.0 ms | — | — |",
    ]


def test_cli_goal_without_spdm_emu_is_unknown(tmp_path: Path) -> None:
    def leg(name: str, wall: float, floor_ratio: float) -> dict[str, Any]:
        stats = {"median_ms": wall, "p10_ms": wall - 1, "p90_ms": wall + 1, "mean_ms": wall}
        return {"name": name, "wall": stats, "cpu": stats, "off_cpu_ms": 0.0,
                "ratio_to_floor": floor_ratio, "ratio_to_spdm_emu": None}
    doc = {"meta": {"affinity_verified": False, "cpu_pinned": None},
           "legs": [leg("floor", 60.0, 1.0), leg("tsm_help", 114.0, 1.9),
                    leg("tsm_attest_session", 443.0, 7.4)],
           "skipped": [{"name": "spdm_emu_requester", "reason": "TEEIO_SPDM_EMU is not set"}],
           "goal": {"target_ratio": 2.5, "ratio": None, "cpu_ratio": None, "met": None,
                    "reason": "TEEIO_SPDM_EMU is not set"}}
    rows, s = rows_for(tmp_path, "bench-cli.json", doc)
    assert rows == [
        "| cli | CLI start-up: teeio-tsm --help, wall | 114 ms | floor (python -c pass): "
        "60.0 ms | 1.90 | p10–p90 113–115 ms | — | — |",
        "| cli | teeio-tsm attest --session (editable checkout), wall | 443 ms | "
        "spdm_emu_requester: not run | — | p10–p90 442–444 ms | ≤ 2.5× spdm_emu_requester "
        "| n/a |",
    ]
    assert s.goal_counts()["unknown"] == 1
    # the same reason once; no affinity note for a benchmark that does not pin
    assert [n for n in s.notes if "TEEIO_SPDM_EMU" in n] == [
        "cli: the spdm_emu_requester leg was skipped: TEEIO_SPDM_EMU is not set"]
    assert not any("affinity" in n for n in s.notes)


def test_unknown_benchmark_goals_read_generically(tmp_path: Path) -> None:
    doc = {"goals": [{"name": "nvme_vs_emulated", "target": "teeio >= 0.5x emulated NVMe",
                      "measured": {"ratio": 0.4, "teeio_MBps": 120.0}, "met": False},
                     {"name": "no flag", "target": "ignored: no met"}],
           "goal": {"target_ratio": 2.0, "ratio": 1.5, "met": True}}
    rows, _ = rows_for(tmp_path, "bench-nvme.json", doc)
    assert rows == [
        "| nvme | goal nvme_vs_emulated: ratio 0.4, teeio_MBps 120 | — | — | 0.4 | — "
        "| teeio >= 0.5x emulated NVMe | no |",
        "| nvme | goal: ratio 1.50 | — | — | 1.50 | — | target_ratio 2 | yes |",
    ]


def test_missing_files_and_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert summary.main(["--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert HEADER in text and "Goals: 0 met, 0 not met, 0 unknown." in text
    assert "- bench-tdi.json: missing" in text and "Plots skipped: --no-plots." in text
    saved = json.loads((out / "bench-summary.json").read_text())
    assert saved["rows"] == [] and saved["files"]["bench.json"] == "missing"
    assert (out / "bench-summary.md").read_text() == text


def test_unreadable_and_reshaped_files_do_not_stop_the_summary(tmp_path: Path) -> None:
    (tmp_path / "bench-spdm.json").write_text("{not json")
    write(tmp_path, "bench-tdi.json", [1, 2])
    reshaped = bench_doc()
    for p in reshaped["dma_throughput"]:
        del p["ratio_server"]                       # a later version renamed it
    write(tmp_path, "bench.json", reshaped)
    s = summarise(*load(tmp_path))
    assert s.files["bench-spdm.json"].startswith("unreadable: ")
    assert s.files["bench-tdi.json"] == "unreadable: not a JSON object"
    assert any(n.startswith("bench: figures not read (KeyError") for n in s.notes)
    # the goals still come through, as the JSON states them
    assert [(r.figure.split(":")[0], r.met) for r in s.rows] == [
        ("goal fixed_cost", False), ("goal copy_throughput", False)]


def test_summary_output_is_not_read_back(tmp_path: Path) -> None:
    write(tmp_path, "bench.json", bench_doc())
    run(tmp_path, plots=False)
    run(tmp_path, plots=False)
    docs, files = load(tmp_path)
    assert summary.SUMMARY_JSON not in files and list(docs) == ["bench.json"]


def test_plots_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "bench.json", bench_doc())
    monkeypatch.setattr(summary_plots, "unavailable", lambda: "matplotlib is not installed")
    assert summary.main(["--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| bench | DMA COPY 1 MiB, server" in text
    assert "Plots skipped: matplotlib is not installed." in text
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "bench-summary.json").read_text())["plots_skipped"] == (
        "matplotlib is not installed")


def test_markdown_escapes_pipes() -> None:
    row = summary.Row("x", "a | b", 1.0, "ms")
    s = summary.Summary([row], {})
    assert "| x | a \\| b | 1.00 ms | — | — | — | — | — |" in markdown(s)


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (the optional `bench` "
                                         "extra: pip install -e '.[bench]')")
def test_plots_written_beside_the_json(tmp_path: Path) -> None:
    write(tmp_path, "bench.json", bench_doc())
    write(tmp_path, "bench-nvme.json", {"results": [{"name": "teeio", "MBps": 100.0},
                                                    {"name": "emulated", "MBps": 250.0}]})
    write(tmp_path, "bench-link.json", {"results": "reshaped"})
    s = run(tmp_path)
    assert s.plots == ["bench-roundtrips.png", "bench-dma.png", "bench-nvme.png"]
    for name in s.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("bench-link.png: not drawn") for n in s.notes)
    assert s.plots_skipped is None


def test_vfio_rows_against_the_c_sample(tmp_path: Path) -> None:
    def leg(read: float, write: float, rounds: list[float]) -> dict[str, object]:
        return {"read": {"median_us": read, "round_medians_us": rounds},
                "write": {"median_us": write, "round_medians_us": [write]}}
    doc = {"legs": {"python": leg(20.0, 21.0, [19.0, 20.0, 21.0]),
                    "c-sample": leg(16.0, 15.0, [16.0])},
           "goal": {"target": 1.5, "met": True, "read_ratio": 1.25, "write_ratio": 1.4}}
    rows, s = rows_for(tmp_path, "bench-vfio.json", doc)
    assert rows == [
        "| vfio | REGION_READ round trip, python server | 20.0 µs | libvfio-user C sample, same "
        "run: 16.0 µs | 1.25 | 10% | target 1.5 | yes |",
        "| vfio | REGION_WRITE round trip, python server | 21.0 µs | libvfio-user C sample, "
        "same run: 15.0 µs | 1.40 | — | target 1.5 | yes |"]
    assert s.goal_counts()["met"] == 2
