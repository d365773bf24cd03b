"""SPDM responder connection state and per-request rules (DSP0274 §10 per-request
rules; libspdm ``libspdm_connection_state_t`` and its response handlers), and the
per-session state (DSP0274 §15 K/F/M transcripts, DSP0277 channel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum

from ..defs import MEAS_CAP_MASK, CapFlags, ErrorCode, RequestCode
from ..secured import SecureChannel


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
class Session:
    """One session the responder keeps: its channel and its K, F and M transcripts."""

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
