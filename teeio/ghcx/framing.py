"""GHCx framing: the 36-byte header, the stream frame and a resynchronising frame decoder.

Specification: ``docs/ghcx.md`` "Framing"::

    0   4  magic "GHCX"
    4   4  u32 LE body length L, HEADER_SIZE <= L <= MAX_BODY
    8   L  body = header (36 B, all of it the AES-GCM associated data) || payload

Header (little endian)::

    +0  u8   version (1)          +4  16 B  VM id, NUL-padded
    +1  u8   type (MsgType)       +20 u64   sequence number (per direction)
    +2  u16  flags (bit 0 ERROR)  +28 u64   request id
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from teeio.ghcx.defs import (
    FRAME_PREFIX,
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    VERSION,
    VM_ID_SIZE,
    MsgType,
    reject,
)

_U64_MAX = (1 << 64) - 1
_VM_NAME = re.compile(r"[A-Za-z0-9._-]{1,16}")
_HEADER = struct.Struct("<BBH16sQQ")


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
        :class:`~teeio.ghcx.GhcxReject`: ``malformed`` (short), ``version``,
        ``unknown_type``."""
        if len(body) < HEADER_SIZE:
            reject("malformed", f"body of {len(body)} bytes is shorter than the header")
        version, mtype, flags, vm_id, seq, rid = _HEADER.unpack_from(body)
        if version != VERSION:
            reject("version", f"version {version}")
        try:
            t = MsgType(mtype)
        except ValueError:
            reject("unknown_type", f"type 0x{mtype:02x}")
        return cls(version, t, flags, vm_id, seq, rid)


def encode_frame(body: bytes) -> bytes:
    """magic || u32 LE length || body (docs/ghcx.md "Framing")."""
    if not HEADER_SIZE <= len(body) <= MAX_BODY:
        raise ValueError(f"body of {len(body)} bytes is outside {HEADER_SIZE}..{MAX_BODY}")
    return MAGIC + len(body).to_bytes(4, "little") + body


def clear_body(mtype: MsgType, vm_id: bytes, payload: bytes = b"") -> bytes:
    """A clear handshake body: header with no flags, seq 0, request id 0, then *payload*."""
    return Header(VERSION, mtype, 0, vm_id, 0, 0).encode() + payload


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
