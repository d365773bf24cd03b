"""Dispatch of PCI-SIG vendor-defined messages by Protocol ID (PCIe 6.x §6.31.3).

One handler serves SPDM VENDOR_DEFINED with StandardID PCI-SIG and VendorID 0x0001; the
payload's first byte, the Protocol ID, selects IDE_KM (§6.33.3) or TDISP (§11).
"""

from __future__ import annotations

from collections.abc import Callable

from ..spdm.defs import ErrorCode, RequestCode
from ..spdm.errors import SpdmError

__all__ = ["PciSigProtocolMux", "VendorHandler"]

VendorHandler = Callable[[bytes, "int | None"], bytes]


class PciSigProtocolMux:
    """The handler for VENDOR_DEFINED (StandardID PCI-SIG, VendorID 0x0001): routes the
    payload by its Protocol ID byte (IDE_KM, TDISP) to the registered handler, which gets
    the whole payload (Protocol ID included) and the session id.

    ``responder.register_vendor_handler(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, mux)``."""

    def __init__(self) -> None:
        self.handlers: dict[int, VendorHandler] = {}

    def register(self, protocol_id: int, handler: VendorHandler) -> None:
        self.handlers[protocol_id] = handler

    def __call__(self, payload: bytes, session_id: int | None) -> bytes:
        if not payload:
            raise SpdmError(ErrorCode.InvalidRequest, "PCI-SIG vendor payload without a "
                            "Protocol ID")
        handler = self.handlers.get(payload[0])
        if handler is None:
            raise SpdmError(ErrorCode.UnsupportedRequest,
                            f"PCI-SIG Protocol ID 0x{payload[0]:02x} not supported",
                            data=RequestCode.VENDOR_DEFINED_REQUEST)
        return handler(payload, session_id)

