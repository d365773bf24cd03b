"""docs/by-hand.md's "The TEE story by hand", run as written.

The shell blocks marked ``<!-- story:host -->``, ``<!-- story:vm -->`` and
``<!-- story:guest -->`` are taken from docs/by-hand.md in order; the only substitution is
the work folder (``/tmp/tdi`` becomes a fresh one).  The host blocks are typed into one
bash (as into a person's terminal, the venv's ``bin`` on PATH as ``activate`` leaves it),
the VM block runs QEMU with its serial console on a pipe, and the guest blocks are typed
into the guest's root shell on that console, line by line.  After each line the harness
types ``echo @@$?@@`` to learn its exit status; every command must succeed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_configs import image
from qemu_configs.launcher import PROJECT_DIR

pytestmark = pytest.mark.timeout(600)

STORY = PROJECT_DIR / "docs" / "by-hand.md"
BLOCK = re.compile(r"<!-- story:(host|vm|guest) -->\s*```sh\n(.*?)```", re.S)
MARK = re.compile(r"@@(\d+)@@")
WORKDIR = "/tmp/tdi"


def story_blocks() -> list[tuple[str, str]]:
    blocks = [(m.group(1), m.group(2)) for m in BLOCK.finditer(STORY.read_text())]
    assert [k for k, _ in blocks] == ["host", "vm", "guest", "host", "guest"], blocks
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blanks dropped."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


class Terminal:
    """A process whose stdin we type into and whose output we read, line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str, log: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=PROJECT_DIR,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log = open(log, "w")   # noqa: SIM115 - closed in close()
        self.transcript: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            text = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
            self.log.write(text + "\n")
            self.log.flush()
            self.lines.put(text)
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float) -> list[str]:
        """Lines until one matches *pattern* (included)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no {pattern!r} in {timeout:g} s; "
                                     f"last lines:\n" + "\n".join(seen[-30:])) from None
            if line is None:
                raise AssertionError(f"{self.name} ended waiting for {pattern!r}:\n"
                                     + "\n".join(seen[-30:]))
            seen.append(line)
            self.transcript.append(line)
            if re.search(pattern, line):
                return seen

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 180.0) -> str:
        """Type *command*, then the status marker; its output (must exit 0)."""
        self.type(command)
        self.type('echo "@@$?@@"')
        seen = self.expect(r"@@\d+@@\s*$", timeout)     # after the guest's prompt, maybe
        rc = int(MARK.search(seen[-1]).group(1))  # type: ignore[union-attr]
        out = "\n".join(seen[:-1])
        assert rc == 0, f"{self.name}: `{command}` exited {rc}:\n{out}"
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def terminals(guest_image: image.GuestImage) -> Iterator[list[Terminal]]:
    terms: list[Terminal] = []
    yield terms
    for t in terms:
        t.close()


def test_the_story_by_hand(terminals: list[Terminal], tmp_path: Path) -> None:
    w = str(tmp_path / "tdi")
    blocks = [(kind, text.replace(WORKDIR, w)) for kind, text in story_blocks()]
    venv = PROJECT_DIR / ".venv" / "bin"
    env = dict(os.environ, PATH=f"{venv}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    env.pop("TEEIO_TSM_CTL", None)
    host = Terminal(["bash", "--norc", "--noprofile"], env, "host", tmp_path / "host.log")
    terminals.append(host)
    pids: list[int] = []
    try:
        # 1. the host sets up
        out = "\n".join(host.run(c) for c in commands(blocks[0][1]))
        pids += [int(p) for p in re.findall(r"ready, pid (\d+)", out)]
        assert len(pids) == 2, out                       # the TSM daemon, the device
        assert re.search(r"^dev0\s+CONFIG_UNLOCKED", out, re.M), out
        # 2. the VM (its console on our pipe)
        script = tmp_path / "vm.sh"
        script.write_text(blocks[1][1])
        vm = Terminal(["bash", str(script)], env, "guest", tmp_path / "console.log")
        terminals.append(vm)
        vm.expect(r"teeio-guest: root shell", 240)
        # 3. the guest accepts; the TDI stays RUN after the agent exits
        g1 = [vm.run(c) for c in commands(blocks[2][1])]
        assert re.search(r"accepted: TDI dev0 .* is RUN", g1[0]), g1[0]
        assert re.search(r"TDI dev0 \(VM vm0\): RUN", g1[1]), g1[1]
        assert "DMA path    T=1 on IDE stream" in g1[2], g1[2]
        # 4. the host: all agree on RUN, then an FLR; the TSM knows without being asked
        h = [host.run(c) for c in commands(blocks[3][1])]
        assert re.search(r"^dev0\s+RUN\s+device", h[0], re.M), h[0]
        assert '"tdi": "ERROR"' in h[1], h[1]
        assert re.search(r"^dev0\s+ERROR\s+(device|platform)", h[2], re.M), h[2]
        assert "device: RUN -> ERROR on FLR" in h[2], h[2]
        assert "platform device_reset" in h[3] and "platform mmio_private" in h[3], h[3]
        # 5. the guest sees ERROR, stops, accepts again, leaves
        guest = commands(blocks[4][1])
        assert guest[-1] == "busybox poweroff -f"
        g2 = [vm.run(c) for c in guest[:-1]]
        assert re.search(r"TDI dev0 \(VM vm0\): ERROR", g2[0]), g2[0]
        assert "ERROR -> CONFIG_UNLOCKED" in g2[1], g2[1]
        assert "DMA path    T=1 on IDE stream" in g2[3], g2[3]
        vm.type(guest[-1])
        vm.proc.wait(60)
        # the VM is gone: the device was reset with the VMM, so the TDI is ERROR again
        final = host.run("teeio-tsm status --refresh")
        assert re.search(r"^dev0\s+ERROR\s+device", final, re.M), final
        assert re.search(r"^dev0 .* gone ", final, re.M), final
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
