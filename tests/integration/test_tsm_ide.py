"""``python -m tsm ide`` against the real device server process (``--identity``,
``--platform-socket``): the one-session demo with DMA running across the key refresh,
setup leaving the stream Secure for later DMA, status without disturbing the session,
the refusal of a stand-alone refresh, teardown, and the failure paths (wrong trust
anchor, wrong credential).  The device log is printed at teardown."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from teeio import pki
from teeio.device_regs import Op, St
from tests.integration.device_process import PROJECT, DeviceProcess
from tests.support.lockstep import GUEST, SIZE, enable_device, map_memfd, run_job
from vfio_user_dev.client import Client

pytestmark = pytest.mark.timeout(120)

def tsm_ide(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tsm", "ide", *map(str, args)], cwd=PROJECT,
                          capture_output=True, text=True, timeout=90, check=False)
    print(f"$ tsm ide {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}")
    assert "Traceback" not in proc.stderr
    return proc


def failure(proc: subprocess.CompletedProcess[str], command: str) -> str:
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ide {command} FAILED: ")
    return lines[0].removeprefix(f"ide {command} FAILED: ")


class Dma:
    """Plays the guest: memory mapped with an fd, DMA jobs started through BAR0."""

    def __init__(self, dev: DeviceProcess) -> None:
        self.client = Client.connect(str(dev.sock))
        self.client.version()
        self.fd = map_memfd(self.client, "tsm-ide")
        enable_device(self.client)
        self.src = os.urandom(4000)
        os.pwrite(self.fd, self.src, 0)
        self.jobs = 0

    def job(self) -> None:
        st = run_job(self.client, Op.COPY, src=GUEST, dst=GUEST + SIZE // 2,
                     length=len(self.src))
        assert st == St.DONE, f"DMA job {self.jobs} ended with status {st:#x}"
        assert os.pread(self.fd, len(self.src), SIZE // 2) == self.src
        os.pwrite(self.fd, bytes(len(self.src)), SIZE // 2)
        self.jobs += 1

    def close(self) -> None:
        os.close(self.fd)
        self.client.close()


def read_until(stream: IO[str], marker: str, lines: list[str], timeout: float = 60) -> None:
    """Collect stdout lines of the demo until one contains *marker*."""
    found: queue.Queue[bool] = queue.Queue()

    def reader() -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if marker in line:
                found.put(True)
                return
        found.put(False)

    threading.Thread(target=reader, daemon=True).start()
    assert found.get(timeout=timeout), f"no {marker!r} in:\n" + "\n".join(lines)


def test_demo_with_dma_running_across_the_refresh(ide_device: DeviceProcess) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tsm", "ide", "demo", "--pause",
                             *ide_device.tsm_args()], cwd=PROJECT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[str] = []
    dma = Dma(ide_device)
    try:
        read_until(proc.stdout, "PAUSE stream Secure with K0", lines)
        assert "device: selective block 0 stream 1 enabled, SECURE (QUERY_RESP)" in lines
        for _ in range(3):
            dma.job()
        tx0 = ide_device.ide_tlps()
        assert tx0 > 0                         # the jobs crossed the link under IDE

        # DMA keeps running while the demo switches K0 -> K1.
        stop = threading.Event()
        errors: list[BaseException] = []

        def traffic() -> None:
            try:
                while not stop.is_set():
                    dma.job()
            except BaseException as exc:      # reported below
                errors.append(exc)

        worker = threading.Thread(target=traffic)
        before = dma.jobs
        worker.start()
        time.sleep(0.3)
        proc.stdin.write("\n")
        proc.stdin.flush()
        read_until(proc.stdout, "PAUSE stream Secure with K1", lines)
        time.sleep(0.3)
        stop.set()
        worker.join(30)
        assert not errors, errors
        assert dma.jobs - before >= 2
        assert "refresh: K0 -> K1; each receiver switches at the first TLP under K1" in lines
        dma.job()
        assert ide_device.ide_tlps(tx0) > tx0
        doc = ide_device.stats_doc()
        assert doc["link_endpoint"]["ide_failures"] == 0 and doc["dma_errors"] == 0

        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        lines += out.splitlines()
        print("\n".join(lines), err, sep="\n")
        assert proc.returncode == 0, err
        assert lines[-1] == "ide demo: done"
        assert "K_SET_STOP for K0 and K1 at both ends; root port stream removed" in lines
        assert "device: selective block 0 stream 0 disabled, INSECURE (host register read)" \
            in lines
        # After teardown DMA still works, in the clear.
        dma.job()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        dma.close()


def test_setup_status_teardown(ide_device: DeviceProcess, tmp_path: Path) -> None:
    dma = Dma(ide_device)        # the "guest" stays connected: a disconnect resets the device
    try:
        _setup_status_teardown(ide_device, tmp_path, dma)
    finally:
        dma.close()


def _setup_status_teardown(ide_device: DeviceProcess, tmp_path: Path, dma: Dma) -> None:
    status_json = tmp_path / "status.json"
    proc = tsm_ide("setup", *ide_device.tsm_args("--stream-id", "7", "--block", "1",
                                         "--json", status_json))
    assert proc.returncode == 0, proc.stderr
    assert "left open in the device" in proc.stdout
    doc = json.loads(status_json.read_text())
    assert doc["device"]["state"] == "secure" and doc["device"]["stream_id"] == 7
    assert doc["device"]["index"] == 1 and doc["device"]["rid_range"] == ["0x0008", "0x0008"]
    assert doc["root_port"]["state"] == "secure" and doc["root_port"]["rid_base"] == 0x100

    # The stream stays Secure after the TSM exits: the guest's DMA goes over IDE.
    dma.job()
    assert ide_device.ide_tlps() > 0

    # status without --query: no SPDM, the session survives.
    proc = tsm_ide("status", *ide_device.tsm_args("--stream-id", "7", "--block", "1"))
    assert proc.returncode == 0
    assert "device: selective block 1 stream 7 enabled, SECURE (host register read)" \
        in proc.stdout
    assert "root port: stream 7 enabled, SECURE, key sets in use K0" in proc.stdout

    # refresh cannot run without setup's session.
    reason = failure(tsm_ide("refresh", *ide_device.tsm_args("--stream-id", "7")), "refresh")
    assert "needs the SPDM session" in reason and "demo" in reason

    # status --query opens a new SPDM session, which ends setup's: keys gone, Insecure.
    proc = tsm_ide("status", *ide_device.tsm_args("--stream-id", "7", "--block", "1", "--query"))
    assert proc.returncode == 0
    assert "device: selective block 1 stream 7 enabled, INSECURE (QUERY_RESP)" in proc.stdout
    assert "closed" in ide_device.log_text()

    proc = tsm_ide("teardown", *ide_device.tsm_args("--stream-id", "7", "--block", "1"))
    assert proc.returncode == 0, proc.stderr
    assert "root port: no stream 7" in proc.stdout
    assert "device: selective block 1 stream 0 disabled, INSECURE (QUERY_RESP)" in proc.stdout
    dma.job()                                            # in the clear again


def test_setup_guards_and_teardown_after_a_device_reset(ide_device: DeviceProcess) -> None:
    assert tsm_ide("setup", *ide_device.tsm_args("--stream-id", "2")).returncode == 0
    reason = failure(tsm_ide("setup", *ide_device.tsm_args("--stream-id", "3")), "setup")
    assert reason == "selective block 0 is enabled for stream 2; tear that one down first"
    reason = failure(tsm_ide("setup", *ide_device.tsm_args("--stream-id", "2", "--block", "1")),
                     "setup")
    assert reason.startswith("stream 2 is already on selective block 0")
    # A vfio-user client that goes away resets the device: its IDE registers and keys are
    # gone, the root port still has the stream.  Teardown copes with that.
    client = Client.connect(str(ide_device.sock))
    client.version()
    client.close()
    deadline = time.monotonic() + 5
    while "device reset" not in ide_device.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc = tsm_ide("teardown", *ide_device.tsm_args("--stream-id", "2"))
    assert proc.returncode == 0, proc.stderr
    assert "root port: no stream 2" in proc.stdout


def test_failures_name_the_reason(ide_device: DeviceProcess, tmp_path: Path) -> None:
    other = pki.provision(tmp_path / "other", "P-384")["trust_anchor"]
    args = ide_device.tsm_args()
    args[args.index("--trust-anchor") + 1] = str(other)
    reason = failure(tsm_ide("setup", *args), "setup")
    assert "certificate" in reason.lower() or "chain" in reason.lower()

    wrong = tmp_path / "wrong.cred"
    wrong.write_text("00" * 32 + "\n")
    wrong.chmod(0o600)
    args = ide_device.tsm_args()
    args[args.index("--platform-credential") + 1] = str(wrong)
    reason = failure(tsm_ide("status", *args), "status")
    assert "unauthenticated" in reason

    loose = tmp_path / "loose.cred"
    loose.write_text(ide_device.cred.read_text())
    loose.chmod(0o644)
    args[args.index("--platform-credential") + 1] = str(loose)
    assert "0600" in failure(tsm_ide("status", *args), "status")

    args = ide_device.tsm_args("--block", "5")
    reason = failure(tsm_ide("demo", *args), "demo")
    assert reason == "the device has no Selective IDE stream block 5 (2 blocks)"
