"""The TSM's GHCx channel (``TsmChannel.receive``) after a real handshake: arbitrary frame
bodies, and requests the guest seals with fuzzed type, flags, ids and plaintext.  Only a
Reply, Request or Cached comes back, or GhcxReject."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable

from fuzz.runner import Bytes, check, chunks, frames
from teeio import ghcx

KIND = "responder"
SECRET = bytes(range(32))
BOOT = b"b" * ghcx.BOOT_ID_SIZE


def det_rng(label: str) -> Callable[[int], bytes]:
    counter = itertools.count()

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{label}:{next(counter)}".encode()).digest()
        return out[:n]
    return rng


def seeds() -> list[bytes]:
    req = json.dumps({"device": "dev0", "nonce": "00" * 32}).encode()
    tdi_info = sorted(ghcx.MsgType).index(ghcx.MsgType.TDI_INFO)
    sealed = bytes((1, tdi_info, 0, 0, 5, 0, 0, 0, 1)) + req
    hello = ghcx.GuestChannel(SECRET, "vm0", det_rng("x")).hello()[ghcx.FRAME_PREFIX:]
    return [frames([sealed]), frames([sealed, sealed]), frames([b"\0" + hello, sealed])]


def one_input(data: bytes) -> None:
    g = ghcx.GuestChannel(SECRET, "vm0", det_rng("g"))
    t = ghcx.TsmChannel(SECRET, "vm0", BOOT, det_rng("t"))
    ack = t.receive(g.hello()[ghcx.FRAME_PREFIX:])
    assert isinstance(ack, ghcx.Reply)
    g.accept_hello_ack(ack.frame[ghcx.FRAME_PREFIX:])
    session = g._session
    assert session is not None
    types = sorted(ghcx.MsgType)
    for chunk in chunks(data):
        b = Bytes(chunk)
        mode = b.u8() % 3
        if mode == 0:
            body = b.rest()
        else:
            mtype = types[b.u8() % len(types)]
            flags, rid, bump = b.u16(), b.u32(), b.u8() % 4
            session.send_seq = max(0, session.send_seq + bump - 1)
            try:
                body = session.seal(mtype, flags if mode == 2 else 0, g.vm_id, rid, b.rest())
            except ghcx.GhcxReject:
                continue
        try:
            got = t.receive(body)
        except ghcx.GhcxReject as exc:
            check(exc.reason in ghcx.REASONS, f"unknown reason {exc.reason}")
            continue
        check(isinstance(got, ghcx.Reply | ghcx.Request | ghcx.Cached), f"receive -> {got!r}")
        if isinstance(got, ghcx.Request):
            check(isinstance(got.payload, dict), "request payload is not an object")
            t.respond(got, {"echo": len(got.payload)})
