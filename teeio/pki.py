"""Device PKI: vendor root CA -> intermediate CA -> device leaf, and chain checks.

The chain follows what SPDM (DSP0274 §10.6 "Certificates and certificate chains")
and CMA (PCIe 6.x §6.31.3) expect of a device certificate: X.509 v3, the leaf with
``digitalSignature`` and not a CA, issuers with ``basicConstraints CA`` and
``keyCertSign``; the leaf carries the DMTF SPDM extended key usage
*responder authentication* (id-DMTF-eku-responder-auth, 1.3.6.1.4.1.412.274.3).

Stays within cryptography 43's API: the guest verifies chains too.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
from dataclasses import field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from teeio.lite_dataclass import dataclass

OID_DMTF_EKU_RESPONDER_AUTH = x509.ObjectIdentifier("1.3.6.1.4.1.412.274.3")
OID_DMTF_EKU_REQUESTER_AUTH = x509.ObjectIdentifier("1.3.6.1.4.1.412.274.4")
ALGORITHMS = ("P-256", "P-384", "RSA-3072")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class ChainError(Exception):
    """A certificate chain that does not verify; the message says precisely why."""


@dataclass(frozen=True)
class Identity:
    """A device identity: certificates root first, and the leaf's private key."""

    certs: tuple[x509.Certificate, ...]
    leaf_key: PrivateKey = field(repr=False)

    @property
    def root(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[-1]

    def ders(self) -> list[bytes]:
        return [_der(c) for c in self.certs]


def new_key(alg: str) -> PrivateKey:
    if alg == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "RSA-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unknown key algorithm {alg!r} (choose from {', '.join(ALGORITHMS)})")


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teeio-emu vendor"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: PrivateKey, issuer: x509.Certificate | None, issuer_key: PrivateKey,
          ca: bool, path_len: int | None, leaf: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(_name(subject))
         .issuer_name(issuer.subject if issuer else _name(subject))
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=3650))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=leaf, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if leaf:
        b = b.add_extension(x509.ExtendedKeyUsage([OID_DMTF_EKU_RESPONDER_AUTH]), critical=False)
    return b.sign(issuer_key, _sign_hash(issuer_key))


def generate_chain(alg: str = "P-384", device_name: str = "teeio TEE-IO device") -> Identity:
    """Root CA -> intermediate CA -> device leaf, all keys of algorithm *alg*."""
    root_key, int_key, leaf_key = new_key(alg), new_key(alg), new_key(alg)
    root = _cert("teeio-emu Vendor Root CA", root_key, None, root_key, True, 1, False)
    inter = _cert("teeio-emu Vendor Intermediate CA", int_key, root, root_key, True, 0, False)
    leaf = _cert(device_name, leaf_key, inter, int_key, False, None, True)
    return Identity((root, inter, leaf), leaf_key)


def _write_key(path: Path, key: PrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding
    return cert.public_bytes(Encoding.PEM)


def provision(outdir: Path, alg: str = "P-384") -> dict[str, Path]:
    """Write a fresh identity: device.key (0600), chain.pem and trust-anchor.pem."""
    outdir.mkdir(parents=True, exist_ok=True)
    ident = generate_chain(alg)
    paths = {"device_key": outdir / "device.key", "chain": outdir / "chain.pem",
             "trust_anchor": outdir / "trust-anchor.pem"}
    _write_key(paths["device_key"], ident.leaf_key)
    paths["chain"].write_bytes(b"".join(_pem(c) for c in ident.certs))
    paths["trust_anchor"].write_bytes(_pem(ident.root))
    return paths


def load_identity(directory: Path) -> Identity:
    certs = x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes())
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key((directory / "device.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ChainError(f"{directory / 'device.key'}: unsupported key type")
    return Identity(tuple(certs), key)


def load_anchors(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _der(c: x509.Certificate) -> bytes:
    # serialization (with its SSH key formats) is imported only where a certificate is
    # encoded: verifying a chain received as DER encodes none.
    from cryptography.hazmat.primitives.serialization import Encoding
    return c.public_bytes(Encoding.DER)


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # InvalidSignature, or a key type that cannot sign
        return False
    return True


def verify_chain(certs: list[x509.Certificate], anchors: list[x509.Certificate],
                 now: datetime.datetime | None = None) -> PublicKey:
    """Check *certs* (root first) up to one of *anchors*; return the leaf's public key."""
    if not certs:
        raise ChainError("empty certificate chain")
    if not anchors:
        raise ChainError("no trust anchor configured")
    now = now or datetime.datetime.now(datetime.UTC)
    first = certs[0]
    if first not in anchors:        # x509.Certificate equality is equality of the DER
        if _self_signed(first):
            # A self-signed root that is not itself an anchor is another CA, even when an
            # anchor has the same name (every provisioned root has).
            raise ChainError(f"root is not a configured trust anchor nor issued by one "
                             f"(self-signed {first.subject.rfc4514_string()!r})")
        issuer = next((a for a in anchors if a.subject == first.issuer), None)
        if issuer is None:
            raise ChainError(f"chain root {first.subject.rfc4514_string()!r} is not a "
                             "configured trust anchor nor issued by one")
        certs = [issuer, *certs]
    for i, cert in enumerate(certs):
        name = cert.subject.rfc4514_string()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ChainError(f"certificate {i} ({name}) is not valid now")
        if i == 0:
            continue
        parent = certs[i - 1]
        try:
            bc = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise ChainError(f"issuer of certificate {i} has no basicConstraints") from None
        if not bc.ca:
            raise ChainError(f"certificate {i} ({name}) is issued by a non-CA certificate")
        # RFC 5280 §4.2.1.9: pathLenConstraint bounds the CA certificates between the
        # issuer (certs[i - 1]) and the leaf, i.e. certs[i:-1].
        if bc.path_length is not None and len(certs) - i - 1 > bc.path_length:
            raise ChainError(f"path length constraint of certificate {i - 1} exceeded")
        try:
            cert.verify_directly_issued_by(parent)
        except (ValueError, TypeError) as exc:
            raise ChainError(f"certificate {i} ({name}) is not issued by certificate {i - 1}: "
                             f"{exc}") from None
        except Exception as exc:  # InvalidSignature carries no message
            raise ChainError(f"certificate {i} ({name}): bad signature by its issuer "
                             f"({type(exc).__name__})") from None
    leaf = certs[-1]
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ChainError("the leaf certificate is a CA")
    except x509.ExtensionNotFound:
        pass
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ChainError(f"leaf key type {type(key).__name__} is not supported")
    return key


# --- SPDM certificate chain format (DSP0274 1.2 §10.6.1, Table "Certificate chain format") ----

HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def spdm_cert_chain(certs: list[x509.Certificate], hash_name: str) -> bytes:
    """Length (2, whole chain) | Reserved (2) | RootHash (H of root DER) | DER certificates."""
    ders = [_der(c) for c in certs]
    root_hash = HASHES[hash_name](ders[0]).digest()
    total = 4 + len(root_hash) + sum(map(len, ders))
    if total > 0xFFFF:
        raise ValueError(f"certificate chain of {total} bytes exceeds 65535")
    return struct.pack("<HH", total, 0) + root_hash + b"".join(ders)


def parse_spdm_cert_chain(blob: bytes, hash_name: str) -> tuple[bytes, list[x509.Certificate]]:
    hlen = HASHES[hash_name]().digest_size
    if len(blob) < 4 + hlen:
        raise ChainError(f"certificate chain of {len(blob)} bytes is too short")
    length, _reserved = struct.unpack_from("<HH", blob)
    if length != len(blob):
        raise ChainError(f"certificate chain length field {length} != {len(blob)} bytes")
    root_hash = blob[4:4 + hlen]
    ders = blob[4 + hlen:]
    certs: list[x509.Certificate] = []
    pos = 0
    while pos < len(ders):
        # Each certificate is one DER SEQUENCE: 0x30, then its length.
        if ders[pos] != 0x30 or pos + 2 > len(ders):
            raise ChainError(f"certificate {len(certs)}: not a DER SEQUENCE at offset {pos}")
        n = ders[pos + 1]
        if n < 0x80:
            size, hdr = n, 2
        else:
            nb = n & 0x7F
            if nb == 0 or nb > 3 or pos + 2 + nb > len(ders):
                raise ChainError(f"certificate {len(certs)}: bad DER length")
            size, hdr = int.from_bytes(ders[pos + 2:pos + 2 + nb], "big"), 2 + nb
        end = pos + hdr + size
        if end > len(ders):
            raise ChainError(f"certificate {len(certs)} is truncated")
        if not certs:
            root_der = ders[pos:end]    # RootHash is over the root certificate's DER
        try:
            certs.append(x509.load_der_x509_certificate(ders[pos:end]))
        except ValueError as exc:
            raise ChainError(f"certificate {len(certs)}: {exc}") from None
        pos = end
    if not certs:
        raise ChainError("certificate chain holds no certificate")
    if HASHES[hash_name](root_der).digest() != root_hash:
        raise ChainError("RootHash does not match the chain's root certificate")
    return root_hash, certs
