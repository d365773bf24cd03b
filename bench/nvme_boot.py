"""One TCG boot of bench/bench_nvme.py: the TEE-IO stack with the NVMe personality
(device server, TSM daemon, QEMU) plus QEMU's own NVMe controller, the guest running
qemu_configs/guest/nvme_bench.sh (``teeio.mode=sh``).

At each of the guest's pauses (before and after every fio job) the host records the CPU
time of the device server and of QEMU and the device's counters (its host access socket's
``stats``), then lets the guest go on.  How the figures are read: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qemu_configs import image
from qemu_configs.launcher import PROJECT_DIR, LaunchError, personality_args, qemu_argv
from qemu_configs.tee_stack import StackOptions, TeeStack
from teeio import personality as personalities

GUEST_SCRIPT = PROJECT_DIR / "qemu_configs" / "guest" / "nvme_bench.sh"
#: What QEMU's NVMe controller (hw/nvme) identifies as, and the serial the bench gives it.
QEMU_NVME_IDS = "1b36:0010"
QEMU_NVME_SERIAL = "teeio-bench"
BOOT_TIMEOUT = 300.0            # boot, accept --no-tee, the modprobe: before the first job
JOB_SLACK = 120.0               # per fio job beyond its ramp and runtime (TCG start-up, drain)
SOCKETS_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class FioPlan:
    rounds: int = 3
    runtime: float = 3.0        # fio --runtime, seconds
    ramp: float = 1.0           # fio --ramp_time
    size: str = "32M"           # fio --size: the region of the namespace the jobs cover
    iodepth: int = 8
    nvme_size: str = "64M"      # both namespaces (teeio-device --nvme-size, QEMU's raw file)
    memory_mb: int = 1024

    def fio_timeout(self) -> int:
        return int(self.ramp + self.runtime + JOB_SLACK)


#: The boots: the legs each runs (in the guest script's order) and its kernel parameters.
BOOTS: dict[str, dict[str, Any]] = {
    "plain": {"legs": ("no_tee", "qemu_nvme", "tee_io"), "kernel_params": []},
    "swiotlb": {"legs": ("swiotlb", "qemu_nvme_swiotlb"), "kernel_params": ["swiotlb=force"]},
}


class BootError(RuntimeError):
    pass


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of *pid* (proc(5) /proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def flatten(doc: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of *doc* as ``a.b.c`` keys (booleans left out)."""
    out: dict[str, float] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(doc, int | float) and not isinstance(doc, bool):
        out[prefix[:-1]] = float(doc)
    return out


def prefill(path: Path, size: int) -> None:
    """*path* holds *size* bytes of data (no holes): the jobs read written blocks on both
    devices from the start."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for off in range(0, size, len(block)):
            f.write(block[:size - off])


def guest_script(boot: str, plan: FioPlan) -> str:
    header = (f"BOOT={boot}\nROUNDS={plan.rounds}\nRUNTIME={plan.runtime:g}\n"
              f"RAMP={plan.ramp:g}\nSIZE={plan.size}\nQD={plan.iodepth}\n"
              f"FIO_TIMEOUT={plan.fio_timeout()}\nQEMU_NVME={QEMU_NVME_IDS}\n")
    return header + GUEST_SCRIPT.read_text()


def with_kernel_params(argv: list[str], params: list[str]) -> list[str]:
    """*argv* with *params* added to QEMU's ``-append`` (teeio-vm's ``--param`` only makes
    ``teeio.K=V``; a kernel parameter of the kernel's own goes here)."""
    if not params:
        return argv
    out = list(argv)
    i = out.index("-append")
    out[i + 1] = " ".join([out[i + 1], *params])
    return out


def without_option(args: list[str], option: str) -> list[str]:
    """*args* without *option* and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        else:
            out.append(a)
    return out


class NvmeBoot:
    """The stack and one guest run; :meth:`run` returns the host's snapshots."""

    def __init__(self, wd: Path, boot: str, plan: FioPlan) -> None:
        self.wd, self.boot, self.plan = wd, boot, plan
        self.results = wd / "results"
        self.sock, self.qmp = wd / "vfio-user.sock", wd / "qmp.sock"
        self.device: subprocess.Popen[bytes] | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.stack = TeeStack(StackOptions(wd, seed=1, stop=False,
                                           personality=personalities.NVME.name))
        self.snapshots: list[dict[str, Any]] = []

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            self._start()
            self._serve_pauses(t0)
        finally:
            self.close()
        status = (self.results / "status").read_text().strip() \
            if (self.results / "status").exists() else "missing"
        if status != "ok":
            raise BootError(f"boot {self.boot}: guest status {status}\n{self.tail()}")
        info = {"boot": self.boot, "seconds": round(time.monotonic() - t0, 1),
                "kernel_params_added": BOOTS[self.boot]["kernel_params"],
                "snapshots": self.snapshots}
        (self.wd / "snapshots.json").write_text(json.dumps(info, indent=1))
        return info

    # -- start-up ----------------------------------------------------------------------------
    def _start(self) -> None:
        size = personalities.namespace_size(self.plan.nvme_size)
        prefill(self.wd / "nvme-namespace.img", size)
        prefill(self.wd / "qemu-nvme.img", size)
        self.stack.prepare()
        self.stack.start_tsm()
        base = self.stack.vm_options()
        vm = replace(base, mode="sh", params={"file": "/mnt/results/bench.sh"},
                     nvme_size=self.plan.nvme_size, memory_mb=self.plan.memory_mb,
                     # no link capture: it would store every TLP of every job
                     device_args=without_option(base.device_args, "--link-capture"))
        (self.results / "bench.sh").write_text(guest_script(self.boot, self.plan))
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR))
        with open(self.wd / "device.log", "wb") as log:
            self.device = subprocess.Popen(
                [sys.executable, "-m", "vfio_user_dev", "--socket", str(self.sock),
                 "--stats-file", str(self.wd / "device-stats.json"),
                 *personality_args(vm, self.wd), *vm.device_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait(lambda: all(p.exists() for p in (self.sock, self.stack.host_sock,
                                                    self.stack.platform_sock)),
                   SOCKETS_TIMEOUT, "the device server's sockets")
        self.stack.connect_and_bind()
        argv = qemu_argv(image.paths(), vm, self.wd, self.sock, self.qmp, "tcg")
        argv = with_kernel_params(argv, BOOTS[self.boot]["kernel_params"]) + [
            "-drive", f"file={self.wd / 'qemu-nvme.img'},if=none,id=qnvme,format=raw",
            "-device", f"nvme,serial={QEMU_NVME_SERIAL},drive=qnvme"]
        (self.wd / "qemu-cmdline.txt").write_text(shlex.join(argv) + "\n")
        with open(self.wd / "qemu.log", "wb") as log:
            self.qemu = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.device is not None and self.device.poll() is not None:
                raise BootError(f"the device server exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise BootError(f"no {what} after {timeout:g} s")
            time.sleep(0.05)

    # -- the guest's pauses ----------------------------------------------------------------
    def _serve_pauses(self, t0: float) -> None:
        jobs = 4 * self.plan.rounds * len(BOOTS[self.boot]["legs"])
        deadline = t0 + BOOT_TIMEOUT + jobs * (self.plan.fio_timeout() + 5)
        done: set[str] = set()
        status = self.results / "status"
        while not status.exists():
            assert self.qemu is not None
            if self.qemu.poll() is not None:
                time.sleep(0.5)          # the status file is written just before poweroff
                if not status.exists():
                    raise BootError(f"QEMU exited ({self.qemu.returncode})\n{self.tail()}")
                break
            if time.monotonic() > deadline:
                raise BootError(f"boot {self.boot} not done after "
                                f"{deadline - t0:.0f} s\n{self.tail()}")
            for p in sorted(self.results.glob("paused-*")):
                point = p.name[len("paused-"):]
                if point not in done:
                    done.add(point)
                    self.snapshots.append(self.snapshot(point))
                    (self.results / f"resume-{point}").write_text("go")
            time.sleep(0.02)

    def snapshot(self, point: str) -> dict[str, Any]:
        """The device's counters, then the CPU time of the device server and QEMU."""
        assert self.device is not None and self.qemu is not None
        reply = self.stack.host("stats")
        counters = flatten(reply.get("result", {}))
        return {"point": point, "t": time.monotonic(),
                "device_cpu_s": proc_cpu_seconds(self.device.pid),
                "qemu_cpu_s": proc_cpu_seconds(self.qemu.pid), "counters": counters}

    # -- the end ---------------------------------------------------------------------------
    def tail(self, lines: int = 40) -> str:
        out = []
        for name in ("results/agent.log", "console.log", "device.log"):
            p = self.wd / name
            text = p.read_text(errors="replace") if p.exists() else ""
            out.append(f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)

    def close(self) -> None:
        for proc in (self.qemu, self.device):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        with contextlib.suppress(LaunchError, OSError):
            self.stack.stop_tsm()
        for path in (self.sock, self.qmp):
            path.unlink(missing_ok=True)


__all__ = ["BOOTS", "BootError", "FioPlan", "NvmeBoot", "flatten", "guest_script",
           "proc_cpu_seconds", "with_kernel_params"]
