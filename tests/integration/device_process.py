"""A real device-server process on temporary sockets, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

PROJECT = Path(__file__).resolve().parents[2]
STARTUP = 15.0

P = TypeVar("P", bound="ServerProcess")


class ServerProcess:
    """`python -m vfio_user_dev` with *options*; waits until every path in *wait_for* exists."""

    def __init__(self, log: Path, options: Sequence[str], wait_for: Sequence[Path]) -> None:
        self.log = log
        self.cmd = [sys.executable, "-m", "vfio_user_dev", *options]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=PROJECT,
                                         env=dict(os.environ, PYTHONPATH=str(PROJECT)))
        deadline = time.monotonic() + STARTUP
        while not all(p.exists() for p in wait_for):
            assert self.proc.poll() is None, f"device server exited:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"no sockets after {STARTUP}s:\n{self.log_text()}"
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def started(factory: Callable[..., P]) -> Iterator[Callable[..., P]]:
    """Fixture body: yields a starter; stops every process it started and prints its log."""
    procs: list[P] = []

    def _start(*args: str, **kwargs: object) -> P:
        dev = factory(*args, **kwargs)
        procs.append(dev)
        return dev

    yield _start
    for dev in procs:
        dev.stop()
        print(f"--- device log ({' '.join(dev.cmd)}) ---\n{dev.log_text()}")
