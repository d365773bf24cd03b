"""``teeio-guest-policy``: write the guest's policy for ``guest_agent accept``.

    teeio-guest-policy --trust-anchor PEM --firmware ELF [--leaf-subject RFC4514]
                       [--identity DIR] [--personality nvme] --out FILE

The policy is the guest owner's, not the TSM's (docs/design.md, "Trust model"): the trust anchors
it accepts device certificates under, the reference values computed from the golden
firmware ELF (docs/design.md decision 11) with the personality's configuration
measurement, and the device it expects (vendor/device ID of the personality and,
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
from teeio import personality as personalities
from teeio.measurements import reference_values
from teeio.tdi_verify import POLICY_FORMAT, PolicyError, policy_from_doc

VENDOR_ID, DEVICE_ID = personalities.VENDOR_ID, personalities.ACCELERATOR.device_id


def policy_document(trust_anchor_pem: str, references: dict[str, Any],
                    leaf_subject: str | None = None,
                    personality: str = personalities.DEFAULT) -> dict[str, Any]:
    """The policy for a device of *personality* (its device ID); *references* must be
    that personality's (:func:`reference_values_for`)."""
    device_id = personalities.personality(personality).device_id
    device: dict[str, Any] = {"vendor_id": hex(VENDOR_ID), "device_id": hex(device_id)}
    if leaf_subject is not None:
        device["leaf_subject"] = leaf_subject
    doc = {"format": POLICY_FORMAT, "trust_anchors_pem": trust_anchor_pem,
           "reference_values": references, "device": device}
    policy_from_doc(doc)           # it must load
    return doc


def reference_values_for(firmware: Path, personality: str = personalities.DEFAULT
                         ) -> dict[str, Any]:
    """The reference values a device of *personality* running *firmware* reports."""
    return reference_values(firmware, personalities.configuration_measurements(personality))


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
    ap.add_argument("--personality", choices=tuple(personalities.PERSONALITIES),
                    default=personalities.DEFAULT,
                    help="the device's personality (teeio-device --personality; default "
                         f"{personalities.DEFAULT}): its device ID and configuration "
                         "measurement")
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
        doc = policy_document(read_anchor(ns.trust_anchor),
                              reference_values_for(ns.firmware, ns.personality), subject,
                              ns.personality)
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
