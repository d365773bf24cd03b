"""SPDM errors.

Responder side: :class:`SpdmError` (a :class:`teeio.codec.ProtocolError`) knows the
DSP0274 ERROR code (§10.13) it becomes on the wire; :class:`DecodeError` (a
:class:`teeio.codec.DecodeError` too) is the InvalidRequest raised by decoders and keeps
the raw bytes and the offset where parsing failed.  Anything else raised while
handling a request is a bug and propagates.

Requester side: every failure is a :class:`RequesterError` subclass whose message
says precisely what did not hold (which field, what was expected).
"""

from __future__ import annotations

from teeio import codec as core

from .defs import ErrorCode


class SpdmError(core.ProtocolError):
    """A protocol error that becomes an SPDM ERROR response (code, data, extended data)."""

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str = "", data: int = 0,
                 ext: bytes = b"") -> None:
        super().__init__(ErrorCode(code), message or ErrorCode(code).name)
        self.code = ErrorCode(code)
        self.data = data & 0xFF
        self.ext = ext


class DecodeError(core.DecodeError, SpdmError):
    """A malformed message (ERROR InvalidRequest); keeps the raw bytes and failing offset."""

    def __init__(self, raw: bytes | bytearray | memoryview, offset: int, reason: str) -> None:
        core.DecodeError.__init__(self, raw, offset, reason)
        self.code = ErrorCode.InvalidRequest
        self.data = 0
        self.ext = b""


class DropRequest(Exception):  # noqa: N818 - a control-flow signal, not a failure
    """Raised by a vendor-defined handler: the request gets no response at all."""


# --- requester side -------------------------------------------------------------------------------

class RequesterError(Exception):
    """Base of every failure the requester reports."""


class ErrorResponse(RequesterError):
    """The responder answered with an SPDM ERROR message."""

    def __init__(self, request: str, code: int, data: int, ext: bytes = b"") -> None:
        self.request = request
        self.code = code
        self.data = data
        self.ext = ext
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"0x{code:02x}"
        super().__init__(f"{request}: responder returned ERROR {name} (0x{code:02x}), "
                         f"data 0x{data:02x}")


class NegotiationError(RequesterError):
    """VERSION / CAPABILITIES / ALGORITHMS leave nothing both sides support, or break rules."""


class MalformedResponse(RequesterError):
    """A response that does not parse, has the wrong code, version or field values."""


class VerificationError(RequesterError):
    """Something the requester checks cryptographically or against policy did not hold."""


class CertificateError(VerificationError):
    """The certificate chain does not verify (anchor, RootHash, digest, X.509 path)."""


class SignatureError(VerificationError):
    """A signature (CHALLENGE_AUTH, MEASUREMENTS, KEY_EXCHANGE_RSP) does not verify."""


class VerifyDataError(VerificationError):
    """An HMAC VerifyData (KEY_EXCHANGE_RSP / FINISH_RSP) does not match."""


class SessionError(RequesterError):
    """A secured-message failure on the requester side (no session, undecryptable response)."""
