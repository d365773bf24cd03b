"""GHCx handshake and sessions (docs/ghcx.md "Handshake"): the key schedule and confirmation
checked against an independent implementation of the spec's formulas, tampering, no key
material in reprs or logs, REHELLO after a TSM restart, and bounded pending handshakes."""

from __future__ import annotations

import json
import logging
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teeio.ghcx import (
    BOOT_ID_SIZE,
    HEADER_SIZE,
    MAX_PENDING,
    NONCE_SIZE,
    PENDING_TTL,
    REASONS,
    VERSION,
    GhcxReject,
    GuestChannel,
    Header,
    MsgType,
    Reply,
    Request,
    Response,
    TsmChannel,
    derive_keys,
    vm_id_bytes,
)
from tests.unit.ghcx_support import (
    BOOT,
    SECRET,
    body_of,
    det_rng,
    established,
    exchange,
    flip,
    handshake,
    handshake_keys,
    pair,
    reject,
    spec_keys,
    spec_seal,
)

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
