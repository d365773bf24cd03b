"""GHCx (teeio-ghcx/1): the guest ⇄ TSM channel, sans-IO.  Specification: ``docs/ghcx.md``.

No sockets, threads or clocks in here: ``guest_agent/ghcx_client.py`` and the TSM's per-VM
server feed bytes in and write the frames that come out.  One concern per module:
:mod:`~teeio.ghcx.defs` (sizes, types, codes), :mod:`~teeio.ghcx.framing` (header and frame
prefix on :mod:`teeio.codec`, resync), :mod:`~teeio.ghcx.keys` (key schedule, sealing),
:mod:`~teeio.ghcx.guest_channel` and :mod:`~teeio.ghcx.tsm_channel` (the two ends: sequence
numbers, request ids, the retry cache), :mod:`~teeio.ghcx.body` and
:mod:`~teeio.ghcx.messages` (the typed payloads).
Every rejected frame raises :class:`GhcxReject` and changes no channel state.
"""

from __future__ import annotations

from teeio.ghcx.body import MessageError
from teeio.ghcx.defs import (
    BOOT_ID_SIZE,
    CONFIRM_SIZE,
    ERROR_CODES,
    FLAG_ERROR,
    FRAME_PREFIX,
    FW_CFG_SECRET,
    FW_CFG_VM_ID,
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    MAX_PENDING,
    MAX_PLAINTEXT,
    NONCE_SIZE,
    PENDING_TTL,
    PORT_NAME,
    REASONS,
    REQUESTS,
    RESPONSES,
    SECRET_SIZE,
    TAG_SIZE,
    VERSION,
    VM_ID_SIZE,
    GhcxReject,
    MsgType,
    response_type,
)
from teeio.ghcx.framing import FrameDecoder, FramePrefix, Header, encode_frame, vm_id_bytes
from teeio.ghcx.guest_channel import GuestChannel, Response
from teeio.ghcx.keys import KEY_INFO, KEY_MATERIAL, SessionKeys, derive_keys
from teeio.ghcx.messages import (
    DmaAccept,
    DmaAcceptResponse,
    DmaRelease,
    DmaReleaseResponse,
    ErrorReply,
    GetEvidence,
    GetEvidenceResponse,
    RequestBody,
    Status,
    StatusResponse,
    TdiAccept,
    TdiAcceptResponse,
    TdiInfo,
    TdiInfoResponse,
    TdiLock,
    TdiLockResponse,
    TdiStop,
    TdiStopResponse,
    decode_request,
)
from teeio.ghcx.tsm_channel import Cached, Incoming, Reply, Request, TsmChannel

__all__ = [
    "BOOT_ID_SIZE", "CONFIRM_SIZE", "ERROR_CODES", "FLAG_ERROR", "FRAME_PREFIX",
    "FW_CFG_SECRET", "FW_CFG_VM_ID", "HEADER_SIZE", "KEY_INFO", "KEY_MATERIAL", "MAGIC",
    "MAX_BODY", "MAX_PENDING", "MAX_PLAINTEXT", "NONCE_SIZE", "PENDING_TTL", "PORT_NAME",
    "REASONS", "REQUESTS", "RESPONSES", "SECRET_SIZE", "TAG_SIZE", "VERSION", "VM_ID_SIZE",
    "Cached", "DmaAccept", "DmaAcceptResponse", "DmaRelease", "DmaReleaseResponse",
    "ErrorReply", "FrameDecoder", "FramePrefix", "GetEvidence", "GetEvidenceResponse", "GhcxReject",
    "GuestChannel", "Header", "Incoming", "MessageError", "MsgType", "Reply", "Request",
    "RequestBody", "Response", "SessionKeys", "Status", "StatusResponse", "TdiAccept",
    "TdiAcceptResponse", "TdiInfo", "TdiInfoResponse", "TdiLock", "TdiLockResponse",
    "TdiStop", "TdiStopResponse", "TsmChannel", "decode_request", "derive_keys",
    "encode_frame", "response_type", "vm_id_bytes",
]
