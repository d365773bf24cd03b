"""SPDM responder (the device side), sans-IO: bytes in, bytes out.

Entry points for the DOE mailbox:

* :meth:`Responder.handle_spdm` -- DOE type 0001:01 (CMA/SPDM), one SPDM message in,
  one out.  Trailing DOE DW padding (up to 3 zero bytes) on the request is accepted.
* :meth:`Responder.handle_secured` -- DOE type 0001:02 (Secured CMA/SPDM), one DSP0277
  record in, one record out, or ``None`` for "no response".

Session end: every way a session ends -- END_SESSION (after its ACK is sealed), a
record that fails to decrypt, a failed FINISH, or GET_VERSION resetting the connection --
goes through one place, which calls each ``Responder.on_session_end`` callback with the
session ID, so protocols bound to a session (IDE_KM keys, TDISP) can drop their state.

Undecryptable secured messages (our documented choice, libspdm's default
``handle_error_return_policy``): an unknown Session ID or a record too short to
name one is dropped (no response; libspdm ``SPDM_ERROR_CODE_INVALID_SESSION``);
a record for a live session that fails to authenticate gets ERROR(DecryptError)
sealed with that session's response keys, and the session is then terminated --
its sequence numbers can no longer be trusted.  A replayed record fails this way,
since the implicit sequence number has moved on.

Handlers check in libspdm's order: version -> connection state / session ->
capabilities -> size -> business rules -> build -> update state; every failure
is an :class:`SpdmError` that becomes the ERROR response.  Supported: SPDM 1.2 and
1.3; GET_VERSION, GET_CAPABILITIES, NEGOTIATE_ALGORITHMS, GET_DIGESTS,
GET_CERTIFICATE, CHALLENGE, GET_MEASUREMENTS, KEY_EXCHANGE, FINISH, HEARTBEAT,
KEY_UPDATE, END_SESSION and VENDOR_DEFINED_REQUEST (dispatched to handlers
registered by (StandardID, VendorID)).  Not supported: mutual authentication,
PSK, chunking, HANDSHAKE_IN_THE_CLEAR, CSR/SET_CERTIFICATE, MEL, events,
multi-key connections; their requests get ERROR(UnsupportedRequest).
"""

from __future__ import annotations

import hmac as _hmac
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from teeio import pki
from teeio.measurements import (
    DmtfValueType,
    MeasurementBlock,
    MeasurementSource,
    measurement_block,
)

from . import codec, crypto, opaque
from . import key_schedule as ks
from .defs import (
    CHALLENGE_AUTH_SIGN_CONTEXT,
    FINISH_SIGNATURE_INCLUDED,
    GET_CERT_SLOT_SIZE_REQUESTED,
    KEY_EXCHANGE_RSP_SIGN_CONTEXT,
    MAX_CT_EXPONENT,
    MAX_OPAQUE_DATA_SIZE,
    MEAS_CAP_MASK,
    MEAS_OP_ALL,
    MEAS_OP_COUNT,
    MEAS_SLOT_ID_MASK,
    MEASUREMENT_SPECIFICATION_DMTF,
    MEASUREMENTS_SIGN_CONTEXT,
    MIN_DATA_TRANSFER_SIZE_12,
    NONCE_SIZE,
    PSK_CAP_MASK,
    RANDOM_DATA_SIZE,
    SECURED_VERSION_10,
    SECURED_VERSION_11,
    SECURED_VERSION_12,
    SPDM_VERSION_10,
    SPDM_VERSION_12,
    SPDM_VERSION_13,
    VENDOR_ID_LEN,
    AeadSuite,
    AlgType,
    BaseAsymAlgo,
    BaseHashAlgo,
    CapFlags,
    DheGroup,
    ErrorCode,
    KeyExchangeSessionPolicy,
    KeySchedule,
    KeyUpdateOp,
    MeasRequestAttr,
    MeasSummaryHashType,
    MeasurementHashAlgo,
    OtherParams,
    RequestCode,
    describe,
    message_name,
    version_number_entry,
)
from .errors import DropRequest, SpdmError
from .secured import (
    Phase,
    SecureChannel,
    SecuredMessageError,
    peek_session_id,
    session_id_of,
)
from .transcript import MessageLogs, l1, m1, th

log = logging.getLogger(__name__)

VendorHandler = Callable[[bytes, "int | None"], bytes]
"""(payload, session_id or None) -> response payload; raise SpdmError for an ERROR
response or DropRequest for no response at all."""

# What this responder implements; ResponderConfig.flags must stay within it.
IMPLEMENTED_FLAGS = (CapFlags.CERT_CAP | CapFlags.CHAL_CAP | CapFlags.MEAS_CAP_NO_SIG
                     | CapFlags.MEAS_CAP_SIG | CapFlags.MEAS_FRESH_CAP | CapFlags.ENCRYPT_CAP
                     | CapFlags.MAC_CAP | CapFlags.KEY_EX_CAP | CapFlags.HBEAT_CAP
                     | CapFlags.KEY_UPD_CAP)

DEFAULT_FLAGS = (CapFlags.CERT_CAP | CapFlags.CHAL_CAP | CapFlags.MEAS_CAP_SIG
                 | CapFlags.MEAS_FRESH_CAP | CapFlags.ENCRYPT_CAP | CapFlags.MAC_CAP
                 | CapFlags.KEY_EX_CAP | CapFlags.HBEAT_CAP | CapFlags.KEY_UPD_CAP)

_MEAS_HASH_FOR = {BaseHashAlgo.SHA_256: MeasurementHashAlgo.SHA_256,
                  BaseHashAlgo.SHA_384: MeasurementHashAlgo.SHA_384,
                  BaseHashAlgo.SHA_512: MeasurementHashAlgo.SHA_512}


@dataclass(frozen=True)
class ResponderConfig:
    versions: tuple[int, ...] = (SPDM_VERSION_12, SPDM_VERSION_13)
    flags: int = DEFAULT_FLAGS
    ct_exponent: int = 20          # CT = 2^20 us (CMA requires <= 2^23)
    data_transfer_size: int = 4096  # below QEMU's 0x1200-byte DOE buffer
    max_spdm_msg_size: int = 4096
    heartbeat_period: int = 60      # seconds (0: off); see Responder.heartbeat_expired
    max_sessions: int = 4
    secured_versions: tuple[int, ...] = (SECURED_VERSION_10, SECURED_VERSION_11,
                                         SECURED_VERSION_12)
    base_hash: int = BaseHashAlgo.SHA_256 | BaseHashAlgo.SHA_384 | BaseHashAlgo.SHA_512
    dhe: int = DheGroup.SECP_256_R1 | DheGroup.SECP_384_R1
    aead: int = AeadSuite.AES_256_GCM | AeadSuite.AES_128_GCM


class ConnectionState(IntEnum):
    """SPDM connection state (libspdm ``libspdm_connection_state_t``)."""

    NOT_STARTED = 0
    AFTER_VERSION = 1
    AFTER_CAPABILITIES = 2
    NEGOTIATED = 3
    AFTER_DIGESTS = 4
    AFTER_CERTIFICATE = 5
    AUTHENTICATED = 6


class Arrival(Enum):
    """Where a request arrived: in the clear, or inside a session in a given phase."""

    CLEAR = "clear"
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"


@dataclass(frozen=True)
class Rule:
    """When a request may be processed (DSP0274 §10 per-request rules, libspdm handlers).

    ``state``: minimum connection state (``exact``: must equal it); ``where``: the
    arrival contexts allowed; ``clear_error`` is the error for a session-only
    request sent in the clear; ``rsp_cap``/``req_cap``: capability bits both sides
    must have (else UnsupportedRequest).
    """

    state: ConnectionState
    where: frozenset[Arrival]
    exact: bool = False
    clear_error: ErrorCode = ErrorCode.UnexpectedRequest
    rsp_cap: int = 0
    req_cap: int = 0


_CLEAR = frozenset({Arrival.CLEAR})
_CLEAR_OR_EST = frozenset({Arrival.CLEAR, Arrival.ESTABLISHED})
_EST = frozenset({Arrival.ESTABLISHED})
_ANY = frozenset(Arrival)

RULES: dict[int, Rule] = {
    RequestCode.GET_VERSION: Rule(ConnectionState.NOT_STARTED, _CLEAR),
    RequestCode.GET_CAPABILITIES: Rule(ConnectionState.AFTER_VERSION, _CLEAR, exact=True),
    RequestCode.NEGOTIATE_ALGORITHMS: Rule(ConnectionState.AFTER_CAPABILITIES, _CLEAR,
                                           exact=True),
    RequestCode.GET_DIGESTS: Rule(ConnectionState.NEGOTIATED, _CLEAR_OR_EST,
                                  rsp_cap=CapFlags.CERT_CAP),
    RequestCode.GET_CERTIFICATE: Rule(ConnectionState.NEGOTIATED, _CLEAR_OR_EST,
                                      rsp_cap=CapFlags.CERT_CAP),
    RequestCode.CHALLENGE: Rule(ConnectionState.NEGOTIATED, _CLEAR, rsp_cap=CapFlags.CHAL_CAP),
    RequestCode.GET_MEASUREMENTS: Rule(ConnectionState.NEGOTIATED, _CLEAR_OR_EST,
                                       rsp_cap=MEAS_CAP_MASK),
    RequestCode.KEY_EXCHANGE: Rule(ConnectionState.NEGOTIATED, _CLEAR,
                                   rsp_cap=CapFlags.KEY_EX_CAP, req_cap=CapFlags.KEY_EX_CAP),
    RequestCode.FINISH: Rule(ConnectionState.NEGOTIATED, frozenset({Arrival.HANDSHAKE}),
                             clear_error=ErrorCode.SessionRequired,
                             rsp_cap=CapFlags.KEY_EX_CAP, req_cap=CapFlags.KEY_EX_CAP),
    RequestCode.HEARTBEAT: Rule(ConnectionState.NEGOTIATED, _EST,
                                clear_error=ErrorCode.SessionRequired,
                                rsp_cap=CapFlags.HBEAT_CAP, req_cap=CapFlags.HBEAT_CAP),
    RequestCode.KEY_UPDATE: Rule(ConnectionState.NEGOTIATED, _EST,
                                 clear_error=ErrorCode.SessionRequired,
                                 rsp_cap=CapFlags.KEY_UPD_CAP, req_cap=CapFlags.KEY_UPD_CAP),
    RequestCode.END_SESSION: Rule(ConnectionState.NEGOTIATED, _EST,
                                  clear_error=ErrorCode.SessionRequired),
    RequestCode.VENDOR_DEFINED_REQUEST: Rule(ConnectionState.NEGOTIATED, _ANY),
}


@dataclass
class _Session:
    session_id: int
    channel: SecureChannel = field(repr=False)
    slot_id: int
    cert_chain_hash: bytes
    secured_version: int
    heartbeat_period: int
    k: bytearray = field(default_factory=bytearray, repr=False)
    f: bytearray = field(default_factory=bytearray, repr=False)
    m: bytearray = field(default_factory=bytearray, repr=False)
    pending_update: int = 0   # KeyUpdateOp awaiting VerifyNewKey, 0 if none
    last_rx: float | None = None    # time the last secured message was opened (caller's clock)


class Responder:
    """The device's SPDM responder for one identity (slot 0) and one set of measurements."""

    def __init__(self, identity: pki.Identity, measurements: Sequence[MeasurementSource] = (),
                 config: ResponderConfig | None = None,
                 random: Callable[[int], bytes] = os.urandom, name: str = "") -> None:
        self.identity = identity
        self.measurements = {m.index: m for m in measurements}
        self.config = config or ResponderConfig()
        extra = self.config.flags & ~IMPLEMENTED_FLAGS
        if extra:
            raise ValueError(f"capabilities 0x{extra:08x} are not implemented by this responder")
        if not set(self.config.versions) <= {SPDM_VERSION_12, SPDM_VERSION_13}:
            raise ValueError(f"SPDM versions {self.config.versions} (only 1.2 and 1.3)")
        self.random = random
        self.log = log.getChild(name) if name else log
        self.asym = crypto.asym_algo_for_key(identity.leaf_key)
        self.vendor_handlers: dict[tuple[int, int], VendorHandler] = {}
        self.sessions: dict[int, _Session] = {}
        # Called with the session ID after a session ended, however it ended.
        self.on_session_end: list[Callable[[int], None]] = []
        self._next_rsp_sid = 1
        self._after_seal: list[Callable[[], None]] = []
        self._reset()

    # --- public API ---------------------------------------------------------------------------

    def register_vendor_handler(self, standard_id: int, vendor_id: int,
                                handler: VendorHandler) -> None:
        """Dispatch VENDOR_DEFINED_REQUEST(StandardID, VendorID) payloads to *handler*."""
        self.vendor_handlers[(standard_id, vendor_id)] = handler

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

    @property
    def negotiated(self) -> codec.Negotiated | None:
        return self._neg

    def heartbeat_expired(self, now: float) -> list[int]:
        """Established sessions with a HeartbeatPeriod that have received no secured message
        for more than twice that period by *now* (DSP0274 §10.17 HEARTBEAT: the responder
        may then terminate the session).  Nothing is changed here; see
        :meth:`terminate_session`."""
        return [sid for sid, s in self.sessions.items()
                if s.heartbeat_period and s.last_rx is not None
                and s.channel.phase is Phase.ESTABLISHED
                and now - s.last_rx > 2 * s.heartbeat_period]

    def terminate_session(self, session_id: int, reason: str) -> None:
        """End *session_id* now (its keys are gone; ``on_session_end`` callbacks run)."""
        if session_id in self.sessions:
            self.log.warning("session 0x%08x terminated: %s", session_id, reason)
            self._terminate(session_id)

    # --- connection state ---------------------------------------------------------------------

    def _reset(self) -> None:
        """What a GET_VERSION clears (libspdm ``libspdm_reset_context``)."""
        for sid in list(self.sessions):
            self._terminate(sid)
        self.state = ConnectionState.NOT_STARTED
        self.version = 0
        self.logs = MessageLogs()
        self.req_flags = 0
        self.req_dts = 0
        self.req_max_msg = 0
        self._neg: codec.Negotiated | None = None
        self.other_params = 0
        self._after_seal.clear()

    def _terminate(self, sid: int) -> None:
        if self.sessions.pop(sid, None) is not None:
            self.log.info("session 0x%08x ended", sid)
            for callback in list(self.on_session_end):
                try:
                    callback(sid)
                except Exception:
                    self.log.exception("session 0x%08x: end-of-session callback failed", sid)

    def _both(self, rsp_cap: int, req_cap: int) -> bool:
        """libspdm ``libspdm_is_capabilities_flag_supported``."""
        return ((not req_cap or bool(self.req_flags & req_cap))
                and (not rsp_cap or bool(self.config.flags & rsp_cap)))

    @property
    def neg(self) -> codec.Negotiated:
        assert self._neg is not None
        return self._neg

    def _error(self, err: SpdmError, request_version: int = 0) -> bytes:
        """ERROR in the negotiated version.  Before one is negotiated (no successful
        GET_CAPABILITIES yet) but after a successful GET_VERSION, the ERROR carries the
        request's SPDMVersion when it is one VERSION offered: the Requester sends
        GET_CAPABILITIES in the version it selected from VERSION (DSP0274 §10.3, §10.4),
        and a rejected one (InvalidRequest, ...) is answered in that version, as libspdm's
        ``libspdm_generate_error_response`` does once the request's version has passed its
        check.  A version VERSION did not offer still gets ERROR(VersionMismatch) in 1.0."""
        version = self.version
        if not version:
            version = (request_version if self.state >= ConnectionState.AFTER_VERSION
                       and request_version in self.config.versions else SPDM_VERSION_10)
        return codec.Error(version, err.code, err.data, err.ext).encode()

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, msg: bytes, sess: _Session | None) -> bytes:
        try:
            return self._process(msg, sess)
        except SpdmError as err:
            self.log.info("%s -> ERROR %s: %s", message_name(msg), err.code.name, err)
            if len(msg) > 1 and msg[1] == RequestCode.GET_VERSION:
                return codec.Error(SPDM_VERSION_10, err.code, err.data, err.ext).encode()
            return self._error(err, msg[0] if msg else 0)

    def _process(self, msg: bytes, sess: _Session | None) -> bytes:
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

    def _handlers(self) -> dict[int, Callable[[bytes, _Session | None, bool], bytes]]:
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

    def _on_request(self, code: int, sess: _Session | None) -> None:
        self.logs.on_request(code, sess.m if sess is not None else None,
                             self.state >= ConnectionState.AUTHENTICATED)

    # --- §10.3 GET_VERSION --------------------------------------------------------------------

    def _get_version(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        if sess is not None:
            raise SpdmError(ErrorCode.UnexpectedRequest, "GET_VERSION inside a session")
        req = codec.GetVersion.decode(msg, pad)
        if req.version != SPDM_VERSION_10:
            # §10.3: GET_VERSION is always 1.0; the ERROR is 1.0 too (see _dispatch).
            raise SpdmError(ErrorCode.VersionMismatch, f"GET_VERSION version 0x{req.version:02x}")
        self._reset()
        rsp = codec.Version(tuple(version_number_entry(v) for v in self.config.versions))
        out = rsp.encode()
        self.logs.a += req.raw + out
        self.state = ConnectionState.AFTER_VERSION
        return out

    # --- §10.4 GET_CAPABILITIES ---------------------------------------------------------------

    def _get_capabilities(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        version = msg[0]
        if version not in self.config.versions:
            raise SpdmError(ErrorCode.VersionMismatch, f"version 0x{version:02x} not offered")
        req = codec.GetCapabilities.decode(msg, pad)
        _check_requester_flags(req.flags, version)
        if (req.data_transfer_size < MIN_DATA_TRANSFER_SIZE_12
                or req.data_transfer_size > req.max_spdm_msg_size):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"DataTransferSize {req.data_transfer_size} / MaxSPDMmsgSize "
                            f"{req.max_spdm_msg_size} inconsistent")
        if not req.flags & CapFlags.CHUNK_CAP and req.data_transfer_size != req.max_spdm_msg_size:
            raise SpdmError(ErrorCode.InvalidRequest,
                            "DataTransferSize != MaxSPDMmsgSize without CHUNK_CAP")
        if req.ct_exponent > MAX_CT_EXPONENT:
            raise SpdmError(ErrorCode.InvalidRequest, f"CTExponent {req.ct_exponent}")
        if version >= SPDM_VERSION_13 and req.param1 & 1 and not req.flags & CapFlags.CHUNK_CAP:
            raise SpdmError(ErrorCode.InvalidRequest,
                            "supported algorithms requested without CHUNK_CAP")
        self._on_request(RequestCode.GET_CAPABILITIES, sess)
        # We do not set CHUNK_CAP, so the 1.3 supported-algorithms block is never sent.
        out = codec.Capabilities(version, self.config.ct_exponent, self.config.flags,
                                 self.config.data_transfer_size,
                                 self.config.max_spdm_msg_size).encode()
        self.logs.a += req.raw + out
        self.version = version
        self.req_flags = req.flags
        self.req_dts, self.req_max_msg = req.data_transfer_size, req.max_spdm_msg_size
        self.state = ConnectionState.AFTER_CAPABILITIES
        return out

    # --- §10.5 NEGOTIATE_ALGORITHMS -----------------------------------------------------------

    def _negotiate_algorithms(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        if msg[0] != self.version:
            raise SpdmError(ErrorCode.VersionMismatch,
                            f"request version 0x{msg[0]:02x}, negotiated 0x{self.version:02x}")
        req = codec.NegotiateAlgorithms.decode(msg, pad)
        if len(req.raw) > 0x80:
            raise SpdmError(ErrorCode.InvalidRequest, f"Length {len(req.raw)} exceeds 128")
        ext_total = len(req.ext_asym) + len(req.ext_hash) + sum(len(s.ext)
                                                                 for s in req.alg_structs)
        if ext_total > 0x14:
            raise SpdmError(ErrorCode.InvalidRequest, f"{ext_total} external algorithms")
        for s in req.alg_structs:
            if s.alg_type not in set(AlgType):
                raise SpdmError(ErrorCode.InvalidRequest, f"AlgType {s.alg_type}")
            if s.supported == 0:
                raise SpdmError(ErrorCode.InvalidRequest, f"AlgType {s.alg_type}: nothing offered")
        cfg = self.config
        base_hash = _pick(cfg.base_hash & req.base_hash, _hash_preference(self.asym))
        base_asym = self.asym if req.base_asym & self.asym else 0
        meas_cap = bool(cfg.flags & MEAS_CAP_MASK)
        meas_spec = (MEASUREMENT_SPECIFICATION_DMTF
                     if meas_cap and req.measurement_spec & MEASUREMENT_SPECIFICATION_DMTF else 0)
        meas_hash = _MEAS_HASH_FOR.get(BaseHashAlgo(base_hash), 0) if meas_spec else 0
        other = (OtherParams.OPAQUE_DATA_FMT1
                 if req.other_params & OtherParams.OPAQUE_DATA_FMT1 else 0)
        selected: list[codec.AlgStruct] = []
        for s in req.alg_structs:
            local = {AlgType.DHE: cfg.dhe, AlgType.AEAD: cfg.aead,
                     AlgType.KEY_SCHEDULE: KeySchedule.SPDM}.get(AlgType(s.alg_type), 0)
            pref = {AlgType.DHE: _dhe_preference(self.asym),
                    AlgType.AEAD: (AeadSuite.AES_256_GCM, AeadSuite.AES_128_GCM),
                    AlgType.KEY_SCHEDULE: (KeySchedule.SPDM,)}.get(AlgType(s.alg_type), ())
            selected.append(codec.AlgStruct(s.alg_type, _pick(local & s.supported, pref)))
        sel = {s.alg_type: s.supported for s in selected}
        # Business rules (libspdm_get_response_algorithms): every capability in use
        # needs its algorithm.
        if meas_cap and req.measurement_spec and not meas_hash:
            raise SpdmError(ErrorCode.InvalidRequest, "no common measurement hash")
        if not base_hash:
            raise SpdmError(ErrorCode.InvalidRequest, "no common base hash algorithm")
        if not base_asym:
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"requester does not offer our signing algorithm {self.asym.name}")
        if self._both(CapFlags.KEY_EX_CAP, CapFlags.KEY_EX_CAP):
            for t in (AlgType.DHE, AlgType.AEAD, AlgType.KEY_SCHEDULE):
                if not sel.get(t):
                    raise SpdmError(ErrorCode.InvalidRequest, f"no common {t.name} algorithm")
        self._on_request(RequestCode.NEGOTIATE_ALGORITHMS, sess)
        out = codec.Algorithms(
            self.version, meas_spec, other, meas_hash, base_asym, base_hash,
            alg_structs=tuple(selected)).encode()
        self.logs.a += req.raw + out
        self._neg = codec.Negotiated(self.version, base_hash, base_asym, meas_hash,
                                     sel.get(AlgType.DHE, 0), sel.get(AlgType.AEAD, 0))
        self.other_params = other
        self.state = ConnectionState.NEGOTIATED
        return out

    # --- §10.6/10.7 GET_DIGESTS, GET_CERTIFICATE -----------------------------------------------

    def _cert_chain(self) -> bytes:
        return pki.spdm_cert_chain(list(self.identity.certs),
                                   crypto.hash_name(self.neg.base_hash))

    def _get_digests(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        req = codec.GetDigests.decode(msg, pad)
        self._on_request(RequestCode.GET_DIGESTS, sess)
        supported = 0x01 if self.version >= SPDM_VERSION_13 else 0
        out = codec.Digests(self.version, 0x01, (crypto.digest(self.neg.base_hash,
                                                               self._cert_chain()),),
                            supported).encode()
        if sess is None:
            self.logs.b += req.raw + out
        self.state = max(self.state, ConnectionState.AFTER_DIGESTS)
        return out

    def _get_certificate(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        req = codec.GetCertificate.decode(msg, pad)
        slot = req.slot_id & 0x0F
        if slot != 0:
            raise SpdmError(ErrorCode.InvalidRequest, f"certificate slot {slot} is empty")
        chain = self._cert_chain()
        offset, requested = req.offset, req.length
        if self.version >= SPDM_VERSION_13 and req.attributes & GET_CERT_SLOT_SIZE_REQUESTED:
            # DSP0274 1.3 §10.7 GET_CERTIFICATE, Param2 bit 0 SlotSizeRequested: Offset and
            # Length are ignored; the CERTIFICATE has PortionLength 0 and RemainderLength
            # the size of the slot's certificate chain.  (In 1.2 the bit is reserved.)
            offset, requested = 0, 0
        if offset >= len(chain):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"Offset {offset} beyond the {len(chain)}-byte chain")
        header = 8
        room = min(self.config.data_transfer_size, self.req_dts or 0xFFFF) - header
        length = min(requested, room, len(chain) - offset)
        self._on_request(RequestCode.GET_CERTIFICATE, sess)
        portion = chain[offset:offset + length]
        out = codec.Certificate(self.version, slot, portion,
                                len(chain) - offset - length).encode()
        if sess is None:
            self.logs.b += req.raw + out
        self.state = max(self.state, ConnectionState.AFTER_CERTIFICATE)
        return out

    # --- measurement summary / blocks -----------------------------------------------------------

    def _blocks(self, raw_requested: bool = False) -> dict[int, bytes]:
        name = crypto.meas_hash_name(self.neg.meas_hash)
        out: dict[int, bytes] = {}
        for index in sorted(self.measurements):
            src = self.measurements[index]
            if raw_requested:
                out[index] = MeasurementBlock(index, src.value_type, True, src.data).encode()
            else:
                out[index] = measurement_block(src, name)
        return out

    def _summary_hash(self, summary_type: int) -> bytes:
        """MeasurementSummaryHash (§10.8): Hash over the concatenated measurement blocks;
        TCB = the immutable-ROM blocks (libspdm sample device rule)."""
        if summary_type == MeasSummaryHashType.NONE:
            return b""
        blocks = [b for i, b in self._blocks().items()
                  if summary_type == MeasSummaryHashType.ALL
                  or self.measurements[i].value_type & 0x7F == DmtfValueType.IMMUTABLE_ROM]
        return crypto.digest(self.neg.base_hash, b"".join(blocks))

    def _check_summary_type(self, summary_type: int) -> None:
        if summary_type not in set(MeasSummaryHashType):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"MeasurementSummaryHashType 0x{summary_type:02x}")
        if summary_type and (not self.config.flags & MEAS_CAP_MASK or not self.neg.meas_hash):
            raise SpdmError(ErrorCode.InvalidRequest,
                            "measurement summary requested but measurements not negotiated")

    def _sign(self, context: bytes, transcript: bytes) -> bytes:
        return crypto.spdm_sign(self.identity.leaf_key, self.version, self.neg.base_asym,
                                self.neg.base_hash, context, transcript)

    # --- §10.8 CHALLENGE ----------------------------------------------------------------------

    def _challenge(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        req = codec.Challenge.decode(msg, pad)
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

    def _get_measurements(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        mlog = sess.m if sess is not None else self.logs.m
        try:
            if not self.neg.meas_hash:
                raise SpdmError(ErrorCode.UnexpectedRequest, "measurements not negotiated")
            req = codec.GetMeasurements.decode(msg, pad)
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

    # --- §10.15 KEY_EXCHANGE ------------------------------------------------------------------

    def _key_exchange(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        neg = self.neg
        if not self._both(CapFlags.MAC_CAP, CapFlags.MAC_CAP):
            raise SpdmError(ErrorCode.InvalidRequest, "MAC_CAP not negotiated")
        if not self._both(CapFlags.ENCRYPT_CAP, CapFlags.ENCRYPT_CAP):
            raise SpdmError(ErrorCode.InvalidRequest, "MAC-only sessions are not supported")
        if self.other_params & 0x0F != OtherParams.OPAQUE_DATA_FMT1:
            raise SpdmError(ErrorCode.InvalidRequest, "OpaqueDataFmt1 not negotiated")
        req = codec.KeyExchange.decode(msg, neg.dhe_size, pad)
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
        self.sessions[sid] = _Session(sid, channel, req.slot_id, ct_hash, sec_version, hb, k)
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

    def _finish(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        assert sess is not None   # RULES: handshake phase only
        neg = self.neg
        if msg[2] & FINISH_SIGNATURE_INCLUDED:
            raise SpdmError(ErrorCode.InvalidRequest,
                            "FINISH carries a signature but mutual auth was not requested")
        req = codec.Finish.decode(msg, neg, pad)
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

    def _established(self, sess: _Session, data: ks.DataSecrets) -> None:
        sess.channel.establish(data)
        self.log.info("session 0x%08x established", sess.session_id)

    # --- §10.17-10.19 HEARTBEAT, KEY_UPDATE, END_SESSION ---------------------------------------

    def _heartbeat(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        assert sess is not None
        req = codec.Heartbeat.decode(msg, pad)
        if sess.heartbeat_period == 0:
            raise SpdmError(ErrorCode.UnexpectedRequest, "HeartbeatPeriod is 0")
        self._on_request(RequestCode.HEARTBEAT, sess)
        return codec.HeartbeatAck(req.version).encode()

    def _key_update(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        assert sess is not None
        req = codec.KeyUpdate.decode(msg, pad)
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

    def _end_session(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        assert sess is not None
        req = codec.EndSession.decode(msg, pad)
        # Param1 PreserveNegotiatedStateClear only matters with CACHE_CAP, which we never set.
        self._on_request(RequestCode.END_SESSION, sess)
        sid = sess.session_id
        self._after_seal.append(lambda: self._terminate(sid))
        return codec.EndSessionAck(req.version).encode()

    # --- §10.20 VENDOR_DEFINED_REQUEST --------------------------------------------------------

    def _vendor_defined(self, msg: bytes, sess: _Session | None, pad: bool) -> bytes:
        req = codec.VendorDefinedRequest.decode(msg, pad)
        want = VENDOR_ID_LEN.get(req.standard_id, -1)
        if want == -1 or (want is not None and len(req.vendor_id) != want):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"StandardID {req.standard_id} with a {len(req.vendor_id)}-byte "
                            "VendorID")
        vendor = int.from_bytes(req.vendor_id, "little")
        handler = self.vendor_handlers.get((req.standard_id, vendor))
        if handler is None:
            raise SpdmError(ErrorCode.UnsupportedRequest,
                            f"no handler for StandardID {req.standard_id} VendorID 0x{vendor:x}",
                            data=RequestCode.VENDOR_DEFINED_REQUEST)
        self._on_request(RequestCode.VENDOR_DEFINED_REQUEST, None)
        payload = handler(req.payload, sess.session_id if sess is not None else None)
        if len(payload) > 0xFFFF:
            raise SpdmError(ErrorCode.Unspecified, "vendor response payload too large")
        return codec.VendorDefinedResponse(self.version, req.standard_id, req.vendor_id,
                                           payload).encode()


# --- helpers --------------------------------------------------------------------------------------

def _pick(common: int, preference: Sequence[int]) -> int:
    return next((p for p in preference if common & p), 0)


def _hash_preference(asym: int) -> tuple[int, ...]:
    if asym == BaseAsymAlgo.ECDSA_P256:
        return (BaseHashAlgo.SHA_256, BaseHashAlgo.SHA_384, BaseHashAlgo.SHA_512)
    return (BaseHashAlgo.SHA_384, BaseHashAlgo.SHA_256, BaseHashAlgo.SHA_512)


def _dhe_preference(asym: int) -> tuple[int, ...]:
    if asym == BaseAsymAlgo.ECDSA_P256:
        return (DheGroup.SECP_256_R1, DheGroup.SECP_384_R1)
    return (DheGroup.SECP_384_R1, DheGroup.SECP_256_R1)


def _check_requester_flags(flags: int, version: int) -> None:
    """libspdm ``libspdm_check_request_flag_compatibility`` (SPDM 1.1+ rules)."""
    def bit(f: int) -> bool:
        return bool(flags & f)

    psk = (flags & PSK_CAP_MASK) >> 10
    key_ex, mac, enc = bit(CapFlags.KEY_EX_CAP), bit(CapFlags.MAC_CAP), bit(CapFlags.ENCRYPT_CAP)
    cert, pub_key_id = bit(CapFlags.CERT_CAP), bit(CapFlags.PUB_KEY_ID_CAP)
    chal, mut = bit(CapFlags.CHAL_CAP), bit(CapFlags.MUT_AUTH_CAP)
    ep_info = (flags >> 22) & 3
    multi_key = (flags >> 26) & 3
    bad: str | None = None
    if psk in (2, 3):
        bad = "PSK_CAP value reserved for requesters"
    elif key_ex or psk:
        if not mac and not enc:
            bad = "KEY_EX/PSK without MAC_CAP or ENCRYPT_CAP"
    elif (mac or enc or bit(CapFlags.HANDSHAKE_IN_THE_CLEAR_CAP) or bit(CapFlags.HBEAT_CAP)
          or bit(CapFlags.KEY_UPD_CAP) or (version >= SPDM_VERSION_13 and bit(CapFlags.EVENT_CAP))):
        bad = "session capabilities without KEY_EX_CAP or PSK_CAP"
    if bad is None and not key_ex and psk == 1 and bit(CapFlags.HANDSHAKE_IN_THE_CLEAR_CAP):
        bad = "HANDSHAKE_IN_THE_CLEAR with PSK only"
    if bad is None:
        if cert or pub_key_id:
            if cert and pub_key_id:
                bad = "CERT_CAP and PUB_KEY_ID_CAP both set"
            elif not chal and not key_ex and (version < SPDM_VERSION_13 or ep_info in (0, 1)):
                bad = "CERT_CAP/PUB_KEY_ID_CAP without CHAL_CAP or KEY_EX_CAP"
        elif chal or mut:
            bad = "CHAL_CAP/MUT_AUTH_CAP without CERT_CAP or PUB_KEY_ID_CAP"
        elif version >= SPDM_VERSION_13 and ep_info == 2:
            bad = "EP_INFO_CAP with signature but no key"
    if bad is None and mut and not key_ex and not chal:
        bad = "MUT_AUTH_CAP without KEY_EX_CAP or CHAL_CAP"
    if bad is None and version >= SPDM_VERSION_13:
        if ep_info == 3 or multi_key == 3:
            bad = "reserved EP_INFO_CAP / MULTI_KEY_CAP value"
        elif multi_key and (pub_key_id or not cert):
            bad = "MULTI_KEY_CAP without CERT_CAP"
    if bad is not None:
        raise SpdmError(ErrorCode.InvalidRequest,
                        f"requester capability flags 0x{flags:08x}: {bad}")


__all__ = ["RULES", "ConnectionState", "Responder", "ResponderConfig", "Rule", "VendorHandler"]
