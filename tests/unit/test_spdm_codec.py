"""SPDM codec: property round trips for every message, golden layouts, and negatives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio.spdm import codec
from teeio.spdm.defs import BaseAsymAlgo, BaseHashAlgo, DheGroup
from teeio.spdm.errors import DecodeError

VERSIONS = st.sampled_from([0x12, 0x13])
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)


def blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


def var(max_size: int = 64) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size)


# Negotiated contexts: (hash size, signature size, DHE size) combinations.
CTXS = st.sampled_from([
    codec.Negotiated(0x12, BaseHashAlgo.SHA_384, BaseAsymAlgo.ECDSA_P384, 0,
                     DheGroup.SECP_384_R1),
    codec.Negotiated(0x13, BaseHashAlgo.SHA_256, BaseAsymAlgo.ECDSA_P256, 0,
                     DheGroup.SECP_256_R1),
    codec.Negotiated(0x12, BaseHashAlgo.SHA_384, BaseAsymAlgo.RSASSA_3072, 0,
                     DheGroup.SECP_384_R1, handshake_in_the_clear=True),
])

alg_structs = st.lists(
    st.builds(codec.AlgStruct, st.sampled_from([2, 3, 4, 5]), u16,
              st.lists(u32, max_size=2).map(tuple)),
    max_size=4, unique_by=lambda s: s.alg_type,
).map(lambda xs: tuple(sorted(xs, key=lambda s: s.alg_type)))


def ctx_len(v: int) -> int:
    return 8 if v >= 0x13 else 0


def roundtrip(msg: Any, decode: Callable[..., Any]) -> None:
    wire = msg.encode()
    back = decode(wire)
    assert back == msg
    assert back.raw == wire
    assert back.encode() == wire
    # DOE DW padding is accepted with pad=True and trimmed from raw.
    padded = decode(wire + bytes(-len(wire) % 4), pad=True)
    assert padded == msg and padded.raw == wire


@given(st.builds(codec.GetVersion))
def test_get_version(m: codec.GetVersion) -> None:
    roundtrip(m, codec.GetVersion.decode)


@given(st.builds(codec.Version, st.lists(u16, max_size=5).map(tuple)))
def test_version(m: codec.Version) -> None:
    roundtrip(m, codec.Version.decode)


@given(st.builds(codec.GetCapabilities, st.sampled_from([0x10, 0x11, 0x12, 0x13]), u8, u32,
                 u32, u32, st.just(0)))
def test_get_capabilities(m: codec.GetCapabilities) -> None:
    if m.version < 0x12:
        m = codec.GetCapabilities(m.version, *((m.ct_exponent, m.flags) if m.version == 0x11
                                               else (0, 0)))
    roundtrip(m, codec.GetCapabilities.decode)


@given(VERSIONS, u8, u32, u32, u32, st.booleans(), var(16))
def test_capabilities(v: int, ct: int, flags: int, dts: int, mx: int, block: bool,
                      extra: bytes) -> None:
    algs = b""
    if block and v >= 0x13:
        algs = bytes((0, 0)) + (4 + len(extra)).to_bytes(2, "little") + extra
    roundtrip(codec.Capabilities(v, ct, flags, dts, mx, algs), codec.Capabilities.decode)


@given(st.builds(codec.NegotiateAlgorithms, VERSIONS, u8, u8, u32, u32, u8,
                 st.lists(u32, max_size=3).map(tuple), st.lists(u32, max_size=3).map(tuple),
                 alg_structs))
def test_negotiate_algorithms(m: codec.NegotiateAlgorithms) -> None:
    roundtrip(m, codec.NegotiateAlgorithms.decode)


@given(st.builds(codec.Algorithms, VERSIONS, u8, u8, u32, u32, u32, u8,
                 st.lists(u32, max_size=2).map(tuple), st.lists(u32, max_size=2).map(tuple),
                 alg_structs))
def test_algorithms(m: codec.Algorithms) -> None:
    roundtrip(m, codec.Algorithms.decode)


@given(st.builds(codec.GetDigests, VERSIONS))
def test_get_digests(m: codec.GetDigests) -> None:
    roundtrip(m, codec.GetDigests.decode)


@given(VERSIONS, u8, st.sampled_from([32, 48]), u8)
def test_digests(v: int, mask: int, h: int, supported: int) -> None:
    digests = tuple(bytes([i]) * h for i in range(bin(mask).count("1")))
    roundtrip(codec.Digests(v, mask, digests, supported),
              lambda d, pad=False: codec.Digests.decode(d, h, pad))


@given(st.builds(codec.GetCertificate, VERSIONS, u8, u16, u16, u8))
def test_get_certificate(m: codec.GetCertificate) -> None:
    roundtrip(m, codec.GetCertificate.decode)


@given(st.builds(codec.Certificate, VERSIONS, u8, var(200), u16, u8))
def test_certificate(m: codec.Certificate) -> None:
    roundtrip(m, codec.Certificate.decode)


@given(VERSIONS, u8, u8, blob(32), blob(8))
def test_challenge(v: int, slot: int, st_: int, nonce: bytes, ctx: bytes) -> None:
    roundtrip(codec.Challenge(v, slot, st_, nonce, ctx[:ctx_len(v)]), codec.Challenge.decode)


@given(CTXS, u8, u8, st.booleans(), var(), st.data())
def test_challenge_auth(ctx: codec.Negotiated, p1: int, p2: int, summary: bool, opq: bytes,
                        data: st.DataObject) -> None:
    h, s = ctx.hash_size, ctx.sig_size
    m = codec.ChallengeAuth(ctx.version, p1, p2, data.draw(blob(h)), data.draw(blob(32)),
                            data.draw(blob(h)) if summary else b"", opq,
                            data.draw(blob(ctx_len(ctx.version))), data.draw(blob(s)))
    roundtrip(m, lambda d, pad=False: codec.ChallengeAuth.decode(d, ctx, summary, pad))


@given(VERSIONS, st.integers(0, 7), u8, blob(32), u8, blob(8))
def test_get_measurements(v: int, attrs: int, op: int, nonce: bytes, slot: int,
                          ctx: bytes) -> None:
    signed = attrs & 1
    m = codec.GetMeasurements(v, attrs, op, nonce if signed else b"", slot if signed else 0,
                              ctx[:ctx_len(v)])
    roundtrip(m, codec.GetMeasurements.decode)


@given(CTXS, u8, u8, u8, var(300), var(), st.booleans(), st.data())
def test_measurements(ctx: codec.Negotiated, p1: int, p2: int, nblocks: int, record: bytes,
                      opq: bytes, signed: bool, data: st.DataObject) -> None:
    m = codec.Measurements(ctx.version, p1, p2, nblocks, record, data.draw(blob(32)), opq,
                           data.draw(blob(ctx_len(ctx.version))),
                           data.draw(blob(ctx.sig_size)) if signed else b"")
    roundtrip(m, lambda d, pad=False: codec.Measurements.decode(d, ctx, signed, pad))


@given(CTXS, u8, u8, u16, u8, blob(32), var(), st.data())
def test_key_exchange(ctx: codec.Negotiated, p1: int, p2: int, sid: int, policy: int,
                      rnd: bytes, opq: bytes, data: st.DataObject) -> None:
    m = codec.KeyExchange(ctx.version, p1, p2, sid, policy, rnd, data.draw(blob(ctx.dhe_size)),
                          opq)
    roundtrip(m, lambda d, pad=False: codec.KeyExchange.decode(d, ctx.dhe_size, pad))


@given(CTXS, u8, u16, u8, u8, blob(32), st.booleans(), var(), st.data())
def test_key_exchange_rsp(ctx: codec.Negotiated, hb: int, sid: int, mut: int, slot: int,
                          rnd: bytes, summary: bool, opq: bytes, data: st.DataObject) -> None:
    h = ctx.hash_size
    m = codec.KeyExchangeRsp(ctx.version, hb, sid, mut, slot, rnd, data.draw(blob(ctx.dhe_size)),
                             data.draw(blob(h)) if summary else b"", opq,
                             data.draw(blob(ctx.sig_size)),
                             b"" if ctx.handshake_in_the_clear else data.draw(blob(h)))
    roundtrip(m, lambda d, pad=False: codec.KeyExchangeRsp.decode(d, ctx, summary, pad))


@given(CTXS, u8, st.data())
def test_finish(ctx: codec.Negotiated, slot: int, data: st.DataObject) -> None:
    m = codec.Finish(ctx.version, 0, slot, b"", data.draw(blob(ctx.hash_size)))
    roundtrip(m, lambda d, pad=False: codec.Finish.decode(d, ctx, pad))
    mut = codec.Negotiated(ctx.version, ctx.base_hash, ctx.base_asym,
                           req_asym=BaseAsymAlgo.ECDSA_P256)
    m = codec.Finish(ctx.version, 1, slot, data.draw(blob(64)), data.draw(blob(ctx.hash_size)))
    roundtrip(m, lambda d, pad=False: codec.Finish.decode(d, mut, pad))


@given(CTXS, st.data())
def test_finish_rsp(ctx: codec.Negotiated, data: st.DataObject) -> None:
    vd = data.draw(blob(ctx.hash_size)) if ctx.handshake_in_the_clear else b""
    roundtrip(codec.FinishRsp(ctx.version, vd),
              lambda d, pad=False: codec.FinishRsp.decode(d, ctx, pad))


@pytest.mark.parametrize("cls", [codec.Heartbeat, codec.HeartbeatAck, codec.KeyUpdate,
                                 codec.KeyUpdateAck, codec.EndSession, codec.EndSessionAck])
@settings(max_examples=20)
@given(v=VERSIONS, p1=u8, p2=u8)
def test_bare_messages(cls: Any, v: int, p1: int, p2: int) -> None:
    roundtrip(cls(v, p1, p2), cls.decode)


@pytest.mark.parametrize("cls", [codec.VendorDefinedRequest, codec.VendorDefinedResponse])
@given(v=VERSIONS, sid=u16, vid=var(9), payload=var(100))
def test_vendor_defined(cls: Any, v: int, sid: int, vid: bytes, payload: bytes) -> None:
    roundtrip(cls(v, sid, vid, payload), cls.decode)


@given(st.builds(codec.Error, VERSIONS, u8, u8, var(32)))
def test_error(m: codec.Error) -> None:
    wire = m.encode()
    assert codec.Error.decode(wire) == m


# --- golden layouts ------------------------------------------------------------------------------

def test_pci_sig_vendor_defined_layout() -> None:
    # DSP0274 VENDOR_DEFINED_REQUEST, PCI-SIG StandardID:
    # ver FE 00 00 | 03 00 | 02 | 01 00 | LL LL | ProtocolID | ...
    m = codec.VendorDefinedRequest(0x12, 3, b"\x01\x00", b"\x01\xaa")
    assert m.encode().hex() == "12fe0000" "0300" "02" "0100" "0200" "01aa"


def test_negotiate_algorithms_layout() -> None:
    m = codec.NegotiateAlgorithms(0x12, 1, 2, 0x90, 0x3,
                                  alg_structs=(codec.AlgStruct(2, 0x18), codec.AlgStruct(3, 2),
                                               codec.AlgStruct(5, 1)))
    wire = m.encode()
    assert len(wire) == 32 + 12
    assert wire[:8].hex() == "12e30300" "2c00" "01" "02"
    assert wire[28:32] == bytes(4)
    assert wire[32:].hex() == "02201800" "03200200" "05200100"


def test_algorithms_layout() -> None:
    m = codec.Algorithms(0x13, 1, 2, 4, 0x80, 2, alg_structs=(codec.AlgStruct(2, 0x10),))
    wire = m.encode()
    assert len(wire) == 40
    assert wire[4:6] == (40).to_bytes(2, "little")
    assert wire[8:20].hex() == "04000000" "80000000" "02000000"
    assert wire[36:].hex() == "02201000"


def test_capabilities_layout() -> None:
    wire = codec.GetCapabilities(0x12, 20, 0x6206, 4096, 4096).encode()
    assert wire.hex() == "12e10000" "0014" "0000" "06620000" "00100000" "00100000"


# --- negatives -----------------------------------------------------------------------------------

def test_decode_rejects_truncation_and_trailing_bytes() -> None:
    wire = codec.GetCertificate(0x12, 0, 0, 1024).encode()
    with pytest.raises(DecodeError, match="truncated Length") as exc:
        codec.GetCertificate.decode(wire[:-1])
    assert exc.value.raw == wire[:-1] and exc.value.offset == 6
    with pytest.raises(DecodeError, match="trailing"):
        codec.GetCertificate.decode(wire + b"\0")
    assert codec.GetCertificate.decode(wire + b"\0\0\0", pad=True).raw == wire
    with pytest.raises(DecodeError, match="trailing"):
        codec.GetCertificate.decode(wire + b"\0\0\0\0", pad=True)   # more than a DW pad
    with pytest.raises(DecodeError, match="trailing"):
        codec.GetCertificate.decode(wire + b"\x01", pad=True)       # pad must be zeros


def test_decode_rejects_wrong_code_and_short_header() -> None:
    with pytest.raises(DecodeError, match="code"):
        codec.GetDigests.decode(bytes.fromhex("12820000"))
    with pytest.raises(DecodeError):
        codec.peek_header(b"\x12\x81")


def test_algorithm_struct_rules() -> None:
    good = codec.NegotiateAlgorithms(0x12, alg_structs=(codec.AlgStruct(2, 8),
                                                        codec.AlgStruct(3, 2))).encode()
    swapped = good[:32] + good[36:40] + good[32:36]
    with pytest.raises(DecodeError, match="ascending"):
        codec.NegotiateAlgorithms.decode(swapped)
    bad_count = good[:33] + b"\x30" + good[34:]
    with pytest.raises(DecodeError, match="FixedAlgCount"):
        codec.NegotiateAlgorithms.decode(bad_count)
    bad_len = good[:4] + (99).to_bytes(2, "little") + good[6:]
    with pytest.raises(DecodeError, match="Length field"):
        codec.NegotiateAlgorithms.decode(bad_len)


def test_finish_signature_needs_requester_algorithm() -> None:
    ctx = codec.Negotiated(0x12, BaseHashAlgo.SHA_384, BaseAsymAlgo.ECDSA_P384)
    wire = codec.Finish(0x12, 1, 0, b"", bytes(48)).encode()
    with pytest.raises(DecodeError, match="signature included"):
        codec.Finish.decode(wire, ctx)


def test_raw_is_not_in_repr_or_equality() -> None:
    a = codec.GetDigests.decode(bytes.fromhex("12810000"))
    assert a == codec.GetDigests(0x12)
    assert "raw" not in repr(a)
