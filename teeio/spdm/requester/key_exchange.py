"""Requester: KEY_EXCHANGE (DSP0274 §10.15) and FINISH (§10.16): the session
handshake with the KEY_EXCHANGE_RSP signature and ResponderVerifyData checked over
TH (§15) and the DSP0277 key schedule.  Mutual authentication is not supported."""

from __future__ import annotations

import hmac as _hmac

from .. import codec, crypto, opaque
from .. import key_schedule as ks
from ..defs import (
    KEY_EXCHANGE_RSP_SIGN_CONTEXT,
    RANDOM_DATA_SIZE,
    CapFlags,
    MeasSummaryHashType,
    OtherParams,
    RequestCode,
    ResponseCode,
)
from ..errors import (
    DecodeError,
    ErrorResponse,
    MalformedResponse,
    NegotiationError,
    SessionError,
    VerifyDataError,
)
from ..secured import SecureChannel, session_id_of
from ..transcript import th
from .config import Session
from .context import RequesterContext


class KeyExchangeRequests(RequesterContext):
    """KEY_EXCHANGE and FINISH."""

    def start_session(self, slot: int = 0,
                      summary_type: int = MeasSummaryHashType.NONE) -> int:
        """KEY_EXCHANGE then FINISH; returns the established session ID."""
        sid = self.key_exchange(slot, summary_type)
        self.finish(sid)
        return sid

    def key_exchange(self, slot: int = 0,
                     summary_type: int = MeasSummaryHashType.NONE) -> int:
        neg = self.negotiated
        for cap in (CapFlags.KEY_EX_CAP, CapFlags.ENCRYPT_CAP, CapFlags.MAC_CAP):
            if not self._both(cap):
                raise NegotiationError(f"KEY_EXCHANGE needs {cap.name} on both sides")
        if self.other_params & 0x0F != OtherParams.OPAQUE_DATA_FMT1:
            raise NegotiationError("OpaqueDataFmt1 was not selected")
        chain = self.cert_chains.get(slot)
        self._leaf(slot)
        assert chain is not None
        ct_hash = crypto.digest(neg.base_hash, chain)
        dhe = crypto.DheKeyPair.generate(neg.dhe)
        req_sid = self._alloc_req_session_id()
        req = codec.KeyExchange(self.version, summary_type, slot, req_sid, 0,
                                self.random(RANDOM_DATA_SIZE), dhe.public_bytes(),
                                opaque.supported_versions(self.config.secured_versions)).encode()
        raw = self._exchange("KEY_EXCHANGE", req, ResponseCode.KEY_EXCHANGE_RSP)
        rsp = self._decode("KEY_EXCHANGE_RSP", lambda: codec.KeyExchangeRsp.decode(
            raw, neg, summary_type != MeasSummaryHashType.NONE, pad=True))
        if rsp.mut_auth_requested:
            raise NegotiationError("KEY_EXCHANGE_RSP requests mutual authentication, which "
                                   "this requester does not support")
        try:
            sec_version = opaque.parse_version_selection(rsp.opaque)
        except DecodeError as exc:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP opaque data: {exc}") from None
        if sec_version not in self.config.secured_versions:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP selects secured-message version "
                                    f"0x{sec_version:02x}, not offered")
        full = rsp.raw
        vd_at = len(full) - len(rsp.verify_data)
        sig_at = vd_at - len(rsp.signature)
        self._on_success(RequestCode.KEY_EXCHANGE, None)
        self._verify("KEY_EXCHANGE_RSP", slot, KEY_EXCHANGE_RSP_SIGN_CONTEXT,
                     th(self.logs.a, ct_hash, req, full[:sig_at]), rsp.signature)
        try:
            shared = dhe.shared_secret(rsp.exchange_data)
        except crypto.CryptoError as exc:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP ExchangeData: {exc}") from None
        th1 = crypto.digest(neg.base_hash, th(self.logs.a, ct_hash, req, full[:vd_at]))
        hs = ks.derive_handshake(neg.base_hash, self.version, neg.aead, shared, th1)
        expected = crypto.hmac(neg.base_hash, hs.response_finished_key, th1)
        if not _hmac.compare_digest(expected, rsp.verify_data):
            raise VerifyDataError("KEY_EXCHANGE_RSP: ResponderVerifyData does not match")
        sid = session_id_of(req_sid, rsp.rsp_session_id)
        if sid in self.sessions:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP: session 0x{sid:08x} already exists")
        channel = SecureChannel(sid, True, neg.base_hash, self.version, neg.aead, hs)
        self.sessions[sid] = Session(sid, channel, slot, ct_hash, sec_version,
                                     rsp.heartbeat_period, req + full)
        self.log.info("session 0x%08x handshaking", sid)
        if self.on_session_secret is not None:
            self.on_session_secret(sid, shared)
        return sid

    def _alloc_req_session_id(self) -> int:
        used = {sid & 0xFFFF for sid in self.sessions}
        while self._next_req_sid in used or self._next_req_sid in (0, 0xFFFF):
            self._next_req_sid = (self._next_req_sid - 1) & 0xFFFF
        sid = self._next_req_sid
        self._next_req_sid = (sid - 1) & 0xFFFF
        return sid

    def finish(self, session_id: int) -> None:
        neg = self.negotiated
        sess = self._session(session_id)
        if sess.established:
            raise SessionError(f"session 0x{session_id:08x} is already established")
        header = codec.Finish(self.version, 0, 0, b"", b"").encode()
        verify = crypto.hmac(neg.base_hash, sess.channel.hs.request_finished_key,
                             crypto.digest(neg.base_hash, th(self.logs.a, sess.cert_chain_hash,
                                                             sess.k, header)))
        req = header + verify
        try:
            raw = self._exchange("FINISH", req, ResponseCode.FINISH_RSP, sess)
        except ErrorResponse:
            self.sessions.pop(session_id, None)
            raise
        rsp = self._decode("FINISH_RSP", lambda: codec.FinishRsp.decode(raw, neg))
        self._on_success(RequestCode.FINISH, sess)
        sess.f = req + rsp.raw
        th2 = crypto.digest(neg.base_hash, th(self.logs.a, sess.cert_chain_hash, sess.k, sess.f))
        sess.channel.establish(ks.derive_data(neg.base_hash, self.version, neg.aead,
                                              sess.channel.hs.handshake_secret, th2))
        self.log.info("session 0x%08x established", session_id)
