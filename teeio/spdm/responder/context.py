"""SPDM responder context: identity, configuration, connection state and sessions
(libspdm ``libspdm_context_t``).  GET_VERSION resets it (DSP0274 §10.3); every way
a session ends goes through :meth:`ResponderContext._terminate`, which runs the
``on_session_end`` callbacks so protocols bound to a session can drop their state."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from teeio import pki
from teeio.measurements import MeasurementSource

from .. import codec, crypto
from ..defs import SPDM_VERSION_10, SPDM_VERSION_12, SPDM_VERSION_13
from ..errors import SpdmError
from ..secured import Phase
from ..transcript import MessageLogs
from .config import IMPLEMENTED_FLAGS, ResponderConfig, VendorHandler
from .state import ConnectionState, Session

log = logging.getLogger("teeio.spdm.responder")


class ResponderContext:
    """The device's SPDM responder state for one identity (slot 0) and one set of
    measurements; the request handlers are mixins over it."""

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
        self.sessions: dict[int, Session] = {}
        # Called with the session ID after a session ended, however it ended.
        self.on_session_end: list[Callable[[int], None]] = []
        self._next_rsp_sid = 1
        self._after_seal: list[Callable[[], None]] = []
        self._reset()

    def register_vendor_handler(self, standard_id: int, vendor_id: int,
                                handler: VendorHandler) -> None:
        """Dispatch VENDOR_DEFINED_REQUEST(StandardID, VendorID) payloads to *handler*."""
        self.vendor_handlers[(standard_id, vendor_id)] = handler

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

    def _on_request(self, code: int, sess: Session | None) -> None:
        self.logs.on_request(code, sess.m if sess is not None else None,
                             self.state >= ConnectionState.AUTHENTICATED)

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
