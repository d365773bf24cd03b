"""Smoke test of the transport benchmark: a tiny run, JSON layout, the libvfio-user leg
measured with the library and skipped with a note without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_backends
from tests.support.servers import libvfio_user_missing
from vfio_user_dev import libvfio_user

OPS = [("COPY", 4096), ("COPY", 65536), ("COPY", 1 << 20), ("FILL", 1 << 20),
       ("SHA256", 1 << 20)]


def _check_leg(leg: dict[str, object], rounds: int = 2) -> None:
    rs = leg["rounds"]
    assert isinstance(rs, list) and len(rs) == rounds
    for r in rs:
        ra = r["region_access"]
        for kind in ("read", "write"):
            assert ra[kind]["n"] == 5 and ra[kind]["median_us"] > 0
        assert [(d["op"], d["size"]) for d in r["dma"]] == OPS
        assert all(d["engine_MBps"] > 0 for d in r["dma"])
    summary = leg["summary"]
    assert isinstance(summary, dict)
    read = summary["read_median_us"]
    assert read["min"] <= read["median"] <= read["max"] and read["spread_pct"] >= 0
    assert set(summary["dma_engine_MBps"]) == {f"{op} {size}" for op, size in OPS}


@pytest.mark.timeout(120)
def test_without_the_library_the_leg_is_skipped_with_a_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(libvfio_user.ENV_VAR, str(tmp_path / "missing.so"))
    out = tmp_path / "bench-backends.json"
    assert bench_backends.main(["--quick", "--iterations", "5", "--rounds", "2",
                                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "backends", "comparison", "notes"}
    assert report["meta"]["affinity_verified"] is True and report["meta"]["library"] is None
    assert report["meta"]["rounds"] == 2 and report["meta"]["order"] == ["python", "python"]
    _check_leg(report["backends"]["python"])
    skipped = report["backends"]["libvfio-user"]["skipped"]
    assert "TEEIO_LIBVFIO_USER=/path/libvfio-user.so.0" in skipped
    assert report["comparison"] is None
    assert "libvfio-user leg was skipped" in report["notes"]
    assert "verified pinned" in report["notes"] and "comparison =" not in report["notes"]
    assert "libvfio-user leg skipped" in capsys.readouterr().err


def test_notes_follow_the_outcome() -> None:
    notes = bench_backends.build_notes(2, ["python", "libvfio-user"] * 2, 0, False, None)
    assert "NOT verified" in notes and "skipped" not in notes
    assert "python libvfio-user python libvfio-user" in notes
    assert "only the STATUS polls" in notes.replace("Only", "only")


@pytest.mark.timeout(120)
def test_both_legs_with_the_library(tmp_path: Path) -> None:
    if (why := libvfio_user_missing()) is not None:
        pytest.skip(f"libvfio-user leg: {why}")
    out = tmp_path / "bench-backends.json"
    assert bench_backends.main(["--quick", "--iterations", "5", "--rounds", "2",
                                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["order"] == ["python", "libvfio-user"] * 2       # ABAB
    for backend in ("python", "libvfio-user"):
        _check_leg(report["backends"][backend])
    cmp = report["comparison"]
    assert cmp["read_latency_ratio"] > 0 and cmp["write_latency_ratio"] > 0
    assert set(cmp["dma_mapped_memory_throughput_ratio"]) == {f"{op} {size}"
                                                              for op, size in OPS}
    assert "STATUS polls" in cmp["dma_ratio_means"]
