"""Responder: KEY_EXCHANGE (DSP0274 §10.15) and FINISH (§10.16), the session
handshake: TH1/TH2 transcripts (§15), DSP0277 key schedule, and the secured-message
version chosen from the opaque data (libspdm ``libspdm_rsp_key_exchange.c``,
``libspdm_rsp_finish.c``).  Mutual authentication and PSK are not supported."""

from __future__ import annotations

import hmac as _hmac

from .. import codec, crypto, opaque
from .. import key_schedule as ks
from ..defs import (
    FINISH_SIGNATURE_INCLUDED,
    KEY_EXCHANGE_RSP_SIGN_CONTEXT,
    MAX_OPAQUE_DATA_SIZE,
    RANDOM_DATA_SIZE,
    SECURED_VERSION_10,
    CapFlags,
    ErrorCode,
    KeyExchangeSessionPolicy,
    OtherParams,
    RequestCode,
)
from ..errors import SpdmError
from ..secured import SecureChannel, session_id_of
from ..transcript import th
from .evidence import Evidence
from .state import Session


class KeyExchangeHandlers(Evidence):
    """KEY_EXCHANGE and FINISH."""

    # --- §10.15 KEY_EXCHANGE ------------------------------------------------------------------

    def _key_exchange(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        neg = self.neg
        if not self._both(CapFlags.MAC_CAP, CapFlags.MAC_CAP):
            raise SpdmError(ErrorCode.InvalidRequest, "MAC_CAP not negotiated")
        if not self._both(CapFlags.ENCRYPT_CAP, CapFlags.ENCRYPT_CAP):
            raise SpdmError(ErrorCode.InvalidRequest, "MAC-only sessions are not supported")
        if self.other_params & 0x0F != OtherParams.OPAQUE_DATA_FMT1:
            raise SpdmError(ErrorCode.InvalidRequest, "OpaqueDataFmt1 not negotiated")
        req = codec.KeyExchange.decode(msg, neg, pad=pad)
        self._check_summary_type(req.summary_type)
        if req.slot_id != 0:
            raise SpdmError(ErrorCode.InvalidRequest, f"certificate slot {req.slot_id} is empty")
        if req.session_policy & KeyExchangeSessionPolicy.EVENT_ALL_POLICY:
            raise SpdmError(ErrorCode.InvalidRequest, "EventAllPolicy without EVENT_CAP")
        if len(req.opaque) > MAX_OPAQUE_DATA_SIZE:
            raise SpdmError(ErrorCode.InvalidRequest, "opaque data too long")
        sec_version = SECURED_VERSION_10
        rsp_opaque = b""
        if req.opaque:
            offered = opaque.parse_supported_versions(req.opaque)
            common = [v for v in self.config.secured_versions if v in offered]
            if not common:
                raise SpdmError(ErrorCode.InvalidRequest,
                                f"no common secured-message version in {offered}")
            sec_version = max(common)
            rsp_opaque = opaque.version_selection(sec_version)
        if len(self.sessions) >= self.config.max_sessions:
            raise SpdmError(ErrorCode.SessionLimitExceeded)
        dhe = crypto.DheKeyPair.generate(neg.dhe)
        try:
            shared = dhe.shared_secret(req.exchange_data)
        except crypto.CryptoError as exc:
            raise SpdmError(ErrorCode.InvalidRequest, f"ExchangeData: {exc}") from None
        self._on_request(RequestCode.KEY_EXCHANGE, sess)
        rsp_sid = self._alloc_rsp_session_id()
        sid = session_id_of(req.req_session_id, rsp_sid)
        hb = (self.config.heartbeat_period
              if self._both(CapFlags.HBEAT_CAP, CapFlags.HBEAT_CAP) else 0)
        ct_hash = crypto.digest(neg.base_hash, self._cert_chain())
        unsigned = codec.KeyExchangeRsp(
            self.version, hb, rsp_sid, 0, 0, self.random(RANDOM_DATA_SIZE), dhe.public_bytes(),
            self._summary_hash(req.summary_type), rsp_opaque, b"", b"").encode()
        k = bytearray(req.raw + unsigned)
        sig = self._sign(KEY_EXCHANGE_RSP_SIGN_CONTEXT, th(self.logs.a, ct_hash, k))
        k += sig
        th1 = crypto.digest(neg.base_hash, th(self.logs.a, ct_hash, k))
        hs = ks.derive_handshake(neg.base_hash, self.version, neg.aead, shared, th1)
        verify = crypto.hmac(neg.base_hash, hs.response_finished_key, th1)
        k += verify
        channel = SecureChannel(sid, False, neg.base_hash, self.version, neg.aead, hs)
        self.sessions[sid] = Session(sid, channel, req.slot_id, ct_hash, sec_version, hb, k)
        self.log.info("session 0x%08x handshaking (DSP0277 %x.%x)", sid, sec_version >> 4,
                      sec_version & 0xF)
        return unsigned + sig + verify

    def _alloc_rsp_session_id(self) -> int:
        used = {sid >> 16 for sid in self.sessions}
        while self._next_rsp_sid in used or self._next_rsp_sid in (0, 0xFFFF):
            self._next_rsp_sid = (self._next_rsp_sid + 1) & 0xFFFF
        rsp_sid = self._next_rsp_sid
        self._next_rsp_sid = (rsp_sid + 1) & 0xFFFF
        return rsp_sid

    # --- §10.16 FINISH ------------------------------------------------------------------------

    def _finish(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        assert sess is not None   # RULES: handshake phase only
        neg = self.neg
        if msg[2] & FINISH_SIGNATURE_INCLUDED:
            raise SpdmError(ErrorCode.InvalidRequest,
                            "FINISH carries a signature but mutual auth was not requested")
        req = codec.Finish.decode(msg, neg, pad=pad)
        self._on_request(RequestCode.FINISH, sess)
        header = req.raw[:len(req.raw) - len(req.verify_data)]
        expected = crypto.hmac(neg.base_hash, sess.channel.hs.request_finished_key,
                               crypto.digest(neg.base_hash,
                                             th(self.logs.a, sess.cert_chain_hash, sess.k,
                                                header)))
        if not _hmac.compare_digest(expected, req.verify_data):
            sid = sess.session_id
            self._after_seal.append(lambda: self._terminate(sid))
            raise SpdmError(ErrorCode.DecryptError, "RequesterVerifyData does not match")
        out = codec.FinishRsp(self.version).encode()
        sess.f += req.raw + out
        th2 = crypto.digest(neg.base_hash, th(self.logs.a, sess.cert_chain_hash, sess.k, sess.f))
        data = ks.derive_data(neg.base_hash, self.version, neg.aead,
                              sess.channel.hs.handshake_secret, th2)
        # FINISH_RSP still travels under the handshake keys; switch afterwards.
        self._after_seal.append(lambda: self._established(sess, data))
        return out

    def _established(self, sess: Session, data: ks.DataSecrets) -> None:
        sess.channel.establish(data)
        self.log.info("session 0x%08x established", sess.session_id)
