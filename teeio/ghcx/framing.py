"""GHCx framing (docs/ghcx.md "Framing"): the 36-byte header, the stream frame and a
resynchronising frame decoder.

Both are declared once on :mod:`teeio.codec`; their decode errors are its
:class:`~teeio.codec.DecodeError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from teeio.codec import DecodeError, Reader, Struct, data, fixed, u8, u16, u32, u64
from teeio.ghcx.defs import (
    FRAME_PREFIX,
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    VERSION,
    VM_ID_SIZE,
    GhcxReject,
    MsgType,
    reject,
)

_VM_NAME = re.compile(r"[A-Za-z0-9._-]{1,16}")


@dataclass(frozen=True)
class FramePrefix(Struct):
    """What precedes a frame body on the stream: magic and body length (docs/ghcx.md
    "Framing")."""

    magic: int = fixed(len(MAGIC), int.from_bytes(MAGIC, "big"), big=True)
    length: int = u32(valid=lambda n: HEADER_SIZE <= n <= MAX_BODY)


@dataclass(frozen=True)
class Header(Struct):
    """The 36-byte header (docs/ghcx.md "Framing"); all of it is the AEAD associated data."""

    version: int = u8(valid=lambda v: v == VERSION)
    mtype: MsgType = u8(kind=MsgType)
    flags: int = u16()
    vm_id: bytes = data(VM_ID_SIZE)
    seq: int = u64()
    request_id: int = u64()

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview, ctx: object = None) -> Header:
        """The header at the start of *body* (header || payload).  Raises
        :class:`~teeio.ghcx.GhcxReject` ``malformed`` (short), ``version`` or
        ``unknown_type``, caused by the codec's :class:`~teeio.codec.DecodeError`."""
        if len(body) < HEADER_SIZE:
            reject("malformed", f"body of {len(body)} bytes is shorter than the header")
        try:
            return cls.pull(Reader(body), ctx)
        except DecodeError as exc:
            reason = _REJECT_AT.get(exc.offset, "malformed")
            raise GhcxReject(reason, exc.reason) from exc


#: The rejection reason of a header field that does not decode, by its offset.
_REJECT_AT = {0: "version", 1: "unknown_type"}


def encode_frame(body: bytes) -> bytes:
    """magic || u32 LE length || body (docs/ghcx.md "Framing")."""
    if not HEADER_SIZE <= len(body) <= MAX_BODY:
        raise ValueError(f"body of {len(body)} bytes is outside {HEADER_SIZE}..{MAX_BODY}")
    return FramePrefix(length=len(body)).encode() + body


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
            try:
                length = FramePrefix.decode(bytes(self._buf[:FRAME_PREFIX])).length
            except DecodeError:
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
