"""SPDM requester configuration (what the TSM offers: DSP0274 §10.4 capabilities,
§10.5 algorithms; CMA PCIe 6.x §6.31.3), its per-session state, and the evidence a
GET_MEASUREMENTS exchange leaves for a verifier (§10.11, L1 transcript §15)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field

from teeio.lite_dataclass import dataclass
from teeio.measurements import MeasurementBlock

from .. import codec
from ..defs import (
    SECURED_VERSION_10,
    SECURED_VERSION_11,
    SECURED_VERSION_12,
    SPDM_VERSION_12,
    SPDM_VERSION_13,
    AeadSuite,
    BaseAsymAlgo,
    BaseHashAlgo,
    CapFlags,
    DheGroup,
)
from ..secured import Phase, SecureChannel

Transport = Callable[[int, bytes], bytes]
"""(DOE data object type, payload) -> response payload."""

DEFAULT_FLAGS = (CapFlags.CERT_CAP | CapFlags.CHAL_CAP | CapFlags.ENCRYPT_CAP
                 | CapFlags.MAC_CAP | CapFlags.KEY_EX_CAP | CapFlags.HBEAT_CAP
                 | CapFlags.KEY_UPD_CAP)


@dataclass(frozen=True)
class RequesterConfig:
    versions: tuple[int, ...] = (SPDM_VERSION_12, SPDM_VERSION_13)
    flags: int = DEFAULT_FLAGS
    ct_exponent: int = 0
    data_transfer_size: int = 4096
    max_spdm_msg_size: int = 4096
    # CMA (PCIe 6.x §6.31.3): requesters support RSASSA-3072, ECDSA P-256 and P-384.
    base_asym: int = (BaseAsymAlgo.ECDSA_P384 | BaseAsymAlgo.ECDSA_P256
                      | BaseAsymAlgo.RSASSA_3072)
    base_hash: int = BaseHashAlgo.SHA_384 | BaseHashAlgo.SHA_256
    dhe: int = DheGroup.SECP_384_R1 | DheGroup.SECP_256_R1
    aead: int = AeadSuite.AES_256_GCM
    secured_versions: tuple[int, ...] = (SECURED_VERSION_10, SECURED_VERSION_11,
                                         SECURED_VERSION_12)
    cert_portion: int = 1024   # GET_CERTIFICATE Length per request


@dataclass(frozen=True)
class MeasurementResult:
    """One GET_MEASUREMENTS exchange and the evidence a verifier needs to re-check it."""

    blocks: tuple[MeasurementBlock, ...]
    total: int                     # TotalNumberOfMeasurements (operation 0), else 0
    response: codec.Measurements
    nonce: bytes                   # the requester nonce sent (empty if unsigned)
    signed: bool
    vca: bytes                     # exact VCA (message A)
    transcript: tuple[tuple[bytes, bytes], ...]   # (request, response) pairs of L1 after VCA


@dataclass
class Session:
    """One session the requester keeps: its channel, K and F transcripts, L2 pairs."""

    session_id: int
    channel: SecureChannel = field(repr=False)
    slot_id: int
    cert_chain_hash: bytes
    secured_version: int
    heartbeat_period: int
    k: bytes = field(default=b"", repr=False)
    f: bytes = field(default=b"", repr=False)
    m_pairs: list[tuple[bytes, bytes]] = field(default_factory=list, repr=False)

    @property
    def established(self) -> bool:
        return self.channel.phase is Phase.ESTABLISHED
