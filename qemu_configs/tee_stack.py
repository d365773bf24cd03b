"""The whole TEE-IO stack for one guest: device server, TSM daemon, QEMU, guest agent.

Used by ``make demo`` (``qemu_configs/demo.py``) and the e2e tests.  One work folder holds
everything of a run; its layout and the start-up order are in docs/by-hand.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu_configs.guest_policy import policy_document, reference_values_for
from qemu_configs.launcher import PROJECT_DIR, LaunchError, RunResult, VmOptions, run_vm
from teeio import pki
from teeio.ghcx import FW_CFG_SECRET, FW_CFG_VM_ID, PORT_NAME
from vfio_user_dev.firmware_build import build as build_firmware
from vfio_user_dev.host_access import HostAccessClient
from vfio_user_dev.link.capture import read_capture

TSM_START_TIMEOUT = 20.0
CTL_TIMEOUT = 120.0
DEVICE = "dev0"
#: MMIO_REPORTING_OFFSET the TSM asks for at LOCK (§11.3.6): non-zero, so the guest's
#: report check really applies it.
MMIO_REPORTING_OFFSET = 0x10_0000_0000


@dataclass
class StackOptions:
    workdir: Path
    vm_id: str = "vm0"
    seed: int = 0
    pause_at: str = ""                 # guest_agent accept --pause-at
    expect: str = "accept"             # guest_agent accept --expect
    stop: bool = True                  # TDI_STOP at the end of the guest's flow
    firmware: Path | None = None       # what the device loads (default: the golden ELF)
    device_identity: Path | None = None    # the device's identity (default: provisioned)
    tsm_anchor: Path | None = None     # what the TSM trusts (default: the device's root)
    tsm_checks_measurements: bool = True   # the TSM compares with the reference values too
    ghcx_relay: Callable[[Path, Path], Any] | None = None   # (qemu side, tsm side) -> relay
    on_running: Callable[[TeeStack], None] | None = None    # beside the booting guest
    accel: str = "tcg"
    extra_device_args: list[str] = field(default_factory=list)
    shell: bool = False                # boot to a root shell on this terminal instead
    cycles: int = 0                    # guest_agent accept --cycles (bench_tdi)
    personality: str = "accelerator"   # teeio-device --personality (docs/nvme.md)


class TeeStack:
    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.wd = opts.workdir
        self.wd.mkdir(parents=True, exist_ok=True)
        (self.wd / "results").mkdir(exist_ok=True)
        self.tsm_dir = self.wd / "tsm"
        self.ctl_sock = self.tsm_dir / "ctl.sock"
        self.doe_sock, self.platform_sock = self.wd / "doe.sock", self.wd / "platform.sock"
        self.platform_cred, self.host_sock = self.wd / "platform.cred", self.wd / "host.sock"
        self.ghcx_sock = self.wd / "ghcx.sock"            # where QEMU connects
        self.tsm_ghcx_sock = self.wd / "ghcx-tsm.sock"    # where the TSM listens
        self.capture = self.wd / "link.pcap"
        self.secret_file = self.tsm_dir / "vms" / f"{opts.vm_id}.secret"
        self.tsm: subprocess.Popen[bytes] | None = None
        self.timings: list[tuple[str, float]] = []
        self.relay: Any = None
        self.golden = self.wd / "golden-fw.elf"

    # -- preparation ------------------------------------------------------------------------
    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        out = fn()
        self.timings.append((name, time.monotonic() - t))
        return out

    def prepare(self) -> None:
        """Firmware, identity, reference values, the guest's policy."""
        self.timed("build firmware", lambda: build_firmware(self.golden))
        ident_dir = self.opts.device_identity or self.wd / "identity"
        if self.opts.device_identity is None:
            self.timed("provision device identity", lambda: pki.provision(ident_dir))
        self.identity_dir = ident_dir
        self.firmware = self.opts.firmware or self.golden
        self.refvalues = self.wd / "reference-values.json"
        refs = reference_values_for(self.golden, self.opts.personality)
        self.refvalues.write_text(json.dumps(refs, indent=2, sort_keys=True))
        # The guest's policy: the *genuine* device vendor's root (the identity provisioned
        # here), whatever the TSM is told to trust.
        genuine_root = (self.wd / "identity" if self.opts.device_identity is None
                        else self.wd / "genuine-identity")
        if not (genuine_root / "trust-anchor.pem").exists():
            pki.provision(genuine_root)
        leaf = pki.load_identity(genuine_root).leaf.subject.rfc4514_string()
        policy = policy_document((genuine_root / "trust-anchor.pem").read_text(), refs, leaf,
                                 self.opts.personality)
        (self.wd / "results" / "policy.json").write_text(json.dumps(policy, indent=2))
        self.tsm_anchor = self.opts.tsm_anchor or ident_dir / "trust-anchor.pem"

    # -- TSM daemon -------------------------------------------------------------------------
    def start_tsm(self) -> None:
        self.tsm_dir.mkdir(exist_ok=True)
        log = open(self.wd / "tsm.log", "ab")   # noqa: SIM115 - lives as long as the daemon
        self.tsm = subprocess.Popen(
            [sys.executable, "-m", "tsm", "daemon", "--state-dir", str(self.tsm_dir),
             "--ctl-socket", str(self.ctl_sock)],
            stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + TSM_START_TIMEOUT
        while not self.ctl_sock.exists():
            if self.tsm.poll() is not None:
                raise LaunchError(f"the TSM daemon exited ({self.tsm.returncode}); see "
                                  f"{self.wd / 'tsm.log'}")
            if time.monotonic() > deadline:
                raise LaunchError("the TSM daemon did not open its control socket")
            time.sleep(0.05)

    def stop_tsm(self, kill: bool = False) -> None:
        if self.tsm is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.tsm.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.tsm.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.tsm.pid, signal.SIGKILL)
            self.tsm.wait(5)
        self.tsm = None
        if kill:
            self.ctl_sock.unlink(missing_ok=True)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tsm", "ctl", "--ctl-socket",
                            str(self.ctl_sock), *args], capture_output=True, text=True,
                           timeout=CTL_TIMEOUT, env=_env(), check=False)
        with open(self.wd / "ctl.log", "a") as f:
            f.write(f"$ tsm ctl {' '.join(args)}\n{r.stdout}{r.stderr}rc={r.returncode}\n")
        if check and r.returncode != 0:
            raise LaunchError(f"tsm ctl {args[0]} failed: {r.stderr.strip() or r.stdout}")
        return r

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.ctl("status", "--json").stdout))

    def connect_and_bind(self) -> None:
        refs = (["--reference-values", str(self.refvalues)]
                if self.opts.tsm_checks_measurements else [])
        self.timed("TSM: attest device, SPDM session, IDE stream", lambda: self.ctl(
            "connect", "--device", DEVICE, "--doe-socket", str(self.doe_sock),
            "--platform-socket", str(self.platform_sock),
            "--platform-credential", str(self.platform_cred),
            "--trust-anchor", str(self.tsm_anchor), *refs))
        self.timed("TSM: bind the TDI to the VM, launch secret", lambda: self.ctl(
            "bind", "--vm", self.opts.vm_id, "--device", DEVICE,
            "--ghcx-socket", str(self.tsm_ghcx_sock), "--secret-file", str(self.secret_file),
            "--mmio-reporting-offset", str(MMIO_REPORTING_OFFSET)))
        if self.opts.ghcx_relay is not None:
            self.relay = self.opts.ghcx_relay(self.ghcx_sock, self.tsm_ghcx_sock)
        else:
            self.ghcx_sock.unlink(missing_ok=True)
            self.ghcx_sock.symlink_to(self.tsm_ghcx_sock)

    # -- the host's own path to the device (docs/design.md decision 12) ----------------------
    def host(self, op: str, **args: Any) -> dict[str, Any]:
        """One request on the device's host access socket; the whole reply."""
        with HostAccessClient(str(self.host_sock)) as c:
            return c.request(op, **args)

    # -- the VM ---------------------------------------------------------------------------------
    def vm_options(self) -> VmOptions:
        o = self.opts
        params = {"policy": "/mnt/results/policy.json", "seed": f"{o.seed:x}",
                  "expect": o.expect}
        if o.pause_at:
            params["pause-at"] = o.pause_at
        if o.cycles:
            params["cycles"] = str(o.cycles)
        if o.stop:
            params["stop"] = "1"
        device_args = ["--identity", str(self.identity_dir), "--firmware", str(self.firmware),
                       "--doe-socket", str(self.doe_sock),
                       "--platform-socket", str(self.platform_sock),
                       "--platform-credential", str(self.platform_cred),
                       "--host-socket", str(self.host_sock),
                       "--link-capture", str(self.capture), *o.extra_device_args]
        qemu = ["-device", "virtio-serial-pci,id=vser0",
                "-chardev", f"socket,id=ghcx0,path={self.ghcx_sock},reconnect-ms=200",
                "-device", f"virtserialport,bus=vser0.0,chardev=ghcx0,name={PORT_NAME}",
                # The launch secret by file, never on a command line (docs/ghcx.md).
                "-fw_cfg", f"name={FW_CFG_SECRET},file={self.secret_file}",
                "-fw_cfg", f"name={FW_CFG_VM_ID},string={o.vm_id}"]
        return VmOptions(mode="shell" if o.shell else "accept", params=params,
                         interactive=o.shell, workdir=self.wd, accel=o.accel,
                         device_args=device_args, extra_qemu_args=qemu,
                         personality=o.personality,
                         before_qemu=lambda _wd: self.connect_and_bind(),
                         on_running=(None if o.on_running is None
                                     else lambda _wd: o.on_running(self)))  # type: ignore[misc]

    def run(self) -> RunResult:
        self.prepare()
        self.timed("start TSM daemon", self.start_tsm)
        try:
            t = time.monotonic()
            res = run_vm(self.vm_options())
            self.timings.append(("boot guest, lock, attest, accept, DMA (guest run)",
                                 time.monotonic() - t))
            return res
        finally:
            with contextlib.suppress(Exception):
                (self.wd / "tsm-status.json").write_text(json.dumps(self.status(), indent=2))
            if self.tsm is not None:
                # The VM is gone: as a VMM would, unbind it (the TSM STOPs a TDI still
                # locked or running, revokes its windows and forgets the launch secret).
                with contextlib.suppress(Exception):
                    self.ctl("unbind", "--vm", self.opts.vm_id, check=False)
            self.stop_tsm()
            if self.relay is not None and hasattr(self.relay, "close"):
                self.relay.close()

    # -- host-side judgement helpers ------------------------------------------------------------
    def wait_for(self, name: str, timeout: float = 120.0) -> None:
        """Wait until the guest paused (``paused-<point>`` in the results folder)."""
        path = self.wd / "results" / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise LaunchError(f"the guest did not reach {name}")
            time.sleep(0.05)

    def resume(self, point: str) -> None:
        (self.wd / "results" / f"resume-{point}").write_text("go")


def capture_summary(path: Path, needles: dict[str, bytes]) -> dict[str, Any]:
    """What the link capture holds: TLP counts, IDE-protected or not, and whether any of
    *needles* (known plaintext) appears anywhere in it."""
    from teeio.tlp import is_protected
    recs = read_capture(path) if path.exists() else []
    raw = path.read_bytes() if path.exists() else b""
    return {"tlps": len(recs), "ide_protected": sum(is_protected(r.data) for r in recs),
            "plaintext_found": sorted(k for k, v in needles.items() if v in raw)}


def guest_dma_data(seed: int) -> bytes:
    """The 64 KiB the guest agent DMAs through its private buffer (guest_agent/accept.py)."""
    return hashlib.sha256(seed.to_bytes(8, "little")).digest() * 2048


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(PROJECT_DIR))


@contextlib.contextmanager
def stack(opts: StackOptions) -> Iterator[TeeStack]:
    s = TeeStack(opts)
    try:
        yield s
    finally:
        s.stop_tsm()
