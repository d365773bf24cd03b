"""SPDM messages (DSP0274 1.2/1.3 §10; layouts as libspdm ``spdm.h``) declared on the
:mod:`teeio.codec` core.

Each message is a frozen dataclass whose fields are its wire layout, in order, after the
4-byte header (§9): ``encode`` and ``decode`` are both generated from that declaration.
Decoders must consume the input exactly; with ``pad=True`` they also accept up to 3
trailing zero bytes (the DW padding of a PCI DOE data object, PCIe 6.x §6.30.1).  The
exact message bytes are kept in ``raw`` so that transcripts hash what was on the wire,
never a re-encoding.  Sizes set by the negotiated algorithms come from a
:class:`~teeio.spdm.fields.Context` (or a :class:`Negotiated`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from teeio import codec as core
from teeio.codec import Reader, Struct, data, u8, u16, u32
from teeio.lite_dataclass import dataclass

from .defs import (
    ALG_STRUCT_FIXED_COUNT,
    FINISH_SIGNATURE_INCLUDED,
    GET_CAPABILITIES_PARAM1_SUPPORTED_ALGORITHMS,
    NONCE_SIZE,
    RANDOM_DATA_SIZE,
    REQ_CONTEXT_SIZE,
    SPDM_VERSION_10,
    SPDM_VERSION_11,
    SPDM_VERSION_12,
    SPDM_VERSION_13,
    ErrorCode,
    MeasRequestAttr,
    RequestCode,
    ResponseCode,
)
from .errors import DecodeError
from .fields import (
    MAX_DOE_PAD,
    Condition,
    MessageLength,
    ascending,
    count_of,
    data_list,
    derived,
    extended_error_data,
    header_code,
    ignored,
    length_of,
    message_length,
    raw_bytes,
    self_sized,
    sized,
    uint_list,
)
from .negotiated import (
    Context,
    Known,
    Negotiated,
    dhe_size,
    finish_rsp_verify_size,
    hash_size,
    measurements_sig_size,
    req_sig_size,
    responder_verify_size,
    sig_size,
    summary_size,
)

HEADER_SIZE = 4


def peek_header(data: bytes) -> tuple[int, int, int, int]:
    """(version, code, param1, param2) of any SPDM message; DecodeError if shorter than 4."""
    if len(data) < HEADER_SIZE:
        raise DecodeError(data, len(data), "SPDM message shorter than its 4-byte header")
    return data[0], data[1], data[2], data[3]


def _since(version: int) -> Condition:
    return lambda known, ctx: bool(known["version"] >= version)


def _requester_context_size(known: Known, ctx: Any) -> int:
    """1.3 RequesterContext (§10.8, §10.11): 8 bytes from SPDM 1.3 on."""
    return REQ_CONTEXT_SIZE if known["version"] >= SPDM_VERSION_13 else 0


def _code_name(code: int) -> str:
    return (RequestCode(code).name if code in _REQUEST_CODES else ResponseCode(code).name)


_REQUEST_CODES = frozenset(RequestCode)


# --- §9 the header --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpdmMessage(Struct):
    """SPDMVersion and RequestResponseCode (§9); a message class names its code once,
    ``class X(SpdmMessage, code=...)``, and declares Param1, Param2 and its body."""

    CODE: ClassVar[int] = 0
    NAME: ClassVar[str] = ""
    DECODE_ERROR: ClassVar[type[core.DecodeError]] = DecodeError

    version: int = u8()
    request_response_code: int = header_code(0)
    raw: bytes = raw_bytes()

    def __init_subclass__(cls, code: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is None:
            return
        cls.CODE, cls.NAME = code, _code_name(code)
        annotations = cls.__dict__.get("__annotations__")
        if annotations is None:
            annotations = {}
            cls.__annotations__ = annotations
        annotations["request_response_code"] = "int"   # re-declared in place: same wire slot
        cls.request_response_code = header_code(code)

    @classmethod
    def pull(cls, r: Reader, ctx: Any = None) -> Self:
        start = r.pos
        obj = super().pull(r, ctx)
        for spec in cls.fields_spec():
            if isinstance(spec, MessageLength):
                spec.verify(r, start)
        return obj

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None, *,
               pad: bool = False) -> Self:
        """Exactly one message (*pad*: bar up to 3 zero bytes of DOE padding)."""
        return cls.decode_in(buf, Context.of(ctx, pad=pad))

    @classmethod
    def decode_in(cls, buf: bytes | bytearray | memoryview, ctx: Context) -> Self:
        r = Reader(buf)
        try:
            obj = cls.pull(r, ctx)
            rest = r.buf[r.pos:]
            if rest and not (ctx.pad and len(rest) <= MAX_DOE_PAD and not any(rest)):
                raise r.fail(f"{len(rest)} unexpected trailing bytes")
        except core.DecodeError as exc:
            raise DecodeError(exc.raw, exc.offset, f"{cls.NAME}: {exc.reason}") from None
        return obj


@dataclass(frozen=True)
class _NoParams(SpdmMessage):
    """Param1 and Param2 reserved."""

    _param1: None = ignored(1)
    _param2: None = ignored(1)


# --- §10.3 GET_VERSION / VERSION ------------------------------------------------------------------

@dataclass(frozen=True)
class GetVersion(_NoParams, code=RequestCode.GET_VERSION):
    version: int = u8(SPDM_VERSION_10)


@dataclass(frozen=True)
class Version(_NoParams, code=ResponseCode.VERSION):
    version: int = u8(SPDM_VERSION_10)
    _reserved: None = ignored(1)
    entry_count: int = count_of(1, "entries")
    entries: tuple[int, ...] = uint_list(2, "entry_count", ())


# --- §10.4 GET_CAPABILITIES / CAPABILITIES --------------------------------------------------------

@dataclass(frozen=True)
class _CapabilitiesBody(SpdmMessage):
    """CTExponent and Flags from 1.1, DataTransferSize and MaxSPDMmsgSize from 1.2."""

    param1: int = u8(0)   # GET_CAPABILITIES 1.3: bit 0 asks for the algorithms block
    _param2: None = ignored(1)
    _reserved0: None = ignored(1, when=_since(SPDM_VERSION_11))
    ct_exponent: int = u8(0, when=_since(SPDM_VERSION_11))
    _reserved1: None = ignored(2, when=_since(SPDM_VERSION_11))
    flags: int = u32(0, when=_since(SPDM_VERSION_11))
    data_transfer_size: int = u32(0, when=_since(SPDM_VERSION_12))
    max_spdm_msg_size: int = u32(0, when=_since(SPDM_VERSION_12))


@dataclass(frozen=True)
class GetCapabilities(_CapabilitiesBody, code=RequestCode.GET_CAPABILITIES):
    pass


def _has_algorithms_block(known: Known, ctx: Any) -> bool:
    # param1 is derived from the block: not known yet while building or drawing one.
    p1 = known.get("param1")
    if p1 is None:
        p1 = GET_CAPABILITIES_PARAM1_SUPPORTED_ALGORITHMS
    return bool(known["version"] >= SPDM_VERSION_13
                and p1 & GET_CAPABILITIES_PARAM1_SUPPORTED_ALGORITHMS)


@dataclass(frozen=True)
class Capabilities(_CapabilitiesBody, code=ResponseCode.CAPABILITIES):
    """1.3: the supported-algorithms block, kept raw, is present iff Param1 bit 0."""

    param1: int = derived(1, lambda v: GET_CAPABILITIES_PARAM1_SUPPORTED_ALGORITHMS
                          if v["supported_algorithms"] else 0)
    supported_algorithms: bytes = self_sized("supported algorithms block", b"",
                                             when=_has_algorithms_block)


# --- §10.5 NEGOTIATE_ALGORITHMS / ALGORITHMS ------------------------------------------------------

@dataclass(frozen=True)
class AlgStruct(Struct):
    """AlgStructure: AlgType, AlgCount (FixedAlgCount 2 << 4 | ExtAlgCount), AlgSupported,
    AlgExternal."""

    alg_type: int = u8()
    alg_count: int = derived(1, lambda v: ALG_STRUCT_FIXED_COUNT | len(v["ext"]),
                             valid=lambda c: c >> 4 == 2,
                             reason=lambda c: f"AlgStruct FixedAlgCount {c >> 4} != 2")
    supported: int = u16()
    ext: tuple[int, ...] = uint_list(4, lambda k, c: k["alg_count"] & 0xF, (), max_count=15)


def _algorithms_length(fixed_size: int, asym: str, hsh: str) -> Any:
    def length(v: Known) -> int:
        structs = v["alg_structs"] if v["version"] >= SPDM_VERSION_11 else ()
        return (fixed_size + 4 * (len(v[asym]) + len(v[hsh]))
                + sum(4 + 4 * len(s.ext) for s in structs))
    return message_length(2, 4, length)


@dataclass(frozen=True)
class NegotiateAlgorithms(SpdmMessage, code=RequestCode.NEGOTIATE_ALGORITHMS):
    struct_count: int = count_of(1, "alg_structs")   # Param1
    _param2: None = ignored(1)
    length: int = _algorithms_length(32, "ext_asym", "ext_hash")
    measurement_spec: int = u8(0)
    other_params: int = u8(0)
    base_asym: int = u32(0)
    base_hash: int = u32(0)
    _reserved0: None = ignored(12)
    ext_asym_count: int = count_of(1, "ext_asym")
    ext_hash_count: int = count_of(1, "ext_hash")
    _reserved1: None = ignored(1)
    mel_spec: int = u8(0)
    ext_asym: tuple[int, ...] = uint_list(4, "ext_asym_count", ())
    ext_hash: tuple[int, ...] = uint_list(4, "ext_hash_count", ())
    alg_structs: tuple[AlgStruct, ...] = ascending(AlgStruct, "struct_count", "alg_type", (),
                                                   when=_since(SPDM_VERSION_11))


@dataclass(frozen=True)
class Algorithms(SpdmMessage, code=ResponseCode.ALGORITHMS):
    struct_count: int = count_of(1, "alg_structs")   # Param1
    _param2: None = ignored(1)
    length: int = _algorithms_length(36, "ext_asym_sel", "ext_hash_sel")
    measurement_spec_sel: int = u8(0)
    other_params_sel: int = u8(0)
    meas_hash_algo: int = u32(0)
    base_asym_sel: int = u32(0)
    base_hash_sel: int = u32(0)
    _reserved0: None = ignored(11)
    mel_spec_sel: int = u8(0)
    ext_asym_sel_count: int = count_of(1, "ext_asym_sel")
    ext_hash_sel_count: int = count_of(1, "ext_hash_sel")
    _reserved1: None = ignored(2)
    ext_asym_sel: tuple[int, ...] = uint_list(4, "ext_asym_sel_count", ())
    ext_hash_sel: tuple[int, ...] = uint_list(4, "ext_hash_sel_count", ())
    alg_structs: tuple[AlgStruct, ...] = ascending(AlgStruct, "struct_count", "alg_type", (),
                                                   when=_since(SPDM_VERSION_11))

    def selected(self, alg_type: int) -> int:
        return next((s.supported for s in self.alg_structs if s.alg_type == alg_type), 0)


# --- §10.6/10.7 GET_DIGESTS / DIGESTS, GET_CERTIFICATE / CERTIFICATE ------------------------------

@dataclass(frozen=True)
class GetDigests(_NoParams, code=RequestCode.GET_DIGESTS):
    pass


@dataclass(frozen=True)
class Digests(SpdmMessage, code=ResponseCode.DIGESTS):
    """One H-byte digest per slot set in ProvisionedSlotMask."""

    supported_slot_mask: int = u8()        # Param1 (1.3; reserved in 1.2)
    slot_mask: int = u8()                  # Param2: ProvisionedSlotMask
    digests: tuple[bytes, ...] = data_list(hash_size,
                                           lambda k, c: bin(k["slot_mask"]).count("1"))


@dataclass(frozen=True)
class GetCertificate(SpdmMessage, code=RequestCode.GET_CERTIFICATE):
    slot_id: int = u8()                 # Param1
    attributes: int = u8()              # Param2 (1.3: bit 0 SlotSizeRequested)
    offset: int = u16()
    length: int = u16()


@dataclass(frozen=True)
class Certificate(SpdmMessage, code=ResponseCode.CERTIFICATE):
    slot_id: int = u8()                 # Param1
    attributes: int = u8()              # Param2
    portion_length: int = length_of(2, "portion")
    remainder_length: int = u16()
    portion: bytes = data("portion_length")


# --- §10.8 CHALLENGE / CHALLENGE_AUTH -------------------------------------------------------------

@dataclass(frozen=True)
class Challenge(SpdmMessage, code=RequestCode.CHALLENGE):
    slot_id: int = u8()                 # Param1
    summary_type: int = u8()            # Param2: MeasurementSummaryHashType
    nonce: bytes = data(NONCE_SIZE)
    requester_context: bytes = sized(_requester_context_size, b"")


@dataclass(frozen=True)
class ChallengeAuth(SpdmMessage, code=ResponseCode.CHALLENGE_AUTH):
    """MeasurementSummaryHash present iff CHALLENGE asked for one (*summary*)."""

    attributes: int = u8()              # Param1: slot ID in bits 3:0
    slot_mask: int = u8()               # Param2
    cert_chain_hash: bytes = sized(hash_size)
    nonce: bytes = data(NONCE_SIZE)
    meas_summary_hash: bytes = sized(summary_size)
    opaque_length: int = length_of(2, "opaque")
    opaque: bytes = data("opaque_length")
    requester_context: bytes = sized(_requester_context_size)
    signature: bytes = sized(sig_size)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None,
               summary: bool = False, *, pad: bool = False) -> Self:
        return cls.decode_in(buf, Context.of(ctx, pad=pad, summary=summary))


# --- §10.11 GET_MEASUREMENTS / MEASUREMENTS -------------------------------------------------------

def _signature_requested(known: Known, ctx: Any) -> bool:
    return bool(known["attributes"] & MeasRequestAttr.SIGNATURE_REQUESTED)


@dataclass(frozen=True)
class GetMeasurements(SpdmMessage, code=RequestCode.GET_MEASUREMENTS):
    """Nonce and SlotIDParam (1.1+) present iff SignatureRequested."""

    attributes: int = u8()              # Param1 (MeasRequestAttr)
    operation: int = u8()               # Param2: 0 count, 1..0xFE index, 0xFF all
    nonce: bytes = data(NONCE_SIZE, b"", when=_signature_requested)
    slot_id_param: int = u8(0, when=lambda k, c: _signature_requested(k, c)
                            and k["version"] >= SPDM_VERSION_11)
    requester_context: bytes = sized(_requester_context_size, b"")

    @property
    def signed(self) -> bool:
        return bool(self.attributes & MeasRequestAttr.SIGNATURE_REQUESTED)


@dataclass(frozen=True)
class Measurements(SpdmMessage, code=ResponseCode.MEASUREMENTS):
    """Signature present iff GET_MEASUREMENTS asked for one (*signed*)."""

    param1: int = u8()                  # TotalNumberOfMeasurements when the operation was 0
    param2: int = u8()                  # slot ID [3:0], content changed [5:4]
    number_of_blocks: int = u8()
    record_length: int = length_of(3, "record")
    record: bytes = data("record_length")
    nonce: bytes = data(NONCE_SIZE)
    opaque_length: int = length_of(2, "opaque")
    opaque: bytes = data("opaque_length")
    requester_context: bytes = sized(_requester_context_size)
    signature: bytes = sized(measurements_sig_size)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None,
               signed: bool = False, *, pad: bool = False) -> Self:
        return cls.decode_in(buf, Context.of(ctx, pad=pad, signed=signed))


# --- §10.15/10.16 KEY_EXCHANGE / KEY_EXCHANGE_RSP, FINISH / FINISH_RSP ----------------------------

@dataclass(frozen=True)
class KeyExchange(SpdmMessage, code=RequestCode.KEY_EXCHANGE):
    summary_type: int = u8()            # Param1
    slot_id: int = u8()                 # Param2
    req_session_id: int = u16()
    session_policy: int = u8()
    _reserved: None = ignored(1)
    random: bytes = data(RANDOM_DATA_SIZE)
    exchange_data: bytes = sized(dhe_size)
    opaque_length: int = length_of(2, "opaque")
    opaque: bytes = data("opaque_length")


@dataclass(frozen=True)
class KeyExchangeRsp(SpdmMessage, code=ResponseCode.KEY_EXCHANGE_RSP):
    """MeasurementSummaryHash iff KEY_EXCHANGE asked for one (*summary*); no
    ResponderVerifyData with HANDSHAKE_IN_THE_CLEAR."""

    heartbeat_period: int = u8()        # Param1
    _param2: None = ignored(1)
    rsp_session_id: int = u16()
    mut_auth_requested: int = u8()
    req_slot_id_param: int = u8()
    random: bytes = data(RANDOM_DATA_SIZE)
    exchange_data: bytes = sized(dhe_size)
    meas_summary_hash: bytes = sized(summary_size)
    opaque_length: int = length_of(2, "opaque")
    opaque: bytes = data("opaque_length")
    signature: bytes = sized(sig_size)
    verify_data: bytes = sized(responder_verify_size)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None,
               summary: bool = False, *, pad: bool = False) -> Self:
        return cls.decode_in(buf, Context.of(ctx, pad=pad, summary=summary))


@dataclass(frozen=True)
class Finish(SpdmMessage, code=RequestCode.FINISH):
    """Signature (mutual authentication) present iff Param1 bit 0."""

    attributes: int = u8()              # Param1 bit 0: signature included
    req_slot_id: int = u8()             # Param2
    signature: bytes = sized(req_sig_size, b"", when=lambda k, c: bool(
        k["attributes"] & FINISH_SIGNATURE_INCLUDED))
    verify_data: bytes = sized(hash_size, b"")


@dataclass(frozen=True)
class FinishRsp(_NoParams, code=ResponseCode.FINISH_RSP):
    verify_data: bytes = sized(finish_rsp_verify_size, b"")   # HANDSHAKE_IN_THE_CLEAR only


# --- §10.17-10.19 HEARTBEAT, KEY_UPDATE, END_SESSION (4-byte messages) ----------------------------

@dataclass(frozen=True)
class _Bare(SpdmMessage):
    """A message that is only the header; Param1/Param2 carry its fields."""

    param1: int = u8(0)
    param2: int = u8(0)


@dataclass(frozen=True)
class Heartbeat(_Bare, code=RequestCode.HEARTBEAT):
    pass


@dataclass(frozen=True)
class HeartbeatAck(_Bare, code=ResponseCode.HEARTBEAT_ACK):
    pass


@dataclass(frozen=True)
class KeyUpdate(_Bare, code=RequestCode.KEY_UPDATE):
    """Param1 = KeyOperation, Param2 = Tag."""


@dataclass(frozen=True)
class KeyUpdateAck(_Bare, code=ResponseCode.KEY_UPDATE_ACK):
    pass


@dataclass(frozen=True)
class EndSession(_Bare, code=RequestCode.END_SESSION):
    """Param1 bit 0: PreserveNegotiatedStateClear."""


@dataclass(frozen=True)
class EndSessionAck(_Bare, code=ResponseCode.END_SESSION_ACK):
    pass


# --- §10.20 VENDOR_DEFINED_REQUEST / VENDOR_DEFINED_RESPONSE --------------------------------------

@dataclass(frozen=True)
class _VendorDefined(_NoParams):
    standard_id: int = u16()
    vendor_id_length: int = length_of(1, "vendor_id")
    vendor_id: bytes = data("vendor_id_length")
    payload_length: int = length_of(2, "payload")   # ReqLength / RespLength
    payload: bytes = data("payload_length")


@dataclass(frozen=True)
class VendorDefinedRequest(_VendorDefined, code=RequestCode.VENDOR_DEFINED_REQUEST):
    pass


@dataclass(frozen=True)
class VendorDefinedResponse(_VendorDefined, code=ResponseCode.VENDOR_DEFINED_RESPONSE):
    pass


# --- §10.13 ERROR ---------------------------------------------------------------------------------

# Extended error data sizes that are fixed by the error code (the rest is DOE pad).
_ERROR_EXT_SIZE: dict[int, int] = {ErrorCode.ResponseNotReady: 4, ErrorCode.LargeResponse: 1,
                                   ErrorCode.ResponseTooLarge: 4}


@dataclass(frozen=True)
class Error(SpdmMessage, code=ResponseCode.ERROR):
    code: int = u8()                    # Param1: ErrorCode
    data: int = u8(0)                   # Param2: ErrorData
    ext: bytes = extended_error_data(_ERROR_EXT_SIZE, "code", b"")


MESSAGES: tuple[type[SpdmMessage], ...] = (
    GetVersion, Version, GetCapabilities, Capabilities, NegotiateAlgorithms, Algorithms,
    GetDigests, Digests, GetCertificate, Certificate, Challenge, ChallengeAuth,
    GetMeasurements, Measurements, KeyExchange, KeyExchangeRsp, Finish, FinishRsp, Heartbeat,
    HeartbeatAck, KeyUpdate, KeyUpdateAck, EndSession, EndSessionAck, VendorDefinedRequest,
    VendorDefinedResponse, Error)
"""Every message class, for dispatch tables, fuzzing and property tests."""

__all__ = [
    "HEADER_SIZE", "MAX_DOE_PAD", "MESSAGES", "AlgStruct", "Algorithms", "Capabilities",
    "Certificate", "Challenge", "ChallengeAuth", "Context", "Digests", "EndSession",
    "EndSessionAck", "Error", "Finish", "FinishRsp", "GetCapabilities", "GetCertificate",
    "GetDigests", "GetMeasurements", "GetVersion", "Heartbeat", "HeartbeatAck", "KeyExchange",
    "KeyExchangeRsp", "KeyUpdate", "KeyUpdateAck", "Measurements", "Negotiated",
    "NegotiateAlgorithms", "SpdmMessage", "VendorDefinedRequest", "VendorDefinedResponse",
    "Version", "peek_header",
]
