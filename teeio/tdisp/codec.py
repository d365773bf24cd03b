"""TDISP messages (PCIe 6.x §11.3; layouts as libspdm ``pci_tdisp.h``), TDISP 1.0.

Every message starts with the 16-byte common header (Table 11-5), all fields LE::

    [0] TDISPVersion (0x10)  [1] MessageType  [2..3] reserved
    [4..7]  INTERFACE_ID.FUNCTION_ID: [15:0] Requester ID, [23:16] segment, b24 segment valid
    [8..15] INTERFACE_ID reserved
    [16..]  payload

On the wire a message is the payload of an SPDM VENDOR_DEFINED_REQUEST/RESPONSE (PCI-SIG)
after the Protocol ID byte 0x01: :func:`to_vendor_payload` / :func:`from_vendor_payload`.

Decoders are strict: exact size, reserved bytes zero, known enum values; any violation is a
:class:`TdispDecodeError` carrying the TDISP error code the responder answers with
(INVALID_REQUEST; VERSION_MISMATCH for a header version other than 1.0; UNSUPPORTED_REQUEST,
ERROR_DATA = the code, for a request code we do not know).  Reserved bits in FUNCTION_ID are
left to the responder (it compares the whole id against the TDIs it hosts: INVALID_INTERFACE).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self, TypeVar

from .defs import (
    FUNCTION_ID_REQUESTER_ID_MASK,
    FUNCTION_ID_REQUESTER_SEGMENT_MASK,
    FUNCTION_ID_REQUESTER_SEGMENT_SHIFT,
    FUNCTION_ID_REQUESTER_SEGMENT_VALID,
    HEADER_SIZE,
    LOCK_INTERFACE_FLAGS_RESERVED,
    MMIO_RANGE_ATTRIBUTES_RESERVED,
    PCI_PROTOCOL_ID_TDISP,
    START_INTERFACE_NONCE_SIZE,
    SUPPORTED_VERSIONS,
    TDISP_VERSION_1_0,
    ErrorCode,
    LockInterfaceFlags,
    MessageType,
    MmioRangeAttributes,
    TdiState,
)

__all__ = [
    "BindP2pStreamRequest", "BindP2pStreamResponse", "DeviceInterfaceReportResponse",
    "DeviceInterfaceState", "GetDeviceInterfaceReport", "GetDeviceInterfaceState",
    "GetTdispCapabilities", "GetTdispVersion", "LockInterfaceRequest", "LockInterfaceResponse",
    "MESSAGE_CLASSES", "MmioRange", "SetMmioAttributeRequest", "SetMmioAttributeResponse",
    "StartInterfaceRequest", "StartInterfaceResponse", "StopInterfaceRequest",
    "StopInterfaceResponse", "TdispCapabilities", "TdispDecodeError", "TdispError",
    "TdispErrorResponse", "TdispMessage", "TdispVersion", "UnbindP2pStreamRequest",
    "UnbindP2pStreamResponse", "VdmRequest", "VdmResponse", "decode_message",
    "from_vendor_payload", "function_id", "to_vendor_payload",
]

_M = TypeVar("_M", bound="TdispMessage")


# --- errors --------------------------------------------------------------------------------------

class TdispError(Exception):
    """A protocol error that becomes a TDISP_ERROR response (code, data, extended data)."""

    def __init__(self, code: ErrorCode, message: str = "", data: int = 0,
                 ext: bytes = b"") -> None:
        self.code = ErrorCode(code)
        self.data = data & 0xFFFFFFFF
        self.ext = bytes(ext)
        super().__init__(message or self.code.name)

    def to_response(self, function_id: int) -> TdispErrorResponse:
        return TdispErrorResponse(function_id, self.code, self.data, self.ext)


class TdispDecodeError(TdispError, ValueError):
    """A malformed TDISP message; keeps the raw bytes and the failing offset."""

    def __init__(self, message: str, raw: bytes = b"", offset: int = 0,
                 code: ErrorCode = ErrorCode.INVALID_REQUEST, data: int = 0) -> None:
        self.raw = bytes(raw)
        self.offset = offset
        super().__init__(code, f"TDISP: {message} (at offset {offset} of {len(raw)} bytes)",
                         data)


# --- field helpers -------------------------------------------------------------------------------

def _check(name: str, v: int, bits: int) -> None:
    if not 0 <= v < 1 << bits:
        raise ValueError(f"{name} = {v} does not fit in {bits} bits")


def _zero(raw: bytes, start: int, end: int, what: str) -> None:
    for i in range(start, end):
        if raw[i]:
            raise TdispDecodeError(f"reserved {what} byte is 0x{raw[i]:02x}", raw, i)


def function_id(requester_id: int, segment: int | None = None) -> int:
    """FUNCTION_ID from a Requester ID (bus << 8 | dev << 3 | fn) and optional segment."""
    _check("requester_id", requester_id, 16)
    if segment is None:
        return requester_id
    _check("segment", segment, 8)
    return requester_id | segment << FUNCTION_ID_REQUESTER_SEGMENT_SHIFT \
        | FUNCTION_ID_REQUESTER_SEGMENT_VALID


# --- base ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TdispMessage:
    """Common header; subclasses add the payload (``_payload`` / ``_parse``)."""

    MESSAGE_TYPE: ClassVar[MessageType]
    PAYLOAD_SIZE: ClassVar[int | None] = 0      # None: variable, checked by ``_parse``

    function_id: int
    #: set by ``decode`` from the header; always 1.0 when built locally
    version: int = field(default=TDISP_VERSION_1_0, init=False)

    def __post_init__(self) -> None:
        _check("function_id", self.function_id, 32)

    @property
    def requester_id(self) -> int:
        return self.function_id & FUNCTION_ID_REQUESTER_ID_MASK

    @property
    def segment(self) -> int | None:
        if not self.function_id & FUNCTION_ID_REQUESTER_SEGMENT_VALID:
            return None
        return (self.function_id & FUNCTION_ID_REQUESTER_SEGMENT_MASK) \
            >> FUNCTION_ID_REQUESTER_SEGMENT_SHIFT

    def encode(self) -> bytes:
        head = struct.pack("<BBHIQ", self.version, self.MESSAGE_TYPE, 0, self.function_id, 0)
        return head + self._payload()

    def _payload(self) -> bytes:
        return b""

    @classmethod
    def decode(cls: type[_M], data: bytes) -> _M:
        raw = bytes(data)
        version, mtype, fid = _header(raw)
        if mtype != cls.MESSAGE_TYPE:
            raise TdispDecodeError(f"MessageType 0x{mtype:02x}, expected "
                                   f"{cls.MESSAGE_TYPE.name}", raw, 1)
        if cls.PAYLOAD_SIZE is not None and len(raw) != HEADER_SIZE + cls.PAYLOAD_SIZE:
            raise TdispDecodeError(f"{cls.MESSAGE_TYPE.name} must be "
                                   f"{HEADER_SIZE + cls.PAYLOAD_SIZE} bytes, got {len(raw)}",
                                   raw, min(len(raw), HEADER_SIZE + cls.PAYLOAD_SIZE))
        msg = cls._parse(fid, raw)
        object.__setattr__(msg, "version", version)
        return msg

    @classmethod
    def _parse(cls: type[_M], fid: int, raw: bytes) -> _M:
        return cls(fid)


def _header(raw: bytes) -> tuple[int, int, int]:
    if len(raw) < HEADER_SIZE:
        raise TdispDecodeError("truncated: no 16-byte TDISP header", raw, len(raw))
    version, mtype, rsvd, fid, rsvd2 = struct.unpack_from("<BBHIQ", raw)
    if version not in SUPPORTED_VERSIONS:
        raise TdispDecodeError(f"TDISPVersion 0x{version:02x} not supported", raw, 0,
                               ErrorCode.VERSION_MISMATCH)
    _zero(raw, 2, 4, "header")
    _zero(raw, 8, 16, "INTERFACE_ID")
    return version, mtype, fid


# --- MMIO_RANGE (Table 11-15; also the SET_MMIO_ATTRIBUTE payload) ------------------------------

@dataclass(frozen=True)
class MmioRange:
    """One 16-byte MMIO_RANGE: first 4K page *number* (MMIO_REPORTING_OFFSET already
    applied), number of 4K pages, attributes [15:0], Range ID [31:16] (BAR index for BARs)."""

    SIZE: ClassVar[int] = 16
    first_page: int
    number_of_pages: int
    attributes: MmioRangeAttributes = MmioRangeAttributes(0)
    range_id: int = 0

    def __post_init__(self) -> None:
        _check("first_page", self.first_page, 64)
        _check("number_of_pages", self.number_of_pages, 32)
        _check("range_id", self.range_id, 16)
        if self.attributes & MMIO_RANGE_ATTRIBUTES_RESERVED or self.attributes < 0:
            raise ValueError(f"MMIO range attributes 0x{self.attributes:x}: reserved bits")
        object.__setattr__(self, "attributes", MmioRangeAttributes(self.attributes))

    def encode(self) -> bytes:
        return struct.pack("<QIHH", self.first_page, self.number_of_pages, self.attributes,
                           self.range_id)

    @classmethod
    def decode_at(cls, raw: bytes, off: int) -> MmioRange:
        if len(raw) < off + cls.SIZE:
            raise TdispDecodeError("truncated MMIO_RANGE", raw, len(raw))
        page, n, attrs, rid = struct.unpack_from("<QIHH", raw, off)
        if attrs & MMIO_RANGE_ATTRIBUTES_RESERVED:
            raise TdispDecodeError(f"MMIO_RANGE attributes 0x{attrs:04x}: reserved bits set",
                                   raw, off + 12)
        return cls(page, n, MmioRangeAttributes(attrs), rid)


# --- version and capabilities (§11.3.3–11.3.6) ----------------------------------------------------

@dataclass(frozen=True)
class GetTdispVersion(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.GET_TDISP_VERSION


@dataclass(frozen=True)
class TdispVersion(TdispMessage):
    """[16] VERSION_NUM_COUNT (>= 1), then one byte per version."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.TDISP_VERSION
    PAYLOAD_SIZE: ClassVar[int | None] = None
    versions: tuple[int, ...] = (TDISP_VERSION_1_0,)
    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "versions", tuple(self.versions))
        if not 1 <= len(self.versions) <= 0xFF:
            raise ValueError("TDISP_VERSION needs 1..255 version entries")
        for v in self.versions:
            _check("version entry", v, 8)

    def _payload(self) -> bytes:
        return bytes((len(self.versions), *self.versions))

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> TdispVersion:
        if len(raw) < HEADER_SIZE + 1:
            raise TdispDecodeError("TDISP_VERSION without VERSION_NUM_COUNT", raw, len(raw))
        n = raw[HEADER_SIZE]
        if n == 0:
            raise TdispDecodeError("VERSION_NUM_COUNT is 0", raw, HEADER_SIZE)
        if len(raw) != HEADER_SIZE + 1 + n:
            raise TdispDecodeError(f"TDISP_VERSION with {n} entries must be "
                                   f"{HEADER_SIZE + 1 + n} bytes", raw,
                                   min(len(raw), HEADER_SIZE + 1 + n))
        return cls(fid, tuple(raw[HEADER_SIZE + 1:]))


@dataclass(frozen=True)
class GetTdispCapabilities(TdispMessage):
    """[16..19] TSM_CAPS (reserved in 1.0, carried as is)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.GET_TDISP_CAPABILITIES
    PAYLOAD_SIZE: ClassVar[int | None] = 4
    tsm_caps: int = 0
    def __post_init__(self) -> None:
        super().__post_init__()
        _check("tsm_caps", self.tsm_caps, 32)

    def _payload(self) -> bytes:
        return struct.pack("<I", self.tsm_caps)

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> GetTdispCapabilities:
        return cls(fid, struct.unpack_from("<I", raw, HEADER_SIZE)[0])


@dataclass(frozen=True)
class TdispCapabilities(TdispMessage):
    """[16..19] DSM_CAPS, [20..35] REQ_MSGS_SUPPORTED (bit n = request 0x80+n),
    [36..37] LOCK_INTERFACE_FLAGS_SUPPORTED, [38..40] reserved, [41] DEV_ADDR_WIDTH,
    [42] NUM_REQ_THIS, [43] NUM_REQ_ALL."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.TDISP_CAPABILITIES
    PAYLOAD_SIZE: ClassVar[int | None] = 28
    dsm_caps: int = 0
    req_msgs_supported: int = 0
    lock_interface_flags_supported: int = 0
    dev_addr_width: int = 52
    num_req_this: int = 1
    num_req_all: int = 1
    def __post_init__(self) -> None:
        super().__post_init__()
        _check("dsm_caps", self.dsm_caps, 32)
        _check("req_msgs_supported", self.req_msgs_supported, 128)
        _check("lock_interface_flags_supported", self.lock_interface_flags_supported, 16)
        for name in ("dev_addr_width", "num_req_this", "num_req_all"):
            _check(name, getattr(self, name), 8)

    def supports(self, code: MessageType) -> bool:
        return code.is_request and bool(self.req_msgs_supported >> (code - 0x80) & 1)

    def _payload(self) -> bytes:
        return (struct.pack("<I", self.dsm_caps)
                + self.req_msgs_supported.to_bytes(16, "little")
                + struct.pack("<H3xBBB", self.lock_interface_flags_supported,
                              self.dev_addr_width, self.num_req_this, self.num_req_all))

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> TdispCapabilities:
        _zero(raw, 38, 41, "TDISP_CAPABILITIES")
        (caps,) = struct.unpack_from("<I", raw, 16)
        mask = int.from_bytes(raw[20:36], "little")
        flags, width, this, all_ = struct.unpack_from("<H3xBBB", raw, 36)
        return cls(fid, caps, mask, flags, width, this, all_)


# --- lock (§11.3.7–11.3.8) -----------------------------------------------------------------------

@dataclass(frozen=True)
class LockInterfaceRequest(TdispMessage):
    """[16..17] FLAGS, [18] DEFAULT_STREAM_ID, [19] reserved, [20..27] MMIO_REPORTING_OFFSET
    (u64 on the wire; added modulo 2**64, i.e. two's complement), [28..35]
    BIND_P2P_ADDRESS_MASK."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.LOCK_INTERFACE_REQUEST
    PAYLOAD_SIZE: ClassVar[int | None] = 20
    flags: LockInterfaceFlags = LockInterfaceFlags(0)
    default_stream_id: int = 0
    mmio_reporting_offset: int = 0
    bind_p2p_address_mask: int = 0
    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.flags <= 0xFFFF or self.flags & LOCK_INTERFACE_FLAGS_RESERVED:
            raise ValueError(f"LOCK_INTERFACE flags 0x{self.flags:x}: reserved bits")
        object.__setattr__(self, "flags", LockInterfaceFlags(self.flags))
        _check("default_stream_id", self.default_stream_id, 8)
        _check("mmio_reporting_offset", self.mmio_reporting_offset, 64)
        _check("bind_p2p_address_mask", self.bind_p2p_address_mask, 64)

    def _payload(self) -> bytes:
        return struct.pack("<HBxQQ", self.flags, self.default_stream_id,
                           self.mmio_reporting_offset, self.bind_p2p_address_mask)

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> LockInterfaceRequest:
        flags, sid, off, mask = struct.unpack_from("<HBxQQ", raw, HEADER_SIZE)
        if flags & LOCK_INTERFACE_FLAGS_RESERVED:
            raise TdispDecodeError(f"LOCK_INTERFACE FLAGS 0x{flags:04x}: reserved bits set",
                                   raw, HEADER_SIZE)
        _zero(raw, 19, 20, "LOCK_INTERFACE_REQUEST")
        return cls(fid, LockInterfaceFlags(flags), sid, off, mask)


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != START_INTERFACE_NONCE_SIZE:
        raise ValueError(f"START_INTERFACE_NONCE must be {START_INTERFACE_NONCE_SIZE} bytes")


@dataclass(frozen=True)
class _NonceMessage(TdispMessage):
    """A message whose whole payload is the 32-byte START_INTERFACE_NONCE."""

    PAYLOAD_SIZE: ClassVar[int | None] = START_INTERFACE_NONCE_SIZE
    nonce: bytes = field(default=bytes(START_INTERFACE_NONCE_SIZE), repr=False)
    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "nonce", bytes(self.nonce))
        _check_nonce(self.nonce)

    def _payload(self) -> bytes:
        return self.nonce

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> Self:
        return cls(fid, raw[HEADER_SIZE:])


@dataclass(frozen=True)
class LockInterfaceResponse(_NonceMessage):
    """[16..47] START_INTERFACE_NONCE."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.LOCK_INTERFACE_RESPONSE


# --- report (§11.3.9–11.3.10) --------------------------------------------------------------------

@dataclass(frozen=True)
class GetDeviceInterfaceReport(TdispMessage):
    """[16..17] OFFSET, [18..19] LENGTH (the most the requester takes)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.GET_DEVICE_INTERFACE_REPORT
    PAYLOAD_SIZE: ClassVar[int | None] = 4
    offset: int = 0
    length: int = 0xFFFF
    def __post_init__(self) -> None:
        super().__post_init__()
        _check("offset", self.offset, 16)
        _check("length", self.length, 16)

    def _payload(self) -> bytes:
        return struct.pack("<HH", self.offset, self.length)

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> GetDeviceInterfaceReport:
        return cls(fid, *struct.unpack_from("<HH", raw, HEADER_SIZE))


@dataclass(frozen=True)
class DeviceInterfaceReportResponse(TdispMessage):
    """DEVICE_INTERFACE_REPORT: [16..17] PORTION_LENGTH, [18..19] REMAINDER_LENGTH,
    [20..] the portion of the report structure (:mod:`.report`)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.DEVICE_INTERFACE_REPORT
    PAYLOAD_SIZE: ClassVar[int | None] = None
    portion: bytes = b""
    remainder_length: int = 0
    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "portion", bytes(self.portion))
        _check("portion length", len(self.portion), 16)
        _check("remainder_length", self.remainder_length, 16)

    def _payload(self) -> bytes:
        return struct.pack("<HH", len(self.portion), self.remainder_length) + self.portion

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> DeviceInterfaceReportResponse:
        if len(raw) < HEADER_SIZE + 4:
            raise TdispDecodeError("DEVICE_INTERFACE_REPORT truncated", raw, len(raw))
        plen, rem = struct.unpack_from("<HH", raw, HEADER_SIZE)
        if len(raw) != HEADER_SIZE + 4 + plen:
            raise TdispDecodeError(f"PORTION_LENGTH {plen} does not match the "
                                   f"{len(raw) - HEADER_SIZE - 4} bytes that follow",
                                   raw, HEADER_SIZE)
        return cls(fid, raw[HEADER_SIZE + 4:], rem)


# --- state (§11.3.11–11.3.12) --------------------------------------------------------------------

@dataclass(frozen=True)
class GetDeviceInterfaceState(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.GET_DEVICE_INTERFACE_STATE


@dataclass(frozen=True)
class DeviceInterfaceState(TdispMessage):
    """[16] TDI_STATE."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.DEVICE_INTERFACE_STATE
    PAYLOAD_SIZE: ClassVar[int | None] = 1
    tdi_state: TdiState = TdiState.CONFIG_UNLOCKED
    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "tdi_state", TdiState(self.tdi_state))

    def _payload(self) -> bytes:
        return bytes((self.tdi_state,))

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> DeviceInterfaceState:
        try:
            state = TdiState(raw[HEADER_SIZE])
        except ValueError:
            raise TdispDecodeError(f"TDI_STATE {raw[HEADER_SIZE]} unknown", raw,
                                   HEADER_SIZE) from None
        return cls(fid, state)


# --- start / stop (§11.3.13–11.3.16) -------------------------------------------------------------

@dataclass(frozen=True)
class StartInterfaceRequest(_NonceMessage):
    """[16..47] START_INTERFACE_NONCE (the one LOCK_INTERFACE_RESPONSE returned)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.START_INTERFACE_REQUEST


@dataclass(frozen=True)
class StartInterfaceResponse(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.START_INTERFACE_RESPONSE


@dataclass(frozen=True)
class StopInterfaceRequest(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.STOP_INTERFACE_REQUEST


@dataclass(frozen=True)
class StopInterfaceResponse(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.STOP_INTERFACE_RESPONSE


# --- P2P and MMIO attributes (§11.3.17–11.3.20; optional) ----------------------------------------

@dataclass(frozen=True)
class BindP2pStreamRequest(TdispMessage):
    """[16] P2P_STREAM_ID (1.0 layout; newer libspdm adds a STREAM_CONFIG byte — not here)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.BIND_P2P_STREAM_REQUEST
    PAYLOAD_SIZE: ClassVar[int | None] = 1
    p2p_stream_id: int = 0
    def __post_init__(self) -> None:
        super().__post_init__()
        _check("p2p_stream_id", self.p2p_stream_id, 8)

    def _payload(self) -> bytes:
        return bytes((self.p2p_stream_id,))

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> BindP2pStreamRequest:
        return cls(fid, raw[HEADER_SIZE])


@dataclass(frozen=True)
class BindP2pStreamResponse(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.BIND_P2P_STREAM_RESPONSE


@dataclass(frozen=True)
class UnbindP2pStreamRequest(BindP2pStreamRequest):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.UNBIND_P2P_STREAM_REQUEST


@dataclass(frozen=True)
class UnbindP2pStreamResponse(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.UNBIND_P2P_STREAM_RESPONSE


@dataclass(frozen=True)
class SetMmioAttributeRequest(TdispMessage):
    """[16..31] one MMIO_RANGE (only IS_NON_TEE_MEM is settable — a responder rule)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.SET_MMIO_ATTRIBUTE_REQUEST
    PAYLOAD_SIZE: ClassVar[int | None] = MmioRange.SIZE
    mmio_range: MmioRange = MmioRange(0, 0)
    def _payload(self) -> bytes:
        return self.mmio_range.encode()

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> SetMmioAttributeRequest:
        return cls(fid, MmioRange.decode_at(raw, HEADER_SIZE))


@dataclass(frozen=True)
class SetMmioAttributeResponse(TdispMessage):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.SET_MMIO_ATTRIBUTE_RESPONSE


@dataclass(frozen=True)
class VdmRequest(TdispMessage):
    """[16] REGISTRY_ID, [17] VENDOR_ID_LEN, VENDOR_ID, vendor data (after the common
    header, as libspdm lays it out; the spec table's offsets are UNCONFIRMED)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.VDM_REQUEST
    PAYLOAD_SIZE: ClassVar[int | None] = None
    registry_id: int = 0
    vendor_id: bytes = b""
    vendor_data: bytes = b""
    def __post_init__(self) -> None:
        super().__post_init__()
        _check("registry_id", self.registry_id, 8)
        object.__setattr__(self, "vendor_id", bytes(self.vendor_id))
        object.__setattr__(self, "vendor_data", bytes(self.vendor_data))
        _check("vendor_id length", len(self.vendor_id), 8)

    def _payload(self) -> bytes:
        return bytes((self.registry_id, len(self.vendor_id))) + self.vendor_id + self.vendor_data

    @classmethod
    def _parse(cls: type[_V], fid: int, raw: bytes) -> _V:
        if len(raw) < HEADER_SIZE + 2:
            raise TdispDecodeError("VDM message truncated", raw, len(raw))
        reg, vlen = raw[HEADER_SIZE], raw[HEADER_SIZE + 1]
        end = HEADER_SIZE + 2 + vlen
        if len(raw) < end:
            raise TdispDecodeError(f"VENDOR_ID_LEN {vlen} runs past the end", raw,
                                   HEADER_SIZE + 1)
        return cls(fid, reg, raw[HEADER_SIZE + 2:end], raw[end:])


_V = TypeVar("_V", bound=VdmRequest)


@dataclass(frozen=True)
class VdmResponse(VdmRequest):
    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.VDM_RESPONSE


# --- TDISP_ERROR (§11.3.23) ----------------------------------------------------------------------

@dataclass(frozen=True)
class TdispErrorResponse(TdispMessage):
    """[16..19] ERROR_CODE, [20..23] ERROR_DATA, [24..] EXTENDED_ERROR_DATA.

    ``error_code`` is kept as an int so a requester can carry codes it does not know."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.TDISP_ERROR
    PAYLOAD_SIZE: ClassVar[int | None] = None
    error_code: int = ErrorCode.UNSPECIFIED
    error_data: int = 0
    extended_error_data: bytes = b""
    def __post_init__(self) -> None:
        super().__post_init__()
        _check("error_code", self.error_code, 32)
        _check("error_data", self.error_data, 32)
        object.__setattr__(self, "extended_error_data", bytes(self.extended_error_data))

    def _payload(self) -> bytes:
        return struct.pack("<II", self.error_code, self.error_data) + self.extended_error_data

    @classmethod
    def _parse(cls, fid: int, raw: bytes) -> TdispErrorResponse:
        if len(raw) < HEADER_SIZE + 8:
            raise TdispDecodeError("TDISP_ERROR truncated", raw, len(raw))
        code, data = struct.unpack_from("<II", raw, HEADER_SIZE)
        return cls(fid, code, data, raw[HEADER_SIZE + 8:])


# --- dispatch ------------------------------------------------------------------------------------

MESSAGE_CLASSES: dict[MessageType, type[TdispMessage]] = {
    c.MESSAGE_TYPE: c for c in (
        GetTdispVersion, TdispVersion, GetTdispCapabilities, TdispCapabilities,
        LockInterfaceRequest, LockInterfaceResponse, GetDeviceInterfaceReport,
        DeviceInterfaceReportResponse, GetDeviceInterfaceState, DeviceInterfaceState,
        StartInterfaceRequest, StartInterfaceResponse, StopInterfaceRequest,
        StopInterfaceResponse, BindP2pStreamRequest, BindP2pStreamResponse,
        UnbindP2pStreamRequest, UnbindP2pStreamResponse, SetMmioAttributeRequest,
        SetMmioAttributeResponse, VdmRequest, VdmResponse, TdispErrorResponse)
}


def decode_message(data: bytes) -> TdispMessage:
    """Decode any TDISP message by its MessageType.  An unknown request code (0x80..0xFF)
    is UNSUPPORTED_REQUEST with ERROR_DATA = the code (§11.3.1); other unknown codes are
    INVALID_REQUEST."""
    raw = bytes(data)
    _, mtype, _ = _header(raw)
    try:
        cls = MESSAGE_CLASSES[MessageType(mtype)]
    except ValueError:
        if mtype >= 0x80:
            raise TdispDecodeError(f"request code 0x{mtype:02x} not supported", raw, 1,
                                   ErrorCode.UNSUPPORTED_REQUEST, data=mtype) from None
        raise TdispDecodeError(f"MessageType 0x{mtype:02x} unknown", raw, 1) from None
    return cls.decode(raw)


def to_vendor_payload(msg: TdispMessage) -> bytes:
    """The SPDM VENDOR_DEFINED payload: Protocol ID 0x01 then the TDISP message."""
    return bytes((PCI_PROTOCOL_ID_TDISP,)) + msg.encode()


def from_vendor_payload(payload: bytes) -> TdispMessage:
    """Inverse of :func:`to_vendor_payload` (what ``PciSigProtocolMux`` hands a handler)."""
    raw = bytes(payload)
    if not raw or raw[0] != PCI_PROTOCOL_ID_TDISP:
        raise TdispDecodeError("payload does not start with Protocol ID 0x01 (TDISP)", raw, 0)
    return decode_message(raw[1:])
