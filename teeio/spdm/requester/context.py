"""SPDM requester context: one connection's negotiated state, transcripts and
sessions, and the request/response exchange over the DOE transport (DSP0274 §10,
DSP0277 records for DOE type 0001:02).  Responses may carry DOE DW padding; every
response is sized from its own fields, never from the DOE length."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from cryptography import x509

from .. import codec, crypto
from ..defs import (
    DOE_TYPE_SECURED_SPDM,
    DOE_TYPE_SPDM,
    SPDM_VERSION_10,
    ErrorCode,
    RequestCode,
    ResponseCode,
    describe,
)
from ..errors import (
    DecodeError,
    ErrorResponse,
    MalformedResponse,
    RequesterError,
    SessionError,
    SignatureError,
)
from ..secured import SecuredMessageError
from ..transcript import MessageLogs
from .config import RequesterConfig, Session, Transport

log = logging.getLogger("teeio.spdm.requester")

T = TypeVar("T")


class RequesterContext:
    """One SPDM connection to one responder, driven over *send*; the requests are
    mixins over it."""

    def __init__(self, send: Transport, anchors: Sequence[x509.Certificate] = (),
                 config: RequesterConfig | None = None,
                 random: Callable[[int], bytes] = os.urandom, name: str = "") -> None:
        self.send = send
        self.anchors = list(anchors)
        self.config = config or RequesterConfig()
        self.random = random
        self.log = log.getChild(name) if name else log
        self.sessions: dict[int, Session] = {}
        self._next_req_sid = 0xFFFE
        #: Debugging only: called with (session ID, DHE shared secret) for each session
        #: KEY_EXCHANGE establishes (:class:`teeio.doe_pcap.SessionSecretLog`).
        self.on_session_secret: Callable[[int, bytes], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.sessions.clear()
        self.version = 0
        self.logs = MessageLogs()
        self.m_pairs: list[tuple[bytes, bytes]] = []
        self.peer_flags = 0
        self.peer_dts = 0
        self.neg: codec.Negotiated | None = None
        self.other_params = 0
        self.digests: dict[int, bytes] = {}
        self.cert_chains: dict[int, bytes] = {}
        self.leaf_keys: dict[int, crypto.PublicKey] = {}
        self.authenticated = False

    @property
    def vca(self) -> bytes:
        """The exact VCA (GET_VERSION .. ALGORITHMS) of this connection."""
        return bytes(self.logs.a)

    @property
    def negotiated(self) -> codec.Negotiated:
        if self.neg is None:
            raise RequesterError("algorithms not negotiated yet (call negotiate_algorithms)")
        return self.neg

    def _both(self, cap: int) -> bool:
        return bool(self.config.flags & cap) and bool(self.peer_flags & cap)

    def _exchange(self, name: str, request: bytes, expected: int,
                  sess: Session | None = None) -> bytes:
        """Send one request; return the exact response bytes (DOE pad still attached in the
        clear; decoders trim it).  An ERROR response raises ErrorResponse."""
        if sess is None:
            self.log.debug("--> %s", request.hex())
            response = self.send(DOE_TYPE_SPDM, request)
        else:
            record = sess.channel.seal(request)
            # Only name and size in a session: KEY_PROG carries IDE keys.
            self.log.debug("session 0x%08x --> %s", sess.session_id, describe(request))
            reply = self.send(DOE_TYPE_SECURED_SPDM, record)
            if not reply:
                raise SessionError(f"{name}: no response in session 0x{sess.session_id:08x}")
            try:
                response = sess.channel.open(reply)
            except SecuredMessageError as exc:
                self.sessions.pop(sess.session_id, None)
                raise SessionError(f"{name}: response in session 0x{sess.session_id:08x} "
                                   f"does not decrypt: {exc}") from None
        self.log.debug("<-- %s", response.hex() if sess is None else describe(response))
        try:
            version, code, p1, p2 = codec.peek_header(response)
        except DecodeError as exc:
            raise MalformedResponse(f"{name}: {exc}") from None
        if code == ResponseCode.ERROR:
            if sess is not None and p1 == ErrorCode.DecryptError:
                self.sessions.pop(sess.session_id, None)   # the responder ended it
            raise ErrorResponse(name, p1, p2, response[4:])
        if code != expected:
            raise MalformedResponse(f"{name}: response code 0x{code:02x}, expected "
                                    f"{ResponseCode(expected).name} (0x{expected:02x})")
        want = SPDM_VERSION_10 if expected == ResponseCode.VERSION else self.version
        if version != want:
            raise MalformedResponse(f"{name}: response version 0x{version:02x}, expected "
                                    f"0x{want:02x}")
        return response

    @staticmethod
    def _decode(name: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DecodeError as exc:
            raise MalformedResponse(f"{name}: {exc}") from None

    def _session(self, session_id: int) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionError(f"no session 0x{session_id:08x}") from None

    def _on_success(self, code: int, sess: Session | None) -> None:
        """The transcript resets the responder applied for this request (mirror)."""
        scratch = bytearray()
        self.logs.on_request(code, scratch if sess is not None else None, self.authenticated)
        if code != RequestCode.GET_MEASUREMENTS:
            if sess is not None:
                sess.m_pairs.clear()
            else:
                self.m_pairs.clear()

    def _leaf(self, slot: int) -> crypto.PublicKey:
        try:
            return self.leaf_keys[slot]
        except KeyError:
            raise RequesterError(f"no verified certificate chain for slot {slot} "
                                 "(call get_certificate first)") from None

    def _verify(self, what: str, slot: int, context: bytes, transcript: bytes,
                signature: bytes) -> None:
        neg = self.negotiated
        try:
            crypto.spdm_verify(self._leaf(slot), self.version, neg.base_asym, neg.base_hash,
                               context, transcript, signature)
        except crypto.CryptoError as exc:
            raise SignatureError(f"{what} signature: {exc}") from None
