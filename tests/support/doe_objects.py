"""What the DOE tests share (PCIe 6.3 §6.30.1): the protocols they speak, the mailbox
status bits they check, a DOE Discovery request object, raw header DWs and an echo
handler."""

from __future__ import annotations

import struct
from collections.abc import Callable

from teeio.doe import PCI_SIG_VENDOR_ID, DataObjectType, DiscoveryRequest, DoeObject, DoeStatus

SPDM = (PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM)
SECURED = (PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM)
DISCOVERY = (PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY)
BUSY, ERROR = DoeStatus.BUSY, DoeStatus.ERROR
Exchange = Callable[[DoeObject], DoeObject | None]


def echo(payload: bytes) -> bytes:
    """A protocol handler answering with its request."""
    return payload


def disc_obj(index: int, version: int = 2) -> bytes:
    """A DOE Discovery request for entry *index*, encoded as a data object."""
    return DoeObject(*DISCOVERY, DiscoveryRequest(index, version).encode()).encode()


def hdr(dw0: int, dw1: int, payload: bytes = b"") -> bytes:
    """A data object from its two header DWs, as given, and *payload*."""
    return struct.pack("<II", dw0, dw1) + payload
