"""Responder: VENDOR_DEFINED_REQUEST (DSP0274 §10.20), dispatched to the handler
registered for its (StandardID, VendorID) (libspdm ``libspdm_rsp_vendor_response.c``)."""

from __future__ import annotations

from .. import codec
from ..defs import VENDOR_ID_LEN, ErrorCode, RequestCode
from ..errors import SpdmError
from .context import ResponderContext
from .state import Session


class VendorHandlers(ResponderContext):
    """VENDOR_DEFINED_REQUEST."""

    def _vendor_defined(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        req = codec.VendorDefinedRequest.decode(msg, pad=pad)
        want = VENDOR_ID_LEN.get(req.standard_id, -1)
        if want == -1 or (want is not None and len(req.vendor_id) != want):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"StandardID {req.standard_id} with a {len(req.vendor_id)}-byte "
                            "VendorID")
        vendor = int.from_bytes(req.vendor_id, "little")
        handler = self.vendor_handlers.get((req.standard_id, vendor))
        if handler is None:
            raise SpdmError(ErrorCode.UnsupportedRequest,
                            f"no handler for StandardID {req.standard_id} VendorID 0x{vendor:x}",
                            data=RequestCode.VENDOR_DEFINED_REQUEST)
        self._on_request(RequestCode.VENDOR_DEFINED_REQUEST, None)
        payload = handler(req.payload, sess.session_id if sess is not None else None)
        if len(payload) > 0xFFFF:
            raise SpdmError(ErrorCode.Unspecified, "vendor response payload too large")
        return codec.VendorDefinedResponse(self.version, req.standard_id, req.vendor_id,
                                           bytes(payload)).encode()
