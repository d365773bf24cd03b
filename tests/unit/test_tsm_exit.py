"""teeio-tsm as a program ends its process itself (tsm.__main__.end_process): the exit
status, the output and the atexit handlers are those of a normal interpreter exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tsm.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ("import atexit, sys\n"
           "atexit.register(lambda: print('atexit ran', flush=True))\n"
           "sys.argv = ['teeio-tsm', *sys.argv[1:]]\n"
           "from tsm.__main__ import main\n"
           "main()\n"
           "print('main returned')\n")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_help_exits_zero_with_its_text_and_the_atexit_handlers() -> None:
    proc = run("attest", "--help")
    assert proc.returncode == 0
    assert "--trust-anchor" in proc.stdout and proc.stdout.rstrip().endswith("atexit ran")
    assert "main returned" not in proc.stdout


def test_a_usage_error_exits_two_with_its_message() -> None:
    proc = run("attest", "--no-such-option")
    assert proc.returncode == 2
    assert "error: the following arguments are required" in proc.stderr
    assert "atexit ran" in proc.stdout


def test_a_failed_command_keeps_its_status_and_its_message(tmp_path: Path) -> None:
    proc = run("attest", "--doe-tcp-port", "1", "--trust-anchor", str(tmp_path / "none.pem"))
    assert proc.returncode == 1
    assert "attestation FAILED" in proc.stderr and "atexit ran" in proc.stdout


def test_a_caller_gets_the_status_back() -> None:
    with pytest.raises(SystemExit) as stop:
        main(["attest", "--help"])
    assert stop.value.code == 0
