"""Requester: VENDOR_DEFINED_REQUEST (DSP0274 §10.20), in the clear or in a session;
the response's StandardID and VendorID must echo the request's."""

from __future__ import annotations

from .. import codec
from ..defs import VENDOR_ID_LEN, RequestCode, ResponseCode
from ..errors import MalformedResponse
from .context import RequesterContext


class VendorRequests(RequesterContext):
    """VENDOR_DEFINED_REQUEST."""

    def vendor_request(self, standard_id: int, vendor_id: int, payload: bytes,
                       session_id: int | None = None) -> bytes:
        """VENDOR_DEFINED_REQUEST; returns the response payload (StandardID/VendorID checked)."""
        sess = self._session(session_id) if session_id is not None else None
        vlen = VENDOR_ID_LEN.get(standard_id)
        vid = vendor_id.to_bytes(vlen, "little") if vlen else b""
        req = codec.VendorDefinedRequest(self.version, standard_id, vid, bytes(payload)).encode()
        raw = self._exchange("VENDOR_DEFINED_REQUEST", req,
                             ResponseCode.VENDOR_DEFINED_RESPONSE, sess)
        rsp = self._decode("VENDOR_DEFINED_RESPONSE", lambda: codec.VendorDefinedResponse.decode(
            raw, pad=sess is None))
        if (rsp.standard_id, rsp.vendor_id) != (standard_id, vid):
            raise MalformedResponse(f"VENDOR_DEFINED_RESPONSE for StandardID {rsp.standard_id} "
                                    f"VendorID {rsp.vendor_id.hex()}, sent {standard_id} "
                                    f"{vid.hex()}")
        self._on_success(RequestCode.VENDOR_DEFINED_REQUEST, None)
        return rsp.payload
