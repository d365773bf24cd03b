"""TDISP spec definitions (PCIe 6.x §11.3; DMTF libspdm ``include/industry_standard/pci_tdisp.h``).

Only constants live here; the wire layouts are in :mod:`.codec` and :mod:`.report`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# --- transport (§11.3.1) -------------------------------------------------------------------------

#: PCI-SIG vendor-defined Protocol ID (byte 0 of the SPDM VENDOR_DEFINED payload);
#: the same value as ``teeio.ide_km.PciSigProtocol.TDISP``.
PCI_PROTOCOL_ID_TDISP = 0x01

# --- common header (§11.3.2, Table 11-5) ---------------------------------------------------------

#: TDISPVersion byte: major in [7:4], minor in [3:0]; 1.0 is the only version spoken here.
TDISP_VERSION_1_0 = 0x10
SUPPORTED_VERSIONS: tuple[int, ...] = (TDISP_VERSION_1_0,)
HEADER_SIZE = 16

#: INTERFACE_ID.FUNCTION_ID fields (§11.3.2).
FUNCTION_ID_REQUESTER_ID_MASK = 0x0000FFFF
FUNCTION_ID_REQUESTER_SEGMENT_MASK = 0x00FF0000
FUNCTION_ID_REQUESTER_SEGMENT_SHIFT = 16
FUNCTION_ID_REQUESTER_SEGMENT_VALID = 0x01000000

#: START_INTERFACE_NONCE size (§11.3.8, §11.3.12).
START_INTERFACE_NONCE_SIZE = 32


# --- message codes (§11.3.1, Tables 11-3 / 11-4) -------------------------------------------------

class MessageType(IntEnum):
    """TDISP MessageType: requests 0x81.., responses 0x01.., TDISP_ERROR 0x7F."""

    # responses
    TDISP_VERSION = 0x01
    TDISP_CAPABILITIES = 0x02
    LOCK_INTERFACE_RESPONSE = 0x03
    DEVICE_INTERFACE_REPORT = 0x04
    DEVICE_INTERFACE_STATE = 0x05
    START_INTERFACE_RESPONSE = 0x06
    STOP_INTERFACE_RESPONSE = 0x07
    BIND_P2P_STREAM_RESPONSE = 0x08
    UNBIND_P2P_STREAM_RESPONSE = 0x09
    SET_MMIO_ATTRIBUTE_RESPONSE = 0x0A
    VDM_RESPONSE = 0x0B
    TDISP_ERROR = 0x7F
    # requests
    GET_TDISP_VERSION = 0x81
    GET_TDISP_CAPABILITIES = 0x82
    LOCK_INTERFACE_REQUEST = 0x83
    GET_DEVICE_INTERFACE_REPORT = 0x84
    GET_DEVICE_INTERFACE_STATE = 0x85
    START_INTERFACE_REQUEST = 0x86
    STOP_INTERFACE_REQUEST = 0x87
    BIND_P2P_STREAM_REQUEST = 0x88
    UNBIND_P2P_STREAM_REQUEST = 0x89
    SET_MMIO_ATTRIBUTE_REQUEST = 0x8A
    VDM_REQUEST = 0x8B

    @property
    def is_request(self) -> bool:
        return self >= 0x80


# --- TDISP_ERROR codes (§11.3.23, Table 11-28) ---------------------------------------------------

class ErrorCode(IntEnum):
    """TDISP_ERROR ERROR_CODE (u32)."""

    INVALID_REQUEST = 0x0001
    BUSY = 0x0003
    INVALID_INTERFACE_STATE = 0x0004
    UNSPECIFIED = 0x0005
    UNSUPPORTED_REQUEST = 0x0007           # ERROR_DATA = the request code
    VERSION_MISMATCH = 0x0041
    VENDOR_SPECIFIC_ERROR = 0x00FF         # ERROR_DATA = extended data length
    INVALID_INTERFACE = 0x0101
    INVALID_NONCE = 0x0102
    INSUFFICIENT_ENTROPY = 0x0103
    INVALID_DEVICE_CONFIGURATION = 0x0104


class RegistryId(IntEnum):
    """REGISTRY_ID of VDM and vendor-specific extended error data (§11.3.22)."""

    PCISIG = 0x00
    CXL = 0x01


# --- TDI state (§11.2, §11.3.10) -----------------------------------------------------------------

class TdiState(IntEnum):
    """DEVICE_INTERFACE_STATE.TDI_STATE."""

    CONFIG_UNLOCKED = 0
    CONFIG_LOCKED = 1
    RUN = 2
    ERROR = 3


# --- bit fields ----------------------------------------------------------------------------------

class LockInterfaceFlags(IntFlag):
    """LOCK_INTERFACE_REQUEST FLAGS (u16, §11.3.7); bits 15:5 reserved.

    ``SYSTEM_CACHE_LINE_SIZE``: 0 = 64 B, 1 = 128 B (encoding UNCONFIRMED, reference §8)."""

    NO_FW_UPDATE = 0x0001
    SYSTEM_CACHE_LINE_SIZE = 0x0002
    LOCK_MSIX = 0x0004
    BIND_P2P = 0x0008
    ALL_REQUEST_REDIRECT = 0x0010


LOCK_INTERFACE_FLAGS_RESERVED = 0xFFFF & ~0x001F


class InterfaceInfo(IntFlag):
    """DEVICE_INTERFACE_REPORT INTERFACE_INFO (u16, Table 11-15); bits 15:5 reserved in 1.0."""

    NO_UPDATE_AFTER_LOCK = 0x0001
    DMA_WITHOUT_PASID = 0x0002
    DMA_WITH_PASID = 0x0004
    ATS_SUPPORTED = 0x0008
    PRS_SUPPORTED = 0x0010


INTERFACE_INFO_RESERVED = 0xFFFF & ~0x001F


class MmioRangeAttributes(IntFlag):
    """MMIO_RANGE attributes [15:0] (Table 11-15); bits 15:4 reserved. [31:16] is the Range ID."""

    MSIX_TABLE = 0x0001
    MSIX_PBA = 0x0002
    IS_NON_TEE_MEM = 0x0004
    IS_MEM_ATTR_UPDATABLE = 0x0008


MMIO_RANGE_ATTRIBUTES_RESERVED = 0xFFFF & ~0x000F
