"""Requester: HEARTBEAT (DSP0274 §10.17), KEY_UPDATE (§10.18, libspdm's requester
flow: update, then VerifyNewKey) and END_SESSION (§10.19) in an established session."""

from __future__ import annotations

from .. import codec
from ..defs import KeyUpdateOp, RequestCode, ResponseCode
from ..errors import MalformedResponse, RequesterError, SessionError
from .config import Session
from .context import RequesterContext


class SessionRequests(RequesterContext):
    """HEARTBEAT, KEY_UPDATE and END_SESSION."""

    def _established(self, session_id: int) -> Session:
        sess = self._session(session_id)
        if not sess.established:
            raise SessionError(f"session 0x{session_id:08x} is not established")
        return sess

    def heartbeat(self, session_id: int) -> None:
        sess = self._established(session_id)
        raw = self._exchange("HEARTBEAT", codec.Heartbeat(self.version).encode(),
                             ResponseCode.HEARTBEAT_ACK, sess)
        self._decode("HEARTBEAT_ACK", lambda: codec.HeartbeatAck.decode(raw))
        self._on_success(RequestCode.HEARTBEAT, sess)

    def key_update(self, session_id: int, operation: int = KeyUpdateOp.UpdateKey) -> None:
        """UpdateKey or UpdateAllKeys, then VerifyNewKey (§10.18; libspdm requester flow)."""
        sess = self._established(session_id)
        if operation not in (KeyUpdateOp.UpdateKey, KeyUpdateOp.UpdateAllKeys):
            raise ValueError(f"key update operation {operation}")
        all_keys = operation == KeyUpdateOp.UpdateAllKeys
        if all_keys:
            sess.channel.update_rx(keep_backup=True)   # the ACK comes under the new key
        try:
            self._key_update_op(sess, operation)
        except RequesterError:
            sess.channel.rollback_rx()
            raise
        sess.channel.commit_rx()
        sess.channel.update_tx()
        self._key_update_op(sess, KeyUpdateOp.VerifyNewKey)

    def _key_update_op(self, sess: Session, operation: int) -> None:
        tag = self.random(1)[0]
        req = codec.KeyUpdate(self.version, operation, tag).encode()
        raw = self._exchange("KEY_UPDATE", req, ResponseCode.KEY_UPDATE_ACK, sess)
        ack = self._decode("KEY_UPDATE_ACK", lambda: codec.KeyUpdateAck.decode(raw))
        if (ack.param1, ack.param2) != (operation, tag):
            raise MalformedResponse(f"KEY_UPDATE_ACK operation/tag {ack.param1}/{ack.param2}, "
                                    f"sent {operation}/{tag}")
        self._on_success(RequestCode.KEY_UPDATE, sess)

    def end_session(self, session_id: int) -> None:
        sess = self._established(session_id)
        raw = self._exchange("END_SESSION", codec.EndSession(self.version).encode(),
                             ResponseCode.END_SESSION_ACK, sess)
        self._decode("END_SESSION_ACK", lambda: codec.EndSessionAck.decode(raw))
        self._on_success(RequestCode.END_SESSION, sess)
        del self.sessions[session_id]
        self.log.info("session 0x%08x ended", session_id)
