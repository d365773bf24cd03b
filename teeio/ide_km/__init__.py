"""IDE_KM: the IDE key management protocol (PCIe 6.x §6.33.3), sans-IO.

* :mod:`.defs`      — Protocol and Object IDs, KP_ACK status, the errors' bases;
* :mod:`.codec`     — the objects (QUERY .. K_GOSTOP_ACK), declared on :mod:`teeio.codec`;
* :mod:`.fields`    — the IDE_KM field kinds the codec core lacks (KSS, key, IFV, DWs);
* :mod:`.mux`       — dispatch of PCI-SIG vendor-defined payloads by Protocol ID;
* :mod:`.responder` — the device side, over the device's IDE key store;
* :mod:`.requester` — the TSM side, over an exchange callable.
"""

from __future__ import annotations

from .codec import (
    IdeKmDecodeError,
    IdeKmObject,
    KeyProg,
    KGoStopAck,
    KpAck,
    KSetGo,
    KSetStop,
    Query,
    QueryResp,
    decode_object,
    expected_reg_count,
    key_from_wire,
    key_to_wire,
)
from .defs import (
    IDE_KM_PROTOCOL_ID,
    PCI_SIG_STANDARD_ID,
    PCI_SIG_VENDOR_ID,
    IdeKmError,
    KeyProgError,
    KpStatus,
    ObjectId,
    PciSigProtocol,
)
from .mux import PciSigProtocolMux
from .requester import IdeKmClient, IdeKmResponseError, KpAckError
from .responder import IdeKeyStore, IdeKmResponder

__all__ = [
    "IDE_KM_PROTOCOL_ID", "PCI_SIG_STANDARD_ID", "PCI_SIG_VENDOR_ID", "IdeKeyStore",
    "IdeKmClient", "IdeKmDecodeError", "IdeKmError", "IdeKmObject", "IdeKmResponder",
    "IdeKmResponseError", "KGoStopAck", "KSetGo", "KSetStop", "KeyProg", "KeyProgError",
    "KpAck", "KpAckError", "KpStatus", "ObjectId", "PciSigProtocol", "PciSigProtocolMux",
    "Query", "QueryResp", "decode_object", "expected_reg_count", "key_from_wire",
    "key_to_wire",
]
