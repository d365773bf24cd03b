"""DOE codecs (teeio/doe/): the data object header (PCIe 6.3 §6.30.1), the DOE Discovery
request and response (§6.30.1.1) and the spdm-emu socket header."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio.codec import DecodeError, Struct, strategy
from teeio.doe import (
    MAX_OBJECT_BYTES,
    MAX_OBJECT_DW,
    PCI_SIG_VENDOR_ID,
    DataObjectType,
    DiscoveryRequest,
    DiscoveryResponse,
    DoeDecodeError,
    DoeError,
    DoeObject,
    SocketCommand,
    SocketHeader,
    SocketTransport,
    pad_dw,
    protocol_name,
)
from tests.support.doe_objects import hdr

# -- data objects -------------------------------------------------------------------------------

payloads = st.integers(0, 64).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@given(vendor=st.integers(0, 0xFFFF), dtype=st.integers(0, 0xFF), payload=payloads)
def test_object_round_trip(vendor: int, dtype: int, payload: bytes) -> None:
    obj = DoeObject(vendor, dtype, payload)
    raw = obj.encode()
    assert len(raw) == 8 + len(payload) == 4 * obj.length_dw
    assert DoeObject.decode(raw) == obj
    assert raw[:2] == vendor.to_bytes(2, "little") and raw[2] == dtype and raw[3] == 0
    assert int.from_bytes(raw[4:8], "little") == obj.length_dw


@given(dtype=st.sampled_from([DataObjectType.CMA_SPDM_CONNECTION_ID,
                              DataObjectType.SECURED_CMA_SPDM_CONNECTION_ID]),
       conn=st.integers(0, 0xFFF), payload=payloads)
def test_object_with_connection_id_round_trip(dtype: int, conn: int, payload: bytes) -> None:
    obj = DoeObject(PCI_SIG_VENDOR_ID, dtype, payload, conn)
    raw = obj.encode()
    assert (int.from_bytes(raw[4:8], "little") >> 18) & 0xFFF == conn
    assert DoeObject.decode(raw) == obj


def test_largest_object_encodes_length_zero() -> None:
    obj = DoeObject(1, 1, bytes(MAX_OBJECT_BYTES - 8))
    raw = obj.encode()
    assert len(raw) == MAX_OBJECT_BYTES and obj.length_dw == MAX_OBJECT_DW
    assert int.from_bytes(raw[4:8], "little") == 0        # 0 encodes 2^18 DW
    assert DoeObject.decode(raw) == obj
    with pytest.raises(ValueError):
        DoeObject(1, 1, bytes(MAX_OBJECT_BYTES - 4))


def test_pad_dw() -> None:
    assert pad_dw(b"") == b""
    assert pad_dw(b"\x10") == b"\x10\0\0\0"
    assert pad_dw(b"abcd") == b"abcd"
    assert pad_dw(b"abcde") == b"abcde\0\0\0"


@pytest.mark.parametrize("kwargs", [
    {"vendor_id": 0x10000, "data_object_type": 1},
    {"vendor_id": 1, "data_object_type": 0x100},
    {"vendor_id": 1, "data_object_type": 1, "payload": b"abc"},
    {"vendor_id": 1, "data_object_type": 1, "connection_id": 1},       # type 1 has no CID
    {"vendor_id": 1, "data_object_type": 3, "connection_id": 0x1000},
])
def test_object_constructor_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DoeObject(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "offset", "why"), [
    (b"", 0, "shorter than its header"),
    (b"\1\0\1\0\2\0\0", 7, "shorter than its header"),
    (hdr(0x00010001, 3, b"ab"), 10, "whole number of DWs"),
    (hdr(0x01010001, 2), 3, "reserved bits 31:24"),
    (hdr(0x00010001, 2 | 1 << 30), 4, "reserved bits 31:30"),
    (hdr(0x00010001, 2 | 1 << 31), 4, "reserved bits 31:30"),
    (hdr(0x00010001, 1), 4, "Length 1"),
    (hdr(0x00010001, 3), 4, "3 DW, 2 DW received"),
    (hdr(0x00010001, 2, bytes(4)), 4, "2 DW, 3 DW received"),
    (hdr(0x00010001, 0, bytes(4)), 4, "262144 DW"),
    (hdr(0x00010001, 2 | 5 << 18), 4, "reserved bits 29:18"),   # CID on type 1
])
def test_malformed_objects(raw: bytes, offset: int, why: str) -> None:
    with pytest.raises(DoeDecodeError, match=why) as exc:
        DoeObject.decode(raw)
    assert exc.value.data == raw and exc.value.offset == offset


# -- DOE Discovery codec ------------------------------------------------------------------------

@given(index=st.integers(0, 255), version=st.integers(0, 255))
def test_discovery_request_round_trip(index: int, version: int) -> None:
    req = DiscoveryRequest(index, version)
    raw = req.encode()
    assert raw == bytes([index, version, 0, 0])
    assert DiscoveryRequest.decode(raw) == req


@given(vendor=st.integers(0, 0xFFFF), dtype=st.integers(0, 0xFF), nxt=st.integers(0, 0xFF))
def test_discovery_response_round_trip(vendor: int, dtype: int, nxt: int) -> None:
    rsp = DiscoveryResponse(vendor, dtype, nxt)
    raw = rsp.encode()
    assert int.from_bytes(raw, "little") == vendor | dtype << 16 | nxt << 24
    assert DiscoveryResponse.decode(raw) == rsp
    assert rsp.valid == (vendor != 0xFFFF)


@pytest.mark.parametrize("cls", [DoeObject, DiscoveryRequest, DiscoveryResponse, SocketHeader],
                         ids=lambda k: k.__name__)
def test_declared_round_trip(cls: type[Struct]) -> None:
    """decode(encode(m)) == m and a byte-identical re-encode, for values the declaration
    itself generates (teeio.codec.strategy)."""
    @settings(max_examples=80, deadline=None)
    @given(strategy(cls))
    def run(m: Struct) -> None:
        wire = m.encode()
        back = cls.decode(wire)
        assert back == m and back.encode() == wire
    run()


def test_decode_errors_are_the_core_decode_error() -> None:
    with pytest.raises(DecodeError) as exc:
        DoeObject.decode(hdr(0x01010001, 2))
    assert isinstance(exc.value, DoeDecodeError) and isinstance(exc.value, DoeError)
    assert exc.value.raw == exc.value.data and exc.value.offset == 3
    with pytest.raises(DoeDecodeError, match="trailing"):
        DiscoveryResponse.decode(bytes(5))


def test_discovery_request_ignores_reserved_bits() -> None:
    # Table 6-30: responders must ignore bits 31:16.
    assert DiscoveryRequest.decode(b"\x02\x02\xAA\x55") == DiscoveryRequest(2, 2)


@pytest.mark.parametrize("raw", [b"", b"\0\0\0", bytes(5), bytes(8)])
def test_discovery_codecs_want_one_dw(raw: bytes) -> None:
    with pytest.raises(DoeDecodeError):
        DiscoveryRequest.decode(raw)
    with pytest.raises(DoeDecodeError):
        DiscoveryResponse.decode(raw)


def test_protocol_name_matches_linux_sysfs() -> None:
    assert protocol_name(1, 0) == "0001:00"
    assert protocol_name(0x1E98, 0x2) == "1e98:02"


# -- spdm-emu socket header ---------------------------------------------------------------------

@given(cmd=st.integers(0, 0xFFFFFFFF), tr=st.integers(0, 0xFFFFFFFF),
       size=st.integers(0, 0xFFFFFFFF))
def test_socket_header_round_trip_big_endian(cmd: int, tr: int, size: int) -> None:
    h = SocketHeader(cmd, tr, size)
    raw = h.encode()
    assert raw == struct.pack(">III", cmd, tr, size)
    assert SocketHeader.decode(raw) == h


def test_socket_header_names_and_errors() -> None:
    assert SocketHeader(SocketCommand.TEST, SocketTransport.PCI_DOE, 0).encode() \
        == bytes.fromhex("0000dead" "00000002" "00000000")
    assert SocketHeader(0xFFFE, 2, 0).command_name() == "SHUTDOWN"
    assert SocketHeader(0x1234, 2, 0).command_name() == "0x1234"
    with pytest.raises(ValueError):
        SocketHeader.decode(bytes(11))
