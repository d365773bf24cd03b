"""TDISP messages (PCIe 6.x §11.3; layouts as libspdm ``pci_tdisp.h``), TDISP 1.0.

Every message starts with the 16-byte common header (Table 11-5), all fields LE::

    [0] TDISPVersion (0x10)  [1] MessageType  [2..3] reserved
    [4..7]  INTERFACE_ID.FUNCTION_ID: [15:0] Requester ID, [23:16] segment, b24 segment valid
    [8..15] INTERFACE_ID reserved
    [16..]  payload

Each message is one declaration on :mod:`teeio.codec` (the header's fields come from
:class:`TdispHeader`, the MessageType is fixed per class).  On the wire a message is the
payload of an SPDM VENDOR_DEFINED_REQUEST/RESPONSE (PCI-SIG) after the Protocol ID byte
0x01: :func:`to_vendor_payload` / :func:`from_vendor_payload`.

Decoders are strict: exact size, reserved bytes zero, known enum values; any violation is a
:class:`TdispDecodeError` carrying the TDISP error code the responder answers with
(INVALID_REQUEST; VERSION_MISMATCH for a header version other than 1.0; UNSUPPORTED_REQUEST,
ERROR_DATA = the code, for a request code we do not know).  Reserved bits in FUNCTION_ID are
left to the responder (it compares the whole id against the TDIs it hosts: INVALID_INTERFACE).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, overload

from teeio.codec import (
    REST,
    Data,
    DecodeError,
    Field,
    Fixed,
    ProtocolError,
    Reader,
    Struct,
    UInt,
    Writer,
    data,
    declare,
    fixed,
    nested,
    reserved,
    u8,
    u16,
    u32,
    u64,
    uint,
)

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
    "TdispErrorResponse", "TdispHeader", "TdispMessage", "TdispVersion",
    "UnbindP2pStreamRequest", "UnbindP2pStreamResponse", "VdmRequest", "VdmResponse",
    "decode_message", "from_vendor_payload", "function_id", "to_vendor_payload",
]


# --- errors --------------------------------------------------------------------------------------

class TdispError(ProtocolError):
    """A protocol error that becomes a TDISP_ERROR response (code, data, extended data)."""

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str = "", data: int = 0,
                 ext: bytes = b"") -> None:
        super().__init__(ErrorCode(code), message or ErrorCode(code).name)
        self.code = ErrorCode(code)
        self.data = data & 0xFFFFFFFF
        self.ext = bytes(ext)

    def to_response(self, function_id: int) -> TdispErrorResponse:
        return TdispErrorResponse(function_id, self.code, self.data, self.ext)


class TdispDecodeError(TdispError, DecodeError):
    """A malformed TDISP message: the core's (raw, offset, reason) plus the TDISP error code
    the responder answers with (INVALID_REQUEST unless told otherwise).

    Also accepted, for existing callers: ``(reason, raw, offset)``."""

    @overload
    def __init__(self, raw: bytes, offset: int, reason: str,
                 code: ErrorCode = ErrorCode.INVALID_REQUEST, data: int = 0) -> None: ...

    @overload
    def __init__(self, raw: str, offset: bytes = b"", reason: int = 0,
                 code: ErrorCode = ErrorCode.INVALID_REQUEST, data: int = 0) -> None: ...

    def __init__(self, raw: Any, offset: Any = b"", reason: Any = 0,
                 code: ErrorCode = ErrorCode.INVALID_REQUEST, data: int = 0) -> None:
        if isinstance(raw, str):            # (reason, raw, offset)
            raw, offset, reason = offset, reason, raw
        self.raw, self.offset, self.reason = bytes(raw), int(offset), str(reason)
        self.code, self.data, self.ext = ErrorCode(code), data & 0xFFFFFFFF, b""
        # not the cooperative chain: ProtocolError and DecodeError take different arguments
        Exception.__init__(self, f"TDISP: {self.reason} (at offset {self.offset} of "
                                 f"{len(self.raw)} bytes)")


def _wrap(exc: DecodeError) -> TdispDecodeError:
    return exc if isinstance(exc, TdispDecodeError) \
        else TdispDecodeError(exc.raw, exc.offset, exc.reason)


# --- TDISP field kinds ---------------------------------------------------------------------------

class _Version(Fixed):
    """TDISPVersion: 1.0 when built; on decode a whole header must be there, and another
    version is VERSION_MISMATCH (§11.3.1)."""

    def __init__(self) -> None:
        super().__init__(1, TDISP_VERSION_1_0)

    def pull(self, r: Reader, known: Any, ctx: Any) -> Any:
        if r.remaining < HEADER_SIZE:
            raise TdispDecodeError(r.buf, r.end, "truncated: no 16-byte TDISP header")
        v = r.buf[r.pos]
        if v not in SUPPORTED_VERSIONS:
            raise TdispDecodeError(r.buf, r.pos, f"TDISPVersion 0x{v:02x} not supported",
                                   ErrorCode.VERSION_MISMATCH)
        r.pos += 1
        return v


class _U8Prefixed(Field):
    """A u8 count then that many bytes: VERSION_NUM_COUNT + entries (a tuple of ints) or
    VENDOR_ID_LEN + VENDOR_ID (bytes).  Errors point at the count."""

    def __init__(self, count_name: str, *, entries: bool = False, min_count: int = 0) -> None:
        self.count_name, self.entries, self.min_count = count_name, entries, min_count

    def pull(self, r: Reader, known: Any, ctx: Any) -> Any:
        at = r.pos
        n = r.pull_u8(self.count_name)
        if n < self.min_count:
            raise r.fail(f"{self.count_name} is {n}", at)
        if n > r.remaining:
            raise r.fail(f"{self.count_name} {n} runs past the end", at)
        value = r.pull_bytes(n, self.name)
        return tuple(value) if self.entries else value

    def push(self, w: Writer, value: Any, known: Any, ctx: Any) -> None:
        w.push_u8(len(value))
        w.push_bytes(bytes(value))

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple if self.entries else bytes):
            raise ValueError(f"{self.name} must be a {'tuple' if self.entries else 'bytes'}")
        if not self.min_count <= len(value) <= 0xFF:
            raise ValueError(f"{self.name} needs {self.min_count}..255 entries")
        if self.entries and not all(isinstance(v, int) and 0 <= v <= 0xFF for v in value):
            raise ValueError(f"{self.name} entries must be bytes (0..255)")

    def strategy(self, known: Any, ctx: Any) -> Any:
        # composed from the core's strategies: hypothesis stays teeio.codec's import
        s = Data(REST, max_size=8).strategy(known, ctx)
        return s.map(lambda b: tuple(b) or (TDISP_VERSION_1_0,)) if self.entries else s


def _u8_prefixed(count_name: str, default: Any, **kw: Any) -> Any:
    return declare(_U8Prefixed(count_name, **kw), default)


def _secret(size: int) -> Any:
    """Bytes of a fixed size kept out of ``repr`` (the START_INTERFACE_NONCE)."""
    f = data(size, bytes(size))
    f.repr = False
    return f


def _check_fields(obj: Struct) -> None:
    """Before the core's checks: bytes-likes and lists are taken as bytes and tuples."""
    for spec in obj.fields_spec():
        v = getattr(obj, spec.name)
        if isinstance(spec, Data) and isinstance(v, (bytearray, memoryview)):
            object.__setattr__(obj, spec.name, bytes(v))
        elif isinstance(spec, _U8Prefixed) and isinstance(v, (list, bytes, bytearray)):
            object.__setattr__(obj, spec.name, tuple(v) if spec.entries else bytes(v))


def _finish_fields(obj: Struct) -> None:
    """After them: values of enum-kinded fields become the enum; derived lengths must fit."""
    for spec in obj.fields_spec():
        if not isinstance(spec, UInt):
            continue
        if not spec.init:
            spec.check(getattr(obj, spec.name))
        elif spec.kind is not None:
            object.__setattr__(obj, spec.name, spec.kind(getattr(obj, spec.name)))


def function_id(requester_id: int, segment: int | None = None) -> int:
    """FUNCTION_ID from a Requester ID (bus << 8 | dev << 3 | fn) and optional segment."""
    if not 0 <= requester_id <= 0xFFFF:
        raise ValueError(f"requester_id = {requester_id} does not fit in 16 bits")
    if segment is None:
        return requester_id
    if not 0 <= segment <= 0xFF:
        raise ValueError(f"segment = {segment} does not fit in 8 bits")
    return requester_id | segment << FUNCTION_ID_REQUESTER_SEGMENT_SHIFT \
        | FUNCTION_ID_REQUESTER_SEGMENT_VALID


# --- header and base -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TdispHeader(Struct):
    """The common header (Table 11-5) of any message, MessageType not checked: what
    :func:`decode_message` reads to pick the class."""

    DECODE_ERROR = TdispDecodeError
    version: int = declare(_Version(), TDISP_VERSION_1_0, init=False)
    message_type: int = u8()
    _r0: None = reserved(2)
    function_id: int = u32()
    _r1: None = reserved(8)         # INTERFACE_ID[8..15]

    def __post_init__(self) -> None:
        _check_fields(self)
        super().__post_init__()
        _finish_fields(self)

    @classmethod
    def peek(cls, raw: bytes) -> TdispHeader:
        """The header at the start of *raw* (the rest is not looked at)."""
        try:
            return cls.pull(Reader(raw))
        except DecodeError as exc:
            raise _wrap(exc) from None

    @property
    def requester_id(self) -> int:
        return self.function_id & FUNCTION_ID_REQUESTER_ID_MASK

    @property
    def segment(self) -> int | None:
        if not self.function_id & FUNCTION_ID_REQUESTER_SEGMENT_VALID:
            return None
        return (self.function_id & FUNCTION_ID_REQUESTER_SEGMENT_MASK) \
            >> FUNCTION_ID_REQUESTER_SEGMENT_SHIFT


@dataclass(frozen=True)
class TdispMessage(TdispHeader):
    """A message: the header with its MessageType fixed (``message_type`` redeclared with
    :func:`~teeio.codec.fixed`, which also sets :attr:`MESSAGE_TYPE`), then the payload."""

    MESSAGE_TYPE: ClassVar[MessageType]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        declared = cls.__dict__.get("message_type")
        if isinstance(declared, dataclasses.Field) and isinstance(declared.default, int):
            cls.MESSAGE_TYPE = MessageType(declared.default)


# --- MMIO_RANGE (Table 11-15; also the SET_MMIO_ATTRIBUTE payload) ------------------------------

@dataclass(frozen=True)
class MmioRange(Struct):
    """One 16-byte MMIO_RANGE: first 4K page *number* (MMIO_REPORTING_OFFSET already
    applied), number of 4K pages, attributes [15:0], Range ID [31:16] (BAR index for BARs)."""

    DECODE_ERROR = TdispDecodeError
    SIZE: ClassVar[int] = 16
    first_page: int = u64()
    number_of_pages: int = u32()
    attributes: MmioRangeAttributes = u16(MmioRangeAttributes(0), kind=MmioRangeAttributes,
                                          reserved_mask=MMIO_RANGE_ATTRIBUTES_RESERVED)
    range_id: int = u16(0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _finish_fields(self)

    @classmethod
    def decode_at(cls, raw: bytes, off: int) -> MmioRange:
        """The range at *off* of a larger structure (the TDI report)."""
        try:
            return cls.pull(Reader(raw, off))
        except DecodeError as exc:
            raise _wrap(exc) from None


# --- version and capabilities (§11.3.3–11.3.6) ----------------------------------------------------

@dataclass(frozen=True)
class GetTdispVersion(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.GET_TDISP_VERSION)


@dataclass(frozen=True)
class TdispVersion(TdispMessage):
    """[16] VERSION_NUM_COUNT (>= 1), then one byte per version."""

    message_type: MessageType = fixed(1, MessageType.TDISP_VERSION)
    versions: tuple[int, ...] = _u8_prefixed("VERSION_NUM_COUNT", (TDISP_VERSION_1_0,),
                                             entries=True, min_count=1)


@dataclass(frozen=True)
class GetTdispCapabilities(TdispMessage):
    """[16..19] TSM_CAPS (reserved in 1.0, carried as is)."""

    message_type: MessageType = fixed(1, MessageType.GET_TDISP_CAPABILITIES)
    tsm_caps: int = u32(0)


@dataclass(frozen=True)
class TdispCapabilities(TdispMessage):
    """[16..19] DSM_CAPS, [20..35] REQ_MSGS_SUPPORTED (bit n = request 0x80+n),
    [36..37] LOCK_INTERFACE_FLAGS_SUPPORTED, [38..40] reserved, [41] DEV_ADDR_WIDTH,
    [42] NUM_REQ_THIS, [43] NUM_REQ_ALL."""

    message_type: MessageType = fixed(1, MessageType.TDISP_CAPABILITIES)
    dsm_caps: int = u32(0)
    req_msgs_supported: int = uint(16, 0)
    lock_interface_flags_supported: int = u16(0)
    _r2: None = reserved(3)
    dev_addr_width: int = u8(52)
    num_req_this: int = u8(1)
    num_req_all: int = u8(1)

    def supports(self, code: MessageType) -> bool:
        return code.is_request and bool(self.req_msgs_supported >> (code - 0x80) & 1)


# --- lock (§11.3.7–11.3.8) -----------------------------------------------------------------------

@dataclass(frozen=True)
class LockInterfaceRequest(TdispMessage):
    """[16..17] FLAGS, [18] DEFAULT_STREAM_ID, [19] reserved, [20..27] MMIO_REPORTING_OFFSET
    (u64 on the wire; added modulo 2**64, i.e. two's complement), [28..35]
    BIND_P2P_ADDRESS_MASK."""

    message_type: MessageType = fixed(1, MessageType.LOCK_INTERFACE_REQUEST)
    flags: LockInterfaceFlags = u16(LockInterfaceFlags(0), kind=LockInterfaceFlags,
                                    reserved_mask=LOCK_INTERFACE_FLAGS_RESERVED)
    default_stream_id: int = u8(0)
    _r2: None = reserved(1)
    mmio_reporting_offset: int = u64(0)
    bind_p2p_address_mask: int = u64(0)


@dataclass(frozen=True)
class LockInterfaceResponse(TdispMessage):
    """[16..47] START_INTERFACE_NONCE."""

    message_type: MessageType = fixed(1, MessageType.LOCK_INTERFACE_RESPONSE)
    nonce: bytes = _secret(START_INTERFACE_NONCE_SIZE)


# --- report (§11.3.9–11.3.10) --------------------------------------------------------------------

@dataclass(frozen=True)
class GetDeviceInterfaceReport(TdispMessage):
    """[16..17] OFFSET, [18..19] LENGTH (the most the requester takes)."""

    message_type: MessageType = fixed(1, MessageType.GET_DEVICE_INTERFACE_REPORT)
    offset: int = u16(0)
    length: int = u16(0xFFFF)


@dataclass(frozen=True)
class DeviceInterfaceReportResponse(TdispMessage):
    """DEVICE_INTERFACE_REPORT: [16..17] PORTION_LENGTH, [18..19] REMAINDER_LENGTH,
    [20..] the portion of the report structure (:mod:`.report`)."""

    message_type: MessageType = fixed(1, MessageType.DEVICE_INTERFACE_REPORT)
    portion_length: int = u16(length_of="portion")
    remainder_length: int = u16(0)
    portion: bytes = data("portion_length", b"", max_size=0xFFFF)

    def __init__(self, function_id: int, portion: bytes = b"",
                 remainder_length: int = 0) -> None:
        """Arguments in the order callers use (portion first), not the wire's."""
        object.__setattr__(self, "function_id", function_id)
        object.__setattr__(self, "portion", portion)
        object.__setattr__(self, "remainder_length", remainder_length)
        self.__post_init__()


# --- state (§11.3.11–11.3.12) --------------------------------------------------------------------

@dataclass(frozen=True)
class GetDeviceInterfaceState(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.GET_DEVICE_INTERFACE_STATE)


@dataclass(frozen=True)
class DeviceInterfaceState(TdispMessage):
    """[16] TDI_STATE."""

    message_type: MessageType = fixed(1, MessageType.DEVICE_INTERFACE_STATE)
    tdi_state: TdiState = u8(TdiState.CONFIG_UNLOCKED, kind=TdiState)


# --- start / stop (§11.3.13–11.3.16) -------------------------------------------------------------

@dataclass(frozen=True)
class StartInterfaceRequest(TdispMessage):
    """[16..47] START_INTERFACE_NONCE (the one LOCK_INTERFACE_RESPONSE returned)."""

    message_type: MessageType = fixed(1, MessageType.START_INTERFACE_REQUEST)
    nonce: bytes = _secret(START_INTERFACE_NONCE_SIZE)


@dataclass(frozen=True)
class StartInterfaceResponse(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.START_INTERFACE_RESPONSE)


@dataclass(frozen=True)
class StopInterfaceRequest(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.STOP_INTERFACE_REQUEST)


@dataclass(frozen=True)
class StopInterfaceResponse(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.STOP_INTERFACE_RESPONSE)


# --- P2P and MMIO attributes (§11.3.17–11.3.20; optional) ----------------------------------------

@dataclass(frozen=True)
class BindP2pStreamRequest(TdispMessage):
    """[16] P2P_STREAM_ID (1.0 layout; newer libspdm adds a STREAM_CONFIG byte — not here)."""

    message_type: MessageType = fixed(1, MessageType.BIND_P2P_STREAM_REQUEST)
    p2p_stream_id: int = u8(0)


@dataclass(frozen=True)
class BindP2pStreamResponse(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.BIND_P2P_STREAM_RESPONSE)


@dataclass(frozen=True)
class UnbindP2pStreamRequest(BindP2pStreamRequest):
    message_type: MessageType = fixed(1, MessageType.UNBIND_P2P_STREAM_REQUEST)


@dataclass(frozen=True)
class UnbindP2pStreamResponse(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.UNBIND_P2P_STREAM_RESPONSE)


@dataclass(frozen=True)
class SetMmioAttributeRequest(TdispMessage):
    """[16..31] one MMIO_RANGE (only IS_NON_TEE_MEM is settable — a responder rule)."""

    message_type: MessageType = fixed(1, MessageType.SET_MMIO_ATTRIBUTE_REQUEST)
    mmio_range: MmioRange = nested(MmioRange, MmioRange(0, 0))


@dataclass(frozen=True)
class SetMmioAttributeResponse(TdispMessage):
    message_type: MessageType = fixed(1, MessageType.SET_MMIO_ATTRIBUTE_RESPONSE)


@dataclass(frozen=True)
class VdmRequest(TdispMessage):
    """[16] REGISTRY_ID, [17] VENDOR_ID_LEN, VENDOR_ID, vendor data (after the common
    header, as libspdm lays it out; the spec table's offsets are UNCONFIRMED)."""

    message_type: MessageType = fixed(1, MessageType.VDM_REQUEST)
    registry_id: int = u8(0)
    vendor_id: bytes = _u8_prefixed("VENDOR_ID_LEN", b"")
    vendor_data: bytes = data(REST, b"")


@dataclass(frozen=True)
class VdmResponse(VdmRequest):
    message_type: MessageType = fixed(1, MessageType.VDM_RESPONSE)


# --- TDISP_ERROR (§11.3.23) ----------------------------------------------------------------------

@dataclass(frozen=True)
class TdispErrorResponse(TdispMessage):
    """[16..19] ERROR_CODE, [20..23] ERROR_DATA, [24..] EXTENDED_ERROR_DATA.

    ``error_code`` is kept as an int so a requester can carry codes it does not know."""

    message_type: MessageType = fixed(1, MessageType.TDISP_ERROR)
    error_code: int = u32(ErrorCode.UNSPECIFIED)
    error_data: int = u32(0)
    extended_error_data: bytes = data(REST, b"")


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
    mtype = TdispHeader.peek(raw).message_type
    try:
        cls = MESSAGE_CLASSES[MessageType(mtype)]
    except ValueError:
        if mtype >= 0x80:
            raise TdispDecodeError(raw, 1, f"request code 0x{mtype:02x} not supported",
                                   ErrorCode.UNSUPPORTED_REQUEST, data=mtype) from None
        raise TdispDecodeError(raw, 1, f"MessageType 0x{mtype:02x} unknown") from None
    return cls.decode(raw)


def to_vendor_payload(msg: TdispMessage) -> bytes:
    """The SPDM VENDOR_DEFINED payload: Protocol ID 0x01 then the TDISP message."""
    return bytes((PCI_PROTOCOL_ID_TDISP,)) + msg.encode()


def from_vendor_payload(payload: bytes) -> TdispMessage:
    """Inverse of :func:`to_vendor_payload` (what ``PciSigProtocolMux`` hands a handler)."""
    raw = bytes(payload)
    if not raw or raw[0] != PCI_PROTOCOL_ID_TDISP:
        raise TdispDecodeError(raw, 0, "payload does not start with Protocol ID 0x01 (TDISP)")
    return decode_message(raw[1:])
