"""``python -m tsm tdisp demo`` against the real device server process: attest, session,
IDE stream, TDISP lock/report/start/stop, IDE teardown; and a failure naming its reason.
The device log is printed at teardown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.device_process import PROJECT, DeviceProcess

pytestmark = pytest.mark.timeout(120)


def tsm_tdisp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tsm", "tdisp", *map(str, args)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=90, check=False)
    print(f"$ tsm tdisp {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}")
    assert "Traceback" not in proc.stderr
    return proc


def test_demo(ide_device: DeviceProcess) -> None:
    proc = tsm_tdisp("demo", *ide_device.tsm_args("--stream-id", "3"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "tdisp demo: done"
    assert "TDISP_VERSION: 1.0" in lines
    assert any(line.startswith("TDISP_CAPABILITIES: REQ_MSGS_SUPPORTED 0xfe") for line in lines)
    assert "LOCK_INTERFACE (flags 0x0001, DEFAULT_STREAM_ID 3): CONFIG_LOCKED, " \
        "START_INTERFACE_NONCE received (32 bytes)" in lines
    assert sum(line.startswith("  MMIO range ") for line in lines) == 2
    states = [line for line in lines if line.startswith("DEVICE_INTERFACE_STATE: ")]
    assert [s.split(": ")[1] for s in states] == [
        "CONFIG_UNLOCKED", "CONFIG_LOCKED", "RUN", "CONFIG_UNLOCKED"]
    order = ["device: selective block 0 stream 3 enabled, SECURE (QUERY_RESP)",
             "START_INTERFACE: acknowledged", "STOP_INTERFACE: acknowledged",
             "K_SET_STOP for K0 and K1 at both ends; root port stream removed"]
    assert [lines.index(x) for x in order] == sorted(lines.index(x) for x in order)
    assert "TDISP: STOP: TDI RUN -> CONFIG_UNLOCKED" in ide_device.log_text()


def test_failure_is_one_line(ide_device: DeviceProcess) -> None:
    proc = tsm_tdisp("demo", *ide_device.tsm_args("--block", "5"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "tdisp demo FAILED: the device has no Selective IDE stream block 5 (2 blocks)"]
