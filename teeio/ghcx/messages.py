"""The GHCx requests and responses as typed bodies, and the error response's body.

One frozen dataclass per payload of docs/ghcx.md "Messages" (the tables there list every
field, type and range): the guest encodes a request and decodes its response with these,
the TSM decodes the request (:func:`decode_request`; a :class:`MessageError` is answered
``bad_request``) and encodes its response.  The JSON on the wire is what it always was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

from teeio.ghcx.body import (
    U64_MAX,
    Body,
    Hex,
    HexText,
    Int,
    List,
    MessageError,
    Named,
    Nullable,
    Obj,
    Pair,
    Text,
    wire,
)
from teeio.ghcx.defs import BOOT_ID_SIZE, NONCE_SIZE, MsgType
from teeio.platform_channel import StreamState
from teeio.tdisp.defs import TdiState

__all__ = [
    "ACCESS", "DIGEST_ALG", "DIGEST_SIZE", "REQUEST_BODIES", "DmaAccept", "DmaAcceptResponse",
    "DmaRelease", "DmaReleaseResponse", "Digests", "ErrorReply", "GetEvidence",
    "GetEvidenceResponse", "InfoDigests", "RequestBody", "Status", "StatusResponse",
    "StreamInfo", "TdiAccept", "TdiAcceptResponse", "TdiInfo", "TdiInfoResponse", "TdiLock",
    "TdiLockResponse", "TdiStop", "TdiStopResponse", "Window", "decode_request",
]

#: DMA window access rights (docs/ghcx.md DMA_ACCEPT).
ACCESS = ("rw", "r", "w")
DIGEST_ALG = "sha384"
DIGEST_SIZE = 48
#: A device (TDI) name as the TSM keeps it; a VM id (docs/ghcx.md "Launch secret and VM id").
TDI_NAME = r"[A-Za-z0-9._-]{1,32}"
VM_ID = r"[A-Za-z0-9._-]{1,16}"
_STATE = Named(TdiState)
_EPOCH = Int(0, U64_MAX)
_STREAM_ID = Int(0, 0xFF)               # IDE Stream ID (PCIe 6.x §6.33)
_WINDOW_ID = Int(0, U64_MAX)


# -- nested objects -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Digests(Body):
    """The three SHA-384 digests the guest verified (TDI_ACCEPT), lowercase hex."""

    cert_chain: str = wire(HexText(DIGEST_SIZE))
    transcript: str = wire(HexText(DIGEST_SIZE))
    report: str = wire(HexText(DIGEST_SIZE))

    def differ(self, current: InfoDigests) -> list[str]:
        """The names of the digests that are not *current*'s, sorted."""
        return sorted(name for name, _, _ in self.fields_spec()
                      if getattr(self, name) != getattr(current, name))


@dataclass(frozen=True)
class InfoDigests(Body):
    """TDI info's digests: each null until known (``transcript`` until GET_EVIDENCE)."""

    cert_chain: str | None = wire(Nullable(HexText(DIGEST_SIZE)))
    transcript: str | None = wire(Nullable(HexText(DIGEST_SIZE)))
    report: str | None = wire(Nullable(HexText(DIGEST_SIZE)))


@dataclass(frozen=True)
class StreamInfo(Body):
    """The TDI's IDE stream: its Stream ID and state."""

    id: int = wire(_STREAM_ID)
    state: StreamState = wire(Named(StreamState, by_value=True))


@dataclass(frozen=True)
class Window(Body):
    """One trusted-DMA window the VM holds (STATUS)."""

    window_id: int = wire(_WINDOW_ID)
    base: int = wire(Int(0, U64_MAX))
    size: int = wire(Int(1, U64_MAX + 1))
    access: str = wire(Text(choices=ACCESS))


# -- responses ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TdiLockResponse(Body):
    state: TdiState = wire(_STATE)
    lock_epoch: int = wire(_EPOCH)


@dataclass(frozen=True)
class TdiInfoResponse(Body):
    """The TDI info object (docs/ghcx.md "TDI info"); ``digests`` null before LOCK."""

    tdi: str = wire(Text(pattern=TDI_NAME))
    state: TdiState = wire(_STATE)
    lock_epoch: int = wire(_EPOCH)
    lock_flags: int = wire(Int(0, 0xFFFF))          # LOCK_INTERFACE_REQUEST FLAGS (§11.3.7)
    mmio_reporting_offset: int = wire(Int(0, U64_MAX))
    stream: StreamInfo = wire(Obj(StreamInfo))
    digest_alg: str = wire(Text(choices=(DIGEST_ALG,)))
    digests: InfoDigests | None = wire(Nullable(Obj(InfoDigests)))
    tsm_boot_id: bytes = wire(Hex(BOOT_ID_SIZE))
    reason: str | None = wire(Nullable(Text()))


@dataclass(frozen=True)
class GetEvidenceResponse(Body):
    """The SPDM certificate chain of slot 0, VCA, the GET_MEASUREMENTS/MEASUREMENTS pairs
    (the last one signed with the guest's nonce) and the whole interface report."""

    cert_chain: bytes = wire(Hex(min_size=1))
    vca: bytes = wire(Hex(min_size=1))
    measurements: tuple[tuple[bytes, bytes], ...] = wire(
        List(Pair(Hex(min_size=1)), min_items=1))
    report: bytes = wire(Hex(min_size=1))


@dataclass(frozen=True)
class TdiAcceptResponse(Body):
    state: TdiState = wire(_STATE)
    dma_stream: int = wire(_STREAM_ID)


@dataclass(frozen=True)
class DmaAcceptResponse(Body):
    window_id: int = wire(_WINDOW_ID)


@dataclass(frozen=True)
class DmaReleaseResponse(Body):
    pass


@dataclass(frozen=True)
class TdiStopResponse(Body):
    state: TdiState = wire(_STATE)


@dataclass(frozen=True)
class StatusResponse(Body):
    boot_id: bytes = wire(Hex(BOOT_ID_SIZE))
    vm_id: str = wire(Text(pattern=VM_ID))
    tdi: str = wire(Text(pattern=TDI_NAME))
    state: TdiState = wire(_STATE)
    windows: tuple[Window, ...] = wire(List(Obj(Window)))


@dataclass(frozen=True)
class ErrorReply(Body):
    """An error response's payload (flag ERROR).  The TSM sends only the codes of
    :data:`~teeio.ghcx.ERROR_CODES`; the guest takes any code, for a newer TSM's."""

    error: str = wire(Text(pattern=r"[a-z_]{1,32}"))
    message: str = wire(Text(), "")


# -- requests -------------------------------------------------------------------------------------

R = TypeVar("R", bound=Body)


class RequestBody(Body, Generic[R]):
    """A request: its :class:`~teeio.ghcx.MsgType` and the body of its response."""

    mtype: ClassVar[MsgType]
    response: ClassVar[type[Body]]

    def decode_response(self, payload: object) -> R:
        """The response payload to this request, decoded; raises :class:`MessageError`."""
        return cast(R, self.response.decode(payload, self.mtype.name))


@dataclass(frozen=True)
class TdiLock(RequestBody[TdiLockResponse]):
    mtype = MsgType.TDI_LOCK
    response = TdiLockResponse


@dataclass(frozen=True)
class TdiInfo(RequestBody[TdiInfoResponse]):
    mtype = MsgType.TDI_INFO
    response = TdiInfoResponse


@dataclass(frozen=True)
class GetEvidence(RequestBody[GetEvidenceResponse]):
    """Signed measurements with the guest's *nonce* (DSP0274 §10.11)."""

    mtype = MsgType.GET_EVIDENCE
    response = GetEvidenceResponse
    nonce: bytes = wire(Hex(NONCE_SIZE))


@dataclass(frozen=True)
class TdiAccept(RequestBody[TdiAcceptResponse]):
    """Start the TDI if these digests and this lock epoch are still the current ones."""

    mtype = MsgType.TDI_ACCEPT
    response = TdiAcceptResponse
    digests: Digests = wire(Obj(Digests))
    lock_epoch: int = wire(_EPOCH)


@dataclass(frozen=True)
class DmaAccept(RequestBody[DmaAcceptResponse]):
    """A trusted-DMA window over [base, base + size) of guest memory."""

    mtype = MsgType.DMA_ACCEPT
    response = DmaAcceptResponse
    base: int = wire(Int(0, U64_MAX))
    size: int = wire(Int(1, U64_MAX + 1))
    access: str = wire(Text(choices=ACCESS), "rw")

    def check(self) -> None:
        if self.base + self.size > U64_MAX + 1:
            raise MessageError("size", f"base {self.base:#x} + size {self.size:#x} is "
                                       "beyond the 64-bit address space")


@dataclass(frozen=True)
class DmaRelease(RequestBody[DmaReleaseResponse]):
    mtype = MsgType.DMA_RELEASE
    response = DmaReleaseResponse
    window_id: int = wire(_WINDOW_ID)


@dataclass(frozen=True)
class TdiStop(RequestBody[TdiStopResponse]):
    mtype = MsgType.TDI_STOP
    response = TdiStopResponse


@dataclass(frozen=True)
class Status(RequestBody[StatusResponse]):
    mtype = MsgType.STATUS
    response = StatusResponse


#: Each request type's body.
REQUEST_BODIES: dict[MsgType, type[RequestBody[Any]]] = {
    b.mtype: b for b in (TdiLock, TdiInfo, GetEvidence, TdiAccept, DmaAccept, DmaRelease,
                         TdiStop, Status)}


def decode_request(mtype: MsgType, payload: object) -> RequestBody[Any]:
    """The typed request of type *mtype*; raises :class:`MessageError` (``bad_request``)."""
    body = REQUEST_BODIES.get(mtype)
    if body is None:
        raise MessageError("", f"{mtype.name} is not a GHCx request")
    return body.decode(payload, mtype.name)
