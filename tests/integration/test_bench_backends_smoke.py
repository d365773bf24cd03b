"""Smoke test of the transport benchmark: a tiny run, JSON layout, the libvfio-user leg
measured with the library and skipped with a note without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_backends
from tests.conftest import libvfio_user_missing
from vfio_user_dev import libvfio_user

OPS = [("COPY", 4096), ("COPY", 65536), ("COPY", 1 << 20), ("FILL", 1 << 20),
       ("SHA256", 1 << 20)]


def _check_leg(leg: dict[str, object]) -> None:
    ra = leg["region_access"]
    assert isinstance(ra, dict)
    for kind in ("read", "write"):
        assert ra[kind]["n"] == 5 and ra[kind]["median_us"] > 0
    dma = leg["dma"]
    assert isinstance(dma, list)
    assert [(d["op"], d["size"]) for d in dma] == OPS
    assert all(d["engine_MBps"] > 0 for d in dma)


@pytest.mark.timeout(120)
def test_without_the_library_the_leg_is_skipped_with_a_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(libvfio_user.ENV_VAR, str(tmp_path / "missing.so"))
    out = tmp_path / "bench-backends.json"
    assert bench_backends.main(["--quick", "--iterations", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "backends", "comparison", "notes"}
    assert report["meta"]["affinity_verified"] is True and report["meta"]["library"] is None
    _check_leg(report["backends"]["python"])
    skipped = report["backends"]["libvfio-user"]["skipped"]
    assert "TEEIO_LIBVFIO_USER=/path/libvfio-user.so.0" in skipped
    assert report["comparison"] is None
    assert "libvfio-user leg skipped" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_both_legs_with_the_library(tmp_path: Path) -> None:
    if (why := libvfio_user_missing()) is not None:
        pytest.skip(f"libvfio-user leg: {why}")
    out = tmp_path / "bench-backends.json"
    assert bench_backends.main(["--quick", "--iterations", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for backend in ("python", "libvfio-user"):
        _check_leg(report["backends"][backend])
    cmp = report["comparison"]
    assert cmp["read_latency_ratio"] > 0 and cmp["write_latency_ratio"] > 0
    assert set(cmp["dma_throughput_ratio"]) == {f"{op} {size}" for op, size in OPS}
