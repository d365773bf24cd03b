"""`python -m tsm.provision` in a subprocess: files, modes, printed paths and fingerprint."""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from teeio import pki

ROOT = Path(__file__).resolve().parents[2]


def _provision(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tsm.provision", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode not in (0, 1, 2):
        pytest.fail(f"tsm.provision crashed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _fingerprint(anchor: Path) -> str:
    der = pki.load_anchors(anchor)[0].public_bytes(serialization.Encoding.DER)
    return hashlib.sha384(der).hexdigest()


@pytest.mark.parametrize("alg", pki.ALGORITHMS)
def test_provision_cli(tmp_path: Path, alg: str) -> None:
    out = tmp_path / "identity"
    proc = _provision("--out", str(out), "--alg", alg)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert lines == {"device_key": str(out / "device.key"), "chain": str(out / "chain.pem"),
                     "trust_anchor": str(out / "trust-anchor.pem"),
                     "trust anchor SHA-384": lines["trust anchor SHA-384"]}
    printed = lines["trust anchor SHA-384"]
    assert printed.replace(":", "").lower() == _fingerprint(out / "trust-anchor.pem")
    assert len(printed.split(":")) == 48
    assert stat.S_IMODE((out / "device.key").stat().st_mode) == 0o600
    ident = pki.load_identity(out)
    pki.verify_chain(list(ident.certs), pki.load_anchors(out / "trust-anchor.pem"))
    key = ident.leaf_key
    if alg == "RSA-3072":
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == {"P-256": "secp256r1", "P-384": "secp384r1"}[alg]


def test_provision_cli_refuses_to_overwrite(tmp_path: Path) -> None:
    assert _provision("--out", str(tmp_path), "--alg", "P-256").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = _provision("--out", str(tmp_path))
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    proc = _provision("--out", str(tmp_path), "--alg", "P-256", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "trust-anchor.pem").read_bytes() != before["trust-anchor.pem"]


def test_provision_cli_rejects_unknown_algorithm(tmp_path: Path) -> None:
    proc = _provision("--out", str(tmp_path), "--alg", "P-521")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert not any(tmp_path.iterdir())
