"""Secured SPDM records (``teeio/spdm/secured.py``): SecuredMessageError or the
application message; a record sealed with fuzzed content and header fields opens to it."""

from __future__ import annotations

from fuzz.runner import Bytes, check
from teeio.spdm.key_schedule import TrafficKeys
from teeio.spdm.secured import (
    SecuredMessageError,
    decode_record,
    encode_record,
    peek_session_id,
)

KIND = "decoder"
KEYS = TrafficKeys(b"s" * 48, bytes(range(32)), bytes(range(12)))


def seeds() -> list[bytes]:
    out = []
    for seq in (0, 1, 7):
        for size in (0, 2):
            rec = encode_record(0xFFFE0001, KEYS, seq, bytes.fromhex("12e80000"), size)
            out.append(bytes((0, seq, size)) + rec)
            out.append(bytes((1, seq, size)) + bytes.fromhex("12e80000"))
    return out


def one_input(data: bytes) -> None:
    b = Bytes(data)
    mode, seq, size = b.u8() % 3, b.u8(), b.u8() % 3 * 2
    body = b.rest()
    try:
        if mode == 0:
            peek_session_id(body)
            decode_record(body, KEYS, seq, size)
        elif mode == 1:
            rec = encode_record(0x1234, KEYS, seq, body, size)
            check(decode_record(rec, KEYS, seq, size) == body, "sealed record round trip")
            check(peek_session_id(rec) == 0x1234, "session id")
        else:
            # a sealed record whose clear header is then damaged
            damaged = bytearray(encode_record(0x1234, KEYS, seq, b"\x12\xe8\0\0", size))
            for i, v in enumerate(body[:8]):
                damaged[v % len(damaged)] ^= 1 << (i % 8)
            decode_record(bytes(damaged) + body[8:], KEYS, seq, size)
    except SecuredMessageError:
        pass
