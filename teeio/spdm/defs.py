"""SPDM (DMTF DSP0274 1.2/1.3) and Secured Messages (DSP0277) definitions.

Pure spec tables: codes, bitfields and constants, named as in the specification (header
layout, DSP0274 §9; byte order: docs/attestation.md "Inside the SPDM cores").
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# --- §9.1 version numbers -----------------------------------------------------------------------

SPDM_VERSION_10 = 0x10
SPDM_VERSION_11 = 0x11
SPDM_VERSION_12 = 0x12
SPDM_VERSION_13 = 0x13

# DSP0277 "Secured Messages using SPDM" versions (carried in KEY_EXCHANGE opaque data).
SECURED_VERSION_10 = 0x10
SECURED_VERSION_11 = 0x11
SECURED_VERSION_12 = 0x12

NONCE_SIZE = 32            # §10.10 CHALLENGE Nonce, §10.11 GET_MEASUREMENTS Nonce
RANDOM_DATA_SIZE = 32      # §10.15 KEY_EXCHANGE RandomData
REQ_CONTEXT_SIZE = 8       # 1.3 RequesterContext
MIN_DATA_TRANSFER_SIZE_12 = 42   # §10.4 Table "GET_CAPABILITIES": DataTransferSize >= 42
MAX_OPAQUE_DATA_SIZE = 1024      # §10.x "OpaqueDataLength shall be <= 1024"
MAX_SLOT_COUNT = 8
MAX_CT_EXPONENT = 31             # libspdm LIBSPDM_MAX_CT_EXPONENT


def version_number_entry(version: int) -> int:
    """VERSION entry (§10.3 Table "VersionNumberEntry"): major[15:12] minor[11:8] update alpha."""
    return (version & 0xFF) << 8


def version_str(version: int) -> str:
    return f"{version >> 4}.{version & 0xF}"


# --- §10 request / response codes (Table "SPDM request codes", "SPDM response codes") ------------

class RequestCode(IntEnum):
    GET_DIGESTS = 0x81
    GET_CERTIFICATE = 0x82
    CHALLENGE = 0x83
    GET_VERSION = 0x84
    CHUNK_SEND = 0x85
    CHUNK_GET = 0x86
    GET_ENDPOINT_INFO = 0x87
    GET_MEASUREMENTS = 0xE0
    GET_CAPABILITIES = 0xE1
    GET_SUPPORTED_EVENT_TYPES = 0xE2
    NEGOTIATE_ALGORITHMS = 0xE3
    KEY_EXCHANGE = 0xE4
    FINISH = 0xE5
    PSK_EXCHANGE = 0xE6
    PSK_FINISH = 0xE7
    HEARTBEAT = 0xE8
    KEY_UPDATE = 0xE9
    GET_ENCAPSULATED_REQUEST = 0xEA
    DELIVER_ENCAPSULATED_RESPONSE = 0xEB
    END_SESSION = 0xEC
    GET_CSR = 0xED
    SET_CERTIFICATE = 0xEE
    GET_MEASUREMENT_EXTENSION_LOG = 0xEF
    SUBSCRIBE_EVENT_TYPES = 0xF0
    SEND_EVENT = 0xF1
    GET_KEY_PAIR_INFO = 0xFC
    SET_KEY_PAIR_INFO = 0xFD
    VENDOR_DEFINED_REQUEST = 0xFE
    RESPOND_IF_READY = 0xFF


class ResponseCode(IntEnum):
    DIGESTS = 0x01
    CERTIFICATE = 0x02
    CHALLENGE_AUTH = 0x03
    VERSION = 0x04
    CHUNK_SEND_ACK = 0x05
    CHUNK_RESPONSE = 0x06
    ENDPOINT_INFO = 0x07
    MEASUREMENTS = 0x60
    CAPABILITIES = 0x61
    SUPPORTED_EVENT_TYPES = 0x62
    ALGORITHMS = 0x63
    KEY_EXCHANGE_RSP = 0x64
    FINISH_RSP = 0x65
    PSK_EXCHANGE_RSP = 0x66
    PSK_FINISH_RSP = 0x67
    HEARTBEAT_ACK = 0x68
    KEY_UPDATE_ACK = 0x69
    ENCAPSULATED_REQUEST = 0x6A
    ENCAPSULATED_RESPONSE_ACK = 0x6B
    END_SESSION_ACK = 0x6C
    CSR = 0x6D
    SET_CERTIFICATE_RSP = 0x6E
    MEASUREMENT_EXTENSION_LOG = 0x6F
    SUBSCRIBE_EVENT_TYPES_ACK = 0x70
    EVENT_ACK = 0x71
    KEY_PAIR_INFO = 0x7C
    SET_KEY_PAIR_INFO_ACK = 0x7D
    VENDOR_DEFINED_RESPONSE = 0x7E
    ERROR = 0x7F


# --- §10.13 ERROR (Table "Error code and error data") ------------------------------------------

class ErrorCode(IntEnum):
    InvalidRequest = 0x01
    Busy = 0x03
    UnexpectedRequest = 0x04
    Unspecified = 0x05
    DecryptError = 0x06
    UnsupportedRequest = 0x07
    RequestInFlight = 0x08
    InvalidResponseCode = 0x09
    SessionLimitExceeded = 0x0A
    SessionRequired = 0x0B
    ResetRequired = 0x0C
    ResponseTooLarge = 0x0D
    RequestTooLarge = 0x0E
    LargeResponse = 0x0F
    MessageLost = 0x10
    InvalidPolicy = 0x11
    VersionMismatch = 0x41
    ResponseNotReady = 0x42
    RequestResynch = 0x43
    OperationFailed = 0x44
    NoPendingRequests = 0x45
    VendorDefined = 0xFF


# --- §10.4 CAPABILITIES.Flags (Tables "Requester/Responder flag fields") -------------------------

class CapFlags(IntFlag):
    CACHE_CAP = 0x1
    CERT_CAP = 0x2
    CHAL_CAP = 0x4
    MEAS_CAP_NO_SIG = 0x8
    MEAS_CAP_SIG = 0x10
    MEAS_FRESH_CAP = 0x20
    ENCRYPT_CAP = 0x40
    MAC_CAP = 0x80
    MUT_AUTH_CAP = 0x100
    KEY_EX_CAP = 0x200
    PSK_CAP = 0x400
    PSK_CAP_WITH_CONTEXT = 0x800
    ENCAP_CAP = 0x1000
    HBEAT_CAP = 0x2000
    KEY_UPD_CAP = 0x4000
    HANDSHAKE_IN_THE_CLEAR_CAP = 0x8000
    PUB_KEY_ID_CAP = 0x10000
    CHUNK_CAP = 0x20000
    ALIAS_CERT_CAP = 0x40000
    SET_CERT_CAP = 0x80000
    CSR_CAP = 0x100000
    CERT_INSTALL_RESET_CAP = 0x200000
    EP_INFO_CAP_NO_SIG = 0x400000
    EP_INFO_CAP_SIG = 0x800000
    MEL_CAP = 0x1000000
    EVENT_CAP = 0x2000000
    MULTI_KEY_CAP_ONLY = 0x4000000
    MULTI_KEY_CAP_NEG = 0x8000000
    GET_KEY_PAIR_INFO_CAP = 0x10000000
    SET_KEY_PAIR_INFO_CAP = 0x20000000
    SET_KEY_PAIR_RESET_CAP = 0x40000000
    LARGE_RESP_CAP = 0x80000000


MEAS_CAP_MASK = CapFlags.MEAS_CAP_NO_SIG | CapFlags.MEAS_CAP_SIG
PSK_CAP_MASK = CapFlags.PSK_CAP | CapFlags.PSK_CAP_WITH_CONTEXT

GET_CAPABILITIES_PARAM1_SUPPORTED_ALGORITHMS = 0x01   # 1.3


# --- §10.5 NEGOTIATE_ALGORITHMS / ALGORITHMS ----------------------------------------------------

MEASUREMENT_SPECIFICATION_DMTF = 0x01


class OtherParams(IntFlag):
    """OtherParamsSupport / OtherParamsSelection (1.2; MULTI_KEY_CONN 1.3)."""

    OPAQUE_DATA_FMT0 = 0x01
    OPAQUE_DATA_FMT1 = 0x02
    MULTI_KEY_CONN = 0x10


OPAQUE_DATA_FORMAT_MASK = 0x0F


class BaseAsymAlgo(IntFlag):
    RSASSA_2048 = 0x1
    RSAPSS_2048 = 0x2
    RSASSA_3072 = 0x4
    RSAPSS_3072 = 0x8
    ECDSA_P256 = 0x10
    RSASSA_4096 = 0x20
    RSAPSS_4096 = 0x40
    ECDSA_P384 = 0x80
    ECDSA_P521 = 0x100
    SM2_P256 = 0x200
    EDDSA_25519 = 0x400
    EDDSA_448 = 0x800


class BaseHashAlgo(IntFlag):
    SHA_256 = 0x1
    SHA_384 = 0x2
    SHA_512 = 0x4
    SHA3_256 = 0x8
    SHA3_384 = 0x10
    SHA3_512 = 0x20
    SM3_256 = 0x40


class MeasurementHashAlgo(IntFlag):
    RAW_BIT_STREAM_ONLY = 0x1
    SHA_256 = 0x2
    SHA_384 = 0x4
    SHA_512 = 0x8
    SHA3_256 = 0x10
    SHA3_384 = 0x20
    SHA3_512 = 0x40
    SM3_256 = 0x80


class AlgType(IntEnum):
    """AlgStructure.AlgType (Table "Algorithm request structure")."""

    DHE = 2
    AEAD = 3
    REQ_BASE_ASYM_ALG = 4
    KEY_SCHEDULE = 5


class DheGroup(IntFlag):
    FFDHE_2048 = 0x1
    FFDHE_3072 = 0x2
    FFDHE_4096 = 0x4
    SECP_256_R1 = 0x8
    SECP_384_R1 = 0x10
    SECP_521_R1 = 0x20
    SM2_P256 = 0x40


class AeadSuite(IntFlag):
    AES_128_GCM = 0x1
    AES_256_GCM = 0x2
    CHACHA20_POLY1305 = 0x4
    SM4_GCM = 0x8


class KeySchedule(IntFlag):
    SPDM = 0x1


ALG_STRUCT_FIXED_COUNT = 0x20   # AlgCount: FixedAlgCount (2) << 4 | ExtAlgCount (0)


class RegistryId(IntEnum):
    """StandardID / registry ID (Table "Standards body or vendor-defined header registry")."""

    DMTF = 0x0
    TCG = 0x1
    USB = 0x2
    PCISIG = 0x3
    IANA = 0x4
    HDBASET = 0x5
    MIPI = 0x6
    CXL = 0x7
    JEDEC = 0x8
    VESA = 0x9
    IANA_CBOR = 0xA
    DMTF_DSP = 0xB


# VendorID length by registry (libspdm ``libspdm_validate_svh_vendor_id_len``); None = any.
VENDOR_ID_LEN: dict[int, int | None] = {
    RegistryId.DMTF: 0, RegistryId.TCG: 2, RegistryId.USB: 2, RegistryId.PCISIG: 2,
    RegistryId.IANA: 4, RegistryId.HDBASET: 4, RegistryId.MIPI: 2, RegistryId.CXL: 2,
    RegistryId.JEDEC: 2, RegistryId.VESA: 0, RegistryId.IANA_CBOR: None, RegistryId.DMTF_DSP: 2,
}

PCI_SIG_VENDOR_ID = 0x0001


# --- §10.10/10.11/10.15 request attributes --------------------------------------------------------

class MeasSummaryHashType(IntEnum):
    NONE = 0x00
    TCB = 0x01
    ALL = 0xFF


class MeasRequestAttr(IntFlag):
    """GET_MEASUREMENTS Param1."""

    SIGNATURE_REQUESTED = 0x01
    RAW_BIT_STREAM_REQUESTED = 0x02
    NEW_MEASUREMENT_REQUESTED = 0x04   # 1.3


#: GET_CERTIFICATE Param2 (Request Attributes, SPDM 1.3) bit 0: SlotSizeRequested
#: (DSP0274 1.3 §10.7); reserved in 1.2.
GET_CERT_SLOT_SIZE_REQUESTED = 0x01

MEAS_OP_COUNT = 0x00
MEAS_OP_ALL = 0xFF
MEAS_SLOT_ID_MASK = 0x0F
MEAS_CONTENT_CHANGE_MASK = 0x30


class KeyUpdateOp(IntEnum):
    """KEY_UPDATE Param1 (§10.18 Table "KEY_UPDATE operations")."""

    UpdateKey = 1
    UpdateAllKeys = 2
    VerifyNewKey = 3


class KeyExchangeSessionPolicy(IntFlag):
    TERMINATION_POLICY_RUNTIME_UPDATE = 0x01
    EVENT_ALL_POLICY = 0x02


FINISH_SIGNATURE_INCLUDED = 0x01
END_SESSION_PRESERVE_NEGOTIATED_STATE_CLEAR = 0x01


# --- §15 signing contexts (SPDM 1.2+) -------------------------------------------------------------

SIGNING_PREFIX_TEMPLATE = "dmtf-spdm-v{major}.{minor}.*"   # 16 bytes, repeated 4 times
SIGNING_CONTEXT_SIZE = 100                                  # 64 prefix + zero pad + context

CHALLENGE_AUTH_SIGN_CONTEXT = b"responder-challenge_auth signing"
MUT_CHALLENGE_AUTH_SIGN_CONTEXT = b"requester-challenge_auth signing"
MEASUREMENTS_SIGN_CONTEXT = b"responder-measurements signing"
KEY_EXCHANGE_RSP_SIGN_CONTEXT = b"responder-key_exchange_rsp signing"
FINISH_SIGN_CONTEXT = b"requester-finish signing"


# --- §12 key schedule labels (BinConcat) ----------------------------------------------------------

BIN_STR_0_LABEL = b"derived"
BIN_STR_1_LABEL = b"req hs data"
BIN_STR_2_LABEL = b"rsp hs data"
BIN_STR_3_LABEL = b"req app data"
BIN_STR_4_LABEL = b"rsp app data"
BIN_STR_5_LABEL = b"key"
BIN_STR_6_LABEL = b"iv"
BIN_STR_7_LABEL = b"finished"
BIN_STR_8_LABEL = b"exp master"
BIN_STR_9_LABEL = b"traffic upd"


# --- DSP0277 opaque data (SPDM 1.2 OpaqueDataFmt1, "Secured message opaque data") ----------------

SM_DATA_VERSION = 0x01


class SmDataId(IntEnum):
    VERSION_SELECTION = 0x00
    SUPPORTED_VERSION = 0x01
    AEAD_LIMIT = 0x02   # DSP0277 1.3


# --- PCI DOE data object types carrying SPDM (PCIe 6.x §6.31.3/6.31.4) ----------------------------

DOE_TYPE_SPDM = 0x01
DOE_TYPE_SECURED_SPDM = 0x02


def message_name(msg: bytes) -> str:
    """The request or response code name of an SPDM message (for logs and errors)."""
    if len(msg) < 2:
        return "short message"
    try:
        return RequestCode(msg[1]).name
    except ValueError:
        try:
            return ResponseCode(msg[1]).name
        except ValueError:
            return f"code 0x{msg[1]:02x}"


def describe(msg: bytes) -> str:
    """Name and size, never the bytes: what may be logged of a message inside a session."""
    return f"{message_name(msg)} ({len(msg)} bytes)"
