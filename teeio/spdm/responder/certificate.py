"""Responder: GET_DIGESTS (DSP0274 §10.6) and GET_CERTIFICATE (§10.7), recorded in
message log B outside a session (libspdm ``libspdm_rsp_digests.c``,
``libspdm_rsp_certificate.c``).  Only slot 0 is provisioned."""

from __future__ import annotations

from .. import codec, crypto
from ..defs import GET_CERT_SLOT_SIZE_REQUESTED, SPDM_VERSION_13, ErrorCode, RequestCode
from ..errors import SpdmError
from .evidence import Evidence
from .state import ConnectionState, Session


class CertificateHandlers(Evidence):
    """GET_DIGESTS and GET_CERTIFICATE."""

    def _get_digests(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        req = codec.GetDigests.decode(msg, pad=pad)
        self._on_request(RequestCode.GET_DIGESTS, sess)
        supported = 0x01 if self.version >= SPDM_VERSION_13 else 0
        out = codec.Digests(self.version, supported, 0x01,
                            (crypto.digest(self.neg.base_hash, self._cert_chain()),)).encode()
        if sess is None:
            self.logs.b += req.raw + out
        self.state = max(self.state, ConnectionState.AFTER_DIGESTS)
        return out

    def _get_certificate(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        req = codec.GetCertificate.decode(msg, pad=pad)
        slot = req.slot_id & 0x0F
        if slot != 0:
            raise SpdmError(ErrorCode.InvalidRequest, f"certificate slot {slot} is empty")
        chain = self._cert_chain()
        offset, requested = req.offset, req.length
        if self.version >= SPDM_VERSION_13 and req.attributes & GET_CERT_SLOT_SIZE_REQUESTED:
            # DSP0274 1.3 §10.7 GET_CERTIFICATE, Param2 bit 0 SlotSizeRequested: Offset and
            # Length are ignored; the CERTIFICATE has PortionLength 0 and RemainderLength
            # the size of the slot's certificate chain.  (In 1.2 the bit is reserved.)
            offset, requested = 0, 0
        if offset >= len(chain):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"Offset {offset} beyond the {len(chain)}-byte chain")
        header = 8
        room = min(self.config.data_transfer_size, self.req_dts or 0xFFFF) - header
        length = min(requested, room, len(chain) - offset)
        self._on_request(RequestCode.GET_CERTIFICATE, sess)
        portion = chain[offset:offset + length]
        out = codec.Certificate(self.version, slot, 0, len(chain) - offset - length,
                                portion).encode()
        if sess is None:
            self.logs.b += req.raw + out
        self.state = max(self.state, ConnectionState.AFTER_CERTIFICATE)
        return out
