"""SPDM key schedule (DSP0274 1.2/1.3 §12 "Key schedule"), as libspdm computes it.

The derivations are written out in docs/attestation.md, "The key schedule".  No secret
reaches ``repr``.
"""

from __future__ import annotations

import struct
from dataclasses import field

from teeio.lite_dataclass import dataclass

from . import crypto
from .defs import (
    BIN_STR_0_LABEL,
    BIN_STR_1_LABEL,
    BIN_STR_2_LABEL,
    BIN_STR_3_LABEL,
    BIN_STR_4_LABEL,
    BIN_STR_5_LABEL,
    BIN_STR_6_LABEL,
    BIN_STR_7_LABEL,
    BIN_STR_8_LABEL,
    BIN_STR_9_LABEL,
)


def bin_concat(version: int, length: int, label: bytes, context: bytes = b"") -> bytes:
    """BinConcat: u16le(Length) || "spdmM.m " || Label || Context."""
    return (struct.pack("<H", length) + f"spdm{version >> 4}.{version & 0xF} ".encode()
            + label + context)


def expand(hash_alg: int, version: int, secret: bytes, label: bytes, length: int,
           context: bytes = b"") -> bytes:
    return crypto.hkdf_expand(hash_alg, secret, bin_concat(version, length, label, context),
                              length)


@dataclass(frozen=True)
class TrafficKeys:
    """One direction's secret and the AEAD key / IV (salt) derived from it."""

    secret: bytes = field(repr=False)
    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, hash_alg: int, version: int, aead: int, secret: bytes) -> TrafficKeys:
        klen = crypto.aead_key_size(aead)
        return cls(secret, expand(hash_alg, version, secret, BIN_STR_5_LABEL, klen),
                   expand(hash_alg, version, secret, BIN_STR_6_LABEL, crypto.AEAD_IV_SIZE))

    def updated(self, hash_alg: int, version: int, aead: int) -> TrafficKeys:
        """KEY_UPDATE (§10.18): secret' = HKDF-Expand(secret, "traffic upd"); key/iv anew."""
        h = crypto.hash_size(hash_alg)
        return TrafficKeys.from_secret(
            hash_alg, version, aead, expand(hash_alg, version, self.secret, BIN_STR_9_LABEL, h))


@dataclass(frozen=True)
class HandshakeSecrets:
    handshake_secret: bytes = field(repr=False)
    request: TrafficKeys = field(repr=False)
    response: TrafficKeys = field(repr=False)
    request_finished_key: bytes = field(repr=False)
    response_finished_key: bytes = field(repr=False)


@dataclass(frozen=True)
class DataSecrets:
    master_secret: bytes = field(repr=False)
    request: TrafficKeys = field(repr=False)
    response: TrafficKeys = field(repr=False)
    export_master_secret: bytes = field(repr=False)


def derive_handshake(hash_alg: int, version: int, aead: int, shared_secret: bytes,
                     th1_hash: bytes) -> HandshakeSecrets:
    h = crypto.hash_size(hash_alg)
    hs = crypto.hkdf_extract(hash_alg, bytes(h), shared_secret)
    req = expand(hash_alg, version, hs, BIN_STR_1_LABEL, h, th1_hash)
    rsp = expand(hash_alg, version, hs, BIN_STR_2_LABEL, h, th1_hash)
    return HandshakeSecrets(
        hs, TrafficKeys.from_secret(hash_alg, version, aead, req),
        TrafficKeys.from_secret(hash_alg, version, aead, rsp),
        expand(hash_alg, version, req, BIN_STR_7_LABEL, h),
        expand(hash_alg, version, rsp, BIN_STR_7_LABEL, h))


def derive_data(hash_alg: int, version: int, aead: int, handshake_secret: bytes,
                th2_hash: bytes) -> DataSecrets:
    h = crypto.hash_size(hash_alg)
    salt1 = expand(hash_alg, version, handshake_secret, BIN_STR_0_LABEL, h)
    master = crypto.hkdf_extract(hash_alg, salt1, bytes(h))
    req = expand(hash_alg, version, master, BIN_STR_3_LABEL, h, th2_hash)
    rsp = expand(hash_alg, version, master, BIN_STR_4_LABEL, h, th2_hash)
    return DataSecrets(
        master, TrafficKeys.from_secret(hash_alg, version, aead, req),
        TrafficKeys.from_secret(hash_alg, version, aead, rsp),
        expand(hash_alg, version, master, BIN_STR_8_LABEL, h, th2_hash))
