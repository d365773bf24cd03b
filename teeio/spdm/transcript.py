"""SPDM message logs and transcripts (DSP0274 1.2/1.3 §15 "Transcript and transcript hash
calculation").

Which messages each log (A, B, C, M, K/F) holds and how the signed transcripts are built:
docs/attestation.md, "Transcripts".
"""

from __future__ import annotations

from dataclasses import field

from teeio.lite_dataclass import dataclass

from .defs import RequestCode


@dataclass
class MessageLogs:
    """The connection-wide logs A, B, C and the out-of-session M."""

    a: bytearray = field(default_factory=bytearray)
    b: bytearray = field(default_factory=bytearray)
    c: bytearray = field(default_factory=bytearray)
    m: bytearray = field(default_factory=bytearray)

    def reset(self) -> None:
        for log in (self.a, self.b, self.c, self.m):
            log.clear()

    def on_request(self, code: int, session_m: bytearray | None, authenticated: bool) -> None:
        """Resets a request causes before it is processed (libspdm
        ``libspdm_reset_message_buffer_via_request_code``)."""
        if code != RequestCode.GET_MEASUREMENTS:
            (session_m if session_m is not None else self.m).clear()
        if code == RequestCode.GET_DIGESTS:
            self.b.clear()
        elif code in (RequestCode.KEY_EXCHANGE, RequestCode.GET_MEASUREMENTS,
                      RequestCode.FINISH, RequestCode.PSK_EXCHANGE, RequestCode.PSK_FINISH,
                      RequestCode.KEY_UPDATE, RequestCode.HEARTBEAT,
                      RequestCode.GET_ENCAPSULATED_REQUEST, RequestCode.END_SESSION,
                      RequestCode.GET_MEASUREMENT_EXTENSION_LOG) and not authenticated:
            self.b.clear()
            self.c.clear()


Bytes = bytes | bytearray


def m1(a: Bytes, b: Bytes, c: Bytes) -> bytes:
    """CHALLENGE_AUTH signature transcript (1.2+)."""
    return bytes(a) + bytes(b) + bytes(c)


def l1(a: Bytes, m: Bytes) -> bytes:
    """MEASUREMENTS signature transcript (1.2+)."""
    return bytes(a) + bytes(m)


def th(a: Bytes, cert_chain_hash: bytes, *messages: Bytes) -> bytes:
    """Session transcript: A || Hash(CT) || the given KEY_EXCHANGE/FINISH parts."""
    return bytes(a) + cert_chain_hash + b"".join(messages)
