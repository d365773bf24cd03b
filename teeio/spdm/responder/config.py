"""SPDM responder configuration: the capabilities (DSP0274 §10.4) and algorithms
(§10.5) the device offers, and the vendor-defined handler type (§10.20)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..defs import (
    SECURED_VERSION_10,
    SECURED_VERSION_11,
    SECURED_VERSION_12,
    SPDM_VERSION_12,
    SPDM_VERSION_13,
    AeadSuite,
    BaseHashAlgo,
    CapFlags,
    DheGroup,
)

VendorHandler = Callable[[bytes, "int | None"], bytes]
"""(payload, session_id or None) -> response payload; raise SpdmError for an ERROR
response or DropRequest for no response at all."""

# What this responder implements; ResponderConfig.flags must stay within it.
IMPLEMENTED_FLAGS = (CapFlags.CERT_CAP | CapFlags.CHAL_CAP | CapFlags.MEAS_CAP_NO_SIG
                     | CapFlags.MEAS_CAP_SIG | CapFlags.MEAS_FRESH_CAP | CapFlags.ENCRYPT_CAP
                     | CapFlags.MAC_CAP | CapFlags.KEY_EX_CAP | CapFlags.HBEAT_CAP
                     | CapFlags.KEY_UPD_CAP)

DEFAULT_FLAGS = (CapFlags.CERT_CAP | CapFlags.CHAL_CAP | CapFlags.MEAS_CAP_SIG
                 | CapFlags.MEAS_FRESH_CAP | CapFlags.ENCRYPT_CAP | CapFlags.MAC_CAP
                 | CapFlags.KEY_EX_CAP | CapFlags.HBEAT_CAP | CapFlags.KEY_UPD_CAP)


@dataclass(frozen=True)
class ResponderConfig:
    versions: tuple[int, ...] = (SPDM_VERSION_12, SPDM_VERSION_13)
    flags: int = DEFAULT_FLAGS
    ct_exponent: int = 20          # CT = 2^20 us (CMA requires <= 2^23)
    data_transfer_size: int = 4096  # below QEMU's 0x1200-byte DOE buffer
    max_spdm_msg_size: int = 4096
    heartbeat_period: int = 60      # seconds (0: off); see Responder.heartbeat_expired
    max_sessions: int = 4
    secured_versions: tuple[int, ...] = (SECURED_VERSION_10, SECURED_VERSION_11,
                                         SECURED_VERSION_12)
    base_hash: int = BaseHashAlgo.SHA_256 | BaseHashAlgo.SHA_384 | BaseHashAlgo.SHA_512
    dhe: int = DheGroup.SECP_256_R1 | DheGroup.SECP_384_R1
    aead: int = AeadSuite.AES_256_GCM | AeadSuite.AES_128_GCM
