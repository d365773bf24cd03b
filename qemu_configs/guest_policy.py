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

from cryptography import x509

from teeio import options, pki
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


def check_subject(subject: str) -> None:
    """``--leaf-subject`` must be an RFC 4514 name (ValueError naming it otherwise)."""
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        why = " ".join(str(exc).split())
        raise ValueError(f"--leaf-subject {subject!r}: not an RFC 4514 name"
                         + (f" ({why})" if why else "")) from None
    if not len(name):
        raise ValueError(f"--leaf-subject {subject!r}: an empty name")


def read_anchor(path: Path) -> str:
    """The trust anchor's PEM text; ValueError naming *path* if it holds no certificate."""
    text = path.read_text()
    try:
        x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise ValueError(f"--trust-anchor {path}: not a PEM certificate file") from None
    return text


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
        options.writable_file("--out", ns.out)
        subject = ns.leaf_subject
        if subject is not None:
            check_subject(subject)
        if ns.identity is not None:
            subject = pki.load_identity(ns.identity).leaf.subject.rfc4514_string()
        doc = policy_document(read_anchor(ns.trust_anchor), reference_values(ns.firmware),
                              subject)
        ns.out.write_text(json.dumps(doc, indent=2) + "\n")
    except options.OptionError as exc:
        print(f"teeio-guest-policy: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"teeio-guest-policy: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except (ValueError, PolicyError, pki.ChainError) as exc:
        print(f"teeio-guest-policy: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
