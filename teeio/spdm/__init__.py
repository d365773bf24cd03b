"""SPDM 1.2/1.3 (DMTF DSP0274) and DSP0277 secured messages over PCI DOE, sans-IO.

``defs`` (spec tables) -> ``negotiated`` / ``fields`` (sizes and field kinds on
:mod:`teeio.codec`) -> ``codec`` (messages) -> ``crypto`` / ``key_schedule`` /
``transcript`` / ``secured`` (record layer) -> ``responder`` (device) and
``requester`` (TSM), packages of one module per request group.  Nothing here does I/O
or keeps time.
"""

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
from .requester import MeasurementResult, Requester, RequesterConfig, verify_measurement_transcript
from .responder import Responder, ResponderConfig

__all__ = [
    "CertificateError", "DecodeError", "DropRequest", "ErrorResponse", "MalformedResponse",
    "MeasurementResult", "Requester", "RequesterConfig", "RequesterError", "Responder",
    "ResponderConfig", "SessionError", "SignatureError", "SpdmError", "VerificationError",
    "VerifyDataError", "verify_measurement_transcript",
]
