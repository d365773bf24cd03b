"""Provision a device identity: vendor root CA -> intermediate CA -> device leaf.

    python -m tsm.provision --out DIR [--alg P-384|P-256|RSA-3072] [--force]

Writes DIR/device.key (mode 0600), DIR/chain.pem (root first) and DIR/trust-anchor.pem
(teeio.pki.provision), then prints the paths and the trust anchor's SHA-384 fingerprint
(of its DER encoding) so it can be compared out of band.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from teeio import pki


def fingerprint(path: Path) -> str:
    """SHA-384 of the first certificate's DER in the PEM file *path*, colon-separated hex."""
    cert = pki.load_anchors(path)[0]
    return cert.fingerprint(hashes.SHA384()).hex(":").upper()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-provision",
                                 description="Generate a device certificate chain and key.")
    ap.add_argument("--out", type=Path, required=True, help="directory to write into")
    ap.add_argument("--alg", choices=pki.ALGORITHMS, default="P-384",
                    help="key algorithm of all three keys (default: P-384)")
    ap.add_argument("--force", action="store_true",
                    help="replace an identity already in --out")
    opts = ap.parse_args(argv)
    if (opts.out / "device.key").exists() and not opts.force:
        print(f"error: {opts.out / 'device.key'} exists; use --force to replace the identity",
              file=sys.stderr)
        return 1
    try:
        paths = pki.provision(opts.out, opts.alg)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"trust anchor SHA-384: {fingerprint(paths['trust_anchor'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
