"""``python3 -m guest_agent MODE``: runs inside the guest (stdlib + guest python3 only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guest_agent import accept, doe, selftest, spdm_probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="guest_agent", description=__doc__)
    ap.add_argument("mode", choices=["selftest", "probe", "doe-discovery", "spdm-probe", "accept"])
    ap.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    ap.add_argument("--seed", default="0", help="hex seed the host chose for the test data")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of FILL/COPY/SHA-256")
    ap.add_argument("--target", default="teeio", choices=sorted(spdm_probe.TARGETS),
                    help="spdm-probe: whose DOE mailbox to drive (teeio: our device; nvme: "
                         "QEMU's NVMe controller with spdm_port)")
    ap.add_argument("--policy", type=Path, help="accept: the guest's policy (trust anchors, "
                    "reference values, expected device)")
    ap.add_argument("--pause-at", default="", choices=("", *accept.PAUSE_POINTS),
                    help="accept: wait for the host at this point (tests)")
    ap.add_argument("--sync-dir", type=Path, default=Path("/mnt/results"),
                    help="accept: where pause/resume files are exchanged with the host")
    ap.add_argument("--expect", default="accept", choices=("accept", "refuse"),
                    help="accept: 'refuse' when the host broke something on purpose")
    ap.add_argument("--stop", type=int, default=0, choices=(0, 1),
                    help="accept: 1 = TDI_STOP at the end")
    ap.add_argument("--cycles", type=int, default=0,
                    help="accept: that many more STOP/LOCK/verify/ACCEPT rounds (benchmark)")
    ns, _unknown = ap.parse_known_args(argv)
    if ns.mode == "probe":
        report = {"mode": "probe", "ok": True}
    elif ns.mode == "doe-discovery":
        report = doe.run()
    elif ns.mode == "spdm-probe":
        report = spdm_probe.run(ns.target)
    elif ns.mode == "accept":
        if ns.policy is None:
            ap.error("accept needs --policy FILE")
        report = accept.run(ns.policy, pause_at=ns.pause_at, sync_dir=ns.sync_dir,
                            expect=ns.expect, stop=bool(ns.stop), cycles=ns.cycles,
                            seed=int(ns.seed, 16))
    else:
        report = selftest.run(int(ns.seed, 16), ns.rounds)
    tmp = ns.report.with_name(ns.report.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    tmp.replace(ns.report)
    print(json.dumps({k: v for k, v in report.items() if k != "checks"}, sort_keys=True))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
