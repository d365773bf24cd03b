"""GHCx (docs/ghcx.md): codec round trips, stream resync, the handshake and key schedule
checked against an independent implementation of the spec's formulas, every receiver-rule
rejection, the retry cache, REHELLO after a TSM restart, and fuzzing of both ends."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teeio.ghcx import (
    BOOT_ID_SIZE,
    FLAG_ERROR,
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    MAX_PENDING,
    MAX_PLAINTEXT,
    NONCE_SIZE,
    PENDING_TTL,
    REASONS,
    REQUESTS,
    RESPONSES,
    VERSION,
    Cached,
    FrameDecoder,
    GhcxReject,
    GuestChannel,
    Header,
    MsgType,
    Reply,
    Request,
    Response,
    TsmChannel,
    derive_keys,
    encode_frame,
    response_type,
    vm_id_bytes,
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


# -- codec ------------------------------------------------------------------------------------

@given(st.sampled_from(list(MsgType)), st.integers(0, 0xFFFF),
       st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1))
def test_header_round_trip(mtype: MsgType, flags: int, vm: bytes, seq: int, rid: int) -> None:
    h = Header(VERSION, mtype, flags, vm, seq, rid)
    raw = h.encode()
    assert len(raw) == HEADER_SIZE
    assert raw == struct.pack("<BBH16sQQ", 1, mtype, flags, vm, seq, rid)
    assert Header.decode(raw + b"payload") == h


def test_header_decode_rejects() -> None:
    good = Header(VERSION, MsgType.HELLO, 0, vm_id_bytes("vm0"), 0, 0).encode()
    for body, reason in ((good[:35], "malformed"), (b"\x02" + good[1:], "version"),
                         (good[:1] + b"\x42" + good[2:], "unknown_type")):
        with pytest.raises(GhcxReject) as e:
            Header.decode(body)
        assert e.value.reason == reason


def test_response_types() -> None:
    assert {response_type(t) for t in REQUESTS} == RESPONSES
    assert response_type(MsgType.TDI_LOCK) == 0x90
    assert response_type(MsgType.STATUS) == MsgType.STATUS_RESPONSE
    assert int(MsgType.STATUS_RESPONSE) == 0x97
    with pytest.raises(ValueError):
        response_type(MsgType.HELLO)


def test_vm_id_bytes() -> None:
    assert vm_id_bytes("vm0") == b"vm0" + bytes(13)
    assert vm_id_bytes("A.b_c-0123456789") == b"A.b_c-0123456789"
    for bad in ("", "x" * 17, "vm 0", "vm/0", "vmé"):
        with pytest.raises(ValueError):
            vm_id_bytes(bad)


@given(st.lists(st.binary(min_size=HEADER_SIZE, max_size=300), max_size=6), st.data())
def test_frames_survive_any_split(bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec = FrameDecoder()
    out: list[bytes] = []
    for a, b in itertools.pairwise([0, *cuts, len(stream)]):
        out += dec.feed(stream[a:b])
    assert out == bodies
    assert dec.dropped_bytes == 0 and dec.pending == 0
    assert dec.counters["frames"] == len(bodies)


def test_encode_frame_bounds() -> None:
    for size in (HEADER_SIZE - 1, MAX_BODY + 1):
        with pytest.raises(ValueError):
            encode_frame(bytes(size))
    assert len(encode_frame(bytes(MAX_BODY))) == MAX_BODY + 8


def test_decoder_resyncs_after_garbage() -> None:
    f1, f2 = encode_frame(b"A" * HEADER_SIZE), encode_frame(b"B" * 40)
    bad_len = MAGIC + (HEADER_SIZE - 1).to_bytes(4, "little")
    huge = MAGIC + (MAX_BODY + 1).to_bytes(4, "little")
    dec = FrameDecoder()
    out = dec.feed(b"noise" + f1 + bad_len + b"xx" + huge + f2 + b"zzGH")
    assert out == [b"A" * HEADER_SIZE, b"B" * 40]
    assert dec.counters["bad_length"] == 2
    assert dec.counters["bad_magic"] >= 2
    # everything but the two frames and the trailing partial magic was dropped
    assert dec.dropped_bytes == 5 + len(bad_len) + 2 + len(huge) + 2
    assert dec.pending == 2
    assert dec.feed(b"CX" + (40).to_bytes(4, "little") + b"C" * 40) == [b"C" * 40]


def test_decoder_discard_partial() -> None:
    dec = FrameDecoder()
    # a forged length would hold the stream until MAX_BODY bytes arrive
    assert dec.feed(MAGIC + MAX_BODY.to_bytes(4, "little") + b"junk") == []
    assert dec.discard_partial() == 12
    assert dec.feed(encode_frame(b"D" * HEADER_SIZE)) == [b"D" * HEADER_SIZE]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_decoder_never_raises(chunks: list[bytes]) -> None:
    dec = FrameDecoder()
    total = 0
    for c in chunks:
        for body in dec.feed(c):
            assert HEADER_SIZE <= len(body) <= MAX_BODY
            total += len(body) + 8
    assert total + dec.dropped_bytes + dec.pending == sum(map(len, chunks))


# -- handshake and keys -------------------------------------------------------------------------

def test_handshake_matches_the_spec() -> None:
    g, t = pair()
    assert not g.established and not t.established
    hello = body_of(g.hello())
    h = Header.decode(hello)
    assert (h.mtype, h.flags, h.seq, h.request_id, h.vm_id) == \
        (MsgType.HELLO, 0, 0, 0, vm_id_bytes("vm0"))
    assert len(hello) == HEADER_SIZE + NONCE_SIZE
    reply = t.receive(hello)
    assert isinstance(reply, Reply)
    ack = body_of(reply.frame)
    assert Header.decode(ack).mtype == MsgType.HELLO_ACK
    gn, tn, boot, confirm = hello[36:], ack[36:68], ack[68:84], ack[84:]
    assert boot == BOOT and len(confirm) == 16
    _, k_t2g, _, iv_t2g = spec_keys(g.vm_id, gn, tn, boot)
    assert confirm == AESGCM(k_t2g).encrypt(iv_t2g, b"", ack[:36] + gn + tn + boot)
    assert g.accept_hello_ack(ack) == BOOT
    assert g.established and g.boot_id == BOOT
    assert not t.established            # confirmed only by the guest's first request
    exchange(g, t)
    assert t.established


def test_encrypted_frames_match_the_spec() -> None:
    g, t = pair()
    k_g2t, k_t2g, iv_g2t, iv_t2g = handshake_keys(g, t)
    rid, frame = g.request(MsgType.DMA_ACCEPT, {"base": 4096, "size": 8192, "access": "rw"})
    body = body_of(frame)
    plaintext = json.dumps({"base": 4096, "size": 8192, "access": "rw"},
                           separators=(",", ":")).encode()
    assert body == spec_seal(k_g2t, iv_g2t, 0x14, 0, g.vm_id, 1, rid, plaintext)
    req = t.receive(body)
    assert isinstance(req, Request)
    rsp = body_of(t.respond(req, {"window_id": 7}))
    assert rsp == spec_seal(k_t2g, iv_t2g, 0x94, 0, g.vm_id, 1, rid, b'{"window_id":7}')
    # a frame sealed by the independent implementation is accepted
    own = spec_seal(k_g2t, iv_g2t, MsgType.STATUS, 0, g.vm_id, 5, rid + 1, b"{}")
    assert isinstance(t.receive(own), Request)


def test_wrong_secret_fails_the_handshake() -> None:
    g, t = pair(tsm_secret=bytes(32))
    reply = t.receive(body_of(g.hello()))
    assert isinstance(reply, Reply)
    reject("handshake", g.accept_hello_ack, body_of(reply.frame), g.counters)
    assert not g.established


def test_hello_ack_for_another_hello_is_rejected() -> None:
    g, t = pair()
    old = t.receive(body_of(g.hello()))
    new = t.receive(body_of(g.hello()))
    assert isinstance(old, Reply) and isinstance(new, Reply)
    reject("handshake", g.accept_hello_ack, body_of(old.frame), g.counters)  # stale nonce
    assert g.accept_hello_ack(body_of(new.frame)) == BOOT
    reject("handshake", g.accept_hello_ack, body_of(new.frame), g.counters)  # no HELLO out
    reject("handshake", g.open, body_of(new.frame), g.counters)


def test_hello_ack_tampering() -> None:
    g, t = pair()
    reply = t.receive(body_of(g.hello()))
    assert isinstance(reply, Reply)
    ack = body_of(reply.frame)
    for bit in (8 * 36, 8 * 70, 8 * 90):          # TSM nonce, boot id, confirm
        reject("handshake", g.accept_hello_ack, flip(ack, bit), g.counters)
    reject("malformed", g.accept_hello_ack, ack[:-1], g.counters)
    reject("malformed", g.accept_hello_ack, flip(ack, 8 * 20), g.counters)   # seq 1
    assert g.accept_hello_ack(ack) == BOOT


def test_session_keys_differ() -> None:
    n1, n2 = bytes(32), b"\1" * 32
    base = derive_keys(SECRET, vm_id_bytes("vm0"), n1, n2, BOOT)
    variants = [derive_keys(SECRET, vm_id_bytes("vm1"), n1, n2, BOOT),
                derive_keys(SECRET, vm_id_bytes("vm0"), n1, n2, bytes(16)),
                derive_keys(SECRET, vm_id_bytes("vm0"), n2, n2, BOOT),
                derive_keys(SECRET, vm_id_bytes("vm0"), n1, n1, BOOT),
                derive_keys(bytes(32), vm_id_bytes("vm0"), n1, n2, BOOT)]
    seen = {base.k_g2t, base.k_t2g}
    for k in variants:
        assert k.k_g2t not in seen and k.k_t2g not in seen
        seen |= {k.k_g2t, k.k_t2g}
    assert base.k_g2t != base.k_t2g and base.iv_g2t != base.iv_t2g
    assert (base.k_g2t, base.k_t2g, base.iv_g2t, base.iv_t2g) == \
        spec_keys(vm_id_bytes("vm0"), n1, n2, BOOT)
    # two handshakes of the same pair give different keys (fresh nonces)
    g, t = pair()
    assert handshake_keys(g, t) != handshake_keys(g, t)


def test_no_key_material_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    g, t = pair()
    keys = handshake_keys(g, t)
    exchange(g, t)
    t.receive(body_of(g.hello()))                               # a pending session too
    with pytest.raises(GhcxReject):
        g.open(b"junk" * 20)
    k = derive_keys(SECRET, g.vm_id, bytes(32), bytes(32), BOOT)
    text = " ".join([repr(g), str(g), repr(t), repr(k), str(k), caplog.text,
                     repr(t._session), repr(g._outstanding)])
    for secret in (SECRET, *keys, k.k_g2t, k.k_t2g, k.iv_g2t, k.iv_t2g):
        assert secret.hex() not in text and repr(secret) not in text


# -- receiver rules ------------------------------------------------------------------------------

def test_request_response_and_gaps() -> None:
    g, t = established()
    assert exchange(g, t, MsgType.TDI_INFO, {"a": 1}).payload == {"echo": {"a": 1}}
    # a lost request frame (gap in sequence numbers) does not kill the channel
    g.request(MsgType.STATUS, {})
    resp = exchange(g, t, MsgType.STATUS)
    assert resp.mtype == MsgType.STATUS_RESPONSE and resp.error is None
    assert set(g.counters.values()) == {0} and set(t.counters.values()) == {0}


def test_error_response() -> None:
    g, t = established()
    _, frame = g.request(MsgType.TDI_ACCEPT, {"digests": {}, "lock_epoch": 1})
    req = t.receive(body_of(frame))
    assert isinstance(req, Request)
    rsp = body_of(t.respond(req, error="mismatch", message="lock epoch 1 is old"))
    assert Header.decode(rsp).flags == FLAG_ERROR
    resp = g.open(rsp)
    assert isinstance(resp, Response)
    assert (resp.error, resp.message) == ("mismatch", "lock epoch 1 is old")
    with pytest.raises(ValueError):
        t.respond(req, error="nope")
    with pytest.raises(ValueError):
        t.respond(req, {"x": 1}, error="state")


def test_cross_vm() -> None:
    g0, t0 = established()
    g1, t1 = pair("vm1")
    handshake(g1, t1)
    _, f1 = g1.request(MsgType.STATUS, {})
    reject("cross_vm", t0.receive, body_of(f1), t0.counters)
    reject("cross_vm", t0.receive, body_of(g1.hello()), t0.counters)
    _, f0 = g0.request(MsgType.STATUS, {})
    req = t0.receive(body_of(f0))
    assert isinstance(req, Request)
    handshake(g1, t1)
    rid1, f1 = g1.request(MsgType.STATUS, {})
    req1 = t1.receive(body_of(f1))
    assert isinstance(req1, Request)
    reject("cross_vm", g0.open, body_of(t1.respond(req1, {})), g0.counters)
    assert isinstance(g0.open(body_of(t0.respond(req, {}))), Response)


@pytest.mark.parametrize("bit", [8 * 2, 8 * 20, 8 * 27 + 7, 8 * 28, 8 * 35 + 7,
                                 8 * 36, 8 * 40 + 3, -1])
def test_forged_bit_flips(bit: int) -> None:
    """Flags, seq, request id (all associated data), ciphertext and tag."""
    g, t = established()
    _, frame = g.request(MsgType.TDI_LOCK, {})
    body = body_of(frame)
    bit = bit if bit >= 0 else len(body) * 8 - 1
    reject("forged", t.receive, flip(body, bit), t.counters)
    req = t.receive(body)                      # the rejected frame changed nothing
    assert isinstance(req, Request)
    rsp = body_of(t.respond(req, {"state": "CONFIG_LOCKED", "lock_epoch": 1}))
    reject("forged", g.open, flip(rsp, bit if bit < len(rsp) * 8 else len(rsp) * 8 - 1),
           g.counters)
    assert isinstance(g.open(rsp), Response)


def test_header_bit_flips_by_field() -> None:
    g, t = established()
    _, frame = g.request(MsgType.STATUS, {})
    body = body_of(frame)
    reject("version", t.receive, flip(body, 0), t.counters)
    reject("unknown_type", t.receive, flip(body, 8 + 6), t.counters)     # 0x17 -> 0x57
    reject("forged", t.receive, flip(body, 8 + 0), t.counters)           # 0x17 -> 0x16
    reject("cross_vm", t.receive, flip(body, 8 * 4), t.counters)
    assert isinstance(t.receive(body), Request)


def test_replay_and_reorder() -> None:
    g, t = established()
    rid, first = g.request(MsgType.STATUS, {})
    second = g.retry(rid)
    third = g.retry(rid)
    req = t.receive(body_of(third))              # seq 3 first
    assert isinstance(req, Request)
    reject("replay", t.receive, body_of(first), t.counters)    # seq 1 after 3: reordered
    reject("replay", t.receive, body_of(second), t.counters)
    reject("replay", t.receive, body_of(third), t.counters)    # the same frame again
    rsp1 = body_of(t.respond(req, {"n": 1}))
    assert isinstance(g.open(rsp1), Response)
    reject("replay", g.open, rsp1, g.counters)
    # guest side reordering: two responses, the later one first
    rid, f = g.request(MsgType.STATUS, {})
    req = t.receive(body_of(f))
    assert isinstance(req, Request)
    r_a = body_of(t.respond(req, {"n": 2}))
    r_b = t.receive(body_of(g.retry(rid)))
    assert isinstance(r_b, Cached)
    assert isinstance(g.open(body_of(r_b.frame)), Response)
    reject("replay", g.open, r_a, g.counters)                  # seq 1 after seq 2


def test_unbound_responses() -> None:
    g, t = established()
    _, fa = g.request(MsgType.TDI_INFO, {})
    req_a = t.receive(body_of(fa))
    assert isinstance(req_a, Request)
    rsp_a = body_of(t.respond(req_a, {}))                       # lost on the way
    rid_b, fb = g.request(MsgType.STATUS, {})                   # replaces request A
    req_b = t.receive(body_of(fb))
    assert isinstance(req_b, Request)
    reject("unbound", g.open, rsp_a, g.counters)                # answer to another request
    # right request id, but the response type of another request
    wrong = body_of(t.respond(Request(MsgType.TDI_LOCK, rid_b, {}), {}))
    reject("unbound", g.open, wrong, g.counters)
    resp = g.open(body_of(t.respond(req_b, {"ok": True})))
    assert isinstance(resp, Response) and resp.request_id == rid_b
    # no request outstanding at all
    reject("unbound", g.open, body_of(t.respond(req_b, {})), g.counters)


def test_oversized() -> None:
    g, t = established()
    big = encode_frame(bytes(MAX_BODY))[8:] + b"x"
    reject("oversized", t.receive, big, t.counters)
    reject("oversized", g.open, big, g.counters)
    _, f = g.request(MsgType.GET_EVIDENCE, {"nonce": "00" * 32})
    req = t.receive(body_of(f))
    assert isinstance(req, Request)
    with pytest.raises(GhcxReject) as e:
        t.respond(req, {"cert_chain": "a" * MAX_PLAINTEXT})
    assert e.value.reason == "oversized"
    with pytest.raises(GhcxReject):
        g.request(MsgType.STATUS, {"x": "a" * MAX_PLAINTEXT})
    # nothing changed: the error response goes out and is accepted
    resp = g.open(body_of(t.respond(req, error="internal", message="too large")))
    assert isinstance(resp, Response) and resp.error == "internal"
    # the largest payload that fits goes through
    fits = {"x": "a" * (MAX_PLAINTEXT - 8)}
    _, f = g.request(MsgType.STATUS, fits)
    assert len(f) == MAX_BODY + 8
    req = t.receive(FrameDecoder().feed(f)[0])
    assert isinstance(req, Request) and req.payload == fits


def test_version_unknown_type_malformed() -> None:
    g, t = established()
    vm = g.vm_id
    v2 = struct.pack("<BBH16sQQ", 2, MsgType.HELLO, 0, vm, 0, 0) + bytes(32)
    reject("version", t.receive, v2, t.counters)
    reject("version", g.open, v2, g.counters)
    unk = struct.pack("<BBH16sQQ", 1, 0x42, 0, vm, 1, 1) + bytes(32)
    reject("unknown_type", t.receive, unk, t.counters)
    reject("unknown_type", g.open, unk, g.counters)
    # known types in the wrong direction
    rsp_type = struct.pack("<BBH16sQQ", 1, MsgType.STATUS_RESPONSE, 0, vm, 9, 1) + bytes(32)
    reject("unknown_type", t.receive, rsp_type, t.counters)
    req_type = struct.pack("<BBH16sQQ", 1, MsgType.STATUS, 0, vm, 9, 1) + bytes(32)
    reject("unknown_type", g.open, req_type, g.counters)
    reject("unknown_type", g.open, body_of(g.hello())[:36] + bytes(32), g.counters)
    reject("malformed", t.receive, b"GHCX", t.counters)
    reject("malformed", t.receive, body_of(g.hello())[:-1], t.counters)       # short nonce
    reject("malformed", t.receive, req_type[:36 + 15], t.counters)            # < tag
    reject("malformed", g.open, struct.pack("<BBH16sQQ", 1, MsgType.REHELLO, 0, vm, 0, 0)
           + b"x", g.counters)


def _seal_guest(g: GuestChannel, t: TsmChannel) -> Callable[..., bytes]:
    k_g2t, _, iv_g2t, _ = handshake_keys(g, t)
    seq = itertools.count(100)

    def seal(plaintext: bytes, mtype: int = MsgType.STATUS, flags: int = 0,
             rid: int = 7) -> bytes:
        return spec_seal(k_g2t, iv_g2t, mtype, flags, g.vm_id, next(seq), rid, plaintext)
    return seal


@pytest.mark.parametrize("plaintext", [b"[]", b"1", b"null", b"\xff", b"{", b"NaN",
                                       b'{"a": NaN}', b"[" * 30000 + b"]" * 30000])
def test_payload_must_be_a_json_object(plaintext: bytes) -> None:
    g, t = pair()
    seal = _seal_guest(g, t)
    reject("malformed", t.receive, seal(plaintext), t.counters)
    assert not t.established                    # nothing changed
    assert isinstance(t.receive(seal(b'{"ok":1}')), Request)


def test_request_with_flags_or_id_zero() -> None:
    g, t = pair()
    seal = _seal_guest(g, t)
    reject("malformed", t.receive, seal(b"{}", flags=FLAG_ERROR), t.counters)
    reject("malformed", t.receive, seal(b"{}", rid=0), t.counters)
    assert isinstance(t.receive(seal(b"{}")), Request)


def test_rejections_change_nothing_on_the_tsm() -> None:
    """After each kind of rejected frame the next genuine frame is accepted as if it had
    not been there (docs/ghcx.md "Receiver rules")."""
    g, t = established()
    g1, t1 = pair("vm1")
    handshake(g1, t1)
    rid, f = g.request(MsgType.TDI_LOCK, {})
    body = body_of(f)
    bad = [flip(body, 8 * 40), body[:20], b"\x02" + body[1:], body_of(g1.request(
        MsgType.STATUS, {})[1]), bytes(MAX_BODY + 1)]
    for b in bad:
        with pytest.raises(GhcxReject):
            t.receive(b)
    assert sum(t.counters.values()) == len(bad)
    req = t.receive(body)
    assert isinstance(req, Request) and req.request_id == rid


# -- retry cache (docs/ghcx.md "Receiver rules", last paragraphs) ---------------------------------

def test_retry_gets_the_cached_response() -> None:
    g, t = established()
    rid, f = g.request(MsgType.DMA_ACCEPT, {"base": 0, "size": 4096, "access": "rw"})
    req = t.receive(body_of(f))
    assert isinstance(req, Request)
    reject("replay", t.receive, body_of(g.retry(rid)), t.counters)   # still being served
    lost = body_of(t.respond(req, {"window_id": 1}))                 # dropped by the relay
    again = t.receive(body_of(g.retry(rid)))
    assert isinstance(again, Cached)                                 # not served twice
    assert again.frame[8:] != lost
    assert Header.decode(again.frame[8:]).seq == Header.decode(lost).seq + 1
    resp = g.open(body_of(again.frame))
    assert isinstance(resp, Response)
    assert resp.payload == {"window_id": 1} and resp.request_id == rid
    # error responses are cached as well
    rid, f = g.request(MsgType.TDI_STOP, {})
    req = t.receive(body_of(f))
    assert isinstance(req, Request)
    t.respond(req, error="state", message="not locked")
    again = t.receive(body_of(g.retry(rid)))
    assert isinstance(again, Cached)
    resp = g.open(body_of(again.frame))
    assert isinstance(resp, Response) and resp.error == "state"


def test_request_id_rules() -> None:
    g, t = pair()
    seal = _seal_guest(g, t)
    assert isinstance(t.receive(seal(b"{}", rid=10)), Request)
    reject("replay", t.receive, seal(b"{}", rid=9), t.counters)          # going back
    reject("replay", t.receive, seal(b'{"x":1}', rid=10), t.counters)    # reused
    reject("replay", t.receive, seal(b"{}", MsgType.TDI_LOCK, rid=10), t.counters)
    assert isinstance(t.receive(seal(b"{}", rid=12)), Request)           # gaps are fine


def test_cache_survives_a_rehandshake() -> None:
    """A relay answers a non-idempotent request with a forged REHELLO: the guest
    re-handshakes, retries the same request id, and gets the cached response."""
    g, t = established()
    rid, f = g.request(MsgType.DMA_ACCEPT, {"base": 0, "size": 4096, "access": "rw"})
    req = t.receive(body_of(f))
    assert isinstance(req, Request)
    t.respond(req, {"window_id": 5})                                 # replaced by REHELLO
    assert g.open(body_of(t.rehello())) is MsgType.REHELLO
    assert handshake(g, t) == BOOT
    assert g.outstanding == rid
    again = t.receive(body_of(g.retry(rid)))
    assert isinstance(again, Cached)
    resp = g.open(body_of(again.frame))
    assert isinstance(resp, Response) and resp.payload == {"window_id": 5}
    assert exchange(g, t).request_id == rid + 1


def test_new_guest_process_is_not_served_from_the_cache() -> None:
    g, t = established()
    resp = exchange(g, t, MsgType.STATUS)
    # a new guest process whose first request id collides with the cached one
    g2 = GuestChannel(SECRET, "vm0", det_rng("g2"))
    g2._next_request_id = resp.request_id
    handshake(g2, t)
    rid, f = g2.request(MsgType.STATUS, {"other": True})
    assert rid == resp.request_id
    assert isinstance(t.receive(body_of(f)), Request)
    # request ids start at a random value
    ids = {GuestChannel(SECRET, "vm0")._next_request_id for _ in range(4)}
    assert len(ids) == 4 and 0 not in ids


# -- REHELLO and sessions (docs/ghcx.md "Handshake" 5) ------------------------------------------

def test_rehello_after_tsm_restart() -> None:
    g, t = established()
    exchange(g, t)
    new_boot = bytes.fromhex("c1" * BOOT_ID_SIZE)
    t2 = TsmChannel(SECRET, "vm0", new_boot, det_rng("t2"))        # the TSM restarted
    rid, f = g.request(MsgType.TDI_INFO, {})
    reply = t2.receive(body_of(f))
    assert isinstance(reply, Reply) and t2.counters["no_session"] == 1
    rh = body_of(reply.frame)
    assert Header.decode(rh) == Header(VERSION, MsgType.REHELLO, 0, g.vm_id, 0, 0)
    assert len(rh) == HEADER_SIZE
    assert g.open(rh) is MsgType.REHELLO
    assert handshake(g, t2) == new_boot != BOOT and g.boot_id == new_boot
    req = t2.receive(body_of(g.retry(rid)))
    assert isinstance(req, Request) and req.request_id == rid      # a new TSM: no cache
    resp = g.open(body_of(t2.respond(req, {"reason": "TSM restarted: SPDM session lost"})))
    assert isinstance(resp, Response)


def test_rehello_cross_vm_or_malformed() -> None:
    g, _ = established()
    other = TsmChannel(SECRET, "vm1", BOOT).rehello()
    reject("cross_vm", g.open, body_of(other), g.counters)
    vm = g.vm_id
    reject("malformed", g.open,
           struct.pack("<BBH16sQQ", 1, MsgType.REHELLO, 0, vm, 1, 0), g.counters)


def test_injected_hello_does_not_cut_the_session() -> None:
    g, t = established()
    exchange(g, t)
    t.receive(body_of(GuestChannel(SECRET, "vm0", det_rng("relay")).hello()))
    assert t.established
    assert exchange(g, t).payload == {"echo": {}}                     # old session works
    assert set(t.counters.values()) == {0}


def test_new_hello_replaces_the_session_once_confirmed() -> None:
    g, t = established()
    old_rid, old = g.request(MsgType.STATUS, {})
    handshake(g, t)
    exchange(g, t)                                    # confirms the new session
    reject("forged", t.receive, body_of(old), t.counters)


def test_no_session_on_the_guest() -> None:
    g, t = pair()
    g2, _ = established()
    _, f = g2.request(MsgType.STATUS, {})
    with pytest.raises(GhcxReject) as e:
        g.request(MsgType.STATUS, {})
    assert e.value.reason == "no_session"
    # an encrypted frame before any handshake: REHELLO from the TSM
    reply = t.receive(body_of(f))
    assert isinstance(reply, Reply) and Header.decode(reply.frame[8:]).mtype == MsgType.REHELLO
    resp_like = struct.pack("<BBH16sQQ", 1, MsgType.STATUS_RESPONSE, 0, g.vm_id, 1, 1)
    reject("no_session", g.open, resp_like + bytes(20), g.counters)


def test_reasons_are_the_documented_ones() -> None:
    assert set(REASONS) == {"malformed", "version", "unknown_type", "cross_vm", "forged",
                            "replay", "unbound", "no_session", "oversized", "handshake",
                            "hello_limit"}
    with pytest.raises(ValueError):
        GhcxReject("other")


# -- fuzzing: only GhcxReject ever comes out -----------------------------------------------------

def _fuzz_pair() -> tuple[GuestChannel, TsmChannel, list[bytes]]:
    """An established pair with a request outstanding, and genuine bodies to mutate."""
    g, t = established()
    rid, f = g.request(MsgType.STATUS, {})
    req = t.receive(body_of(f))
    assert isinstance(req, Request)
    rsp = body_of(t.respond(req, {"a": [1, 2]}))
    other, _ = pair()              # a HELLO of the same VM, without dropping g's session
    return g, t, [body_of(f), rsp, body_of(other.hello()), body_of(t.rehello())]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([1, 2, 0x42]), st.sampled_from(list(MsgType)),
              st.integers(0, 3), st.sampled_from([b"vm0", b"vm1"]), st.integers(0, 5),
              st.integers(0, 2**64 - 1), st.binary(max_size=80)).map(
        lambda x: struct.pack("<BBH16sQQ", x[0], x[1], x[2], x[3].ljust(16, b"\0"), x[4],
                              x[5]) + x[6]),
    st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 255),
              st.booleans())))
def test_fuzz_both_ends(case: bytes | tuple[int, int, int, bool]) -> None:
    g, t, genuine = _fuzz_pair()
    if isinstance(case, tuple):           # a genuine body with one byte changed or cut
        idx, pos, val, cut = case
        b = bytearray(genuine[idx])
        b[pos % len(b)] = val
        case = bytes(b[:pos % len(b)] if cut else b)
    guest_took_it = False
    for fn in (t.receive, g.open, g.accept_hello_ack):
        try:
            fn(case)
            guest_took_it |= fn == g.open
        except GhcxReject as e:
            assert e.reason in REASONS
    # A rejected frame changes nothing: the genuine response still opens (unless the case
    # was that very response), and the channel keeps working both ways.
    if not guest_took_it:
        assert isinstance(g.open(genuine[1]), Response)
    _rid, f2 = g.request(MsgType.STATUS, {})
    req2 = t.receive(body_of(f2))
    assert isinstance(req2, Request) and req2.mtype == MsgType.STATUS
    assert g.open(body_of(t.respond(req2, {"ok": 1}))).payload == {"ok": 1}


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_stream_into_tsm(data: bytes) -> None:
    _, t, genuine = _fuzz_pair()
    dec = FrameDecoder()
    for body in dec.feed(data + encode_frame(genuine[2]) + data):
        with contextlib.suppress(GhcxReject):
            t.receive(body)


def test_vm_id_and_secret_checked_at_construction() -> None:
    with pytest.raises(ValueError):
        GuestChannel(bytes(31), "vm0")
    with pytest.raises(ValueError):
        TsmChannel(SECRET, "vm 0", BOOT)
    with pytest.raises(ValueError):
        TsmChannel(SECRET, "vm0", bytes(15))


def test_pending_handshakes_are_bounded_and_kept() -> None:
    """Finding: each HELLO got an ACK and replaced the pending handshake.  Now a pending one
    stays until confirmed or expired, at most MAX_PENDING are answered, the rest counted."""
    now = [0.0]
    g = GuestChannel(SECRET, "vm0", det_rng("g"))
    t = TsmChannel(SECRET, "vm0", BOOT, det_rng("t"), clock=lambda: now[0])
    genuine = t.receive(body_of(g.hello()))
    assert isinstance(genuine, Reply)
    acks = 0
    for i in range(1000):
        forged = GuestChannel(SECRET[::-1], "vm0", det_rng(f"f{i}")).hello()
        try:
            t.receive(body_of(forged))
            acks += 1
        except GhcxReject as e:
            assert e.reason == "hello_limit"
    assert acks == MAX_PENDING - 1 and t.counters["hello_limit"] == 1000 - acks
    g.accept_hello_ack(body_of(genuine.frame))
    exchange(g, t)                       # the guest's own handshake completes
    assert t.established

    # a flood that came first: the guest is refused until the forged ones expire
    g2, t2 = GuestChannel(SECRET, "vm0", det_rng("g2")), TsmChannel(
        SECRET, "vm0", BOOT, det_rng("t2"), clock=lambda: now[0])
    for i in range(MAX_PENDING):
        t2.receive(body_of(GuestChannel(SECRET, "vm0", det_rng(f"x{i}")).hello()))
    reject("hello_limit", t2.receive, body_of(g2.hello()), t2.counters)
    now[0] += PENDING_TTL
    hello = body_of(g2.hello())
    first = t2.receive(hello)
    assert isinstance(first, Reply) and t2.receive(hello) == first    # same HELLO, same ACK
    g2.accept_hello_ack(body_of(first.frame))
    exchange(g2, t2)
