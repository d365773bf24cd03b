"""``make demo``: the whole Secure IO story, end to end, with a summary of every step.

Provision and build; the TSM daemon attests the device, keys a Selective IDE stream and binds
the TDI to the VM; the guest locks, verifies and accepts the device, then validates
encrypted DMA; the host judges from its own view.  Exits 0 only if every check passed.
Step by step: docs/by-hand.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu_configs import image
from qemu_configs.launcher import LaunchError, interrupt_on_signals
from qemu_configs.tee_stack import StackOptions, TeeStack, capture_summary, guest_dma_data
from qemu_configs.verify import Check
from teeio import options
from vfio_user_dev.firmware_build import FirmwareBuildError


def judge(stack: TeeStack, report: dict[str, Any] | None, seed: int) -> list[Check]:
    """The host's own checks of an accept run (also used by the e2e tests)."""
    rep = report or {}
    checks = [Check("guest_report", report is not None, "the guest wrote its report"
                    if report is not None else "no report from the guest")]
    for c in rep.get("checks", []):
        checks.append(Check(f"guest:{c['name']}", bool(c["ok"]),
                            ", ".join(f"{k}={v}" for k, v in c.items()
                                      if k in ("value", "length", "digest", "error"))))
    verdict = rep.get("verdict", {})
    for c in verdict.get("checks", []):
        checks.append(Check(f"verify:{c['name']}", bool(c["ok"]), str(c.get("detail", ""))))
    checks.append(Check("accepted", bool(rep.get("accepted")),
                        rep.get("refusal") or "TDI_ACCEPT: TDI in RUN"))
    data = guest_dma_data(seed)
    digest = bytes.fromhex(rep["private_sha256"]) if rep.get("private_sha256") else b""
    checks.append(Check("host_recomputes_sha256",
                        digest == hashlib.sha256(data).digest(),
                        "the device's SHA-256 of the guest's private data equals the host's"))
    cap = capture_summary(stack.capture, {"guest data": data[:32], "digest": digest or b"-"})
    checks.append(Check("link_ciphertext_only", cap["ide_protected"] > 0
                        and not cap["plaintext_found"],
                        f"{cap['tlps']} TLPs captured, {cap['ide_protected']} IDE-protected; "
                        f"plaintext found: {cap['plaintext_found'] or 'none'}"))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-demo", description=__doc__)
    ap.add_argument("--seed", type=lambda s: int(s, 16), default=None, help="hex seed")
    ap.add_argument("--kvm", action="store_true", help="use KVM if a probe boot works")
    ap.add_argument("--workdir", type=Path, help="keep logs and results here")
    ap.add_argument("--doe-capture", type=Path, metavar="FILE",
                    help="the device server writes every DOE object (the TSM's SPDM, IDE_KM "
                         "and TDISP, the guest's DOE discovery) to FILE as the pcap DMTF "
                         "spdm_dump reads (spdm_dump -r FILE)")
    ap.add_argument("--shell", action="store_true",
                    help="the same stack, but boot the guest to a root shell on this terminal "
                         "and run the agent by hand (see docs/by-hand.md)")
    ns = ap.parse_args(argv)
    try:                   # before anything is built or started
        if ns.workdir is not None:
            options.usable_dir("--workdir", ns.workdir)
        if ns.doe_capture is not None:
            options.writable_file("--doe-capture", ns.doe_capture)
    except options.OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    interrupt_on_signals()       # kill and SIGHUP clean up as Ctrl-C does
    made: list[Path] = []
    try:
        return _main(ns, made)
    except KeyboardInterrupt:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if made and ns.workdir is None:
            shutil.rmtree(made[0], ignore_errors=True)
        print("interrupted: QEMU, the device server and the TSM daemon were stopped",
              file=sys.stderr)
        return 130


def _main(ns: argparse.Namespace, made: list[Path]) -> int:
    """:func:`main` after its options were checked; *made* gets the work folder."""
    t0 = time.monotonic()
    try:
        if not image.is_built():
            print("guest image missing: building it (once) ...")
        img = image.ensure_image()
    except image.ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    image_s = time.monotonic() - t0
    wd = ns.workdir or Path(tempfile.mkdtemp(prefix="teeio-demo-"))
    made.append(wd)
    seed = ns.seed if ns.seed is not None else secrets.randbits(64)
    extra = ["--doe-capture", str(ns.doe_capture.absolute())] if ns.doe_capture else []
    stack = TeeStack(StackOptions(wd, seed=seed, accel="kvm" if ns.kvm else "tcg",
                                  shell=ns.shell, extra_device_args=extra))
    if ns.shell:
        return _shell(stack)
    stack.timings.append(("guest image (cached or built)", image_s))
    print(f"work folder {wd}; guest kernel {img.kernel_release}; "
          f"{'KVM if usable' if ns.kvm else 'TCG'}; seed {seed:#x}")
    try:
        res = stack.run()
    except (LaunchError, FirmwareBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"logs kept in {wd}", file=sys.stderr)
        return 1
    rep = res.report or {}
    print("\nsteps                                                        seconds")
    for name, secs in stack.timings:
        print(f"  host   {name:<52} {secs:7.2f}")
    for st in rep.get("steps", []):
        mark = "" if st.get("ok") else "  FAILED: " + str(st.get("error", ""))
        print(f"  guest  {st['step']:<52} {st['seconds']:7.2f}{mark}")
    checks = judge(stack, res.report, seed)
    checks.append(Check("guest_run", res.ok, res.reason or "status ok"))
    print()
    for c in checks:
        print(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    ok = all(c.ok for c in checks)
    print(f"\n{'PASSED' if ok else 'FAILED'}: {sum(c.ok for c in checks)}/{len(checks)} "
          f"checks in {time.monotonic() - t0:.1f}s")
    status = wd / "tsm-status.json"
    if status.exists() and (ns.workdir is not None or not ok):
        print(f"TSM status at the end: {status}  (journal: {wd / 'tsm' / 'journal.jsonl'})")
    (wd / "demo-summary.json").write_text(json.dumps(
        {"ok": ok, "timings": stack.timings, "guest_steps": rep.get("steps", []),
         "checks": [vars(c) for c in checks]}, indent=2))
    if not ok:
        print(f"logs kept in {wd} (console: {res.console_log})")
    elif ns.workdir is None:
        shutil.rmtree(wd, ignore_errors=True)
    return 0 if ok else 1


def _shell(stack: TeeStack) -> int:
    wd = stack.wd
    print("TSM daemon, device and GHCx are set up; in the guest's shell run:\n"
          "    python3 -m guest_agent accept --policy /mnt/results/policy.json "
          "--report /tmp/r.json\n"
          f"and on the host: teeio-tsm ctl --ctl-socket {stack.ctl_sock} status\n"
          f"    python -m vfio_user_dev.host_access --socket {stack.host_sock} stats\n"
          "leave the guest with 'busybox poweroff -f'")
    try:
        res = stack.run()
    except (LaunchError, FirmwareBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"logs and the TSM journal are in {wd}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
