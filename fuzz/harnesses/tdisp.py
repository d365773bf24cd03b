"""TDISP messages (``teeio/tdisp/codec.py``): TdispDecodeError or a message that
re-encodes to its bytes."""

from __future__ import annotations

from fuzz import templates
from fuzz.runner import check
from teeio.tdisp.codec import TdispError, decode_message, from_vendor_payload, to_vendor_payload

KIND = "decoder"


def seeds() -> list[bytes]:
    msgs = templates.tdisp_requests() + templates.tdisp_responses()
    return [b"\0" + m for m in msgs] + [b"\1\1" + m for m in msgs[:3]]


def one_input(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] & 1:
            msg = from_vendor_payload(data[1:])
            check(to_vendor_payload(msg) == data[1:], "vendor payload round trip")
        else:
            msg = decode_message(data[1:])
            check(msg.encode() == data[1:], f"{type(msg).__name__} re-encodes differently")
        check(decode_message(msg.encode()) == msg, f"{type(msg).__name__} round trip")
    except TdispError:
        pass
