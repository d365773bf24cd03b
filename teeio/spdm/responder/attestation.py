"""Responder: CHALLENGE (DSP0274 §10.8, signed over M1 = A || B || C) and
GET_MEASUREMENTS (§10.11, signed over L1 = A || M) (libspdm
``libspdm_rsp_challenge_auth.c``, ``libspdm_rsp_measurements.c``)."""

from __future__ import annotations

from .. import codec, crypto
from ..defs import (
    CHALLENGE_AUTH_SIGN_CONTEXT,
    MEAS_OP_ALL,
    MEAS_OP_COUNT,
    MEAS_SLOT_ID_MASK,
    MEASUREMENTS_SIGN_CONTEXT,
    NONCE_SIZE,
    CapFlags,
    ErrorCode,
    MeasRequestAttr,
    RequestCode,
)
from ..errors import SpdmError
from ..transcript import l1, m1
from .evidence import Evidence
from .state import ConnectionState, Session


class AttestationHandlers(Evidence):
    """CHALLENGE and GET_MEASUREMENTS."""

    # --- §10.8 CHALLENGE ----------------------------------------------------------------------

    def _challenge(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        req = codec.Challenge.decode(msg, pad=pad)
        self._check_summary_type(req.summary_type)
        if req.slot_id != 0:
            raise SpdmError(ErrorCode.InvalidRequest, f"certificate slot {req.slot_id} is empty")
        self._on_request(RequestCode.CHALLENGE, sess)
        rsp = codec.ChallengeAuth(
            self.version, req.slot_id & 0x0F, 0x01,
            crypto.digest(self.neg.base_hash, self._cert_chain()), self.random(NONCE_SIZE),
            self._summary_hash(req.summary_type), b"", req.requester_context, b"")
        unsigned = rsp.encode()
        self.logs.c += req.raw + unsigned
        sig = self._sign(CHALLENGE_AUTH_SIGN_CONTEXT, m1(self.logs.a, self.logs.b, self.logs.c))
        self.state = ConnectionState.AUTHENTICATED
        self.logs.b.clear()
        self.logs.c.clear()
        return unsigned + sig

    # --- §10.11 GET_MEASUREMENTS --------------------------------------------------------------

    def _get_measurements(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        mlog = sess.m if sess is not None else self.logs.m
        try:
            if not self.neg.meas_hash:
                raise SpdmError(ErrorCode.UnexpectedRequest, "measurements not negotiated")
            req = codec.GetMeasurements.decode(msg, pad=pad)
            if req.signed and not self.config.flags & CapFlags.MEAS_CAP_SIG:
                raise SpdmError(ErrorCode.InvalidRequest, "signature requested, MEAS_CAP=1")
            blocks = self._blocks(bool(req.attributes & MeasRequestAttr.RAW_BIT_STREAM_REQUESTED))
            if req.operation == MEAS_OP_COUNT:
                p1, count, record = len(blocks), 0, b""
            elif req.operation == MEAS_OP_ALL:
                p1, count, record = 0, len(blocks), b"".join(blocks.values())
            elif req.operation in blocks:
                p1, count, record = 0, 1, blocks[req.operation]
            else:
                raise SpdmError(ErrorCode.InvalidRequest,
                                f"no measurement block with index {req.operation}")
            p2 = 0
            if req.signed:
                slot = req.slot_id_param & MEAS_SLOT_ID_MASK
                if slot != 0:
                    raise SpdmError(ErrorCode.InvalidRequest, f"certificate slot {slot} is empty")
                p2 = slot   # content-change detection not supported (bits 5:4 = 0)
        except SpdmError:
            mlog.clear()
            raise
        self._on_request(RequestCode.GET_MEASUREMENTS, sess)
        unsigned = codec.Measurements(self.version, p1, p2, count, record,
                                      self.random(NONCE_SIZE), b"", req.requester_context,
                                      b"").encode()
        mlog += req.raw + unsigned
        if not req.signed:
            return unsigned
        sig = self._sign(MEASUREMENTS_SIGN_CONTEXT, l1(self.logs.a, mlog))
        mlog.clear()
        return unsigned + sig
