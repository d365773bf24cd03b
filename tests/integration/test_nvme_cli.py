"""``teeio-device --personality nvme``: a real server process serves the NVMe controller
(its namespace file created sparse, its identity in config space, its counters in the
stats file); bad NVMe options fail at once in one line, before anything starts;
``teeio-vm`` passes the personality through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_configs.launcher import VmOptions, personality_args
from teeio.pcie.config import Reg
from tests.integration.device_process import PROJECT, ServerProcess
from vfio_user_dev.client import Client
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(60)


def test_serves_the_nvme_personality(tmp_path: Path) -> None:
    sock, ns, stats = tmp_path / "d.sock", tmp_path / "ns.img", tmp_path / "stats.json"
    dev = ServerProcess(tmp_path / "device.log",
                        ["--socket", str(sock), "--personality", "nvme", "--nvme-namespace",
                         str(ns), "--nvme-size", "2M", "--stats-file", str(stats),
                         "--max-clients", "1"], [sock])
    try:
        c = Client.connect(str(sock))
        c.version()
        ids = int.from_bytes(c.region_read(PciRegion.CONFIG, Reg.VENDOR_ID, 4), "little")
        klass = int.from_bytes(c.region_read(PciRegion.CONFIG, Reg.CLASS_CODE, 3), "little")
        vs = int.from_bytes(c.region_read(PciRegion.BAR0, 0x08, 4), "little")
        c.close()
        assert dev.proc.wait(10) == 0
    finally:
        dev.stop()
    assert (ids, klass, vs) == (0x7E11_1234, 0x010802, 0x0001_0400)
    assert ns.stat().st_size == 2 << 20 and ns.stat().st_blocks == 0     # sparse
    doc = json.loads(stats.read_text())
    assert doc["personality"] == "nvme" and doc["nvme"]["namespace_bytes"] == 2 << 20
    assert "NVMe namespace" in dev.log_text()


@pytest.mark.parametrize(("args", "names"), [
    (["--nvme-size", "64M"], "--nvme-size goes with --personality nvme"),
    (["--nvme-namespace", "{t}/ns.img"], "--nvme-namespace goes with --personality nvme"),
    (["--personality", "nvme", "--nvme-size", "1000"], "--nvme-size '1000'"),
    (["--personality", "nvme", "--nvme-size", "lots"], "--nvme-size 'lots'"),
    (["--personality", "nvme", "--nvme-namespace", "{t}/none/ns.img"], "--nvme-namespace"),
    (["--personality", "nvme", "--nvme-namespace", "{t}"], "not a regular file"),
], ids=["size-without-nvme", "namespace-without-nvme", "size-not-blocks", "size-not-a-size",
        "namespace-missing-folder", "namespace-is-a-folder"])
def test_bad_nvme_options_fail_in_one_line(tmp_path: Path, args: list[str],
                                           names: str) -> None:
    argv = [a.format(t=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "vfio_user_dev", "--socket",
                           str(tmp_path / "d.sock"), *argv], capture_output=True, text=True,
                          timeout=50, cwd=PROJECT)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and names.format(t=tmp_path) in lines[0], proc.stderr
    assert not (tmp_path / "d.sock").exists()
    assert not (tmp_path / "ns.img").exists() and not (tmp_path / "d.sock.nvme").exists()


def test_launcher_passes_the_personality_through(tmp_path: Path) -> None:
    assert personality_args(VmOptions(), tmp_path) == []                  # default unchanged
    assert personality_args(VmOptions(personality="nvme", nvme_size="1G"), tmp_path) == [
        "--personality", "nvme", "--nvme-namespace", str(tmp_path / "nvme-namespace.img"),
        "--nvme-size", "1G"]
    proc = subprocess.run([sys.executable, "-m", "qemu_configs.launcher", "--nvme-size", "1G"],
                          capture_output=True, text=True, timeout=50, cwd=PROJECT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --nvme-size goes with --personality nvme"
