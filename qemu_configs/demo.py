"""``make demo``: attest the device from the host, drive it from the guest, judge both.

1. Builds what is missing: the guest image, the device firmware ELF.
2. Provisions a fresh device identity (root CA -> intermediate -> device leaf) and
   computes the firmware's reference values from the golden ELF.
3. Starts the device server with that identity and firmware, boots the guest under TCG
   (KVM with --kvm, when a probe boot works); while the guest boots, the host TSM
   attests the device over its DOE socket (SPDM: certificate chain, CHALLENGE, signed
   measurements against the reference values, a secured session).
4. The guest runs the agent's self-test (MMIO, DMA, interrupts) on a fresh seed.
Prints a short summary; exits 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu_configs import image
from qemu_configs.launcher import LaunchError, VmOptions, cleanup, run_vm
from qemu_configs.verify import Check, check_selftest
from teeio import pki
from teeio.measurements import reference_values
from vfio_user_dev.firmware_build import FirmwareBuildError
from vfio_user_dev.firmware_build import build as build_firmware


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-demo", description=__doc__)
    ap.add_argument("--seed", type=lambda s: int(s, 16), default=None, help="hex seed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-share", action="store_true",
                    help="guest RAM not shared: all DMA through DMA_READ/DMA_WRITE messages")
    ap.add_argument("--kvm", action="store_true")
    ap.add_argument("--workdir", type=Path, help="keep logs and results here")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    t0 = time.monotonic()
    try:
        if not image.is_built():
            print("guest image missing: building it (once) ...")
        img = image.ensure_image()
    except image.ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    wd = ns.workdir or Path(tempfile.mkdtemp(prefix="teeio-demo-"))
    try:
        fw = build_firmware(wd / "teeio-fw.elf")
    except FirmwareBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ident = pki.provision(wd / "identity")
    ref = wd / "reference-values.json"
    ref.write_text(json.dumps(reference_values(fw), indent=2, sort_keys=True))
    print(f"provisioned a P-384 device identity and built the firmware "
          f"({fw.stat().st_size} bytes); reference values in {ref.name}")
    doe_sock = wd / "doe.sock"
    attest_out: dict[str, object] = {}

    def attest_while_booting(_vm_dir: Path) -> None:
        cmd = [sys.executable, "-m", "tsm", "attest", "--doe-socket", str(doe_sock),
               "--trust-anchor", str(ident["trust_anchor"]), "--reference-values", str(ref),
               "--session", "--json", str(wd / "evidence.json")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        attest_out.update(rc=r.returncode, stdout=r.stdout, stderr=r.stderr.strip())

    seed = ns.seed if ns.seed is not None else secrets.randbits(64)
    print(f"booting the guest (kernel {img.kernel_release}, "
          f"{'KVM if usable' if ns.kvm else 'TCG'}), seed {seed:#x} ...")
    try:
        res = run_vm(VmOptions(mode="selftest", params={"seed": f"{seed:x}",
                                                        "rounds": str(ns.rounds)},
                               share_memory=not ns.no_share,
                               accel="kvm" if ns.kvm else "tcg", workdir=wd / "vm",
                               device_args=["--identity", str(wd / "identity"),
                                            "--firmware", str(fw),
                                            "--doe-socket", str(doe_sock)],
                               on_running=attest_while_booting))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    checks = check_selftest(res, seed, ns.rounds)
    rep = res.report or {}
    print(f"device {rep.get('bdf', '?')} found by the guest; "
          f"{rep.get('jobs_issued', 0)} DMA jobs, {rep.get('device_bytes', 0)} bytes moved, "
          f"{rep.get('interrupts_received', 0)} interrupts received")
    att_ok = attest_out.get("rc") == 0
    if att_ok:
        print("host TSM attestation (SPDM over the device's DOE socket):")
        for line in str(attest_out.get("stdout", "")).splitlines():
            print(f"    {line}")
    checks.append(Check("host_tsm_attestation", att_ok,
                        "chain, CHALLENGE, signed measurements = reference values, session"
                        if att_ok else str(attest_out.get("stderr") or "did not run")))
    for c in checks:
        print(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    ok = all(c.ok for c in checks)
    print(f"{'PASSED' if ok else 'FAILED'}: {sum(c.ok for c in checks)}/{len(checks)} checks "
          f"in {time.monotonic() - t0:.1f}s")
    if not ok:
        print(f"logs kept in {wd} (console: {res.console_log})")
    elif ns.workdir is None:
        cleanup(res)
        shutil.rmtree(wd, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
