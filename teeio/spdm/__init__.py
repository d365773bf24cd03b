"""SPDM 1.2/1.3 (DMTF DSP0274) and DSP0277 secured messages over PCI DOE, sans-IO.

``defs`` (spec tables) -> ``negotiated`` / ``fields`` (sizes and field kinds on
:mod:`teeio.codec`) -> ``codec`` (messages) -> ``crypto`` / ``key_schedule`` /
``transcript`` / ``secured`` (record layer) -> ``responder`` (device) and
``requester`` (TSM), packages of one module per request group.  Nothing here does I/O
or keeps time.
"""

from typing import TYPE_CHECKING

from .errors import (
    CertificateError,
    DecodeError,
    DropRequest,
    ErrorResponse,
    MalformedResponse,
    RequesterError,
    SessionError,
    SignatureError,
    SpdmError,
    VerificationError,
    VerifyDataError,
)

if TYPE_CHECKING:
    from .requester import (
        MeasurementResult,
        Requester,
        RequesterConfig,
        verify_measurement_transcript,
    )
    from .responder import Responder, ResponderConfig

#: The two ends are imported on first use: a requester never loads the responder.
_REQUESTER = frozenset({"MeasurementResult", "Requester", "RequesterConfig",
                        "verify_measurement_transcript"})
_RESPONDER = frozenset({"Responder", "ResponderConfig"})


def __getattr__(name: str) -> object:
    if name in _REQUESTER:
        from . import requester as end
    elif name in _RESPONDER:
        from . import responder as end  # type: ignore[no-redef]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(end, name)
    globals()[name] = value
    return value


__all__ = [
    "CertificateError", "DecodeError", "DropRequest", "ErrorResponse", "MalformedResponse",
    "MeasurementResult", "Requester", "RequesterConfig", "RequesterError", "Responder",
    "ResponderConfig", "SessionError", "SignatureError", "SpdmError", "VerificationError",
    "VerifyDataError", "verify_measurement_transcript",
]
