"""SPDM responder entry points and request dispatch (DSP0274 §10, DSP0277; libspdm
``libspdm_rsp_receive_send.c``): DOE type 0001:01 takes one SPDM message in the
clear, 0001:02 one DSP0277 record, and each gets one response (or none).

Handlers check in libspdm's order: version -> connection state / session ->
capabilities -> size -> business rules -> build -> update state; every failure is an
:class:`SpdmError` that becomes the ERROR response (§10.13).
"""

from __future__ import annotations

from collections.abc import Callable

from .. import codec
from ..defs import (
    SPDM_VERSION_10,
    SPDM_VERSION_12,
    ErrorCode,
    RequestCode,
    describe,
    message_name,
)
from ..errors import DropRequest, SpdmError
from ..secured import Phase, SecuredMessageError, peek_session_id
from .attestation import AttestationHandlers
from .certificate import CertificateHandlers
from .key_exchange import KeyExchangeHandlers
from .session_mgmt import SessionHandlers
from .state import RULES, Arrival, Session
from .vca import VcaHandlers
from .vendor import VendorHandlers

Handler = Callable[[bytes, Session | None, bool], bytes]


class Responder(VcaHandlers, CertificateHandlers, AttestationHandlers, KeyExchangeHandlers,
                SessionHandlers, VendorHandlers):
    """The device's SPDM responder, sans-IO: bytes in, bytes out.

    Undecryptable secured messages (libspdm's default ``handle_error_return_policy``):
    an unknown Session ID or a record too short to name one is dropped; a record for a
    live session that fails to authenticate (a replay included) gets ERROR(DecryptError)
    sealed with that session's keys, and the session is then terminated.
    """

    def handle_spdm(self, msg: bytes) -> bytes:
        """One SPDM request in the clear -> its response (DOE 0001:01).

        A vendor-defined handler that asks for no response gets ERROR(UnsupportedRequest)
        here, for transports that must always answer; :meth:`handle_spdm_or_drop` is the
        variant that stays silent."""
        resp = self.handle_spdm_or_drop(msg)
        if resp is None:
            resp = self._error(SpdmError(ErrorCode.UnsupportedRequest,
                                         data=RequestCode.VENDOR_DEFINED_REQUEST))
            self.log.debug("<-- %s (instead of no response)", resp.hex())
        return resp

    def handle_spdm_or_drop(self, msg: bytes) -> bytes | None:
        """One SPDM request in the clear -> its response, or None when a vendor-defined
        handler asks for no response (DropRequest), e.g. IDE_KM and TDISP objects that did
        not arrive in a secured session (PCIe 6.x §6.33.3, §11.2.2).  DOE lets a
        responder stay silent: the requester's timeout and Abort take over."""
        self.log.debug("--> %s", msg.hex())
        self._after_seal.clear()
        try:
            resp = self._dispatch(msg, None)
        except DropRequest:
            self.log.debug("no response")
            return None
        self.log.debug("<-- %s", resp.hex())
        return resp

    def handle_secured(self, msg: bytes, now: float | None = None) -> bytes | None:
        """One secured record (DOE 0001:02) -> the sealed response, or None for no response.

        *now*: the caller's clock (seconds), recorded as the session's last activity for
        :meth:`heartbeat_expired` (this module keeps no clock of its own)."""
        try:
            sid = peek_session_id(msg)
        except SecuredMessageError:
            self.log.info("secured message of %d bytes dropped: no session ID", len(msg))
            return None
        sess = self.sessions.get(sid)
        if sess is None:
            self.log.info("secured message for unknown session 0x%08x dropped", sid)
            return None
        try:
            app = sess.channel.open(msg)
        except SecuredMessageError as exc:
            self.log.warning("session 0x%08x: %s; answering DecryptError and ending the "
                             "session", sid, exc)
            sealed = sess.channel.seal(self._error(SpdmError(ErrorCode.DecryptError)))
            self._terminate(sid)
            return sealed
        if now is not None:
            sess.last_rx = now
        if sess.pending_update and sess.channel.rolled_back:
            # The requester never saw our KEY_UPDATE_ACK: forget the update.
            sess.channel.rollback_tx()
            sess.pending_update = 0
        # In a session only name and size are logged: IDE_KM KEY_PROG carries keys and
        # LOCK_INTERFACE_RESPONSE the START nonce.
        self.log.debug("session 0x%08x --> %s", sid, describe(app))
        self._after_seal.clear()
        try:
            resp = self._dispatch(app, sess)
        except DropRequest:
            self.log.debug("session 0x%08x: no response", sid)
            return None
        self.log.debug("session 0x%08x <-- %s", sid, describe(resp))
        sealed = sess.channel.seal(resp)
        actions, self._after_seal = self._after_seal, []
        for action in actions:
            action()
        return sealed

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, msg: bytes, sess: Session | None) -> bytes:
        try:
            return self._process(msg, sess)
        except SpdmError as err:
            self.log.info("%s -> ERROR %s: %s", message_name(msg), err.code.name, err)
            if len(msg) > 1 and msg[1] == RequestCode.GET_VERSION:
                return codec.Error(SPDM_VERSION_10, err.code, err.data, err.ext).encode()
            return self._error(err, msg[0] if msg else 0)

    def _process(self, msg: bytes, sess: Session | None) -> bytes:
        version, code, _, _ = codec.peek_header(msg)
        pad = sess is None
        limit = self.config.data_transfer_size + (codec.MAX_DOE_PAD if pad else 0)
        if len(msg) > limit and self.version >= SPDM_VERSION_12:
            raise SpdmError(ErrorCode.RequestTooLarge,
                            f"{len(msg)}-byte request exceeds DataTransferSize")
        handler = self._handlers().get(code)
        if handler is None:
            raise SpdmError(ErrorCode.UnsupportedRequest, f"request code 0x{code:02x}",
                            data=code)
        rule = RULES[code]
        arrival = (Arrival.CLEAR if sess is None else Arrival.ESTABLISHED
                   if sess.channel.phase is Phase.ESTABLISHED else Arrival.HANDSHAKE)
        if code == RequestCode.GET_VERSION:
            return handler(msg, sess, pad)
        if rule.exact:   # GET_CAPABILITIES / NEGOTIATE_ALGORITHMS: state first
            if self.state != rule.state or arrival is not Arrival.CLEAR:
                raise SpdmError(ErrorCode.UnexpectedRequest,
                                f"{message_name(msg)} in connection state {self.state.name}")
            return handler(msg, sess, pad)
        if version != self.version:
            if self.version == 0 and version in self.config.versions:
                raise SpdmError(ErrorCode.UnexpectedRequest,
                                f"{message_name(msg)} before version negotiation")
            raise SpdmError(ErrorCode.VersionMismatch,
                            f"request version 0x{version:02x}, negotiated "
                            f"0x{self.version:02x}")
        if not self._both(rule.rsp_cap, rule.req_cap):
            raise SpdmError(ErrorCode.UnsupportedRequest,
                            f"{message_name(msg)} needs capabilities not negotiated", data=code)
        if self.state < rule.state:
            raise SpdmError(ErrorCode.UnexpectedRequest,
                            f"{message_name(msg)} in connection state {self.state.name}")
        if arrival not in rule.where:
            if arrival is Arrival.CLEAR:
                raise SpdmError(rule.clear_error, f"{message_name(msg)} outside a session")
            raise SpdmError(ErrorCode.UnexpectedRequest,
                            f"{message_name(msg)} in a session in phase {arrival.value}")
        return handler(msg, sess, pad)

    def _handlers(self) -> dict[int, Handler]:
        return {
            RequestCode.GET_VERSION: self._get_version,
            RequestCode.GET_CAPABILITIES: self._get_capabilities,
            RequestCode.NEGOTIATE_ALGORITHMS: self._negotiate_algorithms,
            RequestCode.GET_DIGESTS: self._get_digests,
            RequestCode.GET_CERTIFICATE: self._get_certificate,
            RequestCode.CHALLENGE: self._challenge,
            RequestCode.GET_MEASUREMENTS: self._get_measurements,
            RequestCode.KEY_EXCHANGE: self._key_exchange,
            RequestCode.FINISH: self._finish,
            RequestCode.HEARTBEAT: self._heartbeat,
            RequestCode.KEY_UPDATE: self._key_update,
            RequestCode.END_SESSION: self._end_session,
            RequestCode.VENDOR_DEFINED_REQUEST: self._vendor_defined,
        }
