"""Smoke test of the NVMe fio benchmark without a VM: the report it builds from the folders
two boots leave (fio's JSON, the host's snapshots, the guest's bounce count), its layout and
arithmetic; and the pieces of a boot that need no guest (the kernel parameter, the guest
script, the device options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import bench_nvme, nvme_boot

LEGS_BY_BOOT = {"plain": ("no_tee", "qemu_nvme", "tee_io"),
                "swiotlb": ("swiotlb", "qemu_nvme_swiotlb")}
#: IOPS per leg in the fake runs (each job the same): what the ratios must come out as
IOPS = {"no_tee": 200.0, "qemu_nvme": 1000.0, "tee_io": 50.0, "swiotlb": 150.0,
        "qemu_nvme_swiotlb": 500.0}


def fio_doc(iops: float, bs: int, write: bool, cpu_pct: float = 40.0) -> dict[str, Any]:
    ios = int(iops * 3)
    active = {"total_ios": ios, "iops": iops, "bw_bytes": iops * bs,
              "clat_ns": {"mean": 8_000_000.0}}
    idle = {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "clat_ns": {"mean": 0.0}}
    return {"jobs": [{"jobname": "x", "error": 0, "job_runtime": 3000,
                      "usr_cpu": cpu_pct / 4, "sys_cpu": cpu_pct * 3 / 4,
                      "read": idle if write else active, "write": active if write else idle}]}


def fake_boot(root: Path, boot: str, rounds: int) -> Path:
    wd = root / boot
    fio = wd / "results" / "fio"
    fio.mkdir(parents=True)
    snaps, t = [], 100.0
    for r in range(1, rounds + 1):
        for leg in LEGS_BY_BOOT[boot]:
            teeio = not leg.startswith("qemu")
            for job, (rw, bs) in bench_nvme.JOBS.items():
                iops = IOPS[leg] * (1 + 0.1 * (r - 2))          # rounds 0.9x, 1x, 1.1x
                doc = fio_doc(iops, bs, "write" in rw)
                (fio / f"{leg}-{r}-{job}.json").write_text(json.dumps(doc))
                cmds = iops * 3 if teeio else 0
                go = {"point": f"go-{leg}-{r}-{job}", "t": t, "device_cpu_s": 10.0,
                      "qemu_cpu_s": 20.0, "counters": {"nvme.namespace.read_commands": 5.0,
                                                       "link.tlps_upstream": 7.0}}
                done = {"point": f"done-{leg}-{r}-{job}", "t": t + 4, "device_cpu_s": 12.0,
                        "qemu_cpu_s": 22.0,
                        "counters": {"nvme.namespace.read_commands": 5.0 + cmds,
                                     "link.tlps_upstream": 7.0 + 10 * cmds}}
                snaps += [go, done]
                t += 5
    (wd / "snapshots.json").write_text(json.dumps(
        {"boot": boot, "seconds": 123.0, "snapshots": snaps,
         "kernel_params_added": nvme_boot.BOOTS[boot]["kernel_params"]}))
    (wd / "plan.json").write_text(json.dumps(nvme_boot.FioPlan(rounds=rounds).__dict__))
    res = wd / "results"
    (res / "kernel.txt").write_text("7.3.4+deb13-amd64\n")
    (res / "pci-ids.txt").write_text("0000:00:03.0 0x1b36:0x0010\n0000:01:00.0 0x1234:0x7e11\n")
    (res / "swiotlb-bounced.txt").write_text(
        "    256 0000:01:00.0\n    256 0000:00:03.0\n" if boot == "swiotlb" else "")
    return wd


def test_report_from_two_kept_boots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for boot in LEGS_BY_BOOT:
        fake_boot(tmp_path / "run", boot, rounds=3)
    out = tmp_path / "out" / "bench-nvme.json"

    assert bench_nvme.main(["--from-workdir", str(tmp_path / "run"), "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report) == {"benchmark", "meta", "legs", "ratios_to_no_tee", "notes", "plots"}
    assert list(report["legs"]) == list(bench_nvme.LEGS)
    meta = report["meta"]
    assert meta["rounds"] == 3 and meta["fio"]["iodepth"] == 8
    assert [b["boot"] for b in meta["boots"]] == ["plain", "swiotlb"]
    assert meta["boots"][1]["kernel_params_added"] == ["swiotlb=force"]
    assert meta["boots"][1]["swiotlb_bounces_reading_1mib"] == {"teeio-nvme": 256,
                                                                 "qemu-nvme": 256}
    assert meta["boots"][0]["swiotlb_bounces_reading_1mib"] == {"teeio-nvme": 0,
                                                                "qemu-nvme": 0}
    for leg, v in report["legs"].items():
        assert set(v["jobs"]) == set(bench_nvme.JOBS), leg
        seq = v["jobs"]["seq_read"]
        assert seq["rounds"] == 3
        assert seq["iops"] == {"median": IOPS[leg], "min": round(IOPS[leg] * 0.9, 3),
                               "max": round(IOPS[leg] * 1.1, 3), "spread_pct": 20.0}
        assert seq["mb_s"]["median"] == pytest.approx(IOPS[leg] * 131072 / 1e6, rel=1e-3)
        # 40% of 3 s over 3 x IOPS I/Os
        assert seq["guest_cpu_us_per_io"]["median"] == pytest.approx(
            0.4 * 3e6 / (3 * IOPS[leg]), rel=1e-3)
        assert seq["clat_mean_us"]["median"] == 8000.0
        assert seq["device_cores"]["median"] == 0.5 and seq["qemu_cores"]["median"] == 0.5
        if v["device"] == "teeio-nvme":      # 2 s of device CPU over its commands
            assert seq["device_cpu_us_per_command"]["median"] == pytest.approx(
                2e6 / (3 * IOPS[leg]), rel=1e-3)
            assert seq["per_command.link.tlps_upstream"]["median"] == 10.0
            assert seq["device_bound_iops"]["median"] == pytest.approx(1.5 * IOPS[leg],
                                                                       rel=1e-3)
        else:
            assert "device_cpu_us_per_command" not in seq
    ratios = report["ratios_to_no_tee"]
    assert ratios["no_tee"]["rand_read"] == {"iops": 1.0, "mb_s": 1.0,
                                             "guest_cpu_us_per_io": 1.0,
                                             "device_cpu_us_per_command": 1.0}
    assert ratios["tee_io"]["seq_write"]["iops"] == 0.25
    assert ratios["tee_io"]["seq_write"]["guest_cpu_us_per_io"] == 4.0
    assert ratios["tee_io"]["seq_write"]["device_cpu_us_per_command"] == 4.0
    assert "device_cpu_us_per_command" not in ratios["qemu_nvme"]["seq_write"]
    assert ratios["qemu_nvme"]["rand_write"]["mb_s"] == pytest.approx(5.0, rel=1e-3)
    notes = " ".join(report["notes"])
    assert "swiotlb boot: swiotlb bounced 256 pages of qemu-nvme, 256 pages of teeio-nvme" \
        in notes
    if report["plots"]:                                  # only with matplotlib
        assert all(Path(p).is_file() for p in report["plots"])
    else:
        assert "matplotlib is not installed" in notes


def test_a_failed_fio_job_and_a_missing_folder_are_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_nvme.main(["--from-workdir", str(tmp_path)]) == 1
    assert "no boot folder" in capsys.readouterr().err
    wd = fake_boot(tmp_path, "plain", rounds=1)
    bad = fio_doc(10.0, 4096, False)
    bad["jobs"][0]["error"] = 5
    (wd / "results" / "fio" / "no_tee-1-rand_read.json").write_text(json.dumps(bad))
    assert bench_nvme.main(["--from-workdir", str(tmp_path)]) == 1
    assert "error 5" in capsys.readouterr().err
    assert bench_nvme.main(["--boots", "plain,kvm"]) == 2


def test_boot_pieces() -> None:
    argv = ["qemu", "-append", "console=ttyS0 teeio.mode=sh", "-m", "1024M"]
    assert nvme_boot.with_kernel_params(argv, ["swiotlb=force"])[2] == \
        "console=ttyS0 teeio.mode=sh swiotlb=force"
    assert nvme_boot.with_kernel_params(argv, []) == argv
    assert nvme_boot.without_option(["--a", "1", "--link-capture", "x.pcap", "--b", "2"],
                                    "--link-capture") == ["--a", "1", "--b", "2"]
    assert nvme_boot.flatten({"a": {"b": 2, "c": True, "d": "x"}, "e": 1.5}) == \
        {"a.b": 2.0, "e": 1.5}
    script = nvme_boot.guest_script("swiotlb", nvme_boot.FioPlan(rounds=2, runtime=1.5))
    assert script.startswith("BOOT=swiotlb\nROUNDS=2\nRUNTIME=1.5\n")
    assert "QEMU_NVME=1b36:0010\n" in script and "leg swiotlb $r $D" in script
    assert nvme_boot.proc_cpu_seconds(__import__("os").getpid()) > 0
