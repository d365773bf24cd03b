"""``teeio-guest-policy``: write the guest's policy for ``guest_agent accept``.

    teeio-guest-policy --trust-anchor PEM --firmware ELF [--leaf-subject RFC4514]
                       [--identity DIR] --out FILE

The policy is the guest owner's, not the TSM's (docs/design.md, "Trust model"): the trust anchors
it accepts device certificates under, the reference values computed from the golden
firmware ELF (docs/design.md decision 11), and the device it expects (vendor/device ID and,
optionally, the leaf certificate's subject; ``--identity DIR`` takes it from a
provisioned identity).  Format: :func:`teeio.tdi_verify.load_policy`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from teeio import pki
from teeio.measurements import reference_values
from teeio.tdi_verify import POLICY_FORMAT, PolicyError, policy_from_doc

VENDOR_ID, DEVICE_ID = 0x1234, 0x7E10


def policy_document(trust_anchor_pem: str, references: dict[str, Any],
                    leaf_subject: str | None = None) -> dict[str, Any]:
    device: dict[str, Any] = {"vendor_id": hex(VENDOR_ID), "device_id": hex(DEVICE_ID)}
    if leaf_subject is not None:
        device["leaf_subject"] = leaf_subject
    doc = {"format": POLICY_FORMAT, "trust_anchors_pem": trust_anchor_pem,
           "reference_values": references, "device": device}
    policy_from_doc(doc)           # it must load
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-guest-policy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trust-anchor", type=Path, required=True,
                    help="PEM file of the root certificate(s) the guest trusts")
    ap.add_argument("--firmware", type=Path, required=True,
                    help="the golden firmware ELF (reference values are computed from it)")
    ap.add_argument("--leaf-subject", help="expected leaf certificate subject (RFC 4514)")
    ap.add_argument("--identity", type=Path,
                    help="take the expected leaf subject from this provisioned identity")
    ap.add_argument("--out", type=Path, required=True,
                    help="where to write the policy document (JSON)")
    ns = ap.parse_args(argv)
    try:
        subject = ns.leaf_subject
        if ns.identity is not None:
            subject = pki.load_identity(ns.identity).leaf.subject.rfc4514_string()
        doc = policy_document(ns.trust_anchor.read_text(), reference_values(ns.firmware),
                              subject)
    except (OSError, ValueError, PolicyError, pki.ChainError) as exc:
        print(f"teeio-guest-policy: {exc}", file=sys.stderr)
        return 1
    ns.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
