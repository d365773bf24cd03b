"""Bad command lines of the project's CLIs: each fails at once, before anything is
started, in ONE line on stderr that names the option or file, non-zero, no traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = os.geteuid() == 0     # root writes into read-only folders: those cases are skipped


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def _dev(*args: str) -> list[str]:
    return ["-m", "vfio_user_dev", *args]


#: (id, argv after the interpreter (``{t}``: the test's folder), what stderr must name,
#:  needs a non-root user)
CASES: list[tuple[str, Callable[[Path, int], list[str]], str, bool]] = [
    ("doe-tcp-port-range", lambda t, p: _dev("--socket", f"{t}/d.sock", "--doe-tcp-port",
                                             "70000"), "--doe-tcp-port 70000", False),
    ("doe-tcp-port-busy", lambda t, p: _dev("--socket", f"{t}/d.sock", "--doe-tcp-port",
                                            str(p)), "already in use", False),
    ("identity-is-a-file", lambda t, p: _dev("--socket", f"{t}/d.sock", "--identity",
                                             f"{t}/file"), "--identity {t}/file", False),
    ("identity-read-only", lambda t, p: _dev("--socket", f"{t}/d.sock", "--identity",
                                             f"{t}/ro/id"), "--identity", True),
    ("platform-credential-read-only", lambda t, p: _dev(
        "--socket", f"{t}/d.sock", "--platform-socket", f"{t}/p.sock",
        "--platform-credential", f"{t}/ro/cred"), "--platform-credential", True),
    ("platform-credential-missing-folder", lambda t, p: _dev(
        "--socket", f"{t}/d.sock", "--platform-socket", f"{t}/p.sock",
        "--platform-credential", f"{t}/none/cred"), "--platform-credential", False),
    ("stats-file-read-only", lambda t, p: _dev("--socket", f"{t}/d.sock", "--stats-file",
                                               f"{t}/ro/s.json"), "--stats-file", True),
    ("stats-file-missing-folder", lambda t, p: _dev("--socket", f"{t}/d.sock", "--stats-file",
                                                    f"{t}/none/s.json"), "--stats-file",
     False),
    ("link-capture-missing-folder", lambda t, p: _dev(
        "--socket", f"{t}/d.sock", "--link-capture", f"{t}/none/x.pcap"), "--link-capture",
     False),
    ("capture-reader-not-pcap", lambda t, p: ["-m", "vfio_user_dev.link", f"{t}/file"],
     "{t}/file", False),
    ("refvalues-out-missing-folder", lambda t, p: ["-m", "tsm.refvalues", "--elf",
                                                   f"{t}/file", "--out", f"{t}/none/r.json"],
     "--out", False),
    ("refvalues-out-read-only", lambda t, p: ["-m", "tsm.refvalues", "--elf", f"{t}/file",
                                              "--out", f"{t}/ro/r.json"], "--out", True),
    ("guest-policy-out", lambda t, p: ["-m", "qemu_configs.guest_policy", "--trust-anchor",
                                       f"{t}/file", "--firmware", f"{t}/file",
                                       "--out", f"{t}/none/p.json"], "--out", False),
    ("guest-policy-non-pem", lambda t, p: ["-m", "qemu_configs.guest_policy",
                                           "--trust-anchor", f"{t}/file", "--firmware",
                                           f"{t}/file", "--out", f"{t}/p.json"],
     "--trust-anchor {t}/file", False),
    ("guest-policy-leaf-subject", lambda t, p: ["-m", "qemu_configs.guest_policy",
                                                "--trust-anchor", f"{t}/file", "--firmware",
                                                f"{t}/file", "--leaf-subject",
                                                "this is not=rfc4514,,", "--out",
                                                f"{t}/p.json"], "--leaf-subject", False),
    ("vm-workdir", lambda t, p: ["-m", "qemu_configs.launcher", "--workdir", f"{t}/file"],
     "--workdir", False),
    ("vm-mode", lambda t, p: ["-m", "qemu_configs.launcher", "--mode", "bogus"],
     "--mode 'bogus'", False),
    ("demo-workdir", lambda t, p: ["-m", "qemu_configs.demo", "--workdir", f"{t}/file/x"],
     "--workdir", False),
    ("tsm-daemon-ctl-socket", lambda t, p: ["-m", "tsm", "daemon", "--state-dir",
                                            f"{t}/state", "--ctl-socket",
                                            f"{t}/none/ctl.sock"], "{t}/none", False),
]


@pytest.mark.parametrize(("argv", "names", "non_root"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_command_line_fails_in_one_line(tmp_path: Path, busy_port: int,
                                            argv: Callable[[Path, int], list[str]],
                                            names: str, non_root: bool) -> None:
    if non_root and ROOT:
        pytest.skip("root writes into a read-only folder")
    (tmp_path / "file").write_text("not a pcap, not PEM, not an ELF\n")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, *argv(tmp_path, busy_port)],
                              capture_output=True, text=True, timeout=50,
                              cwd=Path(__file__).parents[2])
    finally:
        (tmp_path / "ro").chmod(0o755)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert names.format(t=tmp_path) in lines[0]
    assert not (tmp_path / "d.sock").exists()          # nothing was started
    assert not (tmp_path / "state" / "ctl.sock").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["kill", "hup", "ctrl-c"])
def test_demo_signals_clean_up_like_ctrl_c(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           signum: int) -> None:
    """kill and SIGHUP of teeio-demo run the same cleanup as Ctrl-C (the stack's own: QEMU,
    the device server, the TSM daemon, sockets; then the work folder), quietly, no
    traceback."""
    from qemu_configs import demo, image
    from qemu_configs.tee_stack import TeeStack

    seen: dict[str, Any] = {}

    def run(self: TeeStack) -> Any:
        seen["wd"] = self.wd
        try:
            signal.raise_signal(signum)
            raise AssertionError("the signal did not interrupt the run")
        finally:
            seen["stack_cleanup"] = True      # TeeStack.run's finally stops everything

    class Img:
        kernel_release = "test"

    monkeypatch.setattr(image, "is_built", lambda: True)
    monkeypatch.setattr(image, "ensure_image", lambda: Img())
    monkeypatch.setattr(TeeStack, "run", run)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        assert demo.main([]) == 130
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert seen["stack_cleanup"] and not Path(seen["wd"]).exists()
    assert err.splitlines() == ["interrupted: QEMU, the device server and the TSM daemon "
                                "were stopped"]
