"""What the TSM knows about one TDI, and the TDISP steps it takes on it.

One device function is one TDI (``vfio_user_dev/tdisp_responder.py``), named after its
device.  :class:`TdiRecord` is the TSM's view: the state it last saw or caused, the lock
epoch (docs/design.md "Who does what": it grows at every LOCK, and an ACCEPT must carry the
current one), the digests the guest verified against (docs/ghcx.md "TDI info": SHA-384 of
the certificate chain, of VCA || L1 pairs, of the whole interface report), why the state is
what it is when that was not the guest's doing, and the VM it is bound to.

The START_INTERFACE_NONCE and the evidence blobs are kept in memory only (never
journaled, never in a repr): after a restart they are gone with the session anyway.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from teeio.ghcx.messages import DIGEST_ALG, InfoDigests, StreamInfo, TdiInfoResponse
from teeio.platform_channel import StreamState
from teeio.spdm.requester import MeasurementResult
from teeio.tdisp.codec import DeviceInterfaceReportResponse, TdispDecodeError
from teeio.tdisp.defs import LockInterfaceFlags, TdiState
from teeio.tdisp.report import ReportReader
from tsm.tdisp import TdispClient, TdispClientError

#: docs/ghcx.md: the reason a TDI is in ERROR after the TSM restarted.
REASON_RESTART = "TSM restarted: SPDM session lost"
REASON_DEVICE_ERROR = "device reported ERROR"


def sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


def transcript_bytes(vca: bytes, pairs: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """``vca || req1 || rsp1 || ...``: what the ``transcript`` digest covers."""
    return vca + b"".join(q + r for q, r in pairs)


@dataclass
class TdiRecord:
    device: str
    state: TdiState = TdiState.CONFIG_UNLOCKED
    lock_epoch: int = 0
    vm: str | None = None
    reason: str | None = None
    lock_flags: int = 0
    mmio_private: bool = False
    digest_cert_chain: str | None = None
    digest_transcript: str | None = None
    digest_report: str | None = None
    start_nonce: bytes | None = field(default=None, repr=False)
    report: bytes | None = field(default=None, repr=False)

    def digests(self) -> dict[str, str | None]:
        """The digests as the control API's status shows them."""
        return self.info_digests().encode()

    def info_digests(self) -> InfoDigests:
        """The digests the guest verifies against (docs/ghcx.md "TDI info")."""
        return InfoDigests(cert_chain=self.digest_cert_chain,
                           transcript=self.digest_transcript, report=self.digest_report)

    def locked(self, epoch: int, flags: int, nonce: bytes, report: bytes | None,
               cert_chain: bytes) -> None:
        """LOCK succeeded: a new epoch, the report's digest (None if it could not be
        read), no evidence yet."""
        self.state = TdiState.CONFIG_LOCKED
        self.lock_epoch = epoch
        self.lock_flags = flags
        self.reason = None
        self.start_nonce = nonce
        self.report = report
        self.digest_report = sha384(report) if report is not None else None
        self.digest_cert_chain = sha384(cert_chain)
        self.digest_transcript = None

    def evidence(self, result: MeasurementResult) -> None:
        self.digest_transcript = sha384(transcript_bytes(result.vca, result.transcript))

    def unlocked(self) -> None:
        self.state = TdiState.CONFIG_UNLOCKED
        self.reason = None
        self.clear_lock()

    def clear_lock(self) -> None:
        self.start_nonce = None
        self.report = None
        self.lock_flags = 0
        self.digest_report = self.digest_transcript = None

    def failed(self, reason: str) -> None:
        """ERROR for *reason*; the START nonce is useless now (fail-safe)."""
        self.state = TdiState.ERROR
        self.reason = reason
        self.start_nonce = None

    def info(self, stream_id: int, stream_state: StreamState, boot_id: bytes,
             mmio_reporting_offset: int) -> TdiInfoResponse:
        """The TDI info object of docs/ghcx.md (digests null before LOCK)."""
        lock = self.report is not None
        return TdiInfoResponse(
            tdi=self.device, state=self.state, lock_epoch=self.lock_epoch,
            lock_flags=self.lock_flags, mmio_reporting_offset=mmio_reporting_offset,
            stream=StreamInfo(id=stream_id, state=StreamState(stream_state)),
            digest_alg=DIGEST_ALG,
            digests=self.info_digests() if lock else None, tsm_boot_id=boot_id,
            reason=self.reason)


def lock_flags(supported: LockInterfaceFlags) -> LockInterfaceFlags:
    """LOCK asks for NO_FW_UPDATE (PCIe 6.x §11.3.6): firmware stays as attested."""
    if not supported & LockInterfaceFlags.NO_FW_UPDATE:
        raise TdispClientError("the device does not support LOCK flag NO_FW_UPDATE")
    return LockInterfaceFlags.NO_FW_UPDATE


def read_report(client: TdispClient) -> bytes:
    """The whole DEVICE_INTERFACE_REPORT as the device sent it (portions joined, §11.3.8);
    decoded once as a check, but the digest is over these exact bytes."""
    reader = ReportReader(client.function_id, client.report_chunk)
    try:
        while (req := reader.next_request()) is not None:
            reader.feed(client.request(req, DeviceInterfaceReportResponse))
        reader.report()
    except TdispDecodeError as exc:
        raise TdispClientError(f"GET_DEVICE_INTERFACE_REPORT: {exc}") from None
    return reader.report_bytes()


__all__ = ["DIGEST_ALG", "REASON_DEVICE_ERROR", "REASON_RESTART", "TdiRecord", "lock_flags",
           "read_report", "sha384", "transcript_bytes"]
