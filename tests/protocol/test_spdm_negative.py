"""Negative paths: every malformed, unexpected or unsupported request gets the right SPDM
ERROR (never an exception), and the requester refuses every bad answer precisely."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teeio import pki
from teeio.spdm import (
    CertificateError,
    ErrorResponse,
    MalformedResponse,
    Requester,
    RequesterConfig,
    Responder,
    SessionError,
    SignatureError,
    VerifyDataError,
    codec,
    verify_measurement_transcript,
)
from teeio.spdm.defs import (
    DOE_TYPE_SPDM,
    PCI_SIG_VENDOR_ID,
    BaseAsymAlgo,
    CapFlags,
    ErrorCode,
    KeyUpdateOp,
    RegistryId,
)
from teeio.spdm.errors import DropRequest, NegotiationError, SpdmError
from tests.support.pki import shared_identity
from tests.support.spdm_pair import MEASUREMENTS, Link, connect, error_of, make_pair

H = bytes.fromhex


def vca_only(alg: str = "P-384") -> tuple[Requester, Responder, Link]:
    req, rsp, link = make_pair(alg)
    req.init_connection()
    return req, rsp, link


# --- version / order --------------------------------------------------------------------------

def test_get_version_wrong_version_is_version_mismatch_in_1_0() -> None:
    _, rsp, _ = vca_only()
    assert error_of(rsp.handle_spdm(H("12840000"))) == (0x10, ErrorCode.VersionMismatch, 0)


def test_request_in_other_version_is_version_mismatch() -> None:
    _, rsp, _ = vca_only()
    assert error_of(rsp.handle_spdm(H("12810000"))) == (0x13, ErrorCode.VersionMismatch, 0)


def test_capabilities_version_not_offered() -> None:
    _, rsp, _ = make_pair()
    rsp.handle_spdm(H("10840000"))
    caps = codec.GetCapabilities(0x11, ct_exponent=0, flags=0x2).encode()
    assert error_of(rsp.handle_spdm(caps))[1] == ErrorCode.VersionMismatch


@pytest.mark.parametrize(("steps", "msg"), [
    ([], H("12810000")),                                       # GET_DIGESTS before anything
    ([], codec.GetCapabilities(0x12, ct_exponent=0, flags=0x6206,
                               data_transfer_size=4096, max_spdm_msg_size=4096).encode()),
    (["10840000"], codec.NegotiateAlgorithms(0x12).encode()),  # ALGORITHMS before CAPABILITIES
    (["10840000"], H("12810000")),                             # GET_DIGESTS before negotiation
])
def test_out_of_order_is_unexpected_request(steps: list[str], msg: bytes) -> None:
    _, rsp, _ = make_pair()
    for s in steps:
        rsp.handle_spdm(H(s))
    assert error_of(rsp.handle_spdm(msg))[1] == ErrorCode.UnexpectedRequest


def test_repeated_capabilities_is_unexpected() -> None:
    _, rsp, _ = vca_only()
    caps = codec.GetCapabilities(0x13, ct_exponent=0, flags=0x6206,
                                 data_transfer_size=4096, max_spdm_msg_size=4096).encode()
    assert error_of(rsp.handle_spdm(caps)) == (0x13, ErrorCode.UnexpectedRequest, 0)


@pytest.mark.parametrize("msg", ["13e50000" + "00" * 48, "13e80000", "13e90100", "13ec0000"])
def test_session_requests_in_clear_need_a_session(msg: str) -> None:
    _, rsp, _ = vca_only()
    assert error_of(rsp.handle_spdm(H(msg)))[1] == ErrorCode.SessionRequired


@pytest.mark.parametrize("code", [0xED, 0xE6, 0xE7, 0x85, 0x86, 0xEA, 0xEF, 0xFF, 0x04, 0x7F])
def test_unsupported_request_codes(code: int) -> None:
    _, rsp, _ = vca_only()
    assert error_of(rsp.handle_spdm(bytes((0x13, code, 0, 0)))) == (
        0x13, ErrorCode.UnsupportedRequest, code)


def test_unregistered_vendor_is_unsupported() -> None:
    _, rsp, _ = vca_only()
    msg = codec.VendorDefinedRequest(0x13, RegistryId.PCISIG, b"\x01\x00", b"\x00").encode()
    assert error_of(rsp.handle_spdm(msg)) == (0x13, ErrorCode.UnsupportedRequest, 0xFE)
    bad_len = codec.VendorDefinedRequest(0x13, RegistryId.PCISIG, b"\x01", b"\x00").encode()
    assert error_of(rsp.handle_spdm(bad_len))[1] == ErrorCode.InvalidRequest


# --- sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("msg", [
    "13820000" "0000",                   # GET_CERTIFICATE truncated
    "13830000" + "00" * 20,              # CHALLENGE truncated (1.3 needs nonce + context)
    "13e00100" + "00" * 32,              # signed GET_MEASUREMENTS without SlotIDParam/context
    "13810000" "01",                     # GET_DIGESTS with a non-zero trailing byte
    "13810000" "00000000",               # GET_DIGESTS with more than a DW of padding
    "1381",                              # shorter than a header
])
def test_truncated_or_oversized_requests_are_invalid(msg: str) -> None:
    _, rsp, _ = vca_only()
    assert error_of(rsp.handle_spdm(H(msg)))[1] == ErrorCode.InvalidRequest


def test_dw_padding_is_accepted() -> None:
    _, rsp, _ = vca_only()
    assert rsp.handle_spdm(H("13810000" "000000"))[1] == 0x01   # DIGESTS


def test_request_larger_than_data_transfer_size() -> None:
    _, rsp, _ = vca_only()
    msg = codec.VendorDefinedRequest(0x13, RegistryId.PCISIG, b"\x01\x00", bytes(5000)).encode()
    assert error_of(rsp.handle_spdm(msg))[1] == ErrorCode.RequestTooLarge


# --- business rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    CapFlags.KEY_EX_CAP | CapFlags.CERT_CAP | CapFlags.CHAL_CAP,   # KEY_EX without MAC/ENCRYPT
    CapFlags.CHAL_CAP,                                             # CHAL without CERT
    CapFlags.CERT_CAP | CapFlags.PUB_KEY_ID_CAP | CapFlags.CHAL_CAP,
    CapFlags.HBEAT_CAP | CapFlags.CERT_CAP | CapFlags.CHAL_CAP,    # session cap, no KEY_EX
    CapFlags.PSK_CAP_WITH_CONTEXT,                                 # reserved for requesters
])
def test_incoherent_requester_capabilities(flags: int) -> None:
    _, rsp, _ = make_pair()
    rsp.handle_spdm(H("10840000"))
    caps = codec.GetCapabilities(0x12, ct_exponent=0, flags=flags,
                                 data_transfer_size=4096, max_spdm_msg_size=4096).encode()
    assert error_of(rsp.handle_spdm(caps))[1] == ErrorCode.InvalidRequest


@pytest.mark.parametrize(("ct", "dts", "mx"), [(0, 41, 41), (0, 4096, 8192), (32, 4096, 4096)])
def test_bad_capabilities_sizes(ct: int, dts: int, mx: int) -> None:
    _, rsp, _ = make_pair()
    rsp.handle_spdm(H("10840000"))
    caps = codec.GetCapabilities(0x12, ct_exponent=ct, flags=0x6206,
                                 data_transfer_size=dts, max_spdm_msg_size=mx).encode()
    assert error_of(rsp.handle_spdm(caps))[1] == ErrorCode.InvalidRequest


def test_no_common_signing_algorithm() -> None:
    req, _, _ = make_pair("P-384", req_config=RequesterConfig(base_asym=BaseAsymAlgo.ECDSA_P256))
    req.get_version()
    req.get_capabilities()
    with pytest.raises(ErrorResponse) as exc:
        req.negotiate_algorithms()
    assert exc.value.code == ErrorCode.InvalidRequest


def test_measurement_rules() -> None:
    req, rsp, _ = vca_only()
    bad_index = codec.GetMeasurements(0x13, 0, 7, requester_context=bytes(8)).encode()
    assert error_of(rsp.handle_spdm(bad_index))[1] == ErrorCode.InvalidRequest
    bad_slot = codec.GetMeasurements(0x13, 1, 1, bytes(32), 3, bytes(8)).encode()
    assert error_of(rsp.handle_spdm(bad_slot))[1] == ErrorCode.InvalidRequest
    req.get_certificate()
    with pytest.raises(ErrorResponse, match="InvalidRequest"):
        req.get_measurements(0x42)


def test_certificate_offset_beyond_chain_and_bad_slot() -> None:
    _, rsp, _ = vca_only()
    beyond = codec.GetCertificate(0x13, 0, 0, 0xF000, 100).encode()
    assert error_of(rsp.handle_spdm(beyond))[1] == ErrorCode.InvalidRequest
    slot1 = codec.GetCertificate(0x13, 1, 0, 0, 100).encode()
    assert error_of(rsp.handle_spdm(slot1))[1] == ErrorCode.InvalidRequest


def test_key_update_rules_and_handshake_phase() -> None:
    req, rsp, link = make_pair()
    connect(req)
    sid = req.key_exchange()
    sess = req.sessions[sid]
    # In the handshake phase only FINISH (and vendor requests) are allowed.
    for msg in ("13e80000", "13e00000" + "00" * 8, "13810000"):
        out = link.responder.handle_secured(sess.channel.seal(H(msg)))
        assert out is not None
        assert error_of(sess.channel.open(out))[1] == ErrorCode.UnexpectedRequest
    req.finish(sid)
    verify = sess.channel.seal(codec.KeyUpdate(0x13, KeyUpdateOp.VerifyNewKey, 1).encode())
    out = rsp.handle_secured(verify)
    assert out is not None and error_of(sess.channel.open(out))[1] == ErrorCode.InvalidRequest
    bad_op = sess.channel.seal(codec.KeyUpdate(0x13, 9, 1).encode())
    out = rsp.handle_secured(bad_op)
    assert out is not None and error_of(sess.channel.open(out))[1] == ErrorCode.InvalidRequest
    sized = sess.channel.seal(H("13e8000000"))   # in a session the size must be exact
    out = rsp.handle_secured(sized)
    assert out is not None and error_of(sess.channel.open(out))[1] == ErrorCode.InvalidRequest
    req.key_update(sid)
    req.end_session(sid)


def test_finish_with_bad_verify_data_is_decrypt_error() -> None:
    req, rsp, _ = make_pair()
    connect(req)
    sid = req.key_exchange()
    sess = req.sessions[sid]
    finish = codec.Finish(0x13, 0, 0, b"", bytes(48)).encode()
    out = rsp.handle_secured(sess.channel.seal(finish))
    assert out is not None
    assert error_of(sess.channel.open(out))[1] == ErrorCode.DecryptError
    assert sid not in rsp.sessions


def test_session_limit() -> None:
    req, _, _ = make_pair()
    connect(req)
    for _ in range(4):
        req.start_session()
    with pytest.raises(ErrorResponse, match="SessionLimitExceeded"):
        req.key_exchange()


# --- secured messages -------------------------------------------------------------------------

def established() -> tuple[Requester, Responder, int]:
    req, rsp, _ = make_pair("P-256")
    connect(req)
    return req, rsp, req.start_session()


def test_wrong_session_id_is_dropped() -> None:
    req, rsp, sid = established()
    assert rsp.handle_secured((sid ^ 0xFF).to_bytes(4, "little") + bytes(20)) is None
    assert rsp.handle_secured(b"\x01\x02") is None
    req.heartbeat(sid)   # the live session is untouched


def test_replayed_record_fails_to_decrypt() -> None:
    req, rsp, sid = established()
    channel = req.sessions[sid].channel
    record = channel.seal(codec.Heartbeat(0x13).encode())
    assert channel.open(rsp.handle_secured(record) or b"")[1] == 0x68   # HEARTBEAT_ACK
    replay = rsp.handle_secured(record)
    assert replay is not None
    assert error_of(channel.open(replay))[1] == ErrorCode.DecryptError
    assert sid not in rsp.sessions
    assert rsp.handle_secured(channel.seal(codec.Heartbeat(0x13).encode())) is None


def test_tampered_mac_fails_and_requester_reports_it() -> None:
    req, rsp, sid = established()
    tampering = {"on": True}
    original: Callable[[int, bytes], bytes] = req.send

    def mitm(doe_type: int, payload: bytes) -> bytes:
        if doe_type != DOE_TYPE_SPDM and tampering["on"]:
            tampering["on"] = False
            payload = payload[:-1] + bytes((payload[-1] ^ 1,))
        return original(doe_type, payload)

    req.send = mitm
    with pytest.raises(ErrorResponse) as exc:
        req.heartbeat(sid)
    assert exc.value.code == ErrorCode.DecryptError
    assert sid not in rsp.sessions and sid not in req.sessions


def test_tampered_response_is_a_session_error() -> None:
    req, _, sid = established()
    original = req.send
    req.send = lambda t, p: (lambda r: r[:-2] + bytes((r[-2] ^ 1, r[-1])))(original(t, p))
    with pytest.raises(SessionError, match="does not decrypt"):
        req.heartbeat(sid)


def test_dropped_secured_vendor_request() -> None:
    req, rsp, sid = established()

    def drop(payload: bytes, session_id: int | None) -> bytes:
        raise DropRequest

    rsp.register_vendor_handler(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, drop)
    with pytest.raises(SessionError, match="no response"):
        req.vendor_request(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, b"\x00", sid)
    # In the clear the DOE path always answers: UnsupportedRequest.
    with pytest.raises(ErrorResponse, match="UnsupportedRequest"):
        req.vendor_request(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, b"\x00")


def test_handle_spdm_or_drop_stays_silent_where_handle_spdm_answers() -> None:
    req, rsp, _ = established()

    def drop(payload: bytes, session_id: int | None) -> bytes:
        raise DropRequest

    rsp.register_vendor_handler(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, drop)
    msg = codec.VendorDefinedRequest(req.version, RegistryId.PCISIG, b"\x01\x00",
                                     b"\x00").encode()
    assert rsp.handle_spdm_or_drop(msg) is None
    assert error_of(rsp.handle_spdm(msg))[1] == ErrorCode.UnsupportedRequest
    ok = rsp.handle_spdm_or_drop(codec.GetDigests(req.version).encode())
    assert ok is not None and ok[1] == 0x01


def test_on_session_end_sees_every_way_a_session_ends() -> None:
    req, rsp, sid = established()
    ended: list[int] = []
    rsp.on_session_end.append(ended.append)
    req.heartbeat(sid)
    assert ended == []
    req.end_session(sid)                      # END_SESSION: after the ACK went out
    assert ended == [sid]
    sid2 = req.start_session()
    record = bytearray(req.sessions[sid2].channel.seal(codec.Heartbeat(req.version).encode()))
    record[-1] ^= 1
    assert rsp.handle_secured(bytes(record)) is not None     # DecryptError, then ended
    assert ended == [sid, sid2]
    req.sessions.pop(sid2)
    sid3, sid4 = req.start_session(), req.start_session()
    connect(req)                              # GET_VERSION resets the connection
    assert sorted(ended[2:]) == sorted([sid3, sid4])

    def broken(session_id: int) -> None:
        raise RuntimeError("bug")

    rsp.on_session_end.insert(0, broken)      # a failing callback does not stop the others
    sid5 = req.start_session()
    req.end_session(sid5)
    assert ended[-1] == sid5


def test_vendor_handler_error_becomes_spdm_error() -> None:
    req, rsp, _ = established()

    def fail(payload: bytes, session_id: int | None) -> bytes:
        raise SpdmError(ErrorCode.UnexpectedRequest, "not now")

    rsp.register_vendor_handler(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, fail)
    with pytest.raises(ErrorResponse, match="UnexpectedRequest"):
        req.vendor_request(RegistryId.PCISIG, PCI_SIG_VENDOR_ID, b"\x00")


# --- requester verification -------------------------------------------------------------------

def test_wrong_trust_anchor() -> None:
    other = pki.generate_chain("P-384")
    req, _, _ = make_pair("P-384", anchors=[other.root])
    req.init_connection()
    req.get_digests()
    # (pki.verify_chain words this one as a path-length failure: the foreign root has the
    # same subject name as the genuine one.)
    with pytest.raises(CertificateError, match="slot 0 certificate chain"):
        req.get_certificate()


def impostor(alg: str = "P-384") -> Responder:
    """A responder presenting the genuine chain but signing with another key."""
    genuine = shared_identity(alg)
    fake = pki.Identity(genuine.certs, pki.new_key(alg))
    return Responder(fake, MEASUREMENTS)


@pytest.mark.parametrize("step", ["challenge", "measurements", "key_exchange"])
def test_bad_signature(step: str) -> None:
    link = Link(impostor())
    req = Requester(link, [shared_identity("P-384").root])
    connect(req)
    with pytest.raises(SignatureError, match="signature"):
        if step == "challenge":
            req.challenge()
        elif step == "measurements":
            req.get_measurements()
        else:
            req.key_exchange()


def corrupting(req: Requester, code: int, mutate: Callable[[bytes], bytes],
               nth: int = 0) -> None:
    """Let *mutate* rewrite the *nth* (0-based) clear response with response *code*."""
    original = req.send
    seen = {"n": 0}

    def send(doe_type: int, payload: bytes) -> bytes:
        out = original(doe_type, payload)
        if out[1:2] == bytes((code,)):
            seen["n"] += 1
            if seen["n"] - 1 == nth:
                return mutate(out)
        return out

    req.send = send


def flip(at: int) -> Callable[[bytes], bytes]:
    return lambda b: b[:at] + bytes((b[at] ^ 0x01,)) + b[at + 1:]


def test_digest_mismatch() -> None:
    req, _, _ = vca_only()
    corrupting(req, 0x01, flip(10))
    req.get_digests()
    with pytest.raises(CertificateError, match="DIGESTS entry"):
        req.get_certificate()


def test_root_hash_mismatch() -> None:
    req, _, _ = vca_only()
    # First CERTIFICATE portion: header(8) | Length(2) Reserved(2) RootHash(48) ...
    corrupting(req, 0x02, flip(8 + 4 + 10))
    with pytest.raises(CertificateError, match="RootHash"):
        req.get_certificate()


# KEY_EXCHANGE_RSP for P-384, SPDM 1.3: header+IDs 8, Random 32, ExchangeData 96,
# OpaqueLength 2 + VersionSelection 12, Signature 96 (146..242 -> 150..246), VerifyData 48.
@pytest.mark.parametrize(("at", "error"), [(293, VerifyDataError), (200, SignatureError),
                                           (60, SignatureError)])
def test_key_exchange_rsp_tampering(at: int, error: type[Exception]) -> None:
    req, _, _ = vca_only()
    req.get_certificate()
    corrupting(req, 0x64, flip(at))
    with pytest.raises(error):
        req.key_exchange()


def test_wrong_response_code_and_version() -> None:
    req, _, _ = vca_only()
    corrupting(req, 0x01, lambda b: b[:1] + b"\x02" + b[2:])
    with pytest.raises(MalformedResponse, match="response code"):
        req.get_digests()
    req2, _, _ = vca_only()
    corrupting(req2, 0x01, lambda b: b"\x12" + b[1:])
    with pytest.raises(MalformedResponse, match="version"):
        req2.get_digests()


def test_requester_context_echo_checked() -> None:
    req, _, _ = vca_only()
    # MEASUREMENTS for index 1, unsigned, 1.3: 8 + 55 record + 32 nonce + 2 = 97, then the
    # 8-byte RequesterContext at 97..104.
    corrupting(req, 0x60, flip(100))
    with pytest.raises(MalformedResponse, match="RequesterContext"):
        req.get_measurements(1, signed=False)


def test_no_common_version() -> None:
    req, _, _ = make_pair(req_config=RequesterConfig(versions=(0x11,)))
    with pytest.raises(NegotiationError, match="no common SPDM version"):
        req.get_version()


def test_error_response_surfaces_code() -> None:
    req, _, _ = make_pair()
    req.get_version()
    req.get_capabilities()
    with pytest.raises(ErrorResponse, match="GET_CAPABILITIES: responder returned ERROR "
                       "UnexpectedRequest") as exc:
        req.get_capabilities()
    assert (exc.value.code, exc.value.data) == (ErrorCode.UnexpectedRequest, 0)


def test_third_party_transcript_check_rejects_tampering() -> None:
    req, _, _ = vca_only()
    req.get_certificate()
    result = req.get_measurements(nonce=bytes(32))
    leaf = req.leaf_keys[0]
    assert verify_measurement_transcript(result.vca, result.transcript, leaf)
    (q, r), = result.transcript
    bad_nonce = q[:4] + b"\x01" + q[5:]
    with pytest.raises(SignatureError):
        verify_measurement_transcript(result.vca, [(bad_nonce, r)], leaf)
    with pytest.raises(SignatureError):
        verify_measurement_transcript(result.vca[:-1] + b"\x01", [(q, r)], leaf)
    with pytest.raises(MalformedResponse, match="VCA"):
        verify_measurement_transcript(result.vca[:-1], [(q, r)], leaf)
    with pytest.raises(SignatureError):
        verify_measurement_transcript(result.vca, [(q, r)], shared_identity("P-256").leaf_key
                                      .public_key())
    with pytest.raises(MalformedResponse, match="pair"):
        verify_measurement_transcript(result.vca, [(q, r), (q, r)], leaf)


# --- robustness: nothing crashes the responder -------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), max_size=6), st.integers(0, 3))
def test_responder_never_crashes(messages: list[bytes], stage: int) -> None:
    """Arbitrary bytes in the clear, as records, and sealed inside a live session: always an
    answer (or a documented drop), never an exception."""
    req, rsp, _ = make_pair("P-256")
    if stage >= 1:
        req.init_connection()
    if stage >= 2:
        req.get_certificate()
    sid = req.start_session() if stage >= 3 else None
    for m in messages:
        if sid is not None and sid in rsp.sessions:
            out = rsp.handle_secured(req.sessions[sid].channel.seal(m))
            assert out is None or len(out) >= 4 + 2 + 16
        assert rsp.handle_secured(m) is None or len(m) >= 4
        if m[1:2] != b"\x84":   # a valid GET_VERSION would just reset the connection
            out = rsp.handle_spdm(m)
            assert len(out) >= 4


def test_key_update_rolls_back_when_requester_keeps_old_key() -> None:
    """The requester got KEY_UPDATE_ACK but never switched keys: the responder's backup
    key (libspdm TRY_DISCARD_KEY_UPDATE) still decrypts, and the update is forgotten."""
    req, rsp, sid = established()
    channel = req.sessions[sid].channel
    ack = rsp.handle_secured(channel.seal(codec.KeyUpdate(0x13, KeyUpdateOp.UpdateKey, 7)
                                          .encode()))
    assert ack is not None and channel.open(ack)[1] == 0x69
    assert rsp.sessions[sid].pending_update == KeyUpdateOp.UpdateKey
    req.heartbeat(sid)                          # still on the old request key
    assert rsp.sessions[sid].pending_update == 0
    req.key_update(sid, KeyUpdateOp.UpdateAllKeys)
    req.heartbeat(sid)


def _recorded_requests() -> list[bytes]:
    req, _, link = make_pair("P-256")
    connect(req)
    req.challenge(0, 0xFF)
    req.get_measurements(0, signed=False)
    req.get_measurements(0xFF)
    req.key_exchange()
    return [q for t, q, _ in link.log if t == DOE_TYPE_SPDM]


RECORDED = _recorded_requests()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(RECORDED), st.integers(0, 200), st.integers(0, 255),
       st.sampled_from(["flip", "truncate", "extend"]))
def test_mutated_requests_get_errors_not_exceptions(msg: bytes, at: int, value: int,
                                                   how: str) -> None:
    req, rsp, _ = make_pair("P-256")
    connect(req)
    at %= len(msg)
    if how == "flip":
        msg = msg[:at] + bytes((msg[at] ^ (value or 1),)) + msg[at + 1:]
    elif how == "truncate":
        msg = msg[:at]
    else:
        msg = msg + bytes((value,)) * (at % 9 + 1)
    out = rsp.handle_spdm(msg)
    assert len(out) >= 4 and out[1] in (0x7F, msg[1] & 0x7F if len(msg) > 1 else 0x7F)
