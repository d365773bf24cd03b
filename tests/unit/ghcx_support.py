"""Helpers shared by the GHCx channel tests (docs/ghcx.md): deterministic randomness, channel
pairs, and an independent implementation of the spec's key schedule and sealing
("Handshake" 3-4, "Messages") to check the wire against."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teeio.ghcx import (
    HEADER_SIZE,
    MAGIC,
    GhcxReject,
    GuestChannel,
    MsgType,
    Reply,
    Request,
    Response,
    TsmChannel,
)

SECRET = bytes(range(32))
BOOT = bytes.fromhex("b0" * 16)


def det_rng(label: str) -> Callable[[int], bytes]:
    """Deterministic random bytes, so the tests can recompute keys from known nonces."""
    counter = itertools.count()

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{label}:{next(counter)}".encode()).digest()
        return out[:n]
    return rng


def body_of(frame: bytes) -> bytes:
    assert frame[:4] == MAGIC
    assert int.from_bytes(frame[4:8], "little") == len(frame) - 8
    return frame[8:]


def pair(vm: str = "vm0", secret: bytes = SECRET, boot: bytes = BOOT,
         tsm_secret: bytes | None = None) -> tuple[GuestChannel, TsmChannel]:
    return (GuestChannel(secret, vm, det_rng(f"g{vm}")),
            TsmChannel(tsm_secret or secret, vm, boot, det_rng(f"t{vm}")))


def handshake(g: GuestChannel, t: TsmChannel) -> bytes:
    reply = t.receive(body_of(g.hello()))
    assert isinstance(reply, Reply)
    return g.accept_hello_ack(body_of(reply.frame))


def established() -> tuple[GuestChannel, TsmChannel]:
    """A pair whose session both ends confirmed (the TSM after the first request)."""
    g, t = pair()
    handshake(g, t)
    exchange(g, t)
    assert t.established
    return g, t


def exchange(g: GuestChannel, t: TsmChannel, mtype: MsgType = MsgType.STATUS,
             payload: dict[str, object] | None = None) -> Response:
    rid, frame = g.request(mtype, payload or {})
    req = t.receive(body_of(frame))
    assert isinstance(req, Request) and req.request_id == rid
    resp = g.open(body_of(t.respond(req, {"echo": req.payload})))
    assert isinstance(resp, Response)
    return resp


def reject(reason: str, fn: Callable[[bytes], object], body: bytes,
           counters: dict[str, int]) -> None:
    before = dict(counters)
    with pytest.raises(GhcxReject) as e:
        fn(body)
    assert e.value.reason == reason, e.value
    assert counters[reason] == before[reason] + 1
    assert {k: v for k, v in counters.items() if k != reason} == \
        {k: v for k, v in before.items() if k != reason}


def flip(body: bytes, bit: int) -> bytes:
    b = bytearray(body)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# -- independent implementation of the spec's formulas (docs/ghcx.md "Handshake" 3-4) ----------

def hkdf_sha384(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out, not the library's HKDF."""
    prk = hmac.new(salt, ikm, "sha384").digest()
    out, block = b"", b""
    for i in range(1, -(-length // 48) + 1):
        block = hmac.new(prk, block + info + bytes([i]), "sha384").digest()
        out += block
    return out[:length]


def spec_keys(vm: bytes, gn: bytes, tn: bytes, boot: bytes) -> tuple[bytes, ...]:
    okm = hkdf_sha384(SECRET, gn + tn, b"teeio-ghcx/1 keys" + vm + boot, 88)
    return okm[0:32], okm[32:64], okm[64:76], okm[76:88]


def spec_seal(key: bytes, iv: bytes, mtype: int, flags: int, vm: bytes, seq: int, rid: int,
              plaintext: bytes) -> bytes:
    header = struct.pack("<BBH16sQQ", 1, mtype, flags, vm, seq, rid)
    nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))
    return header + AESGCM(key).encrypt(nonce, plaintext, header)


def handshake_keys(g: GuestChannel, t: TsmChannel) -> tuple[bytes, ...]:
    """Handshake and return (k_g2t, k_t2g, iv_g2t, iv_t2g) recomputed from the wire."""
    hello = body_of(g.hello())
    reply = t.receive(hello)
    assert isinstance(reply, Reply)
    ack = body_of(reply.frame)
    g.accept_hello_ack(ack)
    gn, p = hello[HEADER_SIZE:], ack[HEADER_SIZE:]
    return spec_keys(g.vm_id, gn, p[:32], p[32:48])


def seal_guest(g: GuestChannel, t: TsmChannel) -> Callable[..., bytes]:
    k_g2t, _, iv_g2t, _ = handshake_keys(g, t)
    seq = itertools.count(100)

    def seal(plaintext: bytes, mtype: int = MsgType.STATUS, flags: int = 0,
             rid: int = 7) -> bytes:
        return spec_seal(k_g2t, iv_g2t, mtype, flags, g.vm_id, next(seq), rid, plaintext)
    return seal

