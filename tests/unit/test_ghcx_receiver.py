"""GHCx receiver rules (docs/ghcx.md "Receiver rules"): every rejection, counted and changing
nothing, and the retry cache of the last response (last paragraphs)."""

from __future__ import annotations

import struct

import pytest

from teeio.ghcx import (
    FLAG_ERROR,
    MAX_BODY,
    MAX_PLAINTEXT,
    Cached,
    FrameDecoder,
    GhcxReject,
    GuestChannel,
    Header,
    MsgType,
    Request,
    Response,
    encode_frame,
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
    pair,
    reject,
    seal_guest,
)

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



@pytest.mark.parametrize("plaintext", [b"[]", b"1", b"null", b"\xff", b"{", b"NaN",
                                       b'{"a": NaN}', b"[" * 30000 + b"]" * 30000])
def test_payload_must_be_a_json_object(plaintext: bytes) -> None:
    g, t = pair()
    seal = seal_guest(g, t)
    reject("malformed", t.receive, seal(plaintext), t.counters)
    assert not t.established                    # nothing changed
    assert isinstance(t.receive(seal(b'{"ok":1}')), Request)


def test_request_with_flags_or_id_zero() -> None:
    g, t = pair()
    seal = seal_guest(g, t)
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
    seal = seal_guest(g, t)
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
