"""SPDM message codec (DSP0274 1.2/1.3 §10; layouts as libspdm ``spdm.h``).

Every message is a frozen dataclass with ``encode()`` and a mirror-image
``decode()`` classmethod.  Decoders validate lengths and counts and must consume
the input exactly; with ``pad=True`` they also accept up to 3 trailing zero bytes
(the DW padding of a PCI DOE data object, PCIe 6.x §6.30.1) and trim them.  The
exact message bytes are kept in ``raw`` so that transcripts hash what was on the
wire, never a re-encoding.  Reserved fields are written as zero and ignored on
receive (DSP0274 §9 "Reserved fields").

Decoders whose layout depends on the negotiated algorithms take a
:class:`Negotiated` context (hash size H, signature size S, DHE size D) or the
request-dependent flag that decides an optional field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

from . import crypto
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

HEADER_SIZE = 4
MAX_DOE_PAD = 3


# --- negotiated context ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Negotiated:
    """What NEGOTIATE_ALGORITHMS settled; decoders of variable-size fields need it."""

    version: int
    base_hash: int
    base_asym: int
    meas_hash: int = 0
    dhe: int = 0
    aead: int = 0
    handshake_in_the_clear: bool = False
    req_asym: int = 0

    @property
    def hash_size(self) -> int:
        return crypto.hash_size(self.base_hash)

    @property
    def sig_size(self) -> int:
        return crypto.signature_size(self.base_asym)

    @property
    def dhe_size(self) -> int:
        return crypto.dhe_public_size(self.dhe)

    @property
    def req_sig_size(self) -> int:
        return crypto.signature_size(self.req_asym) if self.req_asym else 0


# --- byte reader / writer -------------------------------------------------------------------------

class Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def fail(self, message: str) -> DecodeError:
        return DecodeError(f"{self.what}: {message}", self.data, self.pos)

    def take(self, n: int, name: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated {name} (needs {n} bytes, "
                            f"{len(self.data) - self.pos} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, name: str) -> int:
        return self.take(1, name)[0]

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "little")

    def u24(self, name: str) -> int:
        return int.from_bytes(self.take(3, name), "little")

    def u32(self, name: str) -> int:
        return int.from_bytes(self.take(4, name), "little")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def finish(self, pad: bool) -> bytes:
        """Check the input is consumed (bar DOE pad when allowed); return the exact bytes."""
        rest = self.data[self.pos:]
        if rest and not (pad and len(rest) <= MAX_DOE_PAD and not any(rest)):
            raise self.fail(f"{len(rest)} unexpected trailing bytes")
        return self.data[:self.pos]


def _header(r: Reader, code: int) -> tuple[int, int, int]:
    version = r.u8("SPDMVersion")
    got = r.u8("RequestResponseCode")
    if got != code:
        raise DecodeError(f"{r.what}: code 0x{got:02x} is not 0x{code:02x}", r.data, 1)
    return version, r.u8("Param1"), r.u8("Param2")


def _hdr(version: int, code: int, p1: int = 0, p2: int = 0) -> bytes:
    return bytes((version & 0xFF, code, p1 & 0xFF, p2 & 0xFF))


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def peek_header(data: bytes) -> tuple[int, int, int, int]:
    """(version, code, param1, param2) of any SPDM message; DecodeError if shorter than 4."""
    if len(data) < HEADER_SIZE:
        raise DecodeError("SPDM message shorter than its 4-byte header", data, len(data))
    return data[0], data[1], data[2], data[3]


def _raw() -> bytes:
    return field(default=b"", compare=False, repr=False)


def _ctx_len(version: int) -> int:
    return REQ_CONTEXT_SIZE if version >= SPDM_VERSION_13 else 0


# --- §10.3 GET_VERSION / VERSION ------------------------------------------------------------------

@dataclass(frozen=True)
class GetVersion:
    CODE: ClassVar[int] = RequestCode.GET_VERSION
    version: int = SPDM_VERSION_10
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _hdr(self.version, self.CODE)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> GetVersion:
        r = Reader(data, "GET_VERSION")
        version, _, _ = _header(r, cls.CODE)
        return cls(version, raw=r.finish(pad))


@dataclass(frozen=True)
class Version:
    CODE: ClassVar[int] = ResponseCode.VERSION
    entries: tuple[int, ...]
    version: int = SPDM_VERSION_10
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE) + bytes((0, len(self.entries)))
                + b"".join(_u16(e) for e in self.entries))

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> Version:
        r = Reader(data, "VERSION")
        version, _, _ = _header(r, cls.CODE)
        r.u8("Reserved")
        count = r.u8("VersionNumberEntryCount")
        entries = tuple(r.u16(f"VersionNumberEntry[{i}]") for i in range(count))
        return cls(entries, version, raw=r.finish(pad))


# --- §10.4 GET_CAPABILITIES / CAPABILITIES --------------------------------------------------------

def _caps_body(version: int, ct_exponent: int, flags: int, dts: int, max_msg: int) -> bytes:
    if version < SPDM_VERSION_11:
        return b""
    body = bytes((0, ct_exponent)) + _u16(0) + _u32(flags)
    if version >= SPDM_VERSION_12:
        body += _u32(dts) + _u32(max_msg)
    return body


def _read_caps(r: Reader, version: int) -> tuple[int, int, int, int]:
    if version < SPDM_VERSION_11:
        return 0, 0, 0, 0
    r.u8("Reserved")
    ct = r.u8("CTExponent")
    r.u16("Reserved")
    flags = r.u32("Flags")
    if version < SPDM_VERSION_12:
        return ct, flags, 0, 0
    return ct, flags, r.u32("DataTransferSize"), r.u32("MaxSPDMmsgSize")


@dataclass(frozen=True)
class GetCapabilities:
    CODE: ClassVar[int] = RequestCode.GET_CAPABILITIES
    version: int
    ct_exponent: int = 0
    flags: int = 0
    data_transfer_size: int = 0
    max_spdm_msg_size: int = 0
    param1: int = 0   # 1.3: bit 0 asks for the supported-algorithms block
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _hdr(self.version, self.CODE, self.param1) + _caps_body(
            self.version, self.ct_exponent, self.flags, self.data_transfer_size,
            self.max_spdm_msg_size)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> GetCapabilities:
        r = Reader(data, "GET_CAPABILITIES")
        version, p1, _ = _header(r, cls.CODE)
        ct, flags, dts, mx = _read_caps(r, version)
        return cls(version, ct, flags, dts, mx, p1, raw=r.finish(pad))


@dataclass(frozen=True)
class Capabilities:
    CODE: ClassVar[int] = ResponseCode.CAPABILITIES
    version: int
    ct_exponent: int = 0
    flags: int = 0
    data_transfer_size: int = 0
    max_spdm_msg_size: int = 0
    supported_algorithms: bytes = b""   # 1.3 block, kept raw; present iff Param1 bit 0
    raw: bytes = _raw()

    def encode(self) -> bytes:
        p1 = GET_CAPABILITIES_PARAM1_SUPPORTED_ALGORITHMS if self.supported_algorithms else 0
        return (_hdr(self.version, self.CODE, p1)
                + _caps_body(self.version, self.ct_exponent, self.flags,
                             self.data_transfer_size, self.max_spdm_msg_size)
                + self.supported_algorithms)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> Capabilities:
        r = Reader(data, "CAPABILITIES")
        version, p1, _ = _header(r, cls.CODE)
        ct, flags, dts, mx = _read_caps(r, version)
        block = b""
        if version >= SPDM_VERSION_13 and p1 & GET_CAPABILITIES_PARAM1_SUPPORTED_ALGORITHMS:
            if r.left < 4:
                raise r.fail("truncated supported algorithms block")
            length = int.from_bytes(r.data[r.pos + 2:r.pos + 4], "little")
            if length < 4:      # DSP0274 1.3 §10.4: Length counts the block's own header
                raise r.fail(f"supported algorithms block Length {length} is shorter than "
                             "its 4-byte header")
            block = r.take(length, "supported algorithms block")
        return cls(version, ct, flags, dts, mx, block, raw=r.finish(pad))


# --- §10.5 NEGOTIATE_ALGORITHMS / ALGORITHMS ------------------------------------------------------

@dataclass(frozen=True)
class AlgStruct:
    """AlgStructure: AlgType, AlgCount (fixed 2 << 4 | ext count), AlgSupported, AlgExternal."""

    alg_type: int
    supported: int
    ext: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return (bytes((self.alg_type, ALG_STRUCT_FIXED_COUNT | len(self.ext)))
                + _u16(self.supported) + b"".join(_u32(e) for e in self.ext))

    @classmethod
    def read(cls, r: Reader, index: int) -> AlgStruct:
        alg_type = r.u8(f"AlgStruct[{index}].AlgType")
        count = r.u8(f"AlgStruct[{index}].AlgCount")
        if count >> 4 != 2:
            raise r.fail(f"AlgStruct[{index}] FixedAlgCount {count >> 4} != 2")
        supported = r.u16(f"AlgStruct[{index}].AlgSupported")
        ext = tuple(r.u32(f"AlgStruct[{index}].AlgExternal") for _ in range(count & 0xF))
        return cls(alg_type, supported, ext)


def _read_alg_structs(r: Reader, count: int, version: int) -> tuple[AlgStruct, ...]:
    structs: list[AlgStruct] = []
    if version < SPDM_VERSION_11:
        return ()
    for i in range(count):
        s = AlgStruct.read(r, i)
        if structs and s.alg_type <= structs[-1].alg_type:
            raise r.fail(f"AlgStruct[{i}] type {s.alg_type} out of ascending order")
        structs.append(s)
    return tuple(structs)


@dataclass(frozen=True)
class NegotiateAlgorithms:
    CODE: ClassVar[int] = RequestCode.NEGOTIATE_ALGORITHMS
    FIXED: ClassVar[int] = 32
    version: int
    measurement_spec: int = 0
    other_params: int = 0
    base_asym: int = 0
    base_hash: int = 0
    mel_spec: int = 0
    ext_asym: tuple[int, ...] = ()
    ext_hash: tuple[int, ...] = ()
    alg_structs: tuple[AlgStruct, ...] = ()
    raw: bytes = _raw()

    def encode(self) -> bytes:
        tail = (b"".join(_u32(e) for e in self.ext_asym + self.ext_hash)
                + b"".join(s.encode() for s in self.alg_structs))
        length = self.FIXED + len(tail)
        return (_hdr(self.version, self.CODE, len(self.alg_structs))
                + _u16(length) + bytes((self.measurement_spec, self.other_params))
                + _u32(self.base_asym) + _u32(self.base_hash) + bytes(12)
                + bytes((len(self.ext_asym), len(self.ext_hash), 0, self.mel_spec)) + tail)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> NegotiateAlgorithms:
        r = Reader(data, "NEGOTIATE_ALGORITHMS")
        version, p1, _ = _header(r, cls.CODE)
        length = r.u16("Length")
        mspec, other = r.u8("MeasurementSpecification"), r.u8("OtherParamsSupport")
        asym, hsh = r.u32("BaseAsymAlgo"), r.u32("BaseHashAlgo")
        r.take(12, "Reserved")
        n_asym, n_hash = r.u8("ExtAsymCount"), r.u8("ExtHashCount")
        r.u8("Reserved")
        mel = r.u8("MELSpecification")
        ext_asym = tuple(r.u32("ExtAsym") for _ in range(n_asym))
        ext_hash = tuple(r.u32("ExtHash") for _ in range(n_hash))
        structs = _read_alg_structs(r, p1, version)
        if length != r.pos:
            raise r.fail(f"Length field {length} != message length {r.pos}")
        return cls(version, mspec, other, asym, hsh, mel, ext_asym, ext_hash, structs,
                   raw=r.finish(pad))


@dataclass(frozen=True)
class Algorithms:
    CODE: ClassVar[int] = ResponseCode.ALGORITHMS
    FIXED: ClassVar[int] = 36
    version: int
    measurement_spec_sel: int = 0
    other_params_sel: int = 0
    meas_hash_algo: int = 0
    base_asym_sel: int = 0
    base_hash_sel: int = 0
    mel_spec_sel: int = 0
    ext_asym_sel: tuple[int, ...] = ()
    ext_hash_sel: tuple[int, ...] = ()
    alg_structs: tuple[AlgStruct, ...] = ()
    raw: bytes = _raw()

    def encode(self) -> bytes:
        tail = (b"".join(_u32(e) for e in self.ext_asym_sel + self.ext_hash_sel)
                + b"".join(s.encode() for s in self.alg_structs))
        return (_hdr(self.version, self.CODE, len(self.alg_structs))
                + _u16(self.FIXED + len(tail))
                + bytes((self.measurement_spec_sel, self.other_params_sel))
                + _u32(self.meas_hash_algo) + _u32(self.base_asym_sel)
                + _u32(self.base_hash_sel) + bytes(11) + bytes((self.mel_spec_sel,))
                + bytes((len(self.ext_asym_sel), len(self.ext_hash_sel))) + bytes(2) + tail)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> Algorithms:
        r = Reader(data, "ALGORITHMS")
        version, p1, _ = _header(r, cls.CODE)
        length = r.u16("Length")
        mspec, other = r.u8("MeasurementSpecificationSel"), r.u8("OtherParamsSelection")
        mhash, asym, hsh = r.u32("MeasurementHashAlgo"), r.u32("BaseAsymSel"), r.u32(
            "BaseHashSel")
        r.take(11, "Reserved")
        mel = r.u8("MELSpecificationSel")
        n_asym, n_hash = r.u8("ExtAsymSelCount"), r.u8("ExtHashSelCount")
        r.u16("Reserved")
        ext_asym = tuple(r.u32("ExtAsymSel") for _ in range(n_asym))
        ext_hash = tuple(r.u32("ExtHashSel") for _ in range(n_hash))
        structs = _read_alg_structs(r, p1, version)
        if length != r.pos:
            raise r.fail(f"Length field {length} != message length {r.pos}")
        return cls(version, mspec, other, mhash, asym, hsh, mel, ext_asym, ext_hash, structs,
                   raw=r.finish(pad))

    def selected(self, alg_type: int) -> int:
        return next((s.supported for s in self.alg_structs if s.alg_type == alg_type), 0)


# --- §10.6/10.7 GET_DIGESTS / DIGESTS, GET_CERTIFICATE / CERTIFICATE ------------------------------

@dataclass(frozen=True)
class GetDigests:
    CODE: ClassVar[int] = RequestCode.GET_DIGESTS
    version: int
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _hdr(self.version, self.CODE)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> GetDigests:
        r = Reader(data, "GET_DIGESTS")
        version, _, _ = _header(r, cls.CODE)
        return cls(version, raw=r.finish(pad))


@dataclass(frozen=True)
class Digests:
    """Param1 = SupportedSlotMask (1.3, reserved in 1.2), Param2 = ProvisionedSlotMask."""

    CODE: ClassVar[int] = ResponseCode.DIGESTS
    version: int
    slot_mask: int
    digests: tuple[bytes, ...]
    supported_slot_mask: int = 0
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.supported_slot_mask, self.slot_mask)
                + b"".join(self.digests))

    @classmethod
    def decode(cls, data: bytes, hash_size: int, pad: bool = False) -> Digests:
        r = Reader(data, "DIGESTS")
        version, p1, p2 = _header(r, cls.CODE)
        digests = tuple(r.take(hash_size, f"Digest[{i}]") for i in range(bin(p2).count("1")))
        return cls(version, p2, digests, p1, raw=r.finish(pad))


@dataclass(frozen=True)
class GetCertificate:
    CODE: ClassVar[int] = RequestCode.GET_CERTIFICATE
    version: int
    slot_id: int
    offset: int
    length: int
    attributes: int = 0   # Param2 (1.3)
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.slot_id, self.attributes)
                + _u16(self.offset) + _u16(self.length))

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> GetCertificate:
        r = Reader(data, "GET_CERTIFICATE")
        version, p1, p2 = _header(r, cls.CODE)
        offset, length = r.u16("Offset"), r.u16("Length")
        return cls(version, p1, offset, length, p2, raw=r.finish(pad))


@dataclass(frozen=True)
class Certificate:
    CODE: ClassVar[int] = ResponseCode.CERTIFICATE
    version: int
    slot_id: int
    portion: bytes
    remainder_length: int
    attributes: int = 0
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.slot_id, self.attributes)
                + _u16(len(self.portion)) + _u16(self.remainder_length) + self.portion)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> Certificate:
        r = Reader(data, "CERTIFICATE")
        version, p1, p2 = _header(r, cls.CODE)
        portion_len, remainder = r.u16("PortionLength"), r.u16("RemainderLength")
        portion = r.take(portion_len, "CertChain portion")
        return cls(version, p1, portion, remainder, p2, raw=r.finish(pad))


# --- §10.8 CHALLENGE / CHALLENGE_AUTH -------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    CODE: ClassVar[int] = RequestCode.CHALLENGE
    version: int
    slot_id: int
    summary_type: int
    nonce: bytes
    requester_context: bytes = b""   # 1.3
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.slot_id, self.summary_type) + self.nonce
                + self.requester_context)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> Challenge:
        r = Reader(data, "CHALLENGE")
        version, p1, p2 = _header(r, cls.CODE)
        nonce = r.take(NONCE_SIZE, "Nonce")
        ctx = r.take(_ctx_len(version), "RequesterContext")
        return cls(version, p1, p2, nonce, ctx, raw=r.finish(pad))


@dataclass(frozen=True)
class ChallengeAuth:
    CODE: ClassVar[int] = ResponseCode.CHALLENGE_AUTH
    version: int
    attributes: int      # Param1: slot ID in bits 3:0
    slot_mask: int       # Param2
    cert_chain_hash: bytes
    nonce: bytes
    meas_summary_hash: bytes
    opaque: bytes
    requester_context: bytes
    signature: bytes
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.attributes, self.slot_mask)
                + self.cert_chain_hash + self.nonce + self.meas_summary_hash
                + _u16(len(self.opaque)) + self.opaque + self.requester_context
                + self.signature)

    @classmethod
    def decode(cls, data: bytes, ctx: Negotiated, summary: bool,
               pad: bool = False) -> ChallengeAuth:
        r = Reader(data, "CHALLENGE_AUTH")
        version, p1, p2 = _header(r, cls.CODE)
        h = ctx.hash_size
        cert_hash, nonce = r.take(h, "CertChainHash"), r.take(NONCE_SIZE, "Nonce")
        summary_hash = r.take(h if summary else 0, "MeasurementSummaryHash")
        opaque = r.take(r.u16("OpaqueDataLength"), "OpaqueData")
        req_ctx = r.take(_ctx_len(version), "RequesterContext")
        sig = r.take(ctx.sig_size, "Signature")
        return cls(version, p1, p2, cert_hash, nonce, summary_hash, opaque, req_ctx, sig,
                   raw=r.finish(pad))


# --- §10.11 GET_MEASUREMENTS / MEASUREMENTS -------------------------------------------------------

@dataclass(frozen=True)
class GetMeasurements:
    CODE: ClassVar[int] = RequestCode.GET_MEASUREMENTS
    version: int
    attributes: int      # Param1 (MeasRequestAttr)
    operation: int       # Param2: 0 count, 1..0xFE index, 0xFF all
    nonce: bytes = b""   # present iff SignatureRequested
    slot_id_param: int = 0
    requester_context: bytes = b""   # 1.3
    raw: bytes = _raw()

    @property
    def signed(self) -> bool:
        return bool(self.attributes & MeasRequestAttr.SIGNATURE_REQUESTED)

    def encode(self) -> bytes:
        out = _hdr(self.version, self.CODE, self.attributes, self.operation)
        if self.signed:
            out += self.nonce
            if self.version >= SPDM_VERSION_11:
                out += bytes((self.slot_id_param,))
        return out + self.requester_context

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> GetMeasurements:
        r = Reader(data, "GET_MEASUREMENTS")
        version, p1, p2 = _header(r, cls.CODE)
        nonce, slot = b"", 0
        if p1 & MeasRequestAttr.SIGNATURE_REQUESTED:
            nonce = r.take(NONCE_SIZE, "Nonce")
            if version >= SPDM_VERSION_11:
                slot = r.u8("SlotIDParam")
        ctx = r.take(_ctx_len(version), "RequesterContext")
        return cls(version, p1, p2, nonce, slot, ctx, raw=r.finish(pad))


@dataclass(frozen=True)
class Measurements:
    CODE: ClassVar[int] = ResponseCode.MEASUREMENTS
    version: int
    param1: int          # TotalNumberOfMeasurements when the operation was 0
    param2: int          # slot ID [3:0], content changed [5:4]
    number_of_blocks: int
    record: bytes
    nonce: bytes
    opaque: bytes
    requester_context: bytes
    signature: bytes
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.param1, self.param2)
                + bytes((self.number_of_blocks,)) + len(self.record).to_bytes(3, "little")
                + self.record + self.nonce + _u16(len(self.opaque)) + self.opaque
                + self.requester_context + self.signature)

    @classmethod
    def decode(cls, data: bytes, ctx: Negotiated, signed: bool,
               pad: bool = False) -> Measurements:
        r = Reader(data, "MEASUREMENTS")
        version, p1, p2 = _header(r, cls.CODE)
        blocks = r.u8("NumberOfBlocks")
        record = r.take(r.u24("MeasurementRecordLength"), "MeasurementRecord")
        nonce = r.take(NONCE_SIZE, "Nonce")
        opaque = r.take(r.u16("OpaqueDataLength"), "OpaqueData")
        req_ctx = r.take(_ctx_len(version), "RequesterContext")
        sig = r.take(ctx.sig_size if signed else 0, "Signature")
        return cls(version, p1, p2, blocks, record, nonce, opaque, req_ctx, sig,
                   raw=r.finish(pad))


# --- §10.15/10.16 KEY_EXCHANGE / KEY_EXCHANGE_RSP, FINISH / FINISH_RSP ----------------------------

@dataclass(frozen=True)
class KeyExchange:
    CODE: ClassVar[int] = RequestCode.KEY_EXCHANGE
    version: int
    summary_type: int    # Param1
    slot_id: int         # Param2
    req_session_id: int
    session_policy: int
    random: bytes
    exchange_data: bytes
    opaque: bytes
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.summary_type, self.slot_id)
                + _u16(self.req_session_id) + bytes((self.session_policy, 0)) + self.random
                + self.exchange_data + _u16(len(self.opaque)) + self.opaque)

    @classmethod
    def decode(cls, data: bytes, dhe_size: int, pad: bool = False) -> KeyExchange:
        r = Reader(data, "KEY_EXCHANGE")
        version, p1, p2 = _header(r, cls.CODE)
        sid, policy = r.u16("ReqSessionID"), r.u8("SessionPolicy")
        r.u8("Reserved")
        rnd = r.take(RANDOM_DATA_SIZE, "RandomData")
        exch = r.take(dhe_size, "ExchangeData")
        opaque = r.take(r.u16("OpaqueDataLength"), "OpaqueData")
        return cls(version, p1, p2, sid, policy, rnd, exch, opaque, raw=r.finish(pad))


@dataclass(frozen=True)
class KeyExchangeRsp:
    CODE: ClassVar[int] = ResponseCode.KEY_EXCHANGE_RSP
    version: int
    heartbeat_period: int
    rsp_session_id: int
    mut_auth_requested: int
    req_slot_id_param: int
    random: bytes
    exchange_data: bytes
    meas_summary_hash: bytes
    opaque: bytes
    signature: bytes
    verify_data: bytes   # absent with HANDSHAKE_IN_THE_CLEAR
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.heartbeat_period)
                + _u16(self.rsp_session_id)
                + bytes((self.mut_auth_requested, self.req_slot_id_param)) + self.random
                + self.exchange_data + self.meas_summary_hash + _u16(len(self.opaque))
                + self.opaque + self.signature + self.verify_data)

    @classmethod
    def decode(cls, data: bytes, ctx: Negotiated, summary: bool,
               pad: bool = False) -> KeyExchangeRsp:
        r = Reader(data, "KEY_EXCHANGE_RSP")
        version, p1, _ = _header(r, cls.CODE)
        sid = r.u16("RspSessionID")
        mut, slot = r.u8("MutAuthRequested"), r.u8("ReqSlotIDParam")
        rnd = r.take(RANDOM_DATA_SIZE, "RandomData")
        exch = r.take(ctx.dhe_size, "ExchangeData")
        summary_hash = r.take(ctx.hash_size if summary else 0, "MeasurementSummaryHash")
        opaque = r.take(r.u16("OpaqueDataLength"), "OpaqueData")
        sig = r.take(ctx.sig_size, "Signature")
        vd = r.take(0 if ctx.handshake_in_the_clear else ctx.hash_size, "ResponderVerifyData")
        return cls(version, p1, sid, mut, slot, rnd, exch, summary_hash, opaque, sig, vd,
                   raw=r.finish(pad))


@dataclass(frozen=True)
class Finish:
    CODE: ClassVar[int] = RequestCode.FINISH
    version: int
    attributes: int      # Param1 bit 0: signature included
    req_slot_id: int     # Param2
    signature: bytes
    verify_data: bytes
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return (_hdr(self.version, self.CODE, self.attributes, self.req_slot_id)
                + self.signature + self.verify_data)

    @classmethod
    def decode(cls, data: bytes, ctx: Negotiated, pad: bool = False) -> Finish:
        r = Reader(data, "FINISH")
        version, p1, p2 = _header(r, cls.CODE)
        sig = b""
        if p1 & FINISH_SIGNATURE_INCLUDED:
            if not ctx.req_sig_size:
                raise r.fail("signature included but no requester algorithm negotiated")
            sig = r.take(ctx.req_sig_size, "Signature")
        vd = r.take(ctx.hash_size, "RequesterVerifyData")
        return cls(version, p1, p2, sig, vd, raw=r.finish(pad))


@dataclass(frozen=True)
class FinishRsp:
    CODE: ClassVar[int] = ResponseCode.FINISH_RSP
    version: int
    verify_data: bytes = b""   # only with HANDSHAKE_IN_THE_CLEAR
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _hdr(self.version, self.CODE) + self.verify_data

    @classmethod
    def decode(cls, data: bytes, ctx: Negotiated, pad: bool = False) -> FinishRsp:
        r = Reader(data, "FINISH_RSP")
        version, _, _ = _header(r, cls.CODE)
        vd = r.take(ctx.hash_size if ctx.handshake_in_the_clear else 0, "ResponderVerifyData")
        return cls(version, vd, raw=r.finish(pad))


# --- §10.17-10.19 HEARTBEAT, KEY_UPDATE, END_SESSION (4-byte messages) ----------------------------

@dataclass(frozen=True)
class _Bare:
    """A message that is only the header; Param1/Param2 carry its fields."""

    CODE: ClassVar[int] = 0
    NAME: ClassVar[str] = ""
    version: int
    param1: int = 0
    param2: int = 0
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _hdr(self.version, self.CODE, self.param1, self.param2)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> Self:
        r = Reader(data, cls.NAME)
        version, p1, p2 = _header(r, cls.CODE)
        return cls(version, p1, p2, raw=r.finish(pad))


@dataclass(frozen=True)
class Heartbeat(_Bare):
    CODE: ClassVar[int] = RequestCode.HEARTBEAT
    NAME: ClassVar[str] = "HEARTBEAT"


@dataclass(frozen=True)
class HeartbeatAck(_Bare):
    CODE: ClassVar[int] = ResponseCode.HEARTBEAT_ACK
    NAME: ClassVar[str] = "HEARTBEAT_ACK"


@dataclass(frozen=True)
class KeyUpdate(_Bare):
    """Param1 = KeyOperation, Param2 = Tag."""

    CODE: ClassVar[int] = RequestCode.KEY_UPDATE
    NAME: ClassVar[str] = "KEY_UPDATE"


@dataclass(frozen=True)
class KeyUpdateAck(_Bare):
    CODE: ClassVar[int] = ResponseCode.KEY_UPDATE_ACK
    NAME: ClassVar[str] = "KEY_UPDATE_ACK"


@dataclass(frozen=True)
class EndSession(_Bare):
    """Param1 bit 0: PreserveNegotiatedStateClear."""

    CODE: ClassVar[int] = RequestCode.END_SESSION
    NAME: ClassVar[str] = "END_SESSION"


@dataclass(frozen=True)
class EndSessionAck(_Bare):
    CODE: ClassVar[int] = ResponseCode.END_SESSION_ACK
    NAME: ClassVar[str] = "END_SESSION_ACK"


# --- §10.20 VENDOR_DEFINED_REQUEST / VENDOR_DEFINED_RESPONSE --------------------------------------

def _vendor_encode(version: int, code: int, standard_id: int, vendor_id: bytes,
                   payload: bytes) -> bytes:
    return (_hdr(version, code) + _u16(standard_id) + bytes((len(vendor_id),)) + vendor_id
            + _u16(len(payload)) + payload)


def _vendor_read(r: Reader, code: int) -> tuple[int, int, bytes, bytes]:
    version, _, _ = _header(r, code)
    standard_id = r.u16("StandardID")
    vendor_id = r.take(r.u8("Len"), "VendorID")
    payload = r.take(r.u16("ReqLength/RespLength"), "VendorDefinedPayload")
    return version, standard_id, vendor_id, payload


@dataclass(frozen=True)
class VendorDefinedRequest:
    CODE: ClassVar[int] = RequestCode.VENDOR_DEFINED_REQUEST
    version: int
    standard_id: int
    vendor_id: bytes
    payload: bytes
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _vendor_encode(self.version, self.CODE, self.standard_id, self.vendor_id,
                              self.payload)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> VendorDefinedRequest:
        r = Reader(data, "VENDOR_DEFINED_REQUEST")
        v, sid, vid, payload = _vendor_read(r, cls.CODE)
        return cls(v, sid, vid, payload, raw=r.finish(pad))


@dataclass(frozen=True)
class VendorDefinedResponse:
    CODE: ClassVar[int] = ResponseCode.VENDOR_DEFINED_RESPONSE
    version: int
    standard_id: int
    vendor_id: bytes
    payload: bytes
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _vendor_encode(self.version, self.CODE, self.standard_id, self.vendor_id,
                              self.payload)

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> VendorDefinedResponse:
        r = Reader(data, "VENDOR_DEFINED_RESPONSE")
        v, sid, vid, payload = _vendor_read(r, cls.CODE)
        return cls(v, sid, vid, payload, raw=r.finish(pad))


# --- §10.13 ERROR ---------------------------------------------------------------------------------

# Extended error data sizes that are fixed by the error code (the rest is DOE pad).
_ERROR_EXT_SIZE: dict[int, int] = {ErrorCode.ResponseNotReady: 4, ErrorCode.LargeResponse: 1,
                   ErrorCode.ResponseTooLarge: 4}


@dataclass(frozen=True)
class Error:
    CODE: ClassVar[int] = ResponseCode.ERROR
    version: int
    code: int
    data: int = 0
    ext: bytes = b""
    raw: bytes = _raw()

    def encode(self) -> bytes:
        return _hdr(self.version, self.CODE, self.code, self.data) + self.ext

    @classmethod
    def decode(cls, data: bytes, pad: bool = False) -> Error:
        r = Reader(data, "ERROR")
        version, p1, p2 = _header(r, cls.CODE)
        size = _ERROR_EXT_SIZE.get(p1) if pad else None
        ext = r.take(min(size, r.left) if size is not None else r.left, "ExtendedErrorData")
        if len(ext) > 32:
            raise r.fail(f"extended error data of {len(ext)} bytes exceeds 32")
        return cls(version, p1, p2, ext, raw=r.finish(pad))


__all__ = [
    "AlgStruct", "Algorithms", "Capabilities", "Certificate", "Challenge", "ChallengeAuth",
    "Digests", "EndSession", "EndSessionAck", "Error", "Finish", "FinishRsp", "GetCapabilities",
    "GetCertificate", "GetDigests", "GetMeasurements", "GetVersion", "Heartbeat",
    "HeartbeatAck", "KeyExchange", "KeyExchangeRsp", "KeyUpdate", "KeyUpdateAck",
    "Measurements", "Negotiated", "NegotiateAlgorithms", "Reader", "VendorDefinedRequest",
    "VendorDefinedResponse", "Version", "peek_header",
]
