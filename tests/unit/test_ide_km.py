"""IDE_KM: codec round trips, golden byte order, malformed objects, responder negative matrix,
the requester helpers, and one run over a real secured SPDM session."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.ide_km import (
    PCI_SIG_STANDARD_ID,
    PCI_SIG_VENDOR_ID,
    IdeKmClient,
    IdeKmDecodeError,
    IdeKmObject,
    IdeKmResponder,
    IdeKmResponseError,
    KeyProg,
    KGoStopAck,
    KpAck,
    KpStatus,
    KSetGo,
    KSetStop,
    PciSigProtocol,
    PciSigProtocolMux,
    Query,
    QueryResp,
    decode_object,
    key_from_wire,
    key_to_wire,
)
from teeio.pcie.config import ConfigSpace
from teeio.pcie.ide_cap import IdeCapability, StreamState, build
from teeio.spdm.errors import DropRequest, SpdmError

u8 = st.integers(0, 0xFF)
key_sets = st.sampled_from(list(KeySet))
directions = st.sampled_from(list(Direction))
subs = st.sampled_from(list(SubStream))


@st.composite
def query_resps(draw: st.DrawFn) -> QueryResp:
    link = draw(st.booleans())
    n_tc = draw(st.integers(1, 8)) if link else 1
    n_sel = draw(st.integers(1, 4))
    cap = (0x1 if link else 0) | 0x2 | 0x40 | (n_tc - 1) << 13 | (n_sel - 1) << 16
    regs = [cap, draw(st.integers(0, 0xFFFFFFFF))]
    if link:
        regs += draw(st.lists(st.integers(0, 0xFFFFFFFF), min_size=2 * n_tc,
                              max_size=2 * n_tc))
    for _ in range(n_sel):
        n_addr = draw(st.integers(0, 3))
        regs.append(n_addr | draw(st.integers(0, 0xFFF)) << 4)
        regs += draw(st.lists(st.integers(0, 0xFFFFFFFF), min_size=4 + 3 * n_addr,
                              max_size=4 + 3 * n_addr))
    return QueryResp(draw(u8), draw(u8), draw(u8), draw(u8), draw(u8), tuple(regs))


def stream_obj(cls: type[KSetGo] | type[KSetStop] | type[KGoStopAck]
               ) -> st.SearchStrategy[IdeKmObject]:
    return st.builds(cls, u8, key_sets, directions, subs, u8)


objects: st.SearchStrategy[IdeKmObject] = st.one_of(
    st.builds(Query, u8),
    query_resps(),
    st.builds(KeyProg, u8, key_sets, directions, subs, st.binary(min_size=32, max_size=32),
              st.integers(0, (1 << 64) - 1), u8),
    st.builds(KpAck, u8, key_sets, directions, subs, u8, u8),
    stream_obj(KSetGo), stream_obj(KSetStop), stream_obj(KGoStopAck),
)


@given(objects)
def test_round_trip(obj: IdeKmObject) -> None:
    wire = obj.encode()
    assert wire[0] == PciSigProtocol.IDE_KM and wire[1] == obj.OBJECT_ID
    assert type(obj).decode(wire) == obj
    assert decode_object(wire) == obj


@given(objects, st.data())
def test_truncated_or_extended_rejected(obj: IdeKmObject, data: st.DataObject) -> None:
    wire = obj.encode()
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(IdeKmDecodeError):
        decode_object(wire[:cut])
    with pytest.raises(IdeKmDecodeError):
        decode_object(wire + b"\0\0\0\0")


@given(st.binary(min_size=32, max_size=32))
def test_key_byte_order_is_an_involution(k: bytes) -> None:
    assert key_from_wire(key_to_wire(k)) == k


def test_golden_key_prog_byte_order() -> None:
    """Intel tee-io-validator's key_byte_order.md: each key DW reversed,
    IFV = 1 as ``00 00 00 00 01 00 00 00``."""
    kp = KeyProg(3, KeySet.K1, Direction.TX, SubStream.CPL, bytes(range(32)), 1, 0)
    assert kp.encode().hex() == (
        "00020000" "03" "00" "23" "00"
        "03020100" "07060504" "0b0a0908" "0f0e0d0c" "13121110" "17161514" "1b1a1918" "1f1e1d1c"
        "00000000" "01000000")
    assert "00010203" not in repr(kp) and "key=" not in repr(kp)


def test_golden_small_objects() -> None:
    assert Query(0).encode().hex() == "00000000"
    assert KSetGo(7, KeySet.K0, Direction.RX, SubStream.NPR).encode().hex() == "0004000007001000"
    assert KpAck(7, KeySet.K1, Direction.TX, SubStream.PR, 0,
                 KpStatus.UNSUPPORTED_VALUE).encode().hex() == "0003000007030300"
    assert KpAck(1, KeySet.K0, Direction.RX, SubStream.PR, 0, 0x77).status_code is (
        KpStatus.UNSPECIFIED_FAILURE)


@pytest.mark.parametrize("raw, match", [
    ("", "truncated"),
    ("01000000", "Protocol ID 0x01"),
    ("00070000", "unknown Object ID"),
    ("0000000000", "QUERY must be 4 bytes"),
    ("00000100", r"reserved byte is 0x01 \(at offset 2 "),
    ("0004000107001000", r"reserved byte is 0x01 \(at offset 3 "),
    ("0004000007011000", r"reserved byte is 0x01 \(at offset 5 "),
    ("0004000007001400", "reserved bits 3:2"),
    ("0004000007003000", "unknown sub-stream 3"),
    ("0001000000000000" "42000000" "00000000" "00000000", "describes"),   # 1 selective stream
    ("000100000000000042000000000000", "whole DWs"),
])
def test_malformed_objects_rejected(raw: str, match: str) -> None:
    with pytest.raises(IdeKmDecodeError, match=match):
        decode_object(bytes.fromhex(raw))


def test_query_resp_constructor_checks_regs() -> None:
    with pytest.raises(ValueError, match="at least"):
        QueryResp(0, 0, 0, 0, 0, (0x42,))
    with pytest.raises(ValueError, match="inside the selective"):
        QueryResp(0, 0, 0, 0, 0, (0x42, 0))
    with pytest.raises(ValueError, match="describes 7 DWs"):
        QueryResp(0, 0, 0, 0, 0, (0x42, 0, 0, 0, 0, 0, 0, 0))


def test_key_prog_constructor_checks() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        KeyProg(1, KeySet.K0, Direction.RX, SubStream.PR, bytes(16))
    with pytest.raises(ValueError, match="stream_id"):
        KeyProg(256, KeySet.K0, Direction.RX, SubStream.PR, bytes(32))
    with pytest.raises(ValueError):
        KSetGo(1, KeySet.K0, Direction.RX, 3)  # type: ignore[arg-type]


# --- responder -------------------------------------------------------------------------------

SESSION = 0x0001FFFE
OTHER = 0x0002FFFD
SID = 4


def device() -> tuple[IdeCapability, IdeKmResponder]:
    cs = ConfigSpace()
    cap = build(cs, 0x100)
    sel0 = cap.streams[1]
    cap.config_write(sel0.ctl_off, (SID << 24).to_bytes(4, "little"))
    return cap, IdeKmResponder(cap, dev_func=0x08, bus=0x01, name="t")


def client(rsp: IdeKmResponder, session: int | None = SESSION) -> IdeKmClient:
    return IdeKmClient(lambda p: rsp.handle(p, session))


def all_keys() -> dict[tuple[Direction, SubStream], IdeKey]:
    return {(d, s): IdeKey.generate() for d in Direction for s in SubStream}


def test_query_reports_the_capability() -> None:
    cap, rsp = device()
    q = client(rsp).query()
    assert (q.port_index, q.dev_func, q.bus, q.segment, q.max_port_index) == (0, 8, 1, 0, 0)
    assert q.regs == cap.ide_registers()
    assert q.regs[2 + 2 + 1] >> 24 == SID     # selective stream 0 control: Stream ID


def test_full_flow_makes_the_stream_secure() -> None:
    cap, rsp = device()
    c = client(rsp)
    c.query()
    c.program_keys(SID, KeySet.K0, all_keys())
    c.go_all(SID, KeySet.K0, Direction.RX)
    c.go_all(SID, KeySet.K0, Direction.TX)
    st = cap.streams[1]
    cap.config_write(st.ctl_off, ((SID << 24) | 1).to_bytes(4, "little"))
    assert st.state is StreamState.SECURE


def test_unsecured_requests_get_no_response() -> None:
    _, rsp = device()
    for obj in (Query(0), KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR, bytes(32)),
                KSetGo(SID, KeySet.K0, Direction.RX, SubStream.PR)):
        with pytest.raises(DropRequest, match="secured session"):
            rsp.handle(obj.encode(), None)
    assert rsp.bound_session is None


@pytest.mark.parametrize("raw, status", [
    (KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR, bytes(32)).encode()[:44],
     KpStatus.INCORRECT_LENGTH),
    (KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR, bytes(32)).encode() + bytes(4),
     KpStatus.INCORRECT_LENGTH),
    (KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR, bytes(32), port_index=1).encode(),
     KpStatus.UNSUPPORTED_PORT_INDEX),
    (KeyProg(SID + 1, KeySet.K0, Direction.RX, SubStream.PR, bytes(32)).encode(),
     KpStatus.UNSUPPORTED_VALUE),
    (bytes.fromhex("0002000004003000") + bytes(40), KpStatus.UNSUPPORTED_VALUE),  # sub-stream 3
    (bytes.fromhex("0002000004000400") + bytes(40), KpStatus.UNSUPPORTED_VALUE),  # rsvd KSS
    (bytes.fromhex("0002000104000000") + bytes(40), KpStatus.UNSUPPORTED_VALUE),  # rsvd byte
    (KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR, bytes(32)).encode(),
     KpStatus.SUCCESS),
])
def test_key_prog_status_matrix(raw: bytes, status: KpStatus) -> None:
    cap, rsp = device()
    ack = rsp.handle(raw, SESSION)
    # KP_ACK echoes Stream ID, KeySubStream and PortIndex as received, even the refused ones.
    assert ack == bytes((0, 3, 0, 0, raw[4], status, raw[6], raw[7]))
    assert cap.key_programmed(SID, KeySet.K0, Direction.RX, SubStream.PR) is (
        status == KpStatus.SUCCESS)


def test_key_prog_for_the_set_in_use_is_unspecified_failure() -> None:
    _, rsp = device()
    c = client(rsp)
    c.program_keys(SID, KeySet.K0, all_keys())
    c.go_all(SID, KeySet.K0, Direction.TX)
    with pytest.raises(IdeKmResponseError, match="UNSPECIFIED_FAILURE") as ei:
        c.key_prog(SID, KeySet.K0, Direction.TX, SubStream.PR, IdeKey.generate())
    assert ei.value.status == KpStatus.UNSPECIFIED_FAILURE


def test_go_before_keys_is_dropped() -> None:
    cap, rsp = device()
    c = client(rsp)
    with pytest.raises(DropRequest, match="PR before its key was programmed"):
        c.k_set_go(SID, KeySet.K0, Direction.RX, SubStream.PR)
    # Another sub-stream's key does not count ...
    c.key_prog(SID, KeySet.K0, Direction.RX, SubStream.NPR, IdeKey.generate())
    with pytest.raises(DropRequest, match="PR before its key"):
        c.k_set_go(SID, KeySet.K0, Direction.RX, SubStream.PR)
    # ... nor does the other direction's, nor the other key set's.
    c.key_prog(SID, KeySet.K0, Direction.TX, SubStream.PR, IdeKey.generate())
    c.key_prog(SID, KeySet.K1, Direction.RX, SubStream.PR, IdeKey.generate())
    with pytest.raises(DropRequest):
        c.k_set_go(SID, KeySet.K0, Direction.RX, SubStream.PR)
    c.key_prog(SID, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    c.k_set_go(SID, KeySet.K0, Direction.RX, SubStream.PR)
    assert cap.streams[1].rx.is_go(KeySet.K0, SubStream.PR)


def test_spdm_emu_style_partial_go_is_acked_but_never_secure() -> None:
    """DMTF spdm-emu's requester programs and GOes only PR (Rx then Tx): every object is
    answered, yet the stream stays Insecure (not all six sub-stream keys are GO)."""
    cap, rsp = device()
    c = client(rsp)
    st = cap.streams[1]
    cap.config_write(st.ctl_off, ((SID << 24) | 1).to_bytes(4, "little"))
    for d in Direction:
        c.key_prog(SID, KeySet.K0, d, SubStream.PR, IdeKey.generate())
    for d in Direction:
        c.k_set_go(SID, KeySet.K0, d, SubStream.PR)
    assert not cap.streams[1].secure
    for d in Direction:
        c.k_set_stop(SID, KeySet.K0, d, SubStream.PR)


@pytest.mark.parametrize("raw, match", [
    (KSetGo(SID, KeySet.K0, Direction.RX, SubStream.PR, port_index=1).encode(), "PortIndex 1"),
    (KSetStop(SID + 1, KeySet.K0, Direction.RX, SubStream.PR).encode(), "unknown stream"),
    (bytes.fromhex("0004000004003000"), "sub-stream 3"),
    (bytes.fromhex("000500000400000000"), "8 bytes"),
    (bytes.fromhex("00000000") + b"\0", "4 bytes"),
    (Query(1).encode(), "PortIndex 1"),
    (KpAck(SID, KeySet.K0, Direction.RX, SubStream.PR).encode(), "not a request"),
    (KGoStopAck(SID, KeySet.K0, Direction.RX, SubStream.PR).encode(), "not a request"),
    (bytes.fromhex("01"), "not an IDE_KM"),
])
def test_malformed_requests_get_no_response(raw: bytes, match: str) -> None:
    _, rsp = device()
    with pytest.raises(DropRequest, match=match):
        rsp.handle(raw, SESSION)


def test_stop_then_ack() -> None:
    cap, rsp = device()
    c = client(rsp)
    c.program_keys(SID, KeySet.K0, all_keys())
    c.k_set_stop(SID, KeySet.K0, Direction.RX, SubStream.PR)
    assert not cap.key_programmed(SID, KeySet.K0, Direction.RX, SubStream.PR)


def test_session_binding_and_loss() -> None:
    cap, rsp = device()
    c = client(rsp)
    c.query()
    assert rsp.bound_session == SESSION
    c.program_keys(SID, KeySet.K0, all_keys())
    c.go_all(SID, KeySet.K0, Direction.RX)
    c.go_all(SID, KeySet.K0, Direction.TX)
    st = cap.streams[1]
    cap.config_write(st.ctl_off, ((SID << 24) | 1).to_bytes(4, "little"))
    assert st.state is StreamState.SECURE
    # Another session is ignored while the first is open.
    other = client(rsp, OTHER)
    with pytest.raises(DropRequest, match="bound to session"):
        other.query()
    with pytest.raises(DropRequest, match="bound to session"):
        other.k_set_stop(SID, KeySet.K0, Direction.RX, SubStream.PR)
    rsp.session_closed(OTHER)                 # not the bound one: nothing happens
    assert st.state is StreamState.SECURE
    # The bound session ends: keys gone, stream Insecure; a new session may bind.
    rsp.session_closed(SESSION)
    assert cap.streams[1].state is StreamState.INSECURE
    assert not cap.key_programmed(SID, KeySet.K0, Direction.RX, SubStream.PR)
    other.query()
    assert rsp.bound_session == OTHER


# --- requester-side checks -------------------------------------------------------------------

def test_client_rejects_mismatched_responses() -> None:
    ack = KpAck(SID, KeySet.K0, Direction.RX, SubStream.NPR).encode()
    c = IdeKmClient(lambda p: ack)
    with pytest.raises(IdeKmResponseError, match="does not answer"):
        c.key_prog(SID, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    with pytest.raises(IdeKmResponseError, match="QUERY: .*Object ID"):
        c.query()
    go_ack = KGoStopAck(SID, KeySet.K1, Direction.RX, SubStream.PR).encode()
    c = IdeKmClient(lambda p: go_ack)
    with pytest.raises(IdeKmResponseError, match="does not answer"):
        c.k_set_go(SID, KeySet.K0, Direction.RX, SubStream.PR)
    qr = QueryResp(1, 0, 0, 0, 1, (0x2, 0, 0, 0, 0, 0, 0)).encode()
    with pytest.raises(IdeKmResponseError, match="PortIndex 1"):
        IdeKmClient(lambda p: qr).query()


# --- PCI-SIG vendor-defined mux and a real secured session ------------------------------------

def test_mux_routes_by_protocol_id() -> None:
    _, rsp = device()
    mux = PciSigProtocolMux()
    mux.register(PciSigProtocol.IDE_KM, rsp.handle)
    assert QueryResp.decode(mux(Query(0).encode(), SESSION)).port_index == 0
    with pytest.raises(SpdmError, match="Protocol ID 0x01 not supported"):
        mux(b"\x01\x10", SESSION)
    with pytest.raises(SpdmError, match="without a Protocol ID"):
        mux(b"", SESSION)


def test_over_a_secured_spdm_session() -> None:
    from teeio.spdm.defs import MeasSummaryHashType
    from tests.support.spdm_pair import connect, make_pair

    req, spdm_rsp, _ = make_pair("P-256", versions=(0x12,))
    cap, km = device()
    mux = PciSigProtocolMux()
    mux.register(PciSigProtocol.IDE_KM, km.handle)
    spdm_rsp.register_vendor_handler(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, mux)
    connect(req)
    sid = req.start_session(0, MeasSummaryHashType.NONE)
    c = IdeKmClient(lambda p: req.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, p,
                                                 sid))
    assert c.query().regs == cap.ide_registers()
    c.program_keys(SID, KeySet.K0, all_keys())
    c.go_all(SID, KeySet.K0, Direction.RX)
    c.go_all(SID, KeySet.K0, Direction.TX)
    assert cap.streams[1].keys_ready()
    # Outside the session: the plain SPDM path turns "no response" into ERROR.
    from teeio.spdm.errors import ErrorResponse
    with pytest.raises(ErrorResponse, match="UnsupportedRequest"):
        req.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, Query(0).encode())
