"""What the responder signs and hashes: its SPDM certificate chain (DSP0274 §10.7),
measurement blocks and the MeasurementSummaryHash (§10.8, §10.11), and the 1.2+
signature over a transcript (§15)."""

from __future__ import annotations

from teeio import pki
from teeio.measurements import DmtfValueType, MeasurementBlock, measurement_block

from .. import crypto
from ..defs import MEAS_CAP_MASK, ErrorCode, MeasSummaryHashType
from ..errors import SpdmError
from .context import ResponderContext


class Evidence(ResponderContext):
    """Certificate chain, measurement blocks, summary hash and signing for the handlers."""

    def _cert_chain(self) -> bytes:
        return pki.spdm_cert_chain(list(self.identity.certs),
                                   crypto.hash_name(self.neg.base_hash))

    def _blocks(self, raw_requested: bool = False) -> dict[int, bytes]:
        name = crypto.meas_hash_name(self.neg.meas_hash)
        out: dict[int, bytes] = {}
        for index in sorted(self.measurements):
            src = self.measurements[index]
            if raw_requested:
                out[index] = MeasurementBlock(index, src.value_type, True, src.data).encode()
            else:
                out[index] = measurement_block(src, name)
        return out

    def _summary_hash(self, summary_type: int) -> bytes:
        """MeasurementSummaryHash (§10.8): Hash over the concatenated measurement blocks;
        TCB = the immutable-ROM blocks (libspdm sample device rule)."""
        if summary_type == MeasSummaryHashType.NONE:
            return b""
        blocks = [b for i, b in self._blocks().items()
                  if summary_type == MeasSummaryHashType.ALL
                  or self.measurements[i].value_type & 0x7F == DmtfValueType.IMMUTABLE_ROM]
        return crypto.digest(self.neg.base_hash, b"".join(blocks))

    def _check_summary_type(self, summary_type: int) -> None:
        if summary_type not in set(MeasSummaryHashType):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"MeasurementSummaryHashType 0x{summary_type:02x}")
        if summary_type and (not self.config.flags & MEAS_CAP_MASK or not self.neg.meas_hash):
            raise SpdmError(ErrorCode.InvalidRequest,
                            "measurement summary requested but measurements not negotiated")

    def _sign(self, context: bytes, transcript: bytes) -> bytes:
        return crypto.spdm_sign(self.identity.leaf_key, self.version, self.neg.base_asym,
                                self.neg.base_hash, context, transcript)
