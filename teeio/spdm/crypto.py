"""Cryptographic primitives as SPDM uses them (DSP0274 1.2/1.3 §15, DSP0277).

* Hashes: the negotiated BaseHashAlgo (SHA-256/384/512).
* Signatures (SPDM 1.2+, §15 "Signature generation"): the signer builds
  ``M = combined_spdm_prefix || Hash(transcript)`` where combined_spdm_prefix is
  ``"dmtf-spdm-v1.X.*"`` four times (64 bytes), zero bytes, then the context string,
  100 bytes in all; ECDSA / RSASSA then sign M with the negotiated hash (so the
  curve signs ``Hash(M)``).  This is exactly libspdm ``libspdm_asym_sign`` /
  ``libspdm_create_signing_context``.  ECDSA signatures travel as raw ``r || s``,
  each big-endian and padded to the curve size; RSA signatures as the modulus-size
  big-endian integer (PKCS#1 v1.5).
* ECDHE (§10.15): public key = X || Y big-endian; shared secret = X coordinate.
* HKDF (RFC 5869) with HMAC-Hash; AEAD AES-256-GCM with a 16-byte tag.

Stays within cryptography 43's API (the guest uses it too).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
from dataclasses import field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from teeio.lite_dataclass import dataclass

from .defs import (
    SIGNING_CONTEXT_SIZE,
    SIGNING_PREFIX_TEMPLATE,
    AeadSuite,
    BaseAsymAlgo,
    BaseHashAlgo,
    DheGroup,
    MeasurementHashAlgo,
)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class CryptoError(Exception):
    """A primitive failed (bad signature, bad point, bad tag)."""


# --- hashes ---------------------------------------------------------------------------------------

_HASH_NAMES: dict[int, str] = {
    BaseHashAlgo.SHA_256: "sha256", BaseHashAlgo.SHA_384: "sha384",
    BaseHashAlgo.SHA_512: "sha512",
}
_MEAS_HASH_NAMES: dict[int, str] = {
    MeasurementHashAlgo.SHA_256: "sha256", MeasurementHashAlgo.SHA_384: "sha384",
    MeasurementHashAlgo.SHA_512: "sha512",
}


def hash_name(alg: int) -> str:
    """hashlib name of a BaseHashAlgo bit."""
    try:
        return _HASH_NAMES[alg]
    except KeyError:
        raise CryptoError(f"unsupported base hash algorithm 0x{alg:x}") from None


def meas_hash_name(alg: int) -> str:
    try:
        return _MEAS_HASH_NAMES[alg]
    except KeyError:
        raise CryptoError(f"unsupported measurement hash algorithm 0x{alg:x}") from None


def hash_size(alg: int) -> int:
    return hashlib.new(hash_name(alg)).digest_size


def digest(alg: int, data: bytes) -> bytes:
    return hashlib.new(hash_name(alg), data).digest()


def meas_digest(alg: int, data: bytes) -> bytes:
    return hashlib.new(meas_hash_name(alg), data).digest()


def _chash(alg: int) -> hashes.HashAlgorithm:
    name = hash_name(alg)
    if name == "sha256":
        return hashes.SHA256()
    if name == "sha384":
        return hashes.SHA384()
    return hashes.SHA512()


# --- HMAC / HKDF (RFC 5869) -----------------------------------------------------------------------

def hmac(alg: int, key: bytes, data: bytes) -> bytes:
    return _hmac.new(key, data, hash_name(alg)).digest()


def hkdf_extract(alg: int, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract(salt, IKM) = HMAC-Hash(salt, IKM)."""
    return hmac(alg, salt, ikm)


def hkdf_expand(alg: int, prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(_chash(alg), length, info).derive(prk)


# --- signatures -----------------------------------------------------------------------------------

_SIG_SIZES: dict[int, int] = {
    BaseAsymAlgo.RSASSA_2048: 256, BaseAsymAlgo.RSASSA_3072: 384,
    BaseAsymAlgo.RSASSA_4096: 512, BaseAsymAlgo.ECDSA_P256: 64,
    BaseAsymAlgo.ECDSA_P384: 96, BaseAsymAlgo.ECDSA_P521: 132,
}
_CURVES: dict[int, type[ec.EllipticCurve]] = {
    BaseAsymAlgo.ECDSA_P256: ec.SECP256R1, BaseAsymAlgo.ECDSA_P384: ec.SECP384R1,
    BaseAsymAlgo.ECDSA_P521: ec.SECP521R1,
}
_RSA_BITS: dict[int, int] = {
    BaseAsymAlgo.RSASSA_2048: 2048, BaseAsymAlgo.RSASSA_3072: 3072,
    BaseAsymAlgo.RSASSA_4096: 4096,
}


def signature_size(asym: int) -> int:
    try:
        return _SIG_SIZES[asym]
    except KeyError:
        raise CryptoError(f"unsupported base asymmetric algorithm 0x{asym:x}") from None


def asym_algo_for_key(key: PrivateKey | PublicKey) -> BaseAsymAlgo:
    """The BaseAsymAlgo a key can sign with (ECDSA by curve, RSASSA by modulus size)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        for alg, curve in _CURVES.items():
            if isinstance(key.curve, curve):
                return BaseAsymAlgo(alg)
        raise CryptoError(f"unsupported curve {key.curve.name}")
    for alg, bits in _RSA_BITS.items():
        if key.key_size == bits:
            return BaseAsymAlgo(alg)
    raise CryptoError(f"unsupported RSA key size {key.key_size}")


def key_matches_algo(key: PublicKey, asym: int) -> bool:
    try:
        return asym_algo_for_key(key) == asym
    except CryptoError:
        return False


def signing_prefix(version: int, context: bytes) -> bytes:
    """combined_spdm_prefix (§15): 4 x "dmtf-spdm-v1.X.*", zero pad, context: 100 bytes."""
    prefix = SIGNING_PREFIX_TEMPLATE.format(major=version >> 4, minor=version & 0xF).encode()
    pad = SIGNING_CONTEXT_SIZE - 4 * len(prefix) - len(context)
    if len(prefix) != 16 or pad < 0:
        raise CryptoError(f"bad signing context {context!r} for version 0x{version:02x}")
    return prefix * 4 + bytes(pad) + context


def signed_message(version: int, hash_alg: int, context: bytes, transcript: bytes) -> bytes:
    """M = combined_spdm_prefix || Hash(transcript) -- what the asymmetric algorithm signs."""
    return signing_prefix(version, context) + digest(hash_alg, transcript)


def sign(key: PrivateKey, asym: int, hash_alg: int, message: bytes) -> bytes:
    """Sign *message* (hashing it with *hash_alg*); raw SPDM signature encoding."""
    size = signature_size(asym)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if asym not in _CURVES or not isinstance(key.curve, _CURVES[asym]):
            raise CryptoError(f"key curve {key.curve.name} does not match algorithm 0x{asym:x}")
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(_chash(hash_alg))))
        half = size // 2
        return r.to_bytes(half, "big") + s.to_bytes(half, "big")
    if asym not in _RSA_BITS or key.key_size != _RSA_BITS[asym]:
        raise CryptoError(f"RSA-{key.key_size} key does not match algorithm 0x{asym:x}")
    return key.sign(message, padding.PKCS1v15(), _chash(hash_alg))


def verify(pub: PublicKey, asym: int, hash_alg: int, message: bytes, signature: bytes) -> None:
    """Verify a raw SPDM signature over *message*; raise CryptoError if it does not hold."""
    size = signature_size(asym)
    if len(signature) != size:
        raise CryptoError(f"signature is {len(signature)} bytes, algorithm needs {size}")
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if asym not in _CURVES or not isinstance(pub.curve, _CURVES[asym]):
                raise CryptoError(f"public key curve {pub.curve.name} does not match "
                                  f"algorithm 0x{asym:x}")
            half = size // 2
            der = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                       int.from_bytes(signature[half:], "big"))
            pub.verify(der, message, ec.ECDSA(_chash(hash_alg)))
        else:
            if asym not in _RSA_BITS or pub.key_size != _RSA_BITS[asym]:
                raise CryptoError(f"RSA-{pub.key_size} public key does not match "
                                  f"algorithm 0x{asym:x}")
            pub.verify(signature, message, padding.PKCS1v15(), _chash(hash_alg))
    except InvalidSignature:
        raise CryptoError("signature does not verify") from None


def spdm_sign(key: PrivateKey, version: int, asym: int, hash_alg: int, context: bytes,
              transcript: bytes) -> bytes:
    return sign(key, asym, hash_alg, signed_message(version, hash_alg, context, transcript))


def spdm_verify(pub: PublicKey, version: int, asym: int, hash_alg: int, context: bytes,
                transcript: bytes, signature: bytes) -> None:
    verify(pub, asym, hash_alg, signed_message(version, hash_alg, context, transcript),
           signature)


# --- ECDHE (§10.15) -------------------------------------------------------------------------------

_DHE_CURVES: dict[int, tuple[type[ec.EllipticCurve], int]] = {
    DheGroup.SECP_256_R1: (ec.SECP256R1, 32), DheGroup.SECP_384_R1: (ec.SECP384R1, 48),
    DheGroup.SECP_521_R1: (ec.SECP521R1, 66),
}


def dhe_public_size(group: int) -> int:
    try:
        return 2 * _DHE_CURVES[group][1]
    except KeyError:
        raise CryptoError(f"unsupported DHE group 0x{group:x}") from None


@dataclass(frozen=True)
class DheKeyPair:
    """An ephemeral ECDHE key: the private half never reaches repr."""

    group: int
    private: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def generate(cls, group: int) -> DheKeyPair:
        try:
            curve, _ = _DHE_CURVES[group]
        except KeyError:
            raise CryptoError(f"unsupported DHE group 0x{group:x}") from None
        return cls(group, ec.generate_private_key(curve()))

    def public_bytes(self) -> bytes:
        """ExchangeData: X || Y, each big-endian, padded to the field size."""
        size = _DHE_CURVES[self.group][1]
        nums = self.private.public_key().public_numbers()
        return nums.x.to_bytes(size, "big") + nums.y.to_bytes(size, "big")

    def shared_secret(self, peer: bytes) -> bytes:
        """The X coordinate of private * peer, big-endian (validates the peer point)."""
        curve, size = _DHE_CURVES[self.group]
        if len(peer) != 2 * size:
            raise CryptoError(f"peer ExchangeData is {len(peer)} bytes, expected {2 * size}")
        try:
            pub = ec.EllipticCurvePublicKey.from_encoded_point(curve(), b"\x04" + peer)
            return self.private.exchange(ec.ECDH(), pub)
        except ValueError as exc:
            raise CryptoError(f"peer ExchangeData is not a valid point: {exc}") from None


# --- AEAD ----------------------------------------------------------------------------------------

AEAD_TAG_SIZE = 16
AEAD_IV_SIZE = 12
_AEAD_KEY_SIZES: dict[int, int] = {AeadSuite.AES_128_GCM: 16, AeadSuite.AES_256_GCM: 32}


def aead_key_size(suite: int) -> int:
    try:
        return _AEAD_KEY_SIZES[suite]
    except KeyError:
        raise CryptoError(f"unsupported AEAD suite 0x{suite:x}") from None


def aead_encrypt(key: bytes, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """Ciphertext || 16-byte tag."""
    return AESGCM(key).encrypt(iv, plaintext, aad)


def aead_decrypt(key: bytes, iv: bytes, aad: bytes, ciphertext_and_tag: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(iv, ciphertext_and_tag, aad)
    except InvalidTag:
        raise CryptoError("AEAD tag does not verify") from None
