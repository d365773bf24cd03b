"""Smoke test of the round-trip benchmark against libvfio-user's C sample server
(bench/bench_vfio.py): a tiny run, the JSON layout, each leg measured or skipped saying
why, and the goal judged only when the C leg ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import bench_vfio
from vfio_user_dev import libvfio_user


def _check_leg(leg: dict[str, object], rounds: int, n: int) -> None:
    for op in ("read", "write"):
        stats = leg[op]
        assert isinstance(stats, dict)
        assert stats["n"] == rounds * n and len(stats["round_medians_us"]) == rounds
        assert 0 < stats["p10_us"] <= stats["median_us"] <= stats["p90_us"]
        assert stats["client_cpu_us"] > 0 and stats["server_cpu_us"] >= 0


@pytest.mark.timeout(180)
def test_without_the_c_peers_their_legs_are_skipped_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(libvfio_user.ENV_VAR, str(tmp_path / "missing.so"))
    monkeypatch.delenv(bench_vfio.SAMPLE_ENV_VAR, raising=False)
    out = tmp_path / "bench-vfio.json"
    assert bench_vfio.main(["--iterations", "20", "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "legs", "ratios", "goal", "notes"}
    assert report["meta"]["order"] == ["python", "echo"] * 2        # alternating
    assert report["meta"]["affinity_verified"] is True
    for leg in ("python", "echo"):
        _check_leg(report["legs"][leg], 2, 20)
    assert "TEEIO_LIBVFIO_USER" in report["legs"]["libvfio-user"]["skipped"]
    assert bench_vfio.SAMPLE_ENV_VAR in report["legs"]["c-sample"]["skipped"]
    assert set(report["ratios"]) == {"python/echo"}
    assert set(report["ratios"]["python/echo"]) == {"read", "write", "read_paired",
                                                    "write_paired"}
    assert report["goal"]["met"] is None and "not measured" in report["goal"]["why"]
    assert "c-sample leg was skipped" in report["notes"]
    assert "c-sample leg skipped" in capsys.readouterr().err


def test_a_sample_path_that_is_no_program_is_skipped(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bench_vfio.SAMPLE_ENV_VAR, str(tmp_path / "nothing"))
    assert "not an executable" in bench_vfio.skipped_legs()["c-sample"]


def test_the_goal_is_both_ratios_within_the_target() -> None:
    row = {"read": 1.2, "write": 1.6, "read_paired": 1.1, "write_paired": 1.4}
    goal = bench_vfio.goal({"python/c-sample": row}, {})
    assert goal["met"] is False and "beyond 1.5x" in goal["why"]
    goal = bench_vfio.goal({"python/c-sample": {**row, "write": 1.5}}, {})
    assert goal["met"] is True and goal["write_ratio"] == 1.5


@pytest.mark.timeout(300)
def test_every_leg_with_the_c_peers(tmp_path: Path) -> None:
    sample = os.environ.get(bench_vfio.SAMPLE_ENV_VAR)
    if not sample or "libvfio-user" in bench_vfio.skipped_legs():
        pytest.skip(f"needs {libvfio_user.ENV_VAR} and {bench_vfio.SAMPLE_ENV_VAR} "
                    "(libvfio-user and its gpio-pci-idio-16 sample, built)")
    out = tmp_path / "bench-vfio.json"
    assert bench_vfio.main(["--iterations", "20", "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["order"] == list(bench_vfio.LEGS) * 2
    for leg in bench_vfio.LEGS:
        _check_leg(report["legs"][leg], 2, 20)
    assert report["goal"]["met"] in (True, False) and report["goal"]["read_ratio"] > 0
