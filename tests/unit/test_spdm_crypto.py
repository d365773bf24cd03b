"""Known-answer tests for the SPDM crypto building blocks.

The vectors are data in tests/vectors/ (spdm_secured_message, hkdf_rfc5869,
spdm_bin_concat, ecdsa_rfc6979, ecdh_rfc5903).  Provenance of every vector:

* DSP0277 secured-message records: DMTF libspdm
  ``unit_test/test_spdm_secured_message/encode_decode.c`` (HEAD 7199f34), tests 1, 2
  and 8: AES-256-GCM, key 00..1F, salt 00 02 04 .. 16, session ID 0x00112233,
  application data 00..0F, an explicit 8-byte little-endian sequence number in the
  AAD (MCTP style) -- our ``seq_num_size=8``.
* PCI DOE variant (no sequence number on the wire): derived from the same inputs with
  Python ``cryptography`` (DSP0277 §6 record layout) -- regression
  data, not a standard.  Its ciphertext equals libspdm's (same key/IV/plaintext);
  only the tag differs, because the AAD is shorter.
* HKDF: RFC 5869 Appendix A.1 (test case 1, SHA-256).
* ECDSA P-256 / SHA-256 signature of "sample": RFC 6979 Appendix A.2.5.
* ECDH secp256r1: RFC 5903 §8.1.
* BinConcat bytes (DSP0277 key schedule): hand-built from the libspdm
  ``libspdm_bin_concat`` layout; signing prefixes hand-built from libspdm
  ``libspdm_create_signing_context`` and the ``SPDM_*_SIGN_CONTEXT`` strings.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from teeio.spdm import crypto, key_schedule, opaque
from teeio.spdm.defs import AeadSuite, BaseAsymAlgo, BaseHashAlgo, DheGroup
from teeio.spdm.key_schedule import TrafficKeys, bin_concat
from teeio.spdm.secured import SecuredMessageError, decode_record, encode_record
from tests.support.vectors import load, number, unhex

H = bytes.fromhex
RECORDS = load("spdm_secured_message")
KEY = unhex(RECORDS["key"])
SALT = unhex(RECORDS["salt"])
SESSION_ID = number(RECORDS["session_id"])
APP = unhex(RECORDS["application_data"])
TK = TrafficKeys(secret=b"", key=KEY, iv=SALT)


# --- DSP0277 record layer (libspdm encode_decode.c) -------------------------------------------

@pytest.mark.parametrize(("seq", "ciphertext", "mac"), [
    (number(v["sequence_number"]), v["ciphertext"], v["mac"]) for v in RECORDS["libspdm"]],
    ids=[f"test{v['test']}" for v in RECORDS["libspdm"]])
def test_libspdm_record_vectors(seq: int, ciphertext: str, mac: str) -> None:
    record = encode_record(SESSION_ID, TK, seq, APP, seq_num_size=8)
    header = H("33221100") + seq.to_bytes(8, "little") + H("2200")
    assert record == header + H(ciphertext) + H(mac)
    assert decode_record(record, TK, seq, seq_num_size=8) == APP


def test_pci_doe_record_has_no_sequence_number() -> None:
    # Same inputs, DOE binding: AAD = SessionID || Length only (derived vector, §6.2).
    doe0, doe1 = RECORDS["pci_doe"]
    assert number(doe0["sequence_number"]) == 0 and number(doe1["sequence_number"]) == 1
    record = encode_record(SESSION_ID, TK, 0, APP)
    assert record == unhex(doe0["record"])
    record1 = encode_record(SESSION_ID, TK, 1, APP)
    assert record1 == unhex(doe1["record"])
    assert decode_record(record1 + bytes(2), TK, 1) == APP   # DOE DW padding ignored


def test_record_replay_and_tamper_fail() -> None:
    record = encode_record(SESSION_ID, TK, 0, APP)
    with pytest.raises(SecuredMessageError, match="MAC"):
        decode_record(record, TK, 1)                # replayed: implicit counter moved on
    bad = bytearray(record)
    bad[-1] ^= 1
    with pytest.raises(SecuredMessageError, match="MAC"):
        decode_record(bytes(bad), TK, 0)
    bad = bytearray(record)
    bad[4] ^= 1                                     # Length is in the AAD
    with pytest.raises(SecuredMessageError):
        decode_record(bytes(bad), TK, 0)
    with pytest.raises(SecuredMessageError, match="too short"):
        decode_record(record[:10], TK, 0)


# --- HKDF / key schedule labels ------------------------------------------------------------------

def test_hkdf_rfc5869_case1() -> None:
    (case,) = load("hkdf_rfc5869")["vectors"]
    assert case["hash"] == "SHA-256"
    prk = crypto.hkdf_extract(BaseHashAlgo.SHA_256, unhex(case["salt"]), unhex(case["ikm"]))
    assert prk == unhex(case["prk"])
    okm = crypto.hkdf_expand(BaseHashAlgo.SHA_256, prk, unhex(case["info"]), case["length"])
    assert okm == unhex(case["okm"])


BIN_CONCAT = load("spdm_bin_concat")["vectors"]


@pytest.mark.parametrize(("version", "length", "label", "expected"), [
    (number(v["version"]), v["length"], v["label"].encode(), unhex(v["bin_concat"]))
    for v in BIN_CONCAT], ids=[f"{v['version']}-{v['label']}" for v in BIN_CONCAT])
def test_bin_concat(version: int, length: int, label: bytes, expected: bytes) -> None:
    assert bin_concat(version, length, label) == expected


def test_bin_concat_with_context() -> None:
    th = bytes(range(48))
    assert bin_concat(0x12, 48, b"req hs data", th) == (
        b"\x30\x00" + b"spdm1.2 " + b"req hs data" + th)


def test_key_schedule_structure() -> None:
    """The schedule follows DSP0274 §12 step by step (composition check of our primitives)."""
    alg, ver, aead = BaseHashAlgo.SHA_384, 0x12, AeadSuite.AES_256_GCM
    shared, th1, th2 = b"\x11" * 48, b"\x22" * 48, b"\x33" * 48
    hs = key_schedule.derive_handshake(alg, ver, aead, shared, th1)
    hsecret = crypto.hkdf_extract(alg, bytes(48), shared)
    assert hs.handshake_secret == hsecret
    req_hs = crypto.hkdf_expand(alg, hsecret, b"\x30\x00spdm1.2 req hs data" + th1, 48)
    assert hs.request.secret == req_hs
    assert hs.request.key == crypto.hkdf_expand(alg, req_hs, b"\x20\x00spdm1.2 key", 32)
    assert hs.request.iv == crypto.hkdf_expand(alg, req_hs, b"\x0c\x00spdm1.2 iv", 12)
    assert hs.request_finished_key == crypto.hkdf_expand(alg, req_hs,
                                                         b"\x30\x00spdm1.2 finished", 48)
    data = key_schedule.derive_data(alg, ver, aead, hsecret, th2)
    salt1 = crypto.hkdf_expand(alg, hsecret, b"\x30\x00spdm1.2 derived", 48)
    master = crypto.hkdf_extract(alg, salt1, bytes(48))
    assert data.master_secret == master
    assert data.response.secret == crypto.hkdf_expand(alg, master,
                                                      b"\x30\x00spdm1.2 rsp app data" + th2, 48)
    upd = data.response.updated(alg, ver, aead)
    assert upd.secret == crypto.hkdf_expand(alg, data.response.secret,
                                            b"\x30\x00spdm1.2 traffic upd", 48)
    # No key material reaches repr.
    assert repr(hs) == "HandshakeSecrets()" and repr(data) == "DataSecrets()"
    assert repr(TK) == "TrafficKeys()"


# --- signatures ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "context", "pad"), [
    (0x12, b"responder-challenge_auth signing", 4),
    (0x12, b"responder-measurements signing", 6),
    (0x13, b"responder-key_exchange_rsp signing", 2),
])
def test_signing_prefix_bytes(version: int, context: bytes, pad: int) -> None:
    prefix = f"dmtf-spdm-v1.{version & 0xF}.*".encode()
    expected = prefix * 4 + b"\x00" * pad + context
    assert len(expected) == 100
    assert crypto.signing_prefix(version, context) == expected
    transcript = b"transcript"
    assert crypto.signed_message(version, BaseHashAlgo.SHA_384, context, transcript) == (
        expected + crypto.digest(BaseHashAlgo.SHA_384, transcript))


def test_ecdsa_p256_rfc6979_verifies_raw_r_s() -> None:
    v = load("ecdsa_rfc6979")
    assert (v["curve"], v["hash"], v["message"]) == ("P-256", "SHA-256", "sample")
    pub = ec.EllipticCurvePublicNumbers(int(v["public_x"], 16), int(v["public_y"], 16),
                                        ec.SECP256R1()).public_key()
    sig = unhex(v["signature_r_s"])
    crypto.verify(pub, BaseAsymAlgo.ECDSA_P256, BaseHashAlgo.SHA_256, b"sample", sig)
    with pytest.raises(crypto.CryptoError):
        crypto.verify(pub, BaseAsymAlgo.ECDSA_P256, BaseHashAlgo.SHA_256, b"samplf", sig)
    with pytest.raises(crypto.CryptoError, match="bytes"):
        crypto.verify(pub, BaseAsymAlgo.ECDSA_P256, BaseHashAlgo.SHA_256, b"sample", sig[:-1])


@pytest.mark.parametrize(("curve", "asym", "size"), [
    (ec.SECP256R1(), BaseAsymAlgo.ECDSA_P256, 64), (ec.SECP384R1(), BaseAsymAlgo.ECDSA_P384, 96)])
def test_ecdsa_sign_verify(curve: ec.EllipticCurve, asym: int, size: int) -> None:
    key = ec.generate_private_key(curve)
    assert crypto.asym_algo_for_key(key) == asym
    sig = crypto.spdm_sign(key, 0x12, asym, BaseHashAlgo.SHA_384, b"responder-measurements signing",
                           b"L1")
    assert len(sig) == size
    crypto.spdm_verify(key.public_key(), 0x12, asym, BaseHashAlgo.SHA_384,
                       b"responder-measurements signing", b"L1", sig)
    with pytest.raises(crypto.CryptoError):   # 1.3 prefix differs from 1.2
        crypto.spdm_verify(key.public_key(), 0x13, asym, BaseHashAlgo.SHA_384,
                           b"responder-measurements signing", b"L1", sig)


def test_rsassa_3072() -> None:
    key = rsa.generate_private_key(65537, 3072)
    asym = crypto.asym_algo_for_key(key)
    assert asym == BaseAsymAlgo.RSASSA_3072
    sig = crypto.sign(key, asym, BaseHashAlgo.SHA_384, b"M")
    assert len(sig) == 384
    crypto.verify(key.public_key(), asym, BaseHashAlgo.SHA_384, b"M", sig)
    with pytest.raises(crypto.CryptoError):
        crypto.verify(key.public_key(), asym, BaseHashAlgo.SHA_256, b"M", sig)
    with pytest.raises(crypto.CryptoError, match="does not match"):
        crypto.verify(key.public_key(), BaseAsymAlgo.RSASSA_2048, BaseHashAlgo.SHA_384, b"M",
                      sig[:256])


# --- ECDHE ---------------------------------------------------------------------------------------

def test_ecdh_rfc5903_p256() -> None:
    v = load("ecdh_rfc5903")
    assert v["curve"] == "P-256"
    mine = crypto.DheKeyPair(DheGroup.SECP_256_R1, ec.derive_private_key(
        int(v["private_i"], 16), ec.SECP256R1()))
    assert mine.public_bytes() == unhex(v["public_i"])
    peer = unhex(v["public_r"])
    assert mine.shared_secret(peer) == unhex(v["shared_secret"])
    assert "private" not in repr(mine)


def test_ecdh_rejects_bad_points() -> None:
    mine = crypto.DheKeyPair.generate(DheGroup.SECP_384_R1)
    assert len(mine.public_bytes()) == 96
    with pytest.raises(crypto.CryptoError, match="bytes"):
        mine.shared_secret(bytes(64))
    with pytest.raises(crypto.CryptoError, match="point"):
        mine.shared_secret(b"\x01" * 96)
    other = crypto.DheKeyPair.generate(DheGroup.SECP_384_R1)
    assert mine.shared_secret(other.public_bytes()) == other.shared_secret(mine.public_bytes())


# --- DSP0277 opaque data -------------------------------------------------------------------------

def test_opaque_supported_versions_bytes() -> None:
    blob = opaque.supported_versions([0x10, 0x11, 0x12])
    # TotalElements 1 | Reserved(3) | ID 0 | VendorLen 0 | DataLen 9 | SMDataVersion 1 |
    # SMDataID 1 | VersionCount 3 | 0x1000 0x1100 0x1200 | pad to 4
    assert blob.hex() == "01000000" "0000" "0900" "01" "01" "03" "0010" "0011" "0012" "000000"
    assert opaque.parse_supported_versions(blob) == [0x10, 0x11, 0x12]


def test_opaque_version_selection_bytes() -> None:
    blob = opaque.version_selection(0x11)
    assert blob.hex() == "01000000" "0000" "0400" "01" "00" "0011"
    assert opaque.parse_version_selection(blob) == 0x11
