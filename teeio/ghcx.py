"""GHCx (teeio-ghcx/1): the guest ⇄ TSM channel — codec and both ends' channel state, sans-IO.

Specification: ``docs/ghcx.md``.  No sockets, threads or clocks in here: the guest agent's
``guest_agent/ghcx_client.py`` and the TSM's per-VM server feed bytes in and write the
frames that come out.

Frame (docs/ghcx.md "Framing")::

    0   4  magic "GHCX"
    4   4  u32 LE body length L, HEADER_SIZE <= L <= MAX_BODY
    8   L  body = header (36 B, all of it the AES-GCM associated data) || payload

Header (little endian)::

    +0  u8   version (1)          +4  16 B  VM id, NUL-padded
    +1  u8   type (MsgType)       +20 u64   sequence number (per direction)
    +2  u16  flags (bit 0 ERROR)  +28 u64   request id

Handshake (docs/ghcx.md "Handshake"): HELLO(guest nonce) → HELLO_ACK(TSM nonce || boot id
|| confirm); keys from HKDF-SHA384 over the per-VM secret; REHELLO (clear) is the TSM's
hint that it does not know the session.  Encrypted messages (docs/ghcx.md "Messages"):
AES-256-GCM, nonce = iv XOR seq, plaintext one JSON object.

Every rejected frame raises :class:`GhcxReject` with a reason from :data:`REASONS`, is
counted in the channel's ``counters`` and logged (never with key material), and changes no
channel state (docs/ghcx.md "Receiver rules").
"""

from __future__ import annotations

import enum
import hmac
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "BOOT_ID_SIZE", "ERROR_CODES", "FLAG_ERROR", "FW_CFG_SECRET", "FW_CFG_VM_ID",
    "HEADER_SIZE", "MAGIC", "MAX_BODY", "MAX_PENDING", "MAX_PLAINTEXT", "NONCE_SIZE",
    "PENDING_TTL", "PORT_NAME",
    "REASONS", "REQUESTS", "RESPONSES", "SECRET_SIZE", "TAG_SIZE", "VERSION", "VM_ID_SIZE",
    "Cached", "FrameDecoder", "GhcxReject", "GuestChannel", "Header", "Incoming", "MsgType",
    "Reply", "Request", "Response", "SessionKeys", "TsmChannel", "derive_keys",
    "encode_frame", "response_type", "vm_id_bytes",
]

log = logging.getLogger(__name__)

# -- definitions (docs/ghcx.md) ------------------------------------------------------------------

MAGIC = b"GHCX"
VERSION = 1
HEADER_SIZE = 36
MAX_BODY = 65536
SECRET_SIZE = 32
VM_ID_SIZE = 16
NONCE_SIZE = 32
BOOT_ID_SIZE = 16
TAG_SIZE = 16
CONFIRM_SIZE = 16
MAX_PLAINTEXT = MAX_BODY - HEADER_SIZE - TAG_SIZE
FRAME_PREFIX = 8                       # magic + u32 length
FLAG_ERROR = 1                         # header flags bit 0: a response carrying an error
FW_CFG_SECRET = "opt/org.teeio/ghcx-secret"
FW_CFG_VM_ID = "opt/org.teeio/vm-id"
PORT_NAME = "org.teeio.ghcx.0"
KEY_INFO = b"teeio-ghcx/1 keys"
KEY_MATERIAL = 88                      # k_g2t(32) || k_t2g(32) || iv_g2t(12) || iv_t2g(12)
_U64_MAX = (1 << 64) - 1
_VM_NAME = re.compile(r"[A-Za-z0-9._-]{1,16}")
_HEADER = struct.Struct("<BBH16sQQ")

# Error codes of an error response (docs/ghcx.md "Messages").
ERROR_CODES = frozenset({"bad_request", "unknown_request", "refused", "state", "mismatch",
                         "internal", "device"})
# Rejection reasons (docs/ghcx.md "Receiver rules"; "handshake": a HELLO_ACK that does not
# confirm, or a frame that is not the HELLO_ACK the guest waits for).
REASONS = ("malformed", "version", "unknown_type", "cross_vm", "forged", "replay", "unbound",
           "no_session", "oversized", "handshake", "hello_limit")
#: The TSM keeps at most this many pending handshakes per VM (docs/ghcx.md "Handshake" 6) ...
MAX_PENDING = 4
#: ... each for at most this long (seconds) unless the guest's first request confirms it;
#: a HELLO while all are taken is not answered (rejected ``hello_limit``).
PENDING_TTL = 10.0


class MsgType(enum.IntEnum):
    """Message types (docs/ghcx.md "Handshake", "Messages"); a response is request | 0x80."""

    HELLO = 0x01
    HELLO_ACK = 0x02
    REHELLO = 0x7F
    TDI_LOCK = 0x10
    TDI_INFO = 0x11
    GET_EVIDENCE = 0x12
    TDI_ACCEPT = 0x13
    DMA_ACCEPT = 0x14
    DMA_RELEASE = 0x15
    TDI_STOP = 0x16
    STATUS = 0x17
    TDI_LOCK_RESPONSE = 0x90
    TDI_INFO_RESPONSE = 0x91
    GET_EVIDENCE_RESPONSE = 0x92
    TDI_ACCEPT_RESPONSE = 0x93
    DMA_ACCEPT_RESPONSE = 0x94
    DMA_RELEASE_RESPONSE = 0x95
    TDI_STOP_RESPONSE = 0x96
    STATUS_RESPONSE = 0x97


REQUESTS: frozenset[MsgType] = frozenset(t for t in MsgType if 0x10 <= t <= 0x17)
RESPONSES: frozenset[MsgType] = frozenset(MsgType(t | 0x80) for t in REQUESTS)


def response_type(t: int) -> MsgType:
    """The response type of request type *t* (request | 0x80)."""
    if t not in REQUESTS:
        raise ValueError(f"0x{t:02x} is not a GHCx request type")
    return MsgType(t | 0x80)


class GhcxReject(Exception):
    """A frame this end does not accept; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown GHCx rejection reason {reason!r}")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}" if message else reason)


def _reject(reason: str, message: str) -> NoReturn:
    raise GhcxReject(reason, message)


# -- header and frame -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """The 36-byte header (docs/ghcx.md "Framing"); all of it is the AEAD associated data."""

    version: int
    mtype: MsgType
    flags: int
    vm_id: bytes
    seq: int
    request_id: int

    def encode(self) -> bytes:
        if len(self.vm_id) != VM_ID_SIZE:
            raise ValueError(f"VM id must be {VM_ID_SIZE} bytes")
        if not (0 <= self.seq <= _U64_MAX and 0 <= self.request_id <= _U64_MAX):
            raise ValueError("sequence number and request id are u64")
        return _HEADER.pack(self.version, self.mtype, self.flags, self.vm_id, self.seq,
                            self.request_id)

    @classmethod
    def decode(cls, body: bytes) -> Header:
        """The header at the start of *body* (header || payload).  Raises
        :class:`GhcxReject`: ``malformed`` (short), ``version``, ``unknown_type``."""
        if len(body) < HEADER_SIZE:
            _reject("malformed", f"body of {len(body)} bytes is shorter than the header")
        version, mtype, flags, vm_id, seq, rid = _HEADER.unpack_from(body)
        if version != VERSION:
            _reject("version", f"version {version}")
        try:
            t = MsgType(mtype)
        except ValueError:
            _reject("unknown_type", f"type 0x{mtype:02x}")
        return cls(version, t, flags, vm_id, seq, rid)


def encode_frame(body: bytes) -> bytes:
    """magic || u32 LE length || body (docs/ghcx.md "Framing")."""
    if not HEADER_SIZE <= len(body) <= MAX_BODY:
        raise ValueError(f"body of {len(body)} bytes is outside {HEADER_SIZE}..{MAX_BODY}")
    return MAGIC + len(body).to_bytes(4, "little") + body


def vm_id_bytes(name: str) -> bytes:
    """The wire form of VM id *name* (``[A-Za-z0-9._-]``, 1..16 bytes): NUL-padded to 16."""
    if not isinstance(name, str) or not _VM_NAME.fullmatch(name):
        raise ValueError(f"bad VM id {name!r}: 1-16 characters of [A-Za-z0-9._-]")
    return name.encode("ascii").ljust(VM_ID_SIZE, b"\0")


class FrameDecoder:
    """Byte stream → frame bodies.  A bad magic or a length outside
    HEADER_SIZE..MAX_BODY discards bytes up to the next ``GHCX`` (docs/ghcx.md "Framing");
    every discarded byte is counted in ``dropped_bytes``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.dropped_bytes = 0
        self.counters: dict[str, int] = {"frames": 0, "bad_magic": 0, "bad_length": 0}

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def _drop(self, n: int) -> None:
        del self._buf[:n]
        self.dropped_bytes += n

    def feed(self, data: bytes) -> list[bytes]:
        """Append *data*; return the complete frame bodies now available, in order."""
        self._buf += data
        out: list[bytes] = []
        while self._buf:
            if len(self._buf) < len(MAGIC) and MAGIC.startswith(self._buf):
                break                                   # wait for the rest of the magic
            if not self._buf.startswith(MAGIC):
                self.counters["bad_magic"] += 1
                self._resync()
                continue
            if len(self._buf) < FRAME_PREFIX:
                break
            length = int.from_bytes(self._buf[4:8], "little")
            if not HEADER_SIZE <= length <= MAX_BODY:
                self.counters["bad_length"] += 1
                self._resync()
                continue
            if len(self._buf) < FRAME_PREFIX + length:
                break
            out.append(bytes(self._buf[FRAME_PREFIX:FRAME_PREFIX + length]))
            del self._buf[:FRAME_PREFIX + length]
            self.counters["frames"] += 1
        return out

    def _resync(self) -> None:
        """Drop bytes up to the next magic after offset 0, keeping a tail that may be the
        start of one."""
        at = self._buf.find(MAGIC, 1)
        if at < 0:
            buf = self._buf
            keep = next((k for k in (3, 2, 1)
                         if len(buf) > k and MAGIC.startswith(buf[-k:])), 0)
            at = len(buf) - keep
        self._drop(at)

    def discard_partial(self) -> int:
        """Drop a partly received frame (e.g. after a timeout: a forged length must not
        stall the stream until MAX_BODY more bytes arrive); returns the bytes dropped."""
        n = len(self._buf)
        self._drop(n)
        return n


# -- keys (docs/ghcx.md "Handshake" 3-4) ----------------------------------------------------------

@dataclass(frozen=True)
class SessionKeys:
    """One session's AEAD keys and IVs; ``repr`` shows none of them."""

    k_g2t: bytes = field(repr=False)
    k_t2g: bytes = field(repr=False)
    iv_g2t: bytes = field(repr=False)
    iv_t2g: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "SessionKeys(<hidden>)"

    __str__ = __repr__


def derive_keys(secret: bytes, vm_id: bytes, guest_nonce: bytes, tsm_nonce: bytes,
                boot_id: bytes) -> SessionKeys:
    """HKDF-SHA384(ikm=secret, salt=guest_nonce || tsm_nonce,
    info="teeio-ghcx/1 keys" || vm_id || boot_id) → 88 bytes (docs/ghcx.md "Handshake" 3)."""
    for what, value, size in (("secret", secret, SECRET_SIZE), ("VM id", vm_id, VM_ID_SIZE),
                              ("guest nonce", guest_nonce, NONCE_SIZE),
                              ("TSM nonce", tsm_nonce, NONCE_SIZE),
                              ("boot id", boot_id, BOOT_ID_SIZE)):
        if len(value) != size:
            raise ValueError(f"{what} must be {size} bytes")
    okm = HKDF(algorithm=hashes.SHA384(), length=KEY_MATERIAL, salt=guest_nonce + tsm_nonce,
               info=KEY_INFO + vm_id + boot_id).derive(secret)
    return SessionKeys(okm[0:32], okm[32:64], okm[64:76], okm[76:88])


def _confirm(keys: SessionKeys, ack_header: bytes, guest_nonce: bytes, tsm_nonce: bytes,
             boot_id: bytes) -> bytes:
    """The HELLO_ACK key confirmation: the GCM tag over an empty plaintext
    (docs/ghcx.md "Handshake" 4)."""
    return AESGCM(keys.k_t2g).encrypt(keys.iv_t2g, b"",
                                      ack_header + guest_nonce + tsm_nonce + boot_id)


def _nonce(iv: bytes, seq: int) -> bytes:
    """iv XOR (seq as 12 bytes big endian) (docs/ghcx.md "Messages")."""
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))


class _Session:
    """Keys and sequence numbers of one session, as seen from one end."""

    def __init__(self, keys: SessionKeys, guest: bool) -> None:
        self._send_key = AESGCM(keys.k_g2t if guest else keys.k_t2g)
        self._recv_key = AESGCM(keys.k_t2g if guest else keys.k_g2t)
        self._send_iv = keys.iv_g2t if guest else keys.iv_t2g
        self._recv_iv = keys.iv_t2g if guest else keys.iv_g2t
        self.send_seq = 0                # last sequence number sent; frames count from 1
        self.recv_seq = 0                # last accepted; the handshake took 0
        self.last_request_id: int | None = None     # TSM: within this session

    def __repr__(self) -> str:
        return f"_Session(send_seq={self.send_seq}, recv_seq={self.recv_seq})"

    def seal(self, mtype: MsgType, flags: int, vm_id: bytes, request_id: int,
             plaintext: bytes) -> bytes:
        """One encrypted frame with the next sequence number."""
        if len(plaintext) > MAX_PLAINTEXT:
            _reject("oversized", f"{len(plaintext)}-byte payload (at most {MAX_PLAINTEXT})")
        seq = self.send_seq + 1
        header = Header(VERSION, mtype, flags, vm_id, seq, request_id).encode()
        body = header + self._send_key.encrypt(_nonce(self._send_iv, seq), plaintext, header)
        self.send_seq = seq
        return encode_frame(body)

    def open(self, header: Header, body: bytes) -> bytes | None:
        """The plaintext, or None if the AEAD does not open.  Changes nothing."""
        try:
            return self._recv_key.decrypt(_nonce(self._recv_iv, header.seq),
                                          body[HEADER_SIZE:], body[:HEADER_SIZE])
        except InvalidTag:
            return None


def _encode_json(payload: dict[str, Any]) -> bytes:
    if not isinstance(payload, dict):
        raise TypeError("a GHCx payload is a JSON object (dict)")
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _decode_json(plaintext: bytes) -> dict[str, Any]:
    """One UTF-8 JSON object (docs/ghcx.md "Messages"), else ``malformed``."""
    try:
        value = json.loads(plaintext.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        _reject("malformed", f"payload is not JSON: {type(e).__name__}")
    if not isinstance(value, dict):
        _reject("malformed", f"payload is a JSON {type(value).__name__}, not an object")
    return value


def _clear_body(mtype: MsgType, vm_id: bytes, payload: bytes = b"") -> bytes:
    return Header(VERSION, mtype, 0, vm_id, 0, 0).encode() + payload


class _Endpoint:
    """What both ends share: VM id, secret, counters, the common header checks."""

    side: ClassVar[str]

    def __init__(self, secret: bytes, vm_id: str, rng: Callable[[int], bytes]) -> None:
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"the GHCx secret must be {SECRET_SIZE} bytes")
        self.vm_name = vm_id
        self.vm_id = vm_id_bytes(vm_id)
        self._secret = bytes(secret)
        self._rng = rng
        self.counters: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._log = log.getChild(f"{self.side}.{vm_id}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vm_id={self.vm_name!r}, established={self.established})"

    @property
    def established(self) -> bool:
        raise NotImplementedError

    def _count(self, e: GhcxReject) -> None:
        self.counters[e.reason] += 1
        if e.reason == "hello_limit" and self.counters[e.reason] > 1:
            self._log.debug("rejected frame: %s", e)     # a flood: warned of once
        else:
            self._log.warning("rejected frame: %s", e)

    def _header(self, body: bytes, accepted: frozenset[MsgType]) -> Header:
        """Receiver rules up to the VM id (docs/ghcx.md "Receiver rules"): size, version,
        a type this end receives, the channel's VM id."""
        if len(body) > MAX_BODY:
            _reject("oversized", f"body of {len(body)} bytes")
        h = Header.decode(body)
        if h.mtype not in accepted:
            _reject("unknown_type", f"{h.mtype.name} is not received by the {self.side}")
        if h.vm_id != self.vm_id:
            _reject("cross_vm", f"VM id {h.vm_id.rstrip(bytes(1))!r}")
        return h

    @staticmethod
    def _clear_fields(h: Header, body: bytes, payload_size: int) -> bytes:
        """A clear handshake frame: no flags, seq 0, request id 0, exact payload size."""
        if h.flags or h.seq or h.request_id:
            _reject("malformed", f"{h.mtype.name} with flags/seq/request id set")
        payload = body[HEADER_SIZE:]
        if len(payload) != payload_size:
            _reject("malformed", f"{h.mtype.name} payload of {len(payload)} bytes")
        return payload


# -- guest end ------------------------------------------------------------------------------------

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


class GuestChannel(_Endpoint):
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
        self._session: _Session | None = None
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
        return encode_frame(_clear_body(MsgType.HELLO, self.vm_id, self._guest_nonce))

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
            _reject("handshake", f"{h.mtype.name} while waiting for HELLO_ACK")
        if self._guest_nonce is None:
            _reject("handshake", "HELLO_ACK without an outstanding HELLO")
        payload = self._clear_fields(h, body, NONCE_SIZE + BOOT_ID_SIZE + CONFIRM_SIZE)
        tsm_nonce = payload[:NONCE_SIZE]
        boot_id = payload[NONCE_SIZE:NONCE_SIZE + BOOT_ID_SIZE]
        confirm = payload[NONCE_SIZE + BOOT_ID_SIZE:]
        keys = derive_keys(self._secret, self.vm_id, self._guest_nonce, tsm_nonce, boot_id)
        expected = _confirm(keys, body[:HEADER_SIZE], self._guest_nonce, tsm_nonce, boot_id)
        if not hmac.compare_digest(confirm, expected):
            _reject("handshake", "HELLO_ACK key confirmation does not match")
        self._session = _Session(keys, guest=True)
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
        plaintext = _encode_json(payload)
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
        :meth:`hello` again).  Raises :class:`GhcxReject`."""
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
            _reject("handshake", "HELLO_ACK outside a handshake")
        session = self._session
        if session is None:
            _reject("no_session", f"{h.mtype.name} without a session")
        if len(body) < HEADER_SIZE + TAG_SIZE:
            _reject("malformed", "encrypted payload shorter than the tag")
        plaintext = session.open(h, body)
        if plaintext is None:
            _reject("forged", f"{h.mtype.name} seq {h.seq} does not authenticate")
        if h.seq <= session.recv_seq:
            _reject("replay", f"seq {h.seq} <= last accepted {session.recv_seq}")
        out = self._outstanding
        if out is None or h.request_id != out.request_id or h.mtype != response_type(out.mtype):
            _reject("unbound", f"{h.mtype.name} for request {h.request_id}, outstanding: "
                    f"{f'{out.mtype.name} {out.request_id}' if out else 'none'}")
        if h.flags & ~FLAG_ERROR:
            _reject("malformed", f"flags 0x{h.flags:04x}")
        payload = _decode_json(plaintext)
        error: str | None = None
        message = ""
        if h.flags & FLAG_ERROR:
            error, message = payload.get("error"), payload.get("message", "")
            if not isinstance(error, str) or not isinstance(message, str):
                _reject("malformed", "error response without error/message strings")
        # all checks passed: now the state changes
        session.recv_seq = h.seq
        self._outstanding = None
        return Response(h.mtype, h.request_id, payload, error, message)

    def _session_or_raise(self) -> _Session:
        if self._session is None:
            raise GhcxReject("no_session", "no session: run the handshake first")
        return self._session


# -- TSM end --------------------------------------------------------------------------------------

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


class TsmChannel(_Endpoint):
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
        self._session: _Session | None = None
        #: pending handshakes by guest nonce: (session, HELLO_ACK frame, expiry), oldest first
        self._pending: dict[bytes, tuple[_Session, bytes, float]] = {}
        self._last: _CacheEntry | None = None

    @property
    def established(self) -> bool:
        """True once a guest request authenticated under a session (key confirmation)."""
        return self._session is not None

    def rehello(self) -> bytes:
        """A REHELLO frame (clear, seq 0, empty payload)."""
        return encode_frame(_clear_body(MsgType.REHELLO, self.vm_id))

    def receive(self, body: bytes) -> Reply | Request | Cached:
        """Handle one frame body from the guest.  Raises :class:`GhcxReject` (counted,
        logged, nothing changed).  An encrypted frame while no session is established and
        none authenticates it is counted as ``no_session`` and answered with REHELLO."""
        try:
            return self._receive(body)
        except GhcxReject as e:
            self._count(e)
            raise

    def _receive(self, body: bytes) -> Reply | Request | Cached:
        h = self._header(body, self._ACCEPTED)
        if h.mtype == MsgType.HELLO:
            return self._hello(h, body)
        if len(body) < HEADER_SIZE + TAG_SIZE:
            _reject("malformed", "encrypted payload shorter than the tag")
        session: _Session | None = None
        plaintext: bytes | None = None
        self._expire()
        pending = [p[0] for p in self._pending.values()]
        for candidate in (self._session, *pending):
            if candidate is not None:
                plaintext = candidate.open(h, body)
                if plaintext is not None:
                    session = candidate
                    break
        if session is None or plaintext is None:
            if self._session is None:
                # docs/ghcx.md "Handshake" 5: an unknown session gets REHELLO
                self.counters["no_session"] += 1
                self._log.info("%s without a session: REHELLO", h.mtype.name)
                return Reply(self.rehello())
            _reject("forged", f"{h.mtype.name} seq {h.seq} does not authenticate")
        if h.seq <= session.recv_seq:
            _reject("replay", f"seq {h.seq} <= last accepted {session.recv_seq}")
        if h.flags:
            _reject("malformed", f"request flags 0x{h.flags:04x}")
        payload = _decode_json(plaintext)
        rid = h.request_id
        last = self._last
        cached: _CacheEntry | None = None
        if last is not None and rid == last.request_id and session.last_request_id in (None, rid):
            same = last.mtype == h.mtype and last.plaintext == plaintext
            if same and last.response is None:
                _reject("replay", f"request {rid} is still being served")
            if same:
                cached = last
            elif session.last_request_id is not None:
                _reject("replay", f"request id {rid} reused with another request")
            # else: the first request of a new session (a new guest process) that happens
            # to reuse the id: a new request
        elif session.last_request_id is not None and rid <= session.last_request_id:
            _reject("replay", f"request id {rid} <= last {session.last_request_id}")
        if rid == 0:
            _reject("malformed", "request id 0 is the handshake's")
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
            _reject("hello_limit", f"{MAX_PENDING} handshakes pending: HELLO not answered")
        tsm_nonce = self._rng(NONCE_SIZE)
        keys = derive_keys(self._secret, self.vm_id, guest_nonce, tsm_nonce, self.boot_id)
        header = Header(VERSION, MsgType.HELLO_ACK, 0, self.vm_id, 0, 0).encode()
        confirm = _confirm(keys, header, guest_nonce, tsm_nonce, self.boot_id)
        ack = encode_frame(header + tsm_nonce + self.boot_id + confirm)
        self._pending[guest_nonce] = (_Session(keys, guest=False), ack,
                                      self._clock() + PENDING_TTL)
        self._log.info("HELLO: pending session (%d pending)", len(self._pending))
        return Reply(ack)

    def respond(self, request: Request, payload: dict[str, Any] | None = None, *,
                error: str | None = None, message: str = "") -> bytes:
        """The response frame to *request* (an error response when *error* is given: flag
        ERROR, payload ``{"error": error, "message": message}``).  It is cached for retries.
        Raises :class:`GhcxReject` ``oversized`` (nothing changed: respond again, e.g. with
        an ``internal`` error) or ``no_session``."""
        if error is not None:
            if payload is not None:
                raise ValueError("an error response carries no payload")
            if error not in ERROR_CODES:
                raise ValueError(f"unknown GHCx error code {error!r}")
            flags, plaintext = FLAG_ERROR, _encode_json({"error": error, "message": message})
        else:
            flags, plaintext = 0, _encode_json({} if payload is None else payload)
        if self._session is None:
            raise GhcxReject("no_session", "no session to answer in")
        frame = self._session.seal(response_type(request.mtype), flags, self.vm_id,
                                   request.request_id, plaintext)
        last = self._last
        if last is not None and last.request_id == request.request_id and last.response is None:
            last.response = (flags, plaintext)
        return frame
