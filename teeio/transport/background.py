"""``--background``: start a server, return once it listens.

A person's shell script (the story of docs/by-hand.md) starts the TSM daemon and the device
server and goes straight on to use their sockets.  With ``&`` that races; with
``--background`` the command starts the same program again as a new session, waits until
that child says it is ready (every socket listening) on an inherited pipe, prints one line
(``... ready, pid N, log FILE``) and exits 0 -- or prints why it failed (the child exited,
or was not ready in time, with the last line of its log) and exits 1.

The child learns the pipe from :data:`READY_FD_ENV` and calls :func:`notify_ready`.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

READY_FD_ENV = "TEEIO_READY_FD"
FLAG = "--background"


def start(name: str, argv: Sequence[str], log: Path, timeout: float = 60.0) -> int:
    """Run ``python -m`` *argv*'s program again without :data:`FLAG`, its output to *log*;
    wait for it to be ready.  Returns the exit code for the calling command."""
    args = [a for a in argv if a != FLAG]
    r, w = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(w)})
    try:
        with open(log, "ab") as out:
            child = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, env=env,
                                     pass_fds=(w,), start_new_session=True)
    except OSError as exc:
        os.close(r)
        os.close(w)
        print(f"{name} FAILED: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    os.close(w)
    deadline = time.monotonic() + timeout
    got = b""
    try:
        while b"\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                print(f"{name} FAILED: not ready after {timeout:g} s{_tail(log)}",
                      file=sys.stderr)
                return 1
            ready, _, _ = select.select([r], [], [], min(left, 0.2))
            if ready:
                chunk = os.read(r, 64)
                if not chunk:                  # the child closed the pipe: it exited
                    break
                got += chunk
    finally:
        os.close(r)
    if not got.startswith(b"ready"):
        try:
            code = child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            code = None
        print(f"{name} FAILED: exited ({code}) before it was ready{_tail(log)}",
              file=sys.stderr)
        return 1
    print(f"{name} ready, pid {child.pid}, log {log}")
    return 0


def notify_ready() -> None:
    """In the child: every socket listens (no-op unless started by :func:`start`)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except (OSError, ValueError):
        pass


def _tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {lines[-1].strip()}" if lines else ""
