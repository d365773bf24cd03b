"""Device PKI (teeio/pki.py): chain generation and verification, SPDM chain format."""

from __future__ import annotations

import datetime
import hashlib
import stat
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from teeio import pki
from teeio.pki import ChainError, Identity, verify_chain


@pytest.fixture(scope="module", params=pki.ALGORITHMS)
def ident(request: pytest.FixtureRequest) -> Identity:
    alg = request.param
    assert isinstance(alg, str)
    return pki.generate_chain(alg)


@pytest.fixture(scope="module")
def other() -> Identity:
    """An unrelated identity with the same subject names as every generated chain."""
    return pki.generate_chain("P-256")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def test_chain_verifies_to_its_root(ident: Identity) -> None:
    key = verify_chain(list(ident.certs), [ident.root])
    assert _public_der(key) == _public_der(ident.leaf_key.public_key())
    assert len(ident.certs) == 3


def test_chain_without_root_verifies_to_anchor(ident: Identity) -> None:
    key = verify_chain(list(ident.certs[1:]), [ident.root])
    assert _public_der(key) == _public_der(ident.leaf.public_key())


def test_wrong_anchor_rejected(ident: Identity, other: Identity) -> None:
    # same root name, different key: named as what it is, not as a path length problem
    assert other.root.subject == ident.root.subject
    with pytest.raises(ChainError, match="root is not a configured trust anchor"):
        verify_chain(list(ident.certs), [other.root])
    with pytest.raises(ChainError):
        verify_chain(list(ident.certs[1:]), [other.root])


def test_unrelated_anchor_rejected(ident: Identity) -> None:
    with pytest.raises(ChainError, match="not a configured trust anchor nor issued by one"):
        verify_chain(list(ident.certs), [ident.leaf])


def test_no_anchor_or_empty_chain(ident: Identity) -> None:
    with pytest.raises(ChainError, match="no trust anchor"):
        verify_chain(list(ident.certs), [])
    with pytest.raises(ChainError, match="empty certificate chain"):
        verify_chain([], [ident.root])


def _tamper_signature(cert: x509.Certificate) -> x509.Certificate:
    der = bytearray(_der(cert))
    pos = der.rfind(cert.signature) + len(cert.signature) - 1
    der[pos] ^= 0x01  # last byte of ECDSA s / RSA signature: still well-formed DER
    return x509.load_der_x509_certificate(bytes(der))


@pytest.mark.parametrize("which", [1, 2])
def test_tampered_signature_rejected(ident: Identity, which: int) -> None:
    certs = list(ident.certs)
    certs[which] = _tamper_signature(certs[which])
    with pytest.raises(ChainError, match=f"certificate {which} .*bad signature"):
        verify_chain(certs, [ident.root])


def test_expired_and_not_yet_valid(ident: Identity) -> None:
    after = ident.leaf.not_valid_after_utc + datetime.timedelta(seconds=1)
    before = ident.leaf.not_valid_before_utc - datetime.timedelta(seconds=1)
    for now in (after, before):
        with pytest.raises(ChainError, match="is not valid now"):
            verify_chain(list(ident.certs), [ident.root], now=now)
    inside = ident.leaf.not_valid_before_utc + datetime.timedelta(days=1)
    verify_chain(list(ident.certs), [ident.root], now=inside)


def test_leaf_profile(ident: Identity) -> None:
    leaf = ident.leaf
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ObjectIdentifier("1.3.6.1.4.1.412.274.3") in eku
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    for ca in ident.certs[:2]:
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert all(c.version == x509.Version.v3 for c in ident.certs)
    assert ident.root.issuer == ident.root.subject


def test_leaf_key_not_in_repr(ident: Identity) -> None:
    assert "leaf_key" not in repr(ident)


def test_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="unknown key algorithm 'P-521'"):
        pki.generate_chain("P-521")


# --- chain rules with hand-made chains (P-256 keys: fast) -------------------------------

def _chain(root_path_len: int | None, inter_ca: bool = True,
           leaf_ca: bool = False) -> list[x509.Certificate]:
    rk, ik, lk = (pki.new_key("P-256") for _ in range(3))
    root = pki._cert("root", rk, None, rk, True, root_path_len, False)
    inter = pki._cert("inter", ik, root, rk, inter_ca, 0 if inter_ca else None, not inter_ca)
    leaf = pki._cert("leaf", lk, inter, ik, leaf_ca, None, True)
    return [root, inter, leaf]


def test_root_path_len_zero_forbids_an_intermediate_ca() -> None:
    # RFC 5280 §4.2.1.9: pathLenConstraint 0 = no non-self-issued CA may follow.
    certs = _chain(root_path_len=0)
    with pytest.raises(ChainError, match="path length constraint of certificate 0"):
        verify_chain(certs, [certs[0]])
    ok = _chain(root_path_len=1)
    verify_chain(ok, [ok[0]])


def test_non_ca_issuer_rejected() -> None:
    certs = _chain(root_path_len=None, inter_ca=False)
    with pytest.raises(ChainError, match="issued by a non-CA certificate"):
        verify_chain(certs, [certs[0]])


def test_ca_leaf_rejected() -> None:
    certs = _chain(root_path_len=None, leaf_ca=True)
    with pytest.raises(ChainError, match="the leaf certificate is a CA"):
        verify_chain(certs, [certs[0]])


# --- SPDM certificate chain format (DSP0274 1.2 §10.6.1) --------------------------------

@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_spdm_chain_round_trip(ident: Identity, hash_name: str) -> None:
    blob = pki.spdm_cert_chain(list(ident.certs), hash_name)
    root_hash = hashlib.new(hash_name, _der(ident.root)).digest()
    assert struct.unpack_from("<HH", blob) == (len(blob), 0)
    assert blob[4:4 + len(root_hash)] == root_hash
    assert blob[4 + len(root_hash):] == b"".join(ident.ders())
    got_hash, certs = pki.parse_spdm_cert_chain(blob, hash_name)
    assert got_hash == root_hash and [_der(c) for c in certs] == ident.ders()
    verify_chain(certs, [ident.root])


def _with_length(body: bytes) -> bytes:
    return struct.pack("<HH", 4 + len(body), 0) + body


@pytest.fixture(scope="module")
def blob() -> bytes:
    return pki.spdm_cert_chain(list(pki.generate_chain("P-256").certs), "sha384")


def test_spdm_chain_length_mismatch(blob: bytes) -> None:
    for bad in (blob[:-1], blob + b"\0"):
        with pytest.raises(ChainError, match="length field"):
            pki.parse_spdm_cert_chain(bad, "sha384")


def test_spdm_chain_every_truncation(blob: bytes) -> None:
    body = blob[4:]
    _, certs = pki.parse_spdm_cert_chain(blob, "sha384")
    ends = [48 + sum(len(_der(c)) for c in certs[:k]) for k in range(1, len(certs) + 1)]
    for n in range(len(body)):
        if n in ends:  # a prefix ending on a certificate boundary is a shorter, valid chain
            assert len(pki.parse_spdm_cert_chain(_with_length(body[:n]), "sha384")[1]) \
                == ends.index(n) + 1
            continue
        with pytest.raises(ChainError):
            pki.parse_spdm_cert_chain(_with_length(body[:n]), "sha384")


@pytest.mark.parametrize(("garbage", "message"), [
    (b"\x04\x03abc", "not a DER SEQUENCE"),
    (b"\x30", "not a DER SEQUENCE"),
    (b"\x30\x80\x00\x00", "bad DER length"),
    (b"\x30\x84\x00\x00\x00\x01\x00", "bad DER length"),
    (b"\x30\x82\x10\x00" + bytes(16), "is truncated"),
    (b"\x30\x03\x02\x01\x00", "certificate 0"),
])
def test_spdm_chain_garbage(blob: bytes, garbage: bytes, message: str) -> None:
    root_hash = blob[4:52]
    with pytest.raises(ChainError, match=message):
        pki.parse_spdm_cert_chain(_with_length(root_hash + garbage), "sha384")


def test_spdm_chain_without_certificates(blob: bytes) -> None:
    with pytest.raises(ChainError, match="holds no certificate"):
        pki.parse_spdm_cert_chain(_with_length(blob[4:52]), "sha384")
    with pytest.raises(ChainError, match="too short"):
        pki.parse_spdm_cert_chain(blob[:20], "sha384")


def test_spdm_chain_wrong_root_hash(blob: bytes) -> None:
    bad = bytearray(blob)
    bad[4] ^= 0xFF
    with pytest.raises(ChainError, match="RootHash does not match"):
        pki.parse_spdm_cert_chain(bytes(bad), "sha384")
    with pytest.raises(ChainError):  # the same chain read with the wrong hash size
        pki.parse_spdm_cert_chain(blob, "sha256")


# --- provisioning ------------------------------------------------------------------------

def test_provision_and_load_identity(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    paths = pki.provision(out, "P-256")
    assert set(paths) == {"device_key", "chain", "trust_anchor"}
    assert stat.S_IMODE(paths["device_key"].stat().st_mode) == 0o600
    ident = pki.load_identity(out)
    anchors = pki.load_anchors(paths["trust_anchor"])
    assert [_der(a) for a in anchors] == [_der(ident.root)]
    key = verify_chain(list(ident.certs), anchors)
    assert _public_der(key) == _public_der(ident.leaf_key.public_key())
    assert b"PRIVATE KEY" in paths["device_key"].read_bytes()


def test_provision_tightens_existing_key_mode(tmp_path: Path) -> None:
    (tmp_path / "device.key").write_text("old")
    (tmp_path / "device.key").chmod(0o644)
    pki.provision(tmp_path, "P-256")
    assert stat.S_IMODE((tmp_path / "device.key").stat().st_mode) == 0o600
