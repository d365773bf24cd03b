"""IDE protection of runs of TLPs (PCIe 6.x §6.33.4-§6.33.6): one AES-GCM invocation per
TLP, or per aggregated unit of up to 8 TLPs of one sub-stream whose payloads add up to at
most 256 DW (§6.33.6), the MAC on the unit's last TLP only.

:func:`seal_units` and :func:`open_units` are the reference; with the optional C
accelerator (:mod:`teeio.ide_accel`) they run in it, byte for byte the same.  Design and
figures: docs/ide-and-link.md, "IDE aggregation".
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Sequence
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import ide_accel
from .tlp import MAC_BYTES, PREFIX_LEN

__all__ = ["UNIT_PAYLOAD_MAX", "UNIT_TLPS_MAX", "UNIT_TLPS_MODES", "open_units",
           "open_units_joined", "seal_units", "unit_sizes"]

UNIT_TLPS_MAX = 8               # §6.33.6: a receiver takes units of up to 8 TLPs
UNIT_PAYLOAD_MAX = 256 * 4      # §6.33.6: at most 256 DW of payload in a unit
UNIT_TLPS_MODES = (1, 2, 4, 8)  # Tx Aggregation Mode 00b..11b (§7.9.26.4.1): 1 = none
COUNTER_MAX = (1 << 64) - 1



class IdeKey(Protocol):
    """What these functions need of a key (:class:`teeio.ide.IdeKey`): its engines."""

    @property
    def aead(self) -> AESGCM: ...

    @property
    def accel(self) -> ide_accel.GcmEngine: ...


_IV = struct.Struct(">4xQ")
_TAG_LEN = 16
_TAG_EXTRA = _TAG_LEN - MAC_BYTES


def unit_sizes(payload_lengths: Sequence[int], unit_tlps: int) -> list[int]:
    """How many TLPs each unit of a run takes: consecutive TLPs, at most *unit_tlps*,
    whose payloads add up to at most 256 DW (a lone TLP of any size is a unit of one)."""
    out = []
    i, n = 0, len(payload_lengths)
    while i < n:
        j, total = i + 1, payload_lengths[i]
        while j < n and j - i < unit_tlps and total + payload_lengths[j] <= UNIT_PAYLOAD_MAX:
            total += payload_lengths[j]
            j += 1
        out.append(j - i)
        i = j
    return out


def seal_units(key: IdeKey, counter: int, prefix: bytes, headers: Sequence[bytes],
               payloads: Sequence[bytes | memoryview], unit_tlps: int = 1
               ) -> tuple[list[bytes], int]:
    """The wire bytes of a run of TLPs of one sub-stream and key, and how many invocation
    counters they used (one per unit, from *counter*).  *prefix*: the IDE prefix with M
    set; the TLPs of a unit but its last go with M clear and no MAC (§6.33.4)."""
    if ide_accel.enabled():
        return key.accel.seal(counter, prefix, list(headers), list(payloads), unit_tlps)
    enc, iv = key.aead.encrypt, _IV.pack
    if unit_tlps == 1:                      # no aggregation: one invocation per TLP
        out = []
        for header, payload in zip(headers, payloads, strict=True):
            aad = prefix + header
            out.append(aad + enc(iv(counter), payload, aad)[:-_TAG_EXTRA])
            counter += 1
        return out, len(out)
    inner = prefix[:1] + bytes((prefix[1] & 0xFE,)) + prefix[2:]
    out = []
    i = 0
    sizes = unit_sizes([len(p) for p in payloads], unit_tlps)
    for size in sizes:
        j = i + size
        aads = [inner + h for h in headers[i:j - 1]]
        aads.append(prefix + headers[j - 1])
        sealed = enc(iv(counter), b"".join(payloads[i:j]), b"".join(aads))
        pos = 0
        for aad, payload in zip(aads, payloads[i:j], strict=True):
            end = pos + len(payload)
            out.append(aad + sealed[pos:end])
            pos = end
        out[-1] += sealed[pos:pos + MAC_BYTES]
        counter += 1
        i = j
    return out, len(sizes)


def open_units(key: IdeKey, counter: int, wires: Sequence[bytes], start: int, stop: int,
               unit_tlps: int = 1) -> tuple[list[bytes], int, int]:
    """Check and decrypt whole units of ``wires[start:stop]`` (TLPs of one sub-stream and
    key; each unit the TLPs up to the next with M set, at most *unit_tlps* and at most 256
    DW of payload when more than one), counters from *counter*: (the plaintext payloads,
    how many TLPs, how many units).  Stops before the first unit that is incomplete,
    breaks those limits or fails its MAC check; nothing of it is returned."""
    if ide_accel.enabled() and counter <= COUNTER_MAX:
        plains, taken, units = key.accel.open(wires if isinstance(wires, list) else list(wires),
                                              start, stop, counter, unit_tlps)
        assert isinstance(plains, list)
        return plains, taken, units
    compare = hmac.compare_digest
    enc = key.aead.encrypt
    out: list[bytes] = []
    i = start
    units = 0
    while i < stop and counter <= COUNTER_MAX:
        unit: list[tuple[bytes, int, int]] = []     # (wire, header length, body length)
        total = 0
        complete = False
        while i + len(unit) < stop and len(unit) < unit_tlps:
            w = wires[i + len(unit)]
            if len(w) <= PREFIX_LEN:
                break
            m = w[1] & 1
            hlen = PREFIX_LEN + (16 if w[PREFIX_LEN] & 0x20 else 12)
            blen = len(w) - hlen - (MAC_BYTES if m else 0)
            if blen < 0:
                break
            unit.append((w, hlen, blen))
            total += blen
            if m:
                complete = True
                break
        if not complete or (len(unit) > 1 and total > UNIT_PAYLOAD_MAX):
            break
        iv = _IV.pack(counter)
        last = unit[-1][0]
        mac = last[-MAC_BYTES:]
        if len(unit) == 1:
            aad = last[:unit[0][1]]
            body = last[unit[0][1]:-MAC_BYTES]
        else:
            aad = b"".join(w[:h] for w, h, _ in unit)
            body = b"".join(w[h:h + b] for w, h, b in unit)
        if not body:                    # no payload: the tag is all there is
            plain = b""
            if not compare(enc(iv, plain, aad)[:MAC_BYTES], mac):
                break
        else:
            plain = enc(iv, body, aad)[:-_TAG_LEN]      # CTR: decryption is encryption
            if not compare(enc(iv, plain, aad)[-_TAG_LEN:-_TAG_EXTRA], mac):
                break
        if len(unit) == 1:
            out.append(plain)
        else:
            pos = 0
            for _, _, b in unit:
                out.append(plain[pos:pos + b])
                pos += b
        counter += 1
        units += 1
        i += len(unit)
    return out, i - start, units



def open_units_joined(key: IdeKey, counter: int, wires: Sequence[bytes], start: int,
                      stop: int, unit_tlps: int = 1) -> tuple[bytes, int, int]:
    """:func:`open_units` with the plaintext payloads joined into one bytes object."""
    if ide_accel.enabled() and counter <= COUNTER_MAX:
        plain, taken, units = key.accel.open(wires if isinstance(wires, list) else list(wires),
                                             start, stop, counter, unit_tlps, True)
        assert isinstance(plain, bytes)
        return plain, taken, units
    plains, taken, units = open_units(key, counter, wires, start, stop, unit_tlps)
    return b"".join(plains), taken, units
