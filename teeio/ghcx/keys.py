"""GHCx key schedule and sealing: HKDF-SHA384 session keys, the HELLO_ACK key confirmation,
and one session's AES-256-GCM with per-direction sequence numbers.

Specification: ``docs/ghcx.md`` "Handshake" 3-4 and "Messages" (nonce = iv XOR seq).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teeio.ghcx.defs import (
    BOOT_ID_SIZE,
    HEADER_SIZE,
    MAX_PLAINTEXT,
    NONCE_SIZE,
    SECRET_SIZE,
    VERSION,
    VM_ID_SIZE,
    MsgType,
    reject,
)
from teeio.ghcx.framing import Header, encode_frame

KEY_INFO = b"teeio-ghcx/1 keys"
KEY_MATERIAL = 88                      # k_g2t(32) || k_t2g(32) || iv_g2t(12) || iv_t2g(12)


@dataclass(frozen=True)
class SessionKeys:
    """One session's AEAD keys and IVs; ``repr`` shows none of them."""

    k_g2t: bytes = field(repr=False)
    k_t2g: bytes = field(repr=False)
    iv_g2t: bytes = field(repr=False)
    iv_t2g: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "SessionKeys(<hidden>)"

    __str__ = __repr__


def derive_keys(secret: bytes, vm_id: bytes, guest_nonce: bytes, tsm_nonce: bytes,
                boot_id: bytes) -> SessionKeys:
    """HKDF-SHA384(ikm=secret, salt=guest_nonce || tsm_nonce,
    info="teeio-ghcx/1 keys" || vm_id || boot_id) → 88 bytes (docs/ghcx.md "Handshake" 3)."""
    for what, value, size in (("secret", secret, SECRET_SIZE), ("VM id", vm_id, VM_ID_SIZE),
                              ("guest nonce", guest_nonce, NONCE_SIZE),
                              ("TSM nonce", tsm_nonce, NONCE_SIZE),
                              ("boot id", boot_id, BOOT_ID_SIZE)):
        if len(value) != size:
            raise ValueError(f"{what} must be {size} bytes")
    okm = HKDF(algorithm=hashes.SHA384(), length=KEY_MATERIAL, salt=guest_nonce + tsm_nonce,
               info=KEY_INFO + vm_id + boot_id).derive(secret)
    return SessionKeys(okm[0:32], okm[32:64], okm[64:76], okm[76:88])


def confirm(keys: SessionKeys, ack_header: bytes, guest_nonce: bytes, tsm_nonce: bytes,
            boot_id: bytes) -> bytes:
    """The HELLO_ACK key confirmation: the GCM tag over an empty plaintext
    (docs/ghcx.md "Handshake" 4)."""
    return AESGCM(keys.k_t2g).encrypt(keys.iv_t2g, b"",
                                      ack_header + guest_nonce + tsm_nonce + boot_id)


def _nonce(iv: bytes, seq: int) -> bytes:
    """iv XOR (seq as 12 bytes big endian) (docs/ghcx.md "Messages")."""
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))


class Session:
    """Keys and sequence numbers of one session, as seen from one end."""

    def __init__(self, keys: SessionKeys, guest: bool) -> None:
        self._send_key = AESGCM(keys.k_g2t if guest else keys.k_t2g)
        self._recv_key = AESGCM(keys.k_t2g if guest else keys.k_g2t)
        self._send_iv = keys.iv_g2t if guest else keys.iv_t2g
        self._recv_iv = keys.iv_t2g if guest else keys.iv_g2t
        self.send_seq = 0                # last sequence number sent; frames count from 1
        self.recv_seq = 0                # last accepted; the handshake took 0
        self.last_request_id: int | None = None     # TSM: within this session

    def __repr__(self) -> str:
        return f"_Session(send_seq={self.send_seq}, recv_seq={self.recv_seq})"

    def seal(self, mtype: MsgType, flags: int, vm_id: bytes, request_id: int,
             plaintext: bytes) -> bytes:
        """One encrypted frame with the next sequence number."""
        if len(plaintext) > MAX_PLAINTEXT:
            reject("oversized", f"{len(plaintext)}-byte payload (at most {MAX_PLAINTEXT})")
        seq = self.send_seq + 1
        header = Header(VERSION, mtype, flags, vm_id, seq, request_id).encode()
        body = header + self._send_key.encrypt(_nonce(self._send_iv, seq), plaintext, header)
        self.send_seq = seq
        return encode_frame(body)

    def open(self, header: Header, body: bytes) -> bytes | None:
        """The plaintext, or None if the AEAD does not open.  Changes nothing."""
        try:
            return self._recv_key.decrypt(_nonce(self._recv_iv, header.seq),
                                          body[HEADER_SIZE:], body[:HEADER_SIZE])
        except InvalidTag:
            return None
