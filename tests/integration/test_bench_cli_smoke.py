"""Smoke test of the CLI start-up benchmark: a tiny run (no spdm-emu), JSON layout, sane
numbers; the goal and the spdm-emu lookup on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_cli

STATS = ("median_ms", "p10_ms", "p90_ms", "mean_ms")
LEGS = ["floor", "tsm_help", "tsm_attest_help", "tsm_attest_session"]
INSTALLED_LEGS = ["floor_installed", bench_cli.INSTALLED]


@pytest.mark.timeout(240)
def test_bench_cli_tiny_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEEIO_SPDM_EMU", raising=False)
    monkeypatch.delenv("TEEIO_SPDM_EMU_BIN", raising=False)
    out = tmp_path / "nested" / "bench-cli.json"

    assert bench_cli.main(["--iterations", "2", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report) == {"meta", "legs", "skipped", "import_time", "goal", "notes"}
    meta = report["meta"]
    assert meta["iterations"] == 2 and meta["rounds"] == 2 and meta["spdm_emu"] is None
    assert meta["elapsed_s"] > 0 and "--doe-tcp-port" in meta["device_command"]

    legs = {leg["name"]: leg for leg in report["legs"]}
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    if bench_cli.INSTALLED in skipped:      # no installed copy could be made: says why
        assert list(legs) == LEGS and skipped[bench_cli.INSTALLED]
        assert report["goal"]["judged_on"] == "tsm_attest_session"
    else:
        assert list(legs) == LEGS + INSTALLED_LEGS
        assert report["goal"]["judged_on"] == bench_cli.INSTALLED
        installed = legs[bench_cli.INSTALLED]["command"]
        assert "--session" in installed and not installed[0].startswith(str(bench_cli.PROJECT))
    for leg in legs.values():
        assert leg["n"] == 2, leg["name"]
        assert all(leg["wall"][k] > 0 for k in STATS), leg["name"]
        assert leg["cpu"]["median_ms"] > 0 and leg["ratio_to_spdm_emu"] is None, leg["name"]
        assert leg["off_cpu_ms"] == pytest.approx(
            leg["wall"]["median_ms"] - leg["cpu"]["median_ms"], abs=0.02)
    assert legs["floor"]["ratio_to_floor"] == 1.0
    # attest --session does everything python -c pass does, and a whole SPDM session more
    assert legs["tsm_attest_session"]["wall"]["median_ms"] > legs["floor"]["wall"]["median_ms"]
    assert "--session" in legs["tsm_attest_session"]["command"]

    assert skipped["spdm_emu_requester"] == report["goal"]["reason"]
    assert "TEEIO_SPDM_EMU" in report["goal"]["reason"]
    assert report["goal"]["met"] is None and report["goal"]["ratio"] is None

    split = report["import_time"]
    assert split["runs"] == 2 and "importtime" in split["command"]
    assert split["total_ms"] > 0 and split["process_wall_ms"] > 0
    assert {"tsm", "teeio.spdm", "cryptography", "stdlib"} <= set(split["by_group_ms"])
    assert [m["module"] for m in split["top_modules"]]
    # nothing of the daemon, the device, the SPDM responder or the ELF reader
    assert split["not_needed_loaded"] == []


def leg(name: str, wall: float, cpu: float) -> bench_cli.LegResult:
    s = bench_cli.Stats(median_ms=wall, p10_ms=wall, p90_ms=wall, mean_ms=wall)
    c = bench_cli.Stats(median_ms=cpu, p10_ms=cpu, p90_ms=cpu, mean_ms=cpu)
    return bench_cli.LegResult(name=name, command=[], n=2, wall=s, cpu=c,
                               off_cpu_ms=wall - cpu, ratio_to_floor=1.0,
                               ratio_to_spdm_emu=None)


@pytest.mark.parametrize(("tsm_ms", "met"), [(250.0, True), (251.0, False)])
def test_goal_is_the_wall_ratio_to_spdm_emu(tsm_ms: float, met: bool) -> None:
    legs = {"tsm_attest_session": leg("tsm_attest_session", tsm_ms, 200.0),
            "spdm_emu_requester": leg("spdm_emu_requester", 100.0, 50.0)}
    g = bench_cli.goal(legs, [])
    assert g["met"] is met and g["ratio"] == round(tsm_ms / 100, 3)
    assert g["cpu_ratio"] == 4.0 and g["reason"] is None


def test_goal_says_when_spdm_emu_mostly_waited() -> None:
    legs = {"tsm_attest_session": leg("tsm_attest_session", 250.0, 200.0),
            "spdm_emu_requester": leg("spdm_emu_requester", 1000.0, 60.0)}
    g = bench_cli.goal(legs, [])
    assert g["met"] is True and g["ratio"] == 0.25
    assert g["reason"] is not None and "940 of its 1000 ms off the CPU" in g["reason"]


def test_spdm_emu_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEEIO_SPDM_EMU", raising=False)
    monkeypatch.delenv("TEEIO_SPDM_EMU_BIN", raising=False)
    assert bench_cli.spdm_emu_binary(None)[0] is None
    binary = tmp_path / "spdm_requester_emu"
    binary.write_text("#!/bin/sh\n")
    path, reason = bench_cli.spdm_emu_binary(str(binary))
    assert path is None and "not an executable file" in reason
    binary.chmod(0o755)
    monkeypatch.setenv("TEEIO_SPDM_EMU_BIN", str(tmp_path))
    path, reason = bench_cli.spdm_emu_binary(None)
    assert path is None and "ecp384/ca.cert.der" in reason     # the sample keys are missing
    (tmp_path / "ecp384").mkdir()
    (tmp_path / "ecp384" / "ca.cert.der").write_bytes(b"0")
    assert bench_cli.spdm_emu_binary(None) == (binary.resolve(), "")


def test_importtime_is_parsed_by_module() -> None:
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:       120 |        120 |   _io\n"
            "import time:      3000 |       5000 | tsm.attest\n")
    assert bench_cli.parse_importtime(text) == {"_io": (120, 120), "tsm.attest": (3000, 5000)}
    assert [bench_cli.group_of(m) for m in ("tsm.attest", "teeio.spdm.codec", "teeio.doe",
                                            "cryptography.x509", "json", "elftools")] == [
        "tsm", "teeio.spdm", "teeio (other)", "cryptography", "stdlib",
        "other (site, third party)"]


def test_goal_is_judged_on_the_installed_copy_when_there_is_one() -> None:
    legs = {"tsm_attest_session": leg("tsm_attest_session", 300.0, 200.0),
            bench_cli.INSTALLED: leg(bench_cli.INSTALLED, 240.0, 190.0),
            "spdm_emu_requester": leg("spdm_emu_requester", 100.0, 50.0)}
    g = bench_cli.goal(legs, [])
    assert g["judged_on"] == bench_cli.INSTALLED and g["ratio"] == 2.4 and g["met"] is True
    del legs[bench_cli.INSTALLED]
    g = bench_cli.goal(legs, [])
    assert g["judged_on"] == "tsm_attest_session" and g["met"] is False
