"""DSP0277 secured messages bound to PCI DOE (PCIe 6.x §6.31.4): AES-GCM records.

Implicit per-direction sequence numbers, no padding on the wire; the record layout and
nonce rules are in docs/attestation.md, "Secured messages over DOE".
"""

from __future__ import annotations

import logging
import struct
from dataclasses import field
from enum import Enum

from teeio.lite_dataclass import dataclass

from . import crypto
from .key_schedule import DataSecrets, HandshakeSecrets, TrafficKeys

log = logging.getLogger(__name__)

SESSION_ID_SIZE = 4
LENGTH_SIZE = 2
APP_LENGTH_SIZE = 2
MAX_SEQUENCE_NUMBER = 0xFFFF_FFFF_FFFF_FFFF


class SecuredMessageError(Exception):
    """A record that does not decode or authenticate."""


def session_id_of(req_session_id: int, rsp_session_id: int) -> int:
    return (req_session_id & 0xFFFF) | (rsp_session_id & 0xFFFF) << 16


def peek_session_id(record: bytes) -> int:
    if len(record) < SESSION_ID_SIZE:
        raise SecuredMessageError(f"secured message of {len(record)} bytes has no session ID")
    return int(struct.unpack_from("<I", record)[0])


def _iv(salt: bytes, seq: int) -> bytes:
    seq_le = seq.to_bytes(8, "little")
    return bytes(b ^ s for b, s in zip(salt, seq_le + bytes(len(salt) - 8), strict=True))


def encode_record(session_id: int, keys: TrafficKeys, seq: int, app: bytes,
                  seq_num_size: int = 0, random: bytes = b"") -> bytes:
    """Encrypt *app* (one SPDM message) into a secured record with sequence number *seq*."""
    if seq >= MAX_SEQUENCE_NUMBER:
        raise SecuredMessageError("sequence number exhausted")
    plaintext = struct.pack("<H", len(app)) + app + random
    length = len(plaintext) + crypto.AEAD_TAG_SIZE
    if length > 0xFFFF:
        raise SecuredMessageError(f"record of {length} bytes exceeds the u16 Length field")
    aad = (struct.pack("<I", session_id) + seq.to_bytes(8, "little")[:seq_num_size]
           + struct.pack("<H", length))
    return aad + crypto.aead_encrypt(keys.key, _iv(keys.iv, seq), aad, plaintext)


def decode_record(record: bytes, keys: TrafficKeys, seq: int, seq_num_size: int = 0) -> bytes:
    """Authenticate and decrypt a record; return the SPDM message (bytes after the record,
    e.g. DOE DW padding, are ignored)."""
    hdr = SESSION_ID_SIZE + seq_num_size + LENGTH_SIZE
    if len(record) < hdr + crypto.AEAD_TAG_SIZE:
        raise SecuredMessageError(f"secured message of {len(record)} bytes is too short")
    if seq_num_size and record[SESSION_ID_SIZE:SESSION_ID_SIZE + seq_num_size] != \
            seq.to_bytes(8, "little")[:seq_num_size]:
        raise SecuredMessageError("explicit sequence number does not match")
    (length,) = struct.unpack_from("<H", record, hdr - LENGTH_SIZE)
    if length < crypto.AEAD_TAG_SIZE + APP_LENGTH_SIZE or hdr + length > len(record):
        raise SecuredMessageError(f"Length field {length} inconsistent with "
                                  f"{len(record) - hdr} bytes of record body")
    try:
        plaintext = crypto.aead_decrypt(keys.key, _iv(keys.iv, seq), record[:hdr],
                                        record[hdr:hdr + length])
    except crypto.CryptoError:
        raise SecuredMessageError(f"MAC does not verify (sequence number {seq})") from None
    (app_len,) = struct.unpack_from("<H", plaintext)
    if APP_LENGTH_SIZE + app_len > len(plaintext):
        raise SecuredMessageError(f"ApplicationDataLength {app_len} exceeds the "
                                  f"{len(plaintext) - APP_LENGTH_SIZE} decrypted bytes")
    return plaintext[APP_LENGTH_SIZE:APP_LENGTH_SIZE + app_len]


class Phase(Enum):
    """Session phase (DSP0274 §11 "Session"): which key set protects records."""

    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"


@dataclass
class _Channel:
    """One direction of one phase: keys, implicit sequence number, key-update backup."""

    keys: TrafficKeys = field(repr=False)
    seq: int = 0
    backup: TrafficKeys | None = field(default=None, repr=False)
    backup_seq: int = 0

    def next_seq(self) -> int:
        seq = self.seq
        if seq >= MAX_SEQUENCE_NUMBER:
            raise SecuredMessageError("sequence number exhausted")
        self.seq += 1
        return seq


@dataclass
class SecureChannel:
    """The record layer of one session, from one side's point of view.

    ``is_requester`` decides which direction this side encrypts with.  Handshake
    keys protect everything until FINISH_RSP; :meth:`establish` then switches both
    directions to the data keys with fresh counters.
    """

    session_id: int
    is_requester: bool
    hash_alg: int
    version: int
    aead: int
    handshake: HandshakeSecrets | None = field(repr=False)   # discarded once established
    phase: Phase = Phase.HANDSHAKING
    rolled_back: bool = False   # the last open() fell back to the pre-KEY_UPDATE key
    _tx: _Channel = field(init=False, repr=False)
    _rx: _Channel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        hs = self.hs
        req, rsp = _Channel(hs.request), _Channel(hs.response)
        self._tx, self._rx = (req, rsp) if self.is_requester else (rsp, req)

    @property
    def hs(self) -> HandshakeSecrets:
        if self.handshake is None:
            raise SecuredMessageError(f"session 0x{self.session_id:08x}: handshake secrets "
                                      "already discarded")
        return self.handshake

    def establish(self, data: DataSecrets) -> None:
        """Switch to the data keys (after FINISH_RSP) and forget the handshake secrets."""
        req, rsp = _Channel(data.request), _Channel(data.response)
        self._tx, self._rx = (req, rsp) if self.is_requester else (rsp, req)
        self.phase = Phase.ESTABLISHED
        self.handshake = None

    def seal(self, message: bytes) -> bytes:
        return encode_record(self.session_id, self._tx.keys, self._tx.next_seq(), message)

    def open(self, record: bytes) -> bytes:
        """Decrypt the next record from the peer.  On failure with a key-update backup
        held (the peer never saw our KEY_UPDATE_ACK), retry with the old key and roll
        back (libspdm ``LIBSPDM_STATUS_SESSION_TRY_DISCARD_KEY_UPDATE``)."""
        if peek_session_id(record) != self.session_id:
            raise SecuredMessageError(f"session ID 0x{peek_session_id(record):08x} is not "
                                      f"0x{self.session_id:08x}")
        rx = self._rx
        self.rolled_back = False
        seq = rx.next_seq()
        try:
            return decode_record(record, rx.keys, seq)
        except SecuredMessageError:
            if rx.backup is None:
                raise
            plain = decode_record(record, rx.backup, rx.backup_seq)
            log.debug("session 0x%08x: peer still on the pre-update key; rolled back",
                      self.session_id)
            rx.keys, rx.seq, rx.backup = rx.backup, rx.backup_seq + 1, None
            self.rolled_back = True
            return plain

    # --- KEY_UPDATE (§10.18): update one direction, keep a backup until verified -----------

    def _update(self, ch: _Channel, keep_backup: bool) -> None:
        if keep_backup:
            ch.backup, ch.backup_seq = ch.keys, ch.seq
        ch.keys = ch.keys.updated(self.hash_alg, self.version, self.aead)
        ch.seq = 0

    def update_rx(self, keep_backup: bool = True) -> None:
        self._update(self._rx, keep_backup)

    def update_tx(self, keep_backup: bool = False) -> None:
        self._update(self._tx, keep_backup)

    def commit_rx(self) -> None:
        """The peer proved the new key (VerifyNewKey): drop the backup."""
        self._rx.backup = None

    def rollback_rx(self) -> None:
        if self._rx.backup is not None:
            self._rx.keys, self._rx.seq, self._rx.backup = (self._rx.backup,
                                                            self._rx.backup_seq, None)

    def commit_tx(self) -> None:
        self._tx.backup = None

    def rollback_tx(self) -> None:
        if self._tx.backup is not None:
            self._tx.keys, self._tx.seq, self._tx.backup = (self._tx.backup,
                                                            self._tx.backup_seq, None)
