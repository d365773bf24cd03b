"""GHCx framing and header (``teeio/ghcx/framing.py``): the frame decoder never raises and
only returns bodies within bounds, whatever the byte stream and however it is split; the
header decoder raises GhcxReject or re-encodes to its bytes."""

from __future__ import annotations

from fuzz.runner import check
from teeio import ghcx

KIND = "decoder"
VM = ghcx.vm_id_bytes("vm0")


def seeds() -> list[bytes]:
    h = ghcx.Header(ghcx.VERSION, ghcx.MsgType.HELLO, 0, VM, 0, 0).encode()
    frame = ghcx.encode_frame(h + bytes(32))
    return [b"\x05" + frame, b"\x03" + frame + frame[:10], b"\x10" + b"xx" + frame * 2]


def one_input(data: bytes) -> None:
    if not data:
        return
    split, stream = data[0] or 1, data[1:]
    dec = ghcx.FrameDecoder()
    bodies: list[bytes] = []
    for i in range(0, len(stream), split):
        bodies += dec.feed(stream[i:i + split])
    check(dec.pending <= ghcx.FRAME_PREFIX + ghcx.MAX_BODY, "decoder holds too much")
    check(sum(len(b) + ghcx.FRAME_PREFIX for b in bodies) + dec.dropped_bytes + dec.pending
          == len(stream), "bytes neither framed, dropped nor pending")
    for body in bodies:
        check(ghcx.HEADER_SIZE <= len(body) <= ghcx.MAX_BODY, "body out of bounds")
        try:
            h = ghcx.Header.decode(body)
        except ghcx.GhcxReject:
            continue
        check(h.encode() == body[:ghcx.HEADER_SIZE], "header re-encodes differently")
