"""Requester <-> responder in process, over a DOE-like transport that DW-pads objects.

One full connection per algorithm set (P-384/SHA-384, P-256/SHA-256, RSA-3072) and
SPDM version (1.2, 1.3): VCA, digests, certificate, challenge, measurements with a
signature (and its third-party re-check), key exchange, finish, heartbeat, both key
updates, a secured vendor-defined round trip, end session.  Signatures are also
re-checked here with the raw ``cryptography`` API, independently of
``teeio.spdm.crypto``, to pin the DSP0274 1.2 signing construction.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from teeio import pki
from teeio.spdm import verify_measurement_transcript
from teeio.spdm.defs import (
    DOE_TYPE_SECURED_SPDM,
    DOE_TYPE_SPDM,
    PCI_SIG_VENDOR_ID,
    AeadSuite,
    BaseAsymAlgo,
    BaseHashAlgo,
    DheGroup,
    KeyUpdateOp,
    MeasSummaryHashType,
    RegistryId,
)
from teeio.spdm.requester import parse_vca
from tests.support.pki import shared_identity
from tests.support.spdm_pair import MEASUREMENTS, connect, make_pair

EXPECTED = {   # key algorithm -> (BaseAsymAlgo, BaseHashAlgo, DHE group)
    "P-384": (BaseAsymAlgo.ECDSA_P384, BaseHashAlgo.SHA_384, DheGroup.SECP_384_R1),
    "P-256": (BaseAsymAlgo.ECDSA_P256, BaseHashAlgo.SHA_256, DheGroup.SECP_256_R1),
    "RSA-3072": (BaseAsymAlgo.RSASSA_3072, BaseHashAlgo.SHA_384, DheGroup.SECP_384_R1),
}

def independent_verify(pub: object, version: int, hash_alg: int, context: bytes,
                       transcript: bytes, signature: bytes) -> None:
    """DSP0274 1.2 §15 from first principles: sign(Hash(prefix*4 || pad || context ||
    Hash(transcript))), ECDSA r||s raw or RSASSA-PKCS1-v1_5."""
    name = "sha256" if hash_alg == BaseHashAlgo.SHA_256 else "sha384"
    chash: hashes.HashAlgorithm = hashes.SHA256() if name == "sha256" else hashes.SHA384()
    prefix = f"dmtf-spdm-v{version >> 4}.{version & 0xF}.*".encode() * 4
    message = (prefix + bytes(100 - 64 - len(context)) + context
               + hashlib.new(name, transcript).digest())
    if isinstance(pub, ec.EllipticCurvePublicKey):
        half = len(signature) // 2
        der = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                   int.from_bytes(signature[half:], "big"))
        pub.verify(der, message, ec.ECDSA(chash))
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(signature, message, padding.PKCS1v15(), chash)


@pytest.mark.parametrize("version", [0x12, 0x13])
@pytest.mark.parametrize("alg", ["P-384", "P-256", "RSA-3072"])
def test_full_connection(alg: str, version: int) -> None:
    req, rsp, link = make_pair(alg, versions=(version,))
    neg = req.init_connection()
    asym, hsh, dhe = EXPECTED[alg]
    assert (neg.version, neg.base_asym, neg.base_hash, neg.dhe, neg.aead) == (
        version, asym, hsh, dhe, AeadSuite.AES_256_GCM)
    assert rsp.negotiated == neg
    assert parse_vca(req.vca) == (neg, rsp.config.flags)

    digests = req.get_digests()
    chain = req.get_certificate(0)
    assert chain == pki.spdm_cert_chain(list(shared_identity(alg).certs),
                                        "sha384" if hsh == BaseHashAlgo.SHA_384 else "sha256")
    assert digests[0] == hashlib.new("sha384" if hsh == BaseHashAlgo.SHA_384 else "sha256",
                                     chain).digest()
    assert len(chain) > 1024   # several GET_CERTIFICATE portions were needed

    auth = req.challenge(0, MeasSummaryHashType.ALL)
    assert len(auth.meas_summary_hash) == req.negotiated.hash_size

    # Measurements: count, one index unsigned, then all signed (L1 spans both pairs).
    assert req.get_measurements(0, signed=False).total == len(MEASUREMENTS)
    one = req.get_measurements(2, signed=False)
    assert [b.index for b in one.blocks] == [2]
    nonce = bytes(range(32))
    result = req.get_measurements(0xFF, nonce=nonce)
    assert result.nonce == nonce and result.signed
    assert [b.index for b in result.blocks] == [1, 2, 3, 0x10]
    mh = "sha384" if hsh == BaseHashAlgo.SHA_384 else "sha256"
    assert result.blocks[0].value == hashlib.new(mh, b"boot rom v1").digest()
    assert result.blocks[2].raw and result.blocks[2].value == b"\x01\x02"
    assert len(result.transcript) == 3             # count, index 2, and the signed pair
    assert result.transcript[-1][0][4:36] == nonce  # our nonce is in the signed request
    leaf = shared_identity(alg).leaf_key.public_key()
    assert verify_measurement_transcript(result.vca, result.transcript, leaf)
    last_rsp = result.transcript[-1][1]
    body = b"".join(q + r for q, r in result.transcript[:-1]) + result.transcript[-1][0]
    sig = result.response.signature
    independent_verify(leaf, version, hsh, b"responder-measurements signing",
                       result.vca + body + last_rsp[:len(last_rsp) - len(sig)], sig)

    # Secured session.
    calls: list[int | None] = []

    def echo(payload: bytes, session_id: int | None) -> bytes:
        calls.append(session_id)
        return b"\x00ack" + payload

    rsp.register_vendor_handler(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, echo)
    sid = req.start_session(0, MeasSummaryHashType.TCB)
    assert sid in rsp.sessions and sid in req.sessions
    assert link.log[-1][0] == DOE_TYPE_SECURED_SPDM   # FINISH went inside the session
    req.heartbeat(sid)
    req.key_update(sid, KeyUpdateOp.UpdateKey)
    req.heartbeat(sid)
    req.key_update(sid, KeyUpdateOp.UpdateAllKeys)
    assert req.vendor_request(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, b"\x01ping", sid) == (
        b"\x00ack\x01ping")
    assert calls == [sid]
    in_session = req.get_measurements(1, session_id=sid)
    assert verify_measurement_transcript(in_session.vca, in_session.transcript, leaf)
    req.end_session(sid)
    assert sid not in rsp.sessions and sid not in req.sessions
    # The vendor-defined path works in the clear too.
    assert req.vendor_request(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, b"x") == b"\x00ackx"
    assert calls == [sid, None]


def test_challenge_and_key_exchange_signatures_independently() -> None:
    """Rebuild M1 and the KEY_EXCHANGE_RSP transcript from the wire log and check the
    signatures without teeio.spdm.crypto (SPDM 1.2, P-384/SHA-384: H = 48, S = 96)."""
    req, _, link = make_pair("P-384", versions=(0x12,))
    connect(req)
    auth = req.challenge(0)
    leaf = shared_identity("P-384").leaf_key.public_key()
    clear = [(q, r) for t, q, r in link.log if t == DOE_TYPE_SPDM]
    vca = b"".join(q + r for q, r in clear[:3])
    assert vca == req.vca
    b = b"".join(q + r for q, r in clear[3:-1])          # GET_DIGESTS .. last CERTIFICATE
    chal_req, chal_rsp = clear[-1]
    c = chal_req + chal_rsp[:-96]
    independent_verify(leaf, 0x12, BaseHashAlgo.SHA_384, b"responder-challenge_auth signing",
                       vca + b + c, chal_rsp[-96:])
    assert auth.signature == chal_rsp[-96:]

    sid = req.key_exchange(0)
    ke_req, ke_rsp = link.log[-1][1], link.log[-1][2]
    ct_hash = hashlib.sha384(req.cert_chains[0]).digest()
    signature = ke_rsp[-48 - 96:-48]
    independent_verify(leaf, 0x12, BaseHashAlgo.SHA_384, b"responder-key_exchange_rsp signing",
                       vca + ct_hash + ke_req + ke_rsp[:-48 - 96], signature)
    req.finish(sid)
    req.end_session(sid)


def test_transcript_resets_between_measurements() -> None:
    """A non-measurement request between unsigned and signed GET_MEASUREMENTS restarts L1."""
    req, _, _ = make_pair("P-256")
    connect(req)
    req.get_measurements(1, signed=False)
    req.get_digests()
    result = req.get_measurements(2)
    assert len(result.transcript) == 1
    assert verify_measurement_transcript(result.vca, result.transcript,
                                         shared_identity("P-256").leaf_key.public_key())


def test_multiple_sessions_and_reconnect() -> None:
    req, rsp, _ = make_pair("P-256")
    connect(req)
    a = req.start_session()
    b = req.start_session()
    assert a != b and {a, b} == set(rsp.sessions)
    req.heartbeat(a)
    req.heartbeat(b)
    req.end_session(a)
    req.heartbeat(b)
    # A new GET_VERSION tears every session down (libspdm_reset_context).
    connect(req)
    assert rsp.sessions == {}
    c = req.start_session()
    req.key_update(c, KeyUpdateOp.UpdateAllKeys)
    req.key_update(c, KeyUpdateOp.UpdateKey)
    req.heartbeat(c)


def test_raw_bit_stream_and_key_material_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    caplog.set_level(logging.DEBUG, logger="teeio.spdm")
    req, rsp, _ = make_pair("P-384")
    connect(req)
    raw = req.get_measurements(2, signed=False, raw_bit_stream=True)
    assert raw.blocks[0].raw and raw.blocks[0].value == b"firmware image"
    sid = req.key_exchange()
    sess = rsp.sessions[sid]
    secrets = [sess.channel.hs.handshake_secret, sess.channel.hs.request_finished_key]
    req.finish(sid)
    assert sess.channel.handshake is None   # discarded once established
    text = caplog.text + repr(sess) + repr(req.sessions[sid]) + repr(sess.channel)
    for s in secrets:
        assert s.hex() not in text
    assert "-->" in caplog.text and "<--" in caplog.text
