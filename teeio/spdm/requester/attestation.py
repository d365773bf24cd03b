"""Requester: CHALLENGE (DSP0274 §10.8, signature over M1 = A || B || C) and
GET_MEASUREMENTS (§10.11, signature over L1 = A || M).  In 1.2/1.3 neither response
echoes the requester's nonce (it is bound by being in the signed transcript); what is
echoed (1.3) is the 8-byte RequesterContext, which is checked."""

from __future__ import annotations

from teeio.measurements import MeasurementBlock, MeasurementDecodeError, parse_measurement_blocks

from .. import codec, crypto
from ..defs import (
    CHALLENGE_AUTH_SIGN_CONTEXT,
    MEAS_OP_ALL,
    MEAS_OP_COUNT,
    NONCE_SIZE,
    REQ_CONTEXT_SIZE,
    SPDM_VERSION_13,
    MeasRequestAttr,
    MeasSummaryHashType,
    RequestCode,
    ResponseCode,
)
from ..errors import CertificateError, ErrorResponse, MalformedResponse, NegotiationError
from ..transcript import m1
from .config import MeasurementResult
from .context import RequesterContext
from .evidence import verify_measurement_transcript


class AttestationRequests(RequesterContext):
    """CHALLENGE and GET_MEASUREMENTS."""

    # --- §10.8 CHALLENGE ------------------------------------------------------------------------

    def challenge(self, slot: int = 0, summary_type: int = MeasSummaryHashType.NONE,
                  nonce: bytes | None = None) -> codec.ChallengeAuth:
        neg = self.negotiated
        leaf_chain = self.cert_chains.get(slot)
        self._leaf(slot)
        nonce = nonce if nonce is not None else self.random(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        ctx = self.random(REQ_CONTEXT_SIZE) if self.version >= SPDM_VERSION_13 else b""
        req = codec.Challenge(self.version, slot, summary_type, nonce, ctx).encode()
        raw = self._exchange("CHALLENGE", req, ResponseCode.CHALLENGE_AUTH)
        rsp = self._decode("CHALLENGE_AUTH", lambda: codec.ChallengeAuth.decode(
            raw, neg, summary_type != MeasSummaryHashType.NONE, pad=True))
        if rsp.attributes & 0x0F != slot or not rsp.slot_mask >> slot & 1:
            raise MalformedResponse(f"CHALLENGE_AUTH: slot {rsp.attributes & 0xF}, slot mask "
                                    f"0x{rsp.slot_mask:02x}, asked slot {slot}")
        assert leaf_chain is not None
        if rsp.cert_chain_hash != crypto.digest(neg.base_hash, leaf_chain):
            raise CertificateError("CHALLENGE_AUTH: CertChainHash is not the hash of the "
                                   f"slot {slot} certificate chain")
        if rsp.requester_context != ctx:
            raise MalformedResponse("CHALLENGE_AUTH: RequesterContext not echoed")
        self._on_success(RequestCode.CHALLENGE, None)
        c = req + rsp.raw[:len(rsp.raw) - len(rsp.signature)]
        self._verify("CHALLENGE_AUTH", slot, CHALLENGE_AUTH_SIGN_CONTEXT,
                     m1(self.logs.a, self.logs.b, c), rsp.signature)
        self.authenticated = True
        self.logs.b.clear()
        self.logs.c.clear()
        return rsp

    # --- §10.11 GET_MEASUREMENTS ----------------------------------------------------------------

    def get_measurements(self, operation: int = MEAS_OP_ALL, nonce: bytes | None = None,
                         signed: bool = True, raw_bit_stream: bool = False, slot: int = 0,
                         session_id: int | None = None) -> MeasurementResult:
        """GET_MEASUREMENTS for *operation* (0 count, index, 0xFF all) with the caller's
        *nonce* (random if None); verifies the signature when *signed*."""
        neg = self.negotiated
        if not neg.meas_hash:
            raise NegotiationError("measurements were not negotiated")
        sess = self._session(session_id) if session_id is not None else None
        if signed:
            self._leaf(slot)
            nonce = nonce if nonce is not None else self.random(NONCE_SIZE)
            if len(nonce) != NONCE_SIZE:
                raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        elif nonce:
            raise ValueError("a nonce is only sent with a signature request")
        attrs = ((MeasRequestAttr.SIGNATURE_REQUESTED if signed else 0)
                 | (MeasRequestAttr.RAW_BIT_STREAM_REQUESTED if raw_bit_stream else 0))
        ctx = self.random(REQ_CONTEXT_SIZE) if self.version >= SPDM_VERSION_13 else b""
        req = codec.GetMeasurements(self.version, attrs, operation, nonce or b"", slot,
                                    ctx).encode()
        pairs = sess.m_pairs if sess is not None else self.m_pairs
        try:
            raw = self._exchange("GET_MEASUREMENTS", req, ResponseCode.MEASUREMENTS, sess)
        except ErrorResponse:
            pairs.clear()   # the responder resets L1/L2 on a failed GET_MEASUREMENTS
            raise
        rsp = self._decode("MEASUREMENTS", lambda: codec.Measurements.decode(
            raw, neg, signed, pad=sess is None))
        blocks = self._check_measurements(rsp, operation, signed, slot, ctx)
        self._on_success(RequestCode.GET_MEASUREMENTS, sess)
        pairs.append((req, rsp.raw))
        transcript = tuple(pairs)
        if signed:
            pairs.clear()
            verify_measurement_transcript(self.vca, transcript, self._leaf(slot), neg)
        return MeasurementResult(tuple(blocks), rsp.param1 if operation == MEAS_OP_COUNT else 0,
                                 rsp, nonce or b"", signed, self.vca, transcript)

    def _check_measurements(self, rsp: codec.Measurements, operation: int, signed: bool,
                            slot: int, ctx: bytes) -> list[MeasurementBlock]:
        neg = self.negotiated
        if rsp.requester_context != ctx:
            raise MalformedResponse("MEASUREMENTS: RequesterContext not echoed")
        if signed and rsp.param2 & 0x0F != slot:
            raise MalformedResponse(f"MEASUREMENTS: slot {rsp.param2 & 0xF}, asked {slot}")
        if operation == MEAS_OP_COUNT:
            if rsp.number_of_blocks or rsp.record:
                raise MalformedResponse("MEASUREMENTS: blocks returned for a count request")
            return []
        try:
            blocks = parse_measurement_blocks(rsp.record, rsp.number_of_blocks,
                                              crypto.meas_hash_name(neg.meas_hash))
        except MeasurementDecodeError as exc:
            raise MalformedResponse(f"MEASUREMENTS record: {exc}") from None
        if operation != MEAS_OP_ALL and (len(blocks) != 1 or blocks[0].index != operation):
            raise MalformedResponse(f"MEASUREMENTS: asked block {operation}, got indices "
                                    f"{[b.index for b in blocks]}")
        return blocks
