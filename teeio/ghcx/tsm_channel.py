"""The TSM's end of a GHCx channel for one VM, sans-IO: bounded pending handshakes, the
request checks (sequence numbers, request ids) and the retry cache of the last response.

Specification: ``docs/ghcx.md`` "Handshake" 2-6 and "Receiver rules".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teeio.ghcx import keys
from teeio.ghcx.defs import (
    BOOT_ID_SIZE,
    ERROR_CODES,
    FLAG_ERROR,
    HEADER_SIZE,
    MAX_PENDING,
    NONCE_SIZE,
    PENDING_TTL,
    REQUESTS,
    TAG_SIZE,
    VERSION,
    GhcxReject,
    MsgType,
    reject,
    response_type,
)
from teeio.ghcx.endpoint import Endpoint, decode_json, encode_json
from teeio.ghcx.framing import Header, clear_body, encode_frame
from teeio.ghcx.messages import ErrorReply


class Incoming:
    """What :meth:`TsmChannel.receive` returns: :class:`Reply`, :class:`Request` or
    :class:`Cached`."""


@dataclass
class Reply(Incoming):
    """A clear frame to send as is: HELLO_ACK or REHELLO."""

    frame: bytes


@dataclass
class Request(Incoming):
    """A new request to serve; answer it with :meth:`TsmChannel.respond`."""

    mtype: MsgType
    request_id: int
    payload: dict[str, Any]


@dataclass
class Cached(Incoming):
    """A retried request id: its cached response re-sealed with a new sequence number."""

    frame: bytes


@dataclass
class _CacheEntry:
    request_id: int
    mtype: MsgType
    plaintext: bytes = field(repr=False)
    response: tuple[int, bytes] | None = field(default=None, repr=False)   # (flags, plaintext)


class TsmChannel(Endpoint):
    """The TSM's end for one VM.

    A HELLO sets up a *pending* session; the guest's first request that authenticates under
    it (docs/ghcx.md "Handshake" 4) makes it the VM's session and drops the previous one
    and every other pending one.  So a HELLO injected by a relay cannot kill a live
    session.  A pending session stays until it is confirmed or :data:`PENDING_TTL` has
    passed, never replaced by a later HELLO; at most :data:`MAX_PENDING` are kept and a
    HELLO beyond them is not answered (``hello_limit``), so a flood of forged HELLOs cannot
    push out the guest's own (docs/ghcx.md "Handshake" 6).  A repeated HELLO (same nonce)
    gets the same HELLO_ACK again.  The last response is kept (with its request id, type
    and payload) across re-handshakes within this TSM process.
    """

    side = "tsm"
    _ACCEPTED = REQUESTS | {MsgType.HELLO}

    def __init__(self, secret: bytes, vm_id: str, boot_id: bytes,
                 rng: Callable[[int], bytes] = os.urandom,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(secret, vm_id, rng)
        if len(boot_id) != BOOT_ID_SIZE:
            raise ValueError(f"boot id must be {BOOT_ID_SIZE} bytes")
        self.boot_id = bytes(boot_id)
        self._clock = clock
        self._session: keys.Session | None = None
        #: pending handshakes by guest nonce: (session, HELLO_ACK frame, expiry), oldest first
        self._pending: dict[bytes, tuple[keys.Session, bytes, float]] = {}
        self._last: _CacheEntry | None = None

    @property
    def established(self) -> bool:
        """True once a guest request authenticated under a session (key confirmation)."""
        return self._session is not None

    def rehello(self) -> bytes:
        """A REHELLO frame (clear, seq 0, empty payload)."""
        return encode_frame(clear_body(MsgType.REHELLO, self.vm_id))

    def receive(self, body: bytes) -> Reply | Request | Cached:
        """Handle one frame body from the guest.  Raises :class:`~teeio.ghcx.GhcxReject`
        (counted, logged, nothing changed).  An encrypted frame while no session is
        established and none authenticates it is counted as ``no_session`` and answered
        with REHELLO."""
        try:
            return self._receive(body)
        except GhcxReject as e:
            self._count(e)
            raise

    def _authenticate(self, h: Header, body: bytes) -> tuple[keys.Session | None, bytes | None]:
        """The session (confirmed, else a pending one) under which *body* opens."""
        self._expire()
        pending = [p[0] for p in self._pending.values()]
        for candidate in (self._session, *pending):
            if candidate is not None:
                plaintext = candidate.open(h, body)
                if plaintext is not None:
                    return candidate, plaintext
        return None, None

    def _receive(self, body: bytes) -> Reply | Request | Cached:
        h = self._header(body, self._ACCEPTED)
        if h.mtype == MsgType.HELLO:
            return self._hello(h, body)
        if len(body) < HEADER_SIZE + TAG_SIZE:
            reject("malformed", "encrypted payload shorter than the tag")
        session, plaintext = self._authenticate(h, body)
        if session is None or plaintext is None:
            if self._session is None:
                # docs/ghcx.md "Handshake" 5: an unknown session gets REHELLO
                self.counters["no_session"] += 1
                self._log.info("%s without a session: REHELLO", h.mtype.name)
                return Reply(self.rehello())
            reject("forged", f"{h.mtype.name} seq {h.seq} does not authenticate")
        if h.seq <= session.recv_seq:
            reject("replay", f"seq {h.seq} <= last accepted {session.recv_seq}")
        if h.flags:
            reject("malformed", f"request flags 0x{h.flags:04x}")
        payload = decode_json(plaintext)
        rid = h.request_id
        cached = self._cached(session, h, plaintext)
        if rid == 0:
            reject("malformed", "request id 0 is the handshake's")
        # all checks passed: now the state changes
        session.recv_seq = h.seq
        session.last_request_id = rid
        if session is not self._session:
            self._session = session
            self._pending.clear()
            self._log.info("session confirmed by the guest")
        if cached is not None:
            assert cached.response is not None
            flags, rsp = cached.response
            self._log.info("request %d retried: cached response", rid)
            return Cached(session.seal(response_type(h.mtype), flags, self.vm_id, rid, rsp))
        self._last = _CacheEntry(rid, h.mtype, plaintext)
        return Request(h.mtype, rid, payload)

    def _cached(self, session: keys.Session, h: Header,
                plaintext: bytes) -> _CacheEntry | None:
        """The request id rules (docs/ghcx.md "Receiver rules"): the cache entry a retry is
        answered from, None for a new request, or ``replay``.  Changes nothing."""
        rid, last = h.request_id, self._last
        if last is not None and rid == last.request_id and session.last_request_id in (None, rid):
            same = last.mtype == h.mtype and last.plaintext == plaintext
            if same and last.response is None:
                reject("replay", f"request {rid} is still being served")
            if same:
                return last
            if session.last_request_id is not None:
                reject("replay", f"request id {rid} reused with another request")
            # else: the first request of a new session (a new guest process) that happens
            # to reuse the id: a new request
        elif session.last_request_id is not None and rid <= session.last_request_id:
            reject("replay", f"request id {rid} <= last {session.last_request_id}")
        return None

    def _expire(self) -> None:
        """Drop the pending handshakes whose time is up."""
        now = self._clock()
        for nonce in [n for n, p in self._pending.items() if p[2] <= now]:
            del self._pending[nonce]

    def _hello(self, h: Header, body: bytes) -> Reply:
        guest_nonce = self._clear_fields(h, body, NONCE_SIZE)
        self._expire()
        known = self._pending.get(guest_nonce)
        if known is not None:       # the same HELLO again (a retransmission, or a replay)
            return Reply(known[1])
        if len(self._pending) >= MAX_PENDING:
            reject("hello_limit", f"{MAX_PENDING} handshakes pending: HELLO not answered")
        tsm_nonce = self._rng(NONCE_SIZE)
        k = keys.derive_keys(self._secret, self.vm_id, guest_nonce, tsm_nonce, self.boot_id)
        header = Header(VERSION, MsgType.HELLO_ACK, 0, self.vm_id, 0, 0).encode()
        confirm = keys.confirm(k, header, guest_nonce, tsm_nonce, self.boot_id)
        ack = encode_frame(header + tsm_nonce + self.boot_id + confirm)
        self._pending[guest_nonce] = (keys.Session(k, guest=False), ack,
                                      self._clock() + PENDING_TTL)
        self._log.info("HELLO: pending session (%d pending)", len(self._pending))
        return Reply(ack)

    def respond(self, request: Request, payload: dict[str, Any] | None = None, *,
                error: str | None = None, message: str = "") -> bytes:
        """The response frame to *request* (an error response when *error* is given: flag
        ERROR, payload :class:`~teeio.ghcx.messages.ErrorReply`).  It is cached for retries.
        Raises :class:`~teeio.ghcx.GhcxReject` ``oversized`` (nothing changed: respond
        again, e.g. with an ``internal`` error) or ``no_session``."""
        if error is not None:
            if payload is not None:
                raise ValueError("an error response carries no payload")
            if error not in ERROR_CODES:
                raise ValueError(f"unknown GHCx error code {error!r}")
            flags, plaintext = FLAG_ERROR, encode_json(ErrorReply(error, message).encode())
        else:
            flags, plaintext = 0, encode_json({} if payload is None else payload)
        if self._session is None:
            raise GhcxReject("no_session", "no session to answer in")
        frame = self._session.seal(response_type(request.mtype), flags, self.vm_id,
                                   request.request_id, plaintext)
        last = self._last
        if last is not None and last.request_id == request.request_id and last.response is None:
            last.response = (flags, plaintext)
        return frame
