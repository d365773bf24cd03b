"""GHCx (teeio-ghcx/1) definitions: sizes, message types, error codes, rejection reasons.

Specification: ``docs/ghcx.md`` ("Framing", "Handshake", "Messages", "Receiver rules").
"""

from __future__ import annotations

import enum
from typing import NoReturn

MAGIC = b"GHCX"
VERSION = 1
HEADER_SIZE = 36
MAX_BODY = 65536
SECRET_SIZE = 32
VM_ID_SIZE = 16
NONCE_SIZE = 32
BOOT_ID_SIZE = 16
TAG_SIZE = 16
CONFIRM_SIZE = 16
MAX_PLAINTEXT = MAX_BODY - HEADER_SIZE - TAG_SIZE
FRAME_PREFIX = 8                       # magic + u32 length
FLAG_ERROR = 1                         # header flags bit 0: a response carrying an error
FW_CFG_SECRET = "opt/org.teeio/ghcx-secret"
FW_CFG_VM_ID = "opt/org.teeio/vm-id"
PORT_NAME = "org.teeio.ghcx.0"

# Error codes of an error response (docs/ghcx.md "Messages").
ERROR_CODES = frozenset({"bad_request", "unknown_request", "refused", "state", "mismatch",
                         "internal", "device"})
# Rejection reasons (docs/ghcx.md "Receiver rules"; "handshake": a HELLO_ACK that does not
# confirm, or a frame that is not the HELLO_ACK the guest waits for).
REASONS = ("malformed", "version", "unknown_type", "cross_vm", "forged", "replay", "unbound",
           "no_session", "oversized", "handshake", "hello_limit")
#: The TSM keeps at most this many pending handshakes per VM (docs/ghcx.md "Handshake" 6) ...
MAX_PENDING = 4
#: ... each for at most this long (seconds) unless the guest's first request confirms it;
#: a HELLO while all are taken is not answered (rejected ``hello_limit``).
PENDING_TTL = 10.0


class MsgType(enum.IntEnum):
    """Message types (docs/ghcx.md "Handshake", "Messages"); a response is request | 0x80."""

    HELLO = 0x01
    HELLO_ACK = 0x02
    REHELLO = 0x7F
    TDI_LOCK = 0x10
    TDI_INFO = 0x11
    GET_EVIDENCE = 0x12
    TDI_ACCEPT = 0x13
    DMA_ACCEPT = 0x14
    DMA_RELEASE = 0x15
    TDI_STOP = 0x16
    STATUS = 0x17
    TDI_LOCK_RESPONSE = 0x90
    TDI_INFO_RESPONSE = 0x91
    GET_EVIDENCE_RESPONSE = 0x92
    TDI_ACCEPT_RESPONSE = 0x93
    DMA_ACCEPT_RESPONSE = 0x94
    DMA_RELEASE_RESPONSE = 0x95
    TDI_STOP_RESPONSE = 0x96
    STATUS_RESPONSE = 0x97


REQUESTS: frozenset[MsgType] = frozenset(t for t in MsgType if 0x10 <= t <= 0x17)
RESPONSES: frozenset[MsgType] = frozenset(MsgType(t | 0x80) for t in REQUESTS)


def response_type(t: int) -> MsgType:
    """The response type of request type *t* (request | 0x80)."""
    if t not in REQUESTS:
        raise ValueError(f"0x{t:02x} is not a GHCx request type")
    return MsgType(t | 0x80)


class GhcxReject(Exception):
    """A frame this end does not accept; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown GHCx rejection reason {reason!r}")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}" if message else reason)


def reject(reason: str, message: str) -> NoReturn:
    """Raise :class:`GhcxReject` (*reason*, *message*)."""
    raise GhcxReject(reason, message)
