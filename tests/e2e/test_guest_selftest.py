"""Boot the real guest under TCG and check its report against the host's own view."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from qemu_configs import image
from qemu_configs.launcher import RunResult, VmOptions, cleanup, run_vm
from qemu_configs.verify import check_selftest
from tests.support.servers import backend_params

pytestmark = pytest.mark.e2e


def _explain(res: RunResult) -> str:
    tail = res.console_log.read_text(errors="replace")[-3000:] if res.console_log.exists() else ""
    return f"reason={res.reason!r} workdir={res.workdir}\n--- console tail ---\n{tail}"


def _run_and_check(tmp_path: Path, share: bool, verbose: bool = False,
                   backend: str = "python") -> RunResult:
    seed = secrets.randbits(64)
    res = run_vm(VmOptions(mode="selftest", params={"seed": f"{seed:x}", "rounds": "2"},
                           share_memory=share, workdir=tmp_path / "vm",
                           device_verbose=verbose, device_args=["--backend", backend]))
    checks = check_selftest(res, seed, 2)
    failed = [c for c in checks if not c.ok]
    assert not failed, f"failed checks: {failed}\n{_explain(res)}"
    assert len(checks) >= 12
    return res


@pytest.mark.parametrize("backend", backend_params())
def test_selftest_fd_mapped_memory(backend: str, guest_image: image.GuestImage,
                                   tmp_path: Path) -> None:
    """The same device served by either vfio-user transport (libvfio-user: the leg skips
    unless TEEIO_LIBVFIO_USER points to the library)."""
    res = _run_and_check(tmp_path, share=True, backend=backend)
    rep = res.report
    assert rep is not None
    # 2 rounds x (FILL, COPY, SHA-256) + the refused job, each with its interrupt.
    assert rep["jobs_issued"] == 7
    assert rep["interrupts_received"] == 7
    assert res.device_stats is not None and res.device_stats["irq_signalled_intx"] == 7
    cleanup(res)


def test_selftest_without_shared_memory_uses_dma_messages(guest_image: image.GuestImage,
                                                          tmp_path: Path) -> None:
    """Python server only: libvfio-user refuses DMA to memory without an fd unless
    --libvfio-user-socket-dma is given (libvfio-user's issue 279; see docs/libvfio-user.md)."""
    res = _run_and_check(tmp_path, share=False, verbose=True)
    log = (res.workdir / "device.log").read_text()
    # No fd backs guest RAM: the engine's accesses must have crossed the socket.
    assert log.count("--> cmd DMA_READ") > 0
    assert log.count("--> cmd DMA_WRITE") > 0
    assert "rejected" not in log.replace("DMA fault", "")
    cleanup(res)


def test_failed_guest_run_is_reported_and_cleaned_up(guest_image: image.GuestImage,
                                                     tmp_path: Path) -> None:
    res = run_vm(VmOptions(mode="no-such-mode", workdir=tmp_path / "vm", run_timeout=120))
    assert not res.ok
    assert res.status.startswith("failed")
    assert "guest status" in res.reason
    assert res.console_log.exists() and "teeio-guest" in res.console_log.read_text()
    assert not (tmp_path / "vm" / "vfio-user.sock").exists()
    assert not (tmp_path / "vm" / "qmp.sock").exists()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


def test_ctrl_c_stops_qemu_and_device_server(guest_image: image.GuestImage,
                                              tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    wd = tmp_path / "vm"
    proc = subprocess.Popen([sys.executable, "-m", "qemu_configs.launcher", "--workdir", str(wd)],
                            cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (wd / "qmp.sock").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "QEMU never opened its QMP socket"
        time.sleep(0.05)
    assert _processes_mentioning(str(wd)), "QEMU and the device server should be running"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    assert _processes_mentioning(str(wd)) == []
    assert not (wd / "vfio-user.sock").exists() and not (wd / "qmp.sock").exists()
