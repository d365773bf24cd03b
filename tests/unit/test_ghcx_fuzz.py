"""GHCx fuzzing (docs/ghcx.md "Receiver rules"): arbitrary and mutated frames into both ends;
only GhcxReject ever comes out, and a rejected frame changes nothing."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teeio.ghcx import (
    REASONS,
    Cached,
    FrameDecoder,
    GhcxReject,
    GuestChannel,
    MsgType,
    Reply,
    Request,
    Response,
    TsmChannel,
    encode_frame,
)
from tests.unit.ghcx_support import (
    body_of,
    established,
    pair,
)

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
    g, t, genuine = _fuzz_pair()
    dec = FrameDecoder()
    for body in dec.feed(data + encode_frame(genuine[2]) + data):
        try:
            assert isinstance(t.receive(body), (Reply, Request, Cached))
        except GhcxReject as e:
            assert e.reason in REASONS
    # whatever the stream held, the established session still works both ways
    _rid, f2 = g.request(MsgType.STATUS, {})
    req2 = t.receive(body_of(f2))
    assert isinstance(req2, Request) and req2.mtype == MsgType.STATUS
    assert g.open(body_of(t.respond(req2, {"ok": 1}))).payload == {"ok": 1}
