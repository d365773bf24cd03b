"""A long-lived platform for e2e journeys: one device server (any number of VMMs one after
the other), one TSM daemon, and QEMU guests that run shell scripts (``teeio.mode=sh``)
which pause where the host acts.

The guest side of a journey is a shell script, as a person would type it in the VM
(``python3 -m guest_agent accept|tdi-info|dma|stop``, sysfs writes); :data:`PRELUDE`
gives it ``pause NAME`` (the host waits for ``paused-NAME`` in the results share, acts,
and writes ``resume-NAME``) and ``must_fail CMD...``.  The host side reads what *every*
party believes: the TSM (``status --refresh``, in-process control client), the device
(its host access socket's stats), the root port (platform ``status``) and the guest
(JSON files its commands wrote to the results share).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from qemu_configs import image
from qemu_configs.launcher import PROJECT_DIR, personality_args, qemu_argv
from qemu_configs.tee_stack import StackOptions, TeeStack
from teeio.platform_channel import PlatformClient, read_credential
from tsm.ctl import CtlClient

PRELUDE = """\
A="python3 -m guest_agent"
R=/mnt/results
pause() { touch "$R/paused-$1"; while [ ! -e "$R/resume-$1" ]; do sleep 0.05; done; }
must_fail() { if "$@"; then echo "unexpected success: $*"; exit 1; fi; }
"""

BOOT_TIMEOUT = 240.0


class Journey:
    def __init__(self, workdir: Path, seed: int = 1, personality: str = "accelerator",
                 nvme_size: str | None = None) -> None:
        self.stack = TeeStack(StackOptions(workdir, seed=seed, stop=False,
                                           personality=personality))
        self.wd = self.stack.wd
        self.results = self.wd / "results"
        self.sock = self.wd / "vfio-user.sock"
        self.qemu: subprocess.Popen[bytes] | None = None
        self.device: subprocess.Popen[bytes] | None = None
        self.boots = 0
        self.stack.prepare()
        self.stack.start_tsm()
        self.vm = replace(self.stack.vm_options(), nvme_size=nvme_size)
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR))
        with open(self.wd / "device.log", "wb") as log:
            self.device = subprocess.Popen(
                [sys.executable, "-m", "vfio_user_dev", "--socket", str(self.sock),
                 "--stats-file", str(self.wd / "device-stats.json"),
                 *personality_args(self.vm, self.wd), *self.vm.device_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait(lambda: all(p.exists() for p in (self.sock, self.stack.host_sock,
                                                    self.stack.platform_sock)),
                   30, "the device server's sockets")
        self.stack.connect_and_bind()

    # -- processes ----------------------------------------------------------------------
    def _wait(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.device is not None and self.device.poll() is not None:
                raise AssertionError(f"the device server exited while waiting for {what}:\n"
                                     + self.log("device.log"))
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:g} s\n" + self.diagnose())
            time.sleep(0.05)

    def log(self, name: str, lines: int = 60) -> str:
        p = self.wd / name
        text = p.read_text(errors="replace") if p.exists() else ""
        return f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def diagnose(self) -> str:
        return "\n".join(self.log(n) for n in ("results/agent.log", "console.log", "tsm.log",
                                                "device.log"))

    def boot(self, script: str) -> None:
        """Start a VM (QEMU) whose guest runs *script* (after :data:`PRELUDE`)."""
        self.boots += 1
        name = f"journey{self.boots}.sh"
        (self.results / name).write_text(PRELUDE + script)
        for stale in ("status", "agent.log"):
            (self.results / stale).unlink(missing_ok=True)
        opts = replace(self.vm, mode="sh", params={"file": f"/mnt/results/{name}"})
        qmp = self.wd / f"qmp{self.boots}.sock"
        argv = qemu_argv(image.paths(), opts, self.wd, self.sock, qmp, "tcg")
        with open(self.wd / f"qemu{self.boots}.log", "wb") as log:
            self.qemu = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def paused(self, point: str, timeout: float = BOOT_TIMEOUT) -> None:
        self._wait(lambda: (self.results / f"paused-{point}").exists()
                   or (self.results / "status").exists(), timeout, f"guest pause {point}")
        assert (self.results / f"paused-{point}").exists(), self.diagnose()

    def resume(self, point: str) -> None:
        (self.results / f"resume-{point}").write_text("go")

    def finished(self, timeout: float = BOOT_TIMEOUT) -> None:
        """The guest's script ran to its end (status ok) and the VM powered off."""
        self._wait(lambda: (self.results / "status").exists(), timeout, "the guest's status")
        status = (self.results / "status").read_text().strip()
        assert status == "ok", f"guest status {status}\n{self.diagnose()}"
        assert self.qemu is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.qemu.wait(30)

    def kill_qemu(self) -> None:
        assert self.qemu is not None
        self.qemu.send_signal(signal.SIGKILL)
        self.qemu.wait(10)

    def close(self) -> None:
        for proc in (self.qemu, self.device):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.stack.stop_tsm()

    # -- what each party believes ---------------------------------------------------------
    def tsm(self, refresh: bool = False) -> dict[str, Any]:
        with CtlClient(str(self.stack.ctl_sock)) as c:
            return c.call("status", **({"refresh": True} if refresh else {}))

    def tsm_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``teeio-tsm ctl ...`` as a person runs it (one line on failure)."""
        return self.stack.ctl(*args)

    def tsm_tdi(self, refresh: bool = False) -> dict[str, Any]:
        t = self.tsm(refresh)["tdis"][0]
        assert isinstance(t, dict)
        return t

    def wait_tsm_state(self, state: str, within: float) -> float:
        """Seconds until the TSM (no refresh: what it learnt by itself) says *state*."""
        t0 = time.monotonic()
        while True:
            if self.tsm_tdi()["state"] == state:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < within, (
                f"the TSM did not say {state} within {within} s: {self.tsm()}")
            time.sleep(0.01)

    def device_stats(self) -> dict[str, Any]:
        reply = self.stack.host("stats")
        assert reply.get("ok"), reply
        result = reply["result"]
        assert isinstance(result, dict)
        return result

    def device_tdi(self) -> str:
        return str(self.device_stats()["tdi"]["state"])

    def root_port(self) -> dict[str, Any]:
        with PlatformClient(str(self.stack.platform_sock),
                            read_credential(self.stack.platform_cred)) as rp:
            st = rp.call("status")["root_port"]
        assert isinstance(st, dict)
        return st

    def guest_json(self, name: str) -> dict[str, Any]:
        doc = json.loads((self.results / name).read_text())
        assert isinstance(doc, dict)
        return doc

    def device_fds(self, settle_to: int | None = None) -> int:
        """The device server's open fds; with *settle_to*, once at most that many (it
        closes a finished host or platform connection a moment after the client did),
        waiting up to 2 s."""
        assert self.device is not None
        deadline = time.monotonic() + 2
        while True:
            n = len(os.listdir(f"/proc/{self.device.pid}/fd"))
            if settle_to is None or n <= settle_to or time.monotonic() > deadline:
                return n
            time.sleep(0.02)

    def agree(self, state: str) -> dict[str, Any]:
        """``status --refresh`` says *state*, and so do the device and the root port (no
        windows, no private MMIO outside RUN)."""
        tdi = self.tsm_tdi(refresh=True)
        assert tdi["state"] == state and tdi["source"] == "device", tdi
        assert self.device_tdi() == state
        rp = self.root_port()
        if state != "RUN":
            assert rp["windows"] == [] and rp["mmio_private"] == {}, rp
            assert tdi["mmio_private"] is False
            assert self.tsm()["vms"][0]["windows"] == []
        else:
            assert rp["mmio_private"] != {} and tdi["mmio_private"] is True, rp
        return tdi
