"""SPDM message codecs (``teeio/spdm/codec.py``): DecodeError (an SpdmError) or a value
whose encoding decodes back equal (reserved fields are ignored on receipt, so the bytes
may differ: decode(encode(decode(x))) == decode(x))."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from fuzz import templates
from fuzz.runner import check
from teeio.spdm import codec
from teeio.spdm.errors import SpdmError

KIND = "decoder"

Decoder = Callable[[bytes, codec.Negotiated, int], Any]


@lru_cache(maxsize=1)
def negotiated() -> codec.Negotiated:
    r = templates.rig()
    try:
        return r.req.negotiated
    finally:
        r.close()


def _decoder(cls: type[codec.SpdmMessage]) -> Decoder:
    # flags bit 0: DOE pad allowed; bit 1: a summary hash / signature was asked for
    return lambda b, neg, f: cls.decode_in(b, codec.Context(
        neg, summary=bool(f & 2), signed=bool(f & 2), pad=bool(f & 1)))


DECODERS: dict[int, Decoder] = {cls.CODE: _decoder(cls) for cls in codec.MESSAGES}
CODES = sorted(DECODERS)


def seeds() -> list[bytes]:
    negotiated()
    out = []
    for req, rsp in templates.spdm_transcript():
        out += [b"\0" + req, b"\1" + rsp, b"\3" + rsp]
    r = templates.rig()
    try:
        out += [b"\0" + m for m in templates.session_requests(r.req.version, r.rid)]
    finally:
        r.close()
    return out


def one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    flags, msg = data[0], data[1:]
    ctx = negotiated()
    # The code byte picks the decoder; bit 7 of flags lets a mismatched decoder see it too.
    code = msg[1] if not flags & 0x80 else CODES[msg[1] % len(CODES)]
    decode = DECODERS.get(code)
    if decode is None:
        with contextlib.suppress(SpdmError):
            codec.peek_header(msg)
        return
    try:
        value = decode(msg, ctx, flags)
    except SpdmError:
        return
    again = value.encode()
    check(decode(again, ctx, flags & ~1) == value, f"{type(value).__name__} round trip")
