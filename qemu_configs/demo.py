"""``make demo``: boot the guest with the device, run the agent's self-test, judge it.

Builds the guest image first if it is missing, picks a fresh seed, boots under
TCG (KVM with --kvm, when a probe boot works), prints a short summary and exits
0 only if every check passed.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from pathlib import Path

from qemu_configs import image
from qemu_configs.launcher import LaunchError, VmOptions, cleanup, run_vm
from qemu_configs.verify import check_selftest


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
    seed = ns.seed if ns.seed is not None else secrets.randbits(64)
    print(f"booting the guest (kernel {img.kernel_release}, "
          f"{'KVM if usable' if ns.kvm else 'TCG'}), seed {seed:#x} ...")
    try:
        res = run_vm(VmOptions(mode="selftest", params={"seed": f"{seed:x}",
                                                        "rounds": str(ns.rounds)},
                               share_memory=not ns.no_share,
                               accel="kvm" if ns.kvm else "tcg", workdir=ns.workdir))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    checks = check_selftest(res, seed, ns.rounds)
    rep = res.report or {}
    print(f"device {rep.get('bdf', '?')} found by the guest; "
          f"{rep.get('jobs_issued', 0)} DMA jobs, {rep.get('device_bytes', 0)} bytes moved, "
          f"{rep.get('interrupts_received', 0)} interrupts received")
    for c in checks:
        print(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    ok = all(c.ok for c in checks)
    print(f"{'PASSED' if ok else 'FAILED'}: {sum(c.ok for c in checks)}/{len(checks)} checks "
          f"in {time.monotonic() - t0:.1f}s")
    if not ok:
        print(f"logs kept in {res.workdir} (console: {res.console_log})")
    elif ns.workdir is None:
        cleanup(res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
