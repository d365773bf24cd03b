"""Responder: HEARTBEAT (DSP0274 §10.17), KEY_UPDATE (§10.18) and END_SESSION
(§10.19), the requests of an established session (libspdm ``libspdm_rsp_heartbeat.c``,
``_key_update.c``, ``_end_session.c``)."""

from __future__ import annotations

from .. import codec
from ..defs import ErrorCode, KeyUpdateOp, RequestCode
from ..errors import SpdmError
from .context import ResponderContext
from .state import Session


class SessionHandlers(ResponderContext):
    """HEARTBEAT, KEY_UPDATE and END_SESSION."""

    def _heartbeat(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        assert sess is not None
        req = codec.Heartbeat.decode(msg, pad=pad)
        if sess.heartbeat_period == 0:
            raise SpdmError(ErrorCode.UnexpectedRequest, "HeartbeatPeriod is 0")
        self._on_request(RequestCode.HEARTBEAT, sess)
        return codec.HeartbeatAck(req.version).encode()

    def _key_update(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        assert sess is not None
        req = codec.KeyUpdate.decode(msg, pad=pad)
        op, ch = req.param1, sess.channel
        if op in (KeyUpdateOp.UpdateKey, KeyUpdateOp.UpdateAllKeys):
            if sess.pending_update:
                raise SpdmError(ErrorCode.InvalidRequest,
                                "KEY_UPDATE while a previous update awaits VerifyNewKey")
            ch.update_rx(keep_backup=True)
            if op == KeyUpdateOp.UpdateAllKeys:
                # libspdm activates the new responder key before building the ACK.
                ch.update_tx(keep_backup=True)
            sess.pending_update = op
        elif op == KeyUpdateOp.VerifyNewKey:
            if not sess.pending_update:
                raise SpdmError(ErrorCode.InvalidRequest, "VerifyNewKey without a key update")
            ch.commit_rx()
            ch.commit_tx()
            sess.pending_update = 0
        else:
            raise SpdmError(ErrorCode.InvalidRequest, f"KEY_UPDATE operation {op}")
        self._on_request(RequestCode.KEY_UPDATE, sess)
        return codec.KeyUpdateAck(req.version, req.param1, req.param2).encode()

    def _end_session(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        assert sess is not None
        req = codec.EndSession.decode(msg, pad=pad)
        # Param1 PreserveNegotiatedStateClear only matters with CACHE_CAP, which we never set.
        self._on_request(RequestCode.END_SESSION, sess)
        sid = sess.session_id
        self._after_seal.append(lambda: self._terminate(sid))
        return codec.EndSessionAck(req.version).encode()
