"""The guest's end of a GHCx channel, sans-IO: HELLO, the HELLO_ACK check, sealed requests
with request ids, retries and the response checks.

Specification: ``docs/ghcx.md`` "Handshake" 1-5 and "Receiver rules".
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teeio.ghcx import keys
from teeio.ghcx.body import MessageError
from teeio.ghcx.defs import (
    BOOT_ID_SIZE,
    CONFIRM_SIZE,
    FLAG_ERROR,
    HEADER_SIZE,
    NONCE_SIZE,
    REQUESTS,
    RESPONSES,
    TAG_SIZE,
    GhcxReject,
    MsgType,
    reject,
    response_type,
)
from teeio.ghcx.endpoint import Endpoint, decode_json, encode_json
from teeio.ghcx.framing import clear_body, encode_frame
from teeio.ghcx.messages import ErrorReply


@dataclass(frozen=True)
class Response:
    """A response the guest accepted; ``error``/``message`` are set on an error response
    (flag ERROR, payload ``{"error": CODE, "message": TEXT}``)."""

    mtype: MsgType
    request_id: int
    payload: dict[str, Any]
    error: str | None = None
    message: str = ""


@dataclass
class _Outstanding:
    request_id: int
    mtype: MsgType
    plaintext: bytes = field(repr=False)


class GuestChannel(Endpoint):
    """The guest's end.  One request is outstanding at a time.

    Request ids start at a random value and keep growing across this channel's own
    re-handshakes, and the outstanding request survives :meth:`hello`, so that after a
    REHELLO the same request is retried (:meth:`retry`) in the new session and the TSM
    answers it from its cache (docs/ghcx.md "Receiver rules", last paragraph).
    """

    side = "guest"
    _ACCEPTED = RESPONSES | {MsgType.REHELLO, MsgType.HELLO_ACK}

    def __init__(self, secret: bytes, vm_id: str,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        super().__init__(secret, vm_id, rng)
        self.boot_id: bytes | None = None
        self._session: keys.Session | None = None
        self._guest_nonce: bytes | None = None
        self._outstanding: _Outstanding | None = None
        self._next_request_id = 1 + int.from_bytes(rng(8), "little") % (1 << 62)

    @property
    def established(self) -> bool:
        return self._session is not None

    @property
    def outstanding(self) -> int | None:
        """The request id awaiting its response, if any."""
        return self._outstanding.request_id if self._outstanding else None

    def hello(self) -> bytes:
        """A HELLO frame with a fresh guest nonce; drops the current session
        (docs/ghcx.md "Handshake" 1)."""
        self._session = None
        self._guest_nonce = self._rng(NONCE_SIZE)
        return encode_frame(clear_body(MsgType.HELLO, self.vm_id, self._guest_nonce))

    def accept_hello_ack(self, body: bytes) -> bytes:
        """Check the HELLO_ACK's key confirmation, set up the session and return the TSM
        boot id (docs/ghcx.md "Handshake" 2-4)."""
        try:
            return self._accept_hello_ack(body)
        except GhcxReject as e:
            self._count(e)
            raise

    def _accept_hello_ack(self, body: bytes) -> bytes:
        h = self._header(body, self._ACCEPTED)
        if h.mtype != MsgType.HELLO_ACK:
            reject("handshake", f"{h.mtype.name} while waiting for HELLO_ACK")
        if self._guest_nonce is None:
            reject("handshake", "HELLO_ACK without an outstanding HELLO")
        payload = self._clear_fields(h, body, NONCE_SIZE + BOOT_ID_SIZE + CONFIRM_SIZE)
        tsm_nonce = payload[:NONCE_SIZE]
        boot_id = payload[NONCE_SIZE:NONCE_SIZE + BOOT_ID_SIZE]
        confirm = payload[NONCE_SIZE + BOOT_ID_SIZE:]
        k = keys.derive_keys(self._secret, self.vm_id, self._guest_nonce, tsm_nonce, boot_id)
        expected = keys.confirm(k, body[:HEADER_SIZE], self._guest_nonce, tsm_nonce, boot_id)
        if not hmac.compare_digest(confirm, expected):
            reject("handshake", "HELLO_ACK key confirmation does not match")
        self._session = keys.Session(k, guest=True)
        self._guest_nonce = None
        self.boot_id = boot_id
        self._log.info("session established, TSM boot id %s", boot_id.hex())
        return boot_id

    def request(self, mtype: MsgType, payload: dict[str, Any]) -> tuple[int, bytes]:
        """Seal request *mtype* with the next request id; returns (request id, frame).
        It replaces any outstanding request."""
        if mtype not in REQUESTS:
            raise ValueError(f"{mtype!r} is not a GHCx request")
        session = self._session_or_raise()
        plaintext = encode_json(payload)
        rid = self._next_request_id
        frame = session.seal(MsgType(mtype), 0, self.vm_id, rid, plaintext)
        self._next_request_id += 1
        self._outstanding = _Outstanding(rid, MsgType(mtype), plaintext)
        return rid, frame

    def retry(self, request_id: int) -> bytes:
        """The outstanding request again: same request id and payload, next sequence
        number (possibly in a new session)."""
        out = self._outstanding
        if out is None or out.request_id != request_id:
            raise ValueError(f"request {request_id} is not outstanding")
        return self._session_or_raise().seal(out.mtype, 0, self.vm_id, out.request_id,
                                             out.plaintext)

    def open(self, body: bytes) -> Response | MsgType:
        """The response to the outstanding request, or ``MsgType.REHELLO`` (a hint: run
        :meth:`hello` again).  Raises :class:`~teeio.ghcx.GhcxReject`."""
        try:
            return self._open(body)
        except GhcxReject as e:
            self._count(e)
            raise

    def _open(self, body: bytes) -> Response | MsgType:
        h = self._header(body, self._ACCEPTED)
        if h.mtype == MsgType.REHELLO:
            self._clear_fields(h, body, 0)
            self._log.info("REHELLO from the TSM")
            return MsgType.REHELLO
        if h.mtype == MsgType.HELLO_ACK:
            reject("handshake", "HELLO_ACK outside a handshake")
        session = self._session
        if session is None:
            reject("no_session", f"{h.mtype.name} without a session")
        if len(body) < HEADER_SIZE + TAG_SIZE:
            reject("malformed", "encrypted payload shorter than the tag")
        plaintext = session.open(h, body)
        if plaintext is None:
            reject("forged", f"{h.mtype.name} seq {h.seq} does not authenticate")
        if h.seq <= session.recv_seq:
            reject("replay", f"seq {h.seq} <= last accepted {session.recv_seq}")
        out = self._outstanding
        if out is None or h.request_id != out.request_id or h.mtype != response_type(out.mtype):
            reject("unbound", f"{h.mtype.name} for request {h.request_id}, outstanding: "
                   f"{f'{out.mtype.name} {out.request_id}' if out else 'none'}")
        if h.flags & ~FLAG_ERROR:
            reject("malformed", f"flags 0x{h.flags:04x}")
        payload = decode_json(plaintext)
        error: str | None = None
        message = ""
        if h.flags & FLAG_ERROR:
            try:
                reply = ErrorReply.decode(payload)
            except MessageError as e:
                reject("malformed", f"error response: {e}")
            error, message = reply.error, reply.message
        # all checks passed: now the state changes
        session.recv_seq = h.seq
        self._outstanding = None
        return Response(h.mtype, h.request_id, payload, error, message)

    def _session_or_raise(self) -> keys.Session:
        if self._session is None:
            raise GhcxReject("no_session", "no session: run the handshake first")
        return self._session
