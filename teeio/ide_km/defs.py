"""IDE_KM definitions (PCIe 6.x §6.33.3; DMTF libspdm ``pci_idekm.h``).

An IDE_KM object is the payload of an SPDM VENDOR_DEFINED_REQUEST/RESPONSE with StandardID
PCI-SIG and VendorID 0x0001, inside a secured session; the payload starts with the
PCI-SIG Protocol ID (0x00 = IDE_KM, 0x01 = TDISP).
"""

from __future__ import annotations

from enum import IntEnum

from ..codec import ProtocolError
from ..spdm.defs import PCI_SIG_VENDOR_ID, RegistryId

__all__ = ["IDE_KM_PROTOCOL_ID", "PCI_SIG_STANDARD_ID", "PCI_SIG_VENDOR_ID", "IdeKmError",
           "KeyProgError", "KpStatus", "ObjectId", "PciSigProtocol"]

PCI_SIG_STANDARD_ID = RegistryId.PCISIG
IDE_KM_PROTOCOL_ID = 0x00


class PciSigProtocol(IntEnum):
    """Protocol ID, byte 0 of PCI-SIG vendor-defined payloads (§6.31.3)."""

    IDE_KM = 0x00
    TDISP = 0x01


class ObjectId(IntEnum):
    """IDE_KM Object IDs (§6.33.3; libspdm ``pci_idekm.h``)."""

    QUERY = 0x00
    QUERY_RESP = 0x01
    KEY_PROG = 0x02
    KP_ACK = 0x03
    K_SET_GO = 0x04
    K_SET_STOP = 0x05
    K_GOSTOP_ACK = 0x06


class KpStatus(IntEnum):
    """KP_ACK Status (§6.33.3); 5..FF are reserved and read as UNSPECIFIED_FAILURE."""

    SUCCESS = 0
    INCORRECT_LENGTH = 1
    UNSUPPORTED_PORT_INDEX = 2
    UNSUPPORTED_VALUE = 3
    UNSPECIFIED_FAILURE = 4


class IdeKmError(Exception):
    """Base of IDE_KM errors."""


class KeyProgError(IdeKmError, ProtocolError):
    """KEY_PROG not done, answered with KP_ACK *status* (``code``, §6.33.3); reserved
    values (5..FF) are kept as received."""

    def __init__(self, status: int, message: str = "") -> None:
        ProtocolError.__init__(self, status, message)

    @property
    def status(self) -> int:
        return self.code

    @property
    def status_code(self) -> KpStatus:
        """The status, reserved values read as UNSPECIFIED_FAILURE."""
        try:
            return KpStatus(self.code)
        except ValueError:
            return KpStatus.UNSPECIFIED_FAILURE
