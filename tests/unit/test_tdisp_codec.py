"""TDISP codec and report: round trips for every message, golden header bytes, malformed
inputs -> the TDISP error code the responder answers with, chunked report reassembly."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio.codec import DecodeError, ProtocolError, Struct, strategy
from teeio.ide_km import PciSigProtocol
from teeio.tdisp import codec as c
from teeio.tdisp.defs import (
    PCI_PROTOCOL_ID_TDISP,
    ErrorCode,
    InterfaceInfo,
    LockInterfaceFlags,
    MessageType,
    MmioRangeAttributes,
    TdiState,
)
from teeio.tdisp.report import DeviceInterfaceReport, ReportReader, page_number, report_portion

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
fid = u32
nonce = st.binary(min_size=32, max_size=32)
mmio_ranges = st.builds(c.MmioRange, u64, u32, st.integers(0, 15).map(MmioRangeAttributes), u16)

MESSAGES = st.one_of(
    st.builds(c.GetTdispVersion, fid),
    st.builds(c.TdispVersion, fid, st.lists(u8, min_size=1, max_size=8).map(tuple)),
    st.builds(c.GetTdispCapabilities, fid, u32),
    st.builds(c.TdispCapabilities, fid, u32, st.integers(0, 2**128 - 1), u16, u8, u8, u8),
    st.builds(c.LockInterfaceRequest, fid, st.integers(0, 0x1F).map(LockInterfaceFlags), u8,
              u64, u64),
    st.builds(c.LockInterfaceResponse, fid, nonce),
    st.builds(c.GetDeviceInterfaceReport, fid, u16, u16),
    st.builds(c.DeviceInterfaceReportResponse, fid, st.binary(max_size=64), u16),
    st.builds(c.GetDeviceInterfaceState, fid),
    st.builds(c.DeviceInterfaceState, fid, st.sampled_from(list(TdiState))),
    st.builds(c.StartInterfaceRequest, fid, nonce),
    st.builds(c.StartInterfaceResponse, fid),
    st.builds(c.StopInterfaceRequest, fid),
    st.builds(c.StopInterfaceResponse, fid),
    st.builds(c.BindP2pStreamRequest, fid, u8),
    st.builds(c.BindP2pStreamResponse, fid),
    st.builds(c.UnbindP2pStreamRequest, fid, u8),
    st.builds(c.UnbindP2pStreamResponse, fid),
    st.builds(c.SetMmioAttributeRequest, fid, mmio_ranges),
    st.builds(c.SetMmioAttributeResponse, fid),
    st.builds(c.VdmRequest, fid, u8, st.binary(max_size=4), st.binary(max_size=16)),
    st.builds(c.VdmResponse, fid, u8, st.binary(max_size=4), st.binary(max_size=16)),
    st.builds(c.TdispErrorResponse, fid, u32, u32, st.binary(max_size=32)),
)

REPORTS = st.builds(DeviceInterfaceReport, st.integers(0, 0x1F).map(InterfaceInfo), u16, u16,
                    u32, st.lists(mmio_ranges, max_size=6).map(tuple), st.binary(max_size=64))


def test_every_message_type_has_a_class() -> None:
    assert set(c.MESSAGE_CLASSES) == set(MessageType)
    assert PCI_PROTOCOL_ID_TDISP == PciSigProtocol.TDISP


@given(MESSAGES)
def test_round_trip(msg: c.TdispMessage) -> None:
    raw = msg.encode()
    assert type(msg).decode(raw) == msg
    assert c.decode_message(raw) == msg
    assert c.from_vendor_payload(c.to_vendor_payload(msg)) == msg
    assert raw[0] == 0x10 and raw[1] == msg.MESSAGE_TYPE
    assert raw[4:8] == msg.function_id.to_bytes(4, "little") and raw[8:16] == bytes(8)


@pytest.mark.parametrize("cls", [*c.MESSAGE_CLASSES.values(), c.MmioRange],
                         ids=lambda k: k.__name__)
def test_declared_round_trip(cls: type[Struct]) -> None:
    """decode(encode(m)) == m and a byte-identical re-encode, for values the declaration
    itself generates (teeio.codec.strategy)."""
    @settings(max_examples=60, deadline=None)
    @given(strategy(cls))
    def run(m: Struct) -> None:
        wire = m.encode()
        back = cls.decode(wire)
        assert back == m and back.encode() == wire
        if isinstance(m, c.TdispMessage):
            assert c.decode_message(wire) == m and wire[1] == m.MESSAGE_TYPE
    run()


def test_errors_are_the_core_errors() -> None:
    e = _err(b"\x11" + c.GetTdispVersion(1).encode()[1:])
    assert isinstance(e, DecodeError) and isinstance(e, ProtocolError)
    assert e.code is ErrorCode.VERSION_MISMATCH and e.offset == 0 and "0x11" in e.reason
    with pytest.raises(c.TdispDecodeError) as ei:                   # via the class, too
        c.GetTdispVersion.decode(b"\x11" + c.GetTdispVersion(1).encode()[1:])
    assert ei.value.code is ErrorCode.VERSION_MISMATCH
    with pytest.raises(c.TdispDecodeError) as ei:
        c.StopInterfaceRequest.decode(c.StopInterfaceResponse(1).encode())
    assert ei.value.offset == 1 and ei.value.code is ErrorCode.INVALID_REQUEST
    assert isinstance(c.TdispError(ErrorCode.BUSY), ProtocolError)
    legacy = c.TdispDecodeError("why", b"abc", 2)                   # (reason, raw, offset)
    assert (legacy.raw, legacy.offset, legacy.reason) == (b"abc", 2, "why")


@given(REPORTS)
def test_report_round_trip(rep: DeviceInterfaceReport) -> None:
    assert DeviceInterfaceReport.decode(rep.encode()) == rep


def test_golden_lock_request() -> None:
    m = c.LockInterfaceRequest(c.function_id(0x0108, 2),
                               LockInterfaceFlags.NO_FW_UPDATE | LockInterfaceFlags.LOCK_MSIX,
                               default_stream_id=1, mmio_reporting_offset=2**64 - 0x1000,
                               bind_p2p_address_mask=0xFF)
    assert m.encode() == bytes.fromhex(
        "10 83 0000 08010201 0000000000000000"
        "0500 01 00 00f0ffffffffffff ff00000000000000")
    assert m.requester_id == 0x0108 and m.segment == 2
    assert c.GetTdispVersion(0xBEEF).segment is None


def test_nonce_not_in_repr() -> None:
    n = bytes(range(1, 33))
    for m in (c.LockInterfaceResponse(1, n), c.StartInterfaceRequest(1, n)):
        assert n.hex() not in repr(m) and repr(n) not in repr(m)


def _err(raw: bytes) -> c.TdispDecodeError:
    with pytest.raises(c.TdispDecodeError) as ei:
        c.decode_message(raw)
    return ei.value


def test_malformed_inputs() -> None:
    good = c.LockInterfaceRequest(1).encode()
    assert _err(good[:15]).code is ErrorCode.INVALID_REQUEST                   # truncated header
    assert _err(b"\x11" + good[1:]).code is ErrorCode.VERSION_MISMATCH         # version 1.1
    assert _err(b"\x01" + good[1:]).code is ErrorCode.VERSION_MISMATCH         # 0x01 not 0x10
    assert _err(good[:2] + b"\x01\x00" + good[4:]).offset == 2                 # header rsvd
    assert _err(good[:15] + b"\x01" + good[16:]).offset == 15                  # interface rsvd
    assert _err(good + b"\x00").code is ErrorCode.INVALID_REQUEST              # too long
    assert _err(good[:-1]).code is ErrorCode.INVALID_REQUEST                   # too short
    assert _err(good[:16] + b"\x20\x00" + good[18:]).offset == 16              # reserved flag
    assert _err(good[:19] + b"\x01" + good[20:]).offset == 19                  # reserved byte
    e = _err(good[:1] + b"\x8c" + good[2:16])
    assert e.code is ErrorCode.UNSUPPORTED_REQUEST and e.data == 0x8C
    assert _err(good[:1] + b"\x0c" + good[2:16]).code is ErrorCode.INVALID_REQUEST
    st_ = c.DeviceInterfaceState(1, TdiState.RUN).encode()
    assert _err(st_[:16] + b"\x04").offset == 16                              # unknown state
    assert _err(c.TdispVersion(1).encode()[:16] + b"\x00").offset == 16       # count 0
    assert _err(c.TdispVersion(1, (0x10, 0x11)).encode()[:-1]).code is ErrorCode.INVALID_REQUEST
    rep = c.DeviceInterfaceReportResponse(1, b"abc", 0).encode()
    assert _err(rep[:-1]).code is ErrorCode.INVALID_REQUEST                   # portion length
    assert _err(c.TdispErrorResponse(1).encode()[:23]).code is ErrorCode.INVALID_REQUEST
    vdm = c.VdmRequest(1, 0, b"\x01\x00").encode()
    assert _err(vdm[:17] + b"\x05" + vdm[18:]).offset == 17                   # vendor id len
    caps = bytearray(c.TdispCapabilities(1).encode())
    caps[39] = 1
    assert _err(bytes(caps)).offset == 39
    mm = bytearray(c.SetMmioAttributeRequest(1, c.MmioRange(1, 1)).encode())
    mm[16 + 12] = 0x10
    assert _err(bytes(mm)).offset == 28
    with pytest.raises(c.TdispDecodeError):
        c.StopInterfaceRequest.decode(c.StopInterfaceResponse(1).encode())    # wrong type
    with pytest.raises(c.TdispDecodeError):
        c.from_vendor_payload(b"\x00" + good)                                 # IDE_KM id


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        c.LockInterfaceRequest(1, flags=0x20)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        c.StartInterfaceRequest(1, bytes(31))
    with pytest.raises(ValueError):
        c.TdispVersion(1, ())
    with pytest.raises(ValueError):
        c.GetTdispVersion(2**32)
    with pytest.raises(ValueError):
        c.MmioRange(0, 0, MmioRangeAttributes(0x10))


def test_error_becomes_response() -> None:
    e = c.TdispError(ErrorCode.UNSUPPORTED_REQUEST, data=0x8B)
    r = e.to_response(0xBEEF)
    assert r.encode()[16:] == struct.pack("<II", 7, 0x8B)
    assert c.decode_message(r.encode()) == r


def test_capabilities_supports() -> None:
    caps = c.TdispCapabilities(1, req_msgs_supported=0xFE)
    assert caps.encode()[20] == 0xFE
    assert caps.supports(MessageType.STOP_INTERFACE_REQUEST)
    assert not caps.supports(MessageType.BIND_P2P_STREAM_REQUEST)
    assert len(caps.encode()) == 44


# --- report ---------------------------------------------------------------------------------------

def test_report_golden_and_malformed() -> None:
    rep = DeviceInterfaceReport(InterfaceInfo.DMA_WITHOUT_PASID, 0, 0, 0,
                                (c.MmioRange(page_number(0xFE00_0000, 0x1000), 4,
                                             MmioRangeAttributes(0), 0),),
                                b"dev")
    raw = rep.encode()
    assert raw[:16] == bytes.fromhex("0200 0000 0000 0000 00000000 01000000")
    assert raw[16:32] == struct.pack("<QIHH", 0xFE001, 4, 0, 0)
    assert raw[32:] == b"\x03\x00\x00\x00dev"
    for bad, off in ((raw[:-1], 32), (raw + b"x", 32), (raw[:1] + b"\x01" + raw[2:], 0),
                     (raw[:2] + b"\x01" + raw[3:], 2), (raw[:12] + b"\x05" + raw[13:], 12)):
        with pytest.raises(c.TdispDecodeError) as ei:
            DeviceInterfaceReport.decode(bad)
        assert ei.value.offset == off and ei.value.code is ErrorCode.INVALID_REQUEST
    assert page_number(0x1000, -0x2000) == (2**64 - 0x1000) >> 12


@given(REPORTS, st.integers(1, 40), st.integers(1, 40))
def test_chunked_reassembly(rep: DeviceInterfaceReport, chunk: int, dev_max: int) -> None:
    raw = rep.encode()
    reader = ReportReader(7, chunk)
    rounds = 0
    while (req := reader.next_request()) is not None:
        req = c.GetDeviceInterfaceReport.decode(req.encode())
        reader.feed(report_portion(raw, req, dev_max))
        rounds += 1
    assert reader.report_bytes() == raw and reader.report() == rep
    assert rounds == -(-len(raw) // min(chunk, dev_max))


def test_report_portion_errors() -> None:
    raw = DeviceInterfaceReport().encode()
    with pytest.raises(c.TdispDecodeError) as ei:
        report_portion(raw, c.GetDeviceInterfaceReport(1, len(raw), 10))
    assert ei.value.code is ErrorCode.INVALID_REQUEST
    with pytest.raises(c.TdispDecodeError):
        report_portion(raw, c.GetDeviceInterfaceReport(1, 0, 0))
    reader = ReportReader(1, 8)
    with pytest.raises(c.TdispDecodeError):      # larger than asked
        reader.feed(c.DeviceInterfaceReportResponse(1, bytes(9), 0))
    with pytest.raises(c.TdispDecodeError):      # other interface
        reader.feed(c.DeviceInterfaceReportResponse(2, bytes(8), 0))
    reader.feed(c.DeviceInterfaceReportResponse(1, bytes(8), 12))
    with pytest.raises(c.TdispDecodeError):      # inconsistent remainder
        reader.feed(c.DeviceInterfaceReportResponse(1, bytes(8), 5))
    with pytest.raises(ValueError):
        reader.report_bytes()
