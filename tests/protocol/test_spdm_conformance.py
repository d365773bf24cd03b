"""Conformance details a requester relies on: the SPDMVersion of an ERROR before a version
is negotiated, and SPDM 1.3's SlotSizeRequested in GET_CERTIFICATE (DSP0274 1.3 §10.7)."""

from __future__ import annotations

import pytest

from teeio.spdm import RequesterConfig, codec
from teeio.spdm.defs import ErrorCode
from tests.support.spdm_pair import error_of, make_pair

H = bytes.fromhex
GET_VERSION = H("10840000")


# --- ERROR's SPDMVersion between VERSION and CAPABILITIES --------------------------------------

@pytest.mark.parametrize("version", [0x12, 0x13])
def test_rejected_capabilities_is_answered_in_the_requests_version(version: int) -> None:
    """After VERSION, an invalid GET_CAPABILITIES in an offered version gets its ERROR in
    that version (libspdm: ``127f0100`` / ``137f0100``), not 1.0."""
    _, rsp, _ = make_pair()
    assert rsp.handle_spdm(GET_VERSION)[1] == 0x04
    bad_dts = codec.GetCapabilities(version, ct_exponent=0, flags=0x6,   # DTS below 42
                                    data_transfer_size=16, max_spdm_msg_size=16).encode()
    assert rsp.handle_spdm(bad_dts)[:4] == bytes((version, 0x7F, ErrorCode.InvalidRequest, 0))
    bad_ct = codec.GetCapabilities(version, ct_exponent=32, flags=0x6,
                                   data_transfer_size=4096, max_spdm_msg_size=4096).encode()
    assert error_of(rsp.handle_spdm(bad_ct)) == (version, ErrorCode.InvalidRequest, 0)
    # nothing was negotiated by the errors: a valid GET_CAPABILITIES still succeeds
    good = codec.GetCapabilities(version, ct_exponent=0, flags=0x6,
                                 data_transfer_size=4096, max_spdm_msg_size=4096).encode()
    assert rsp.handle_spdm(good)[:2] == bytes((version, 0x61))


def test_error_version_is_1_0_without_version_or_for_a_version_not_offered() -> None:
    _, rsp, _ = make_pair()
    bad_dts = codec.GetCapabilities(0x13, ct_exponent=0, flags=0x6,
                                    data_transfer_size=16, max_spdm_msg_size=16).encode()
    # before GET_VERSION: UnexpectedRequest, in 1.0
    assert error_of(rsp.handle_spdm(bad_dts)) == (0x10, ErrorCode.UnexpectedRequest, 0)
    rsp.handle_spdm(GET_VERSION)
    # a version VERSION did not offer: VersionMismatch, in 1.0
    caps_11 = codec.GetCapabilities(0x11, ct_exponent=0, flags=0x2).encode()
    assert error_of(rsp.handle_spdm(caps_11)) == (0x10, ErrorCode.VersionMismatch, 0)
    # a malformed GET_VERSION is always answered in 1.0
    assert error_of(rsp.handle_spdm(H("12840000"))) == (0x10, ErrorCode.VersionMismatch, 0)


def test_error_after_negotiation_keeps_the_negotiated_version() -> None:
    req, rsp, _ = make_pair()
    req.init_connection()
    assert rsp.version == 0x13
    assert error_of(rsp.handle_spdm(H("12810000"))) == (0x13, ErrorCode.VersionMismatch, 0)


# --- GET_CERTIFICATE SlotSizeRequested (1.3) ---------------------------------------------------

def test_slot_size_requested_answers_the_chain_size_in_1_3() -> None:
    req, rsp, _ = make_pair()
    req.init_connection()
    chain = req.get_certificate(0)
    # Offset and Length are ignored: even an Offset past the chain is fine
    for offset, length in ((0, 0x400), (0xFFFF, 0xFFFF), (0, 0)):
        out = rsp.handle_spdm(codec.GetCertificate(0x13, 0, 0x01, offset, length).encode())
        cert = codec.Certificate.decode(out)
        assert (cert.version, cert.slot_id, cert.portion, cert.remainder_length) == (
            0x13, 0, b"", len(chain))
    # an empty slot is still refused
    out = rsp.handle_spdm(codec.GetCertificate(0x13, 1, 0x01, 0, 0x400).encode())
    assert error_of(out)[1] == ErrorCode.InvalidRequest
    # and the chain can still be read after the size query
    assert req.get_certificate(0) == chain


def test_slot_size_bit_is_reserved_in_1_2() -> None:
    req, rsp, _ = make_pair(req_config=RequesterConfig(versions=(0x12,)))
    req.init_connection()
    assert rsp.version == 0x12
    chain = req.get_certificate(0)
    out = rsp.handle_spdm(codec.GetCertificate(0x12, 0, 0x01, 0, 0x100).encode())
    cert = codec.Certificate.decode(out)
    assert (cert.portion, cert.remainder_length) == (chain[:0x100], len(chain) - 0x100)
