"""Runs of IDE-protected memory requests and completions parsed from wire bytes, without
:class:`Tlp` objects (PCIe 6.x §2.2 headers behind the §6.33.4 IDE prefix): the link's
fast path.

The parsers accept only what :meth:`Tlp.decode` (with the MAC stripped) accepts exactly so
and stop at the first TLP that is anything else, leaving it to the per-TLP code.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .fields import ADDR32_LIMIT, MAX_PAYLOAD, TlpType, byte_span
from .prefix import IDE_PREFIX_BYTE0, MAC_BYTES

# (write, requester_id, tag, tc, attr, t_bit, byte_address, byte_count, first_byte)
RequestFields = tuple[bool, int, int, int, int, bool, int, int, int]
# (requester_id, tag, byte_count, lower_address)
CompletionFields = tuple[int, int, int, int]



_HEAD = struct.Struct(">BBBBBBBBHBB")   # IDE prefix, DW0, DW1 of a request (12 bytes)
_ADDR32 = struct.Struct(">I")
_ADDR64 = struct.Struct(">Q")
_CPL_HEAD = struct.Struct(">BBBBBBBBHBBHBB")   # IDE prefix and a completion header
_SPANS = ((0, 0),) + tuple(byte_span(be) for be in range(1, 16))   # by byte-enable value


def parse_ide_requests(wires: Sequence[bytes], start: int, stream_id: int) -> list[RequestFields]:
    """The fields of ``wires[start:]``, IDE-protected memory requests of stream
    *stream_id*, up to the first one that is anything else or that :meth:`Tlp.decode`
    (with the MAC stripped) would not accept exactly so.  ``first_byte``: where the
    enabled bytes start in the (DW-padded) payload."""
    out: list[RequestFields] = []
    spans = _SPANS
    head, addr32, addr64 = _HEAD.unpack_from, _ADDR32.unpack_from, _ADDR64.unpack_from
    for i in range(start, len(wires)):
        w = wires[i]
        size = len(w)
        if size < 16 + MAC_BYTES:
            break
        p0, p1, p2, _, kind, h1, h2, h3, rid, tag, be = head(w)
        # Prefix: IDE, this stream, M = 1, no PCRC, reserved 0, the request's sub-stream
        # (PR 0 / NPR 1 in bits 6:4); header: no LN/TH, TD, AT.
        if p0 != IDE_PREFIX_BYTE0 or p2 != stream_id or h1 & 0x03 or h2 & 0x8C:
            break
        if kind & 0xDF == 0x40:                 # MWr32 0x40, MWr64 0x60
            write = True
            if p1 & 0xF9 != 0x01:
                break
        elif kind & 0xDF == 0x00:               # MRd32 0x00, MRd64 0x20
            write = False
            if p1 & 0xF9 != 0x11:
                break
        else:
            break
        n = (h2 & 3) << 8 | h3 or 1024
        if kind & 0x20:
            if size < 20 + MAC_BYTES:
                break
            hlen = 20
            address = addr64(w, 12)[0]
            if address < ADDR32_LIMIT:
                break
        else:
            hlen = 16
            address = addr32(w, 12)[0]
        if (size != hlen + MAC_BYTES + (n << 2 if write else 0) or address & 3
                or (address & 0xFFF) + (n << 2) > 0x1000):
            break
        first, last = be & 0xF, be >> 4
        if not first or (last if n == 1 else not last):
            break
        lo, hi = spans[first]
        out.append((write, rid, (h1 >> 7 & 1) << 9 | (h1 >> 3 & 1) << 8 | tag,
                    h1 >> 4 & 7, (h1 >> 2 & 1) << 2 | (h2 >> 4 & 3), bool(p1 & 0x04),
                    address + lo, hi - lo if n == 1 else (n << 2) - lo - 4 + spans[last][1],
                    lo))
    return out


def parse_ide_completions(wires: Sequence[bytes], start: int,
                          stream_id: int) -> list[CompletionFields]:
    """The fields of ``wires[start:]``, IDE-protected successful CplDs of stream
    *stream_id*, up to the first one that is anything else or that :meth:`Tlp.decode`
    (with the MAC stripped) would not accept exactly so."""
    out: list[CompletionFields] = []
    head = _CPL_HEAD.unpack_from
    cpld = int(TlpType.CPLD)
    for i in range(start, len(wires)):
        w = wires[i]
        if len(w) < 16 + MAC_BYTES:
            break
        p0, p1, p2, _, kind, h1, h2, h3, _cid, st_bc, bc, rid, tag, lower = head(w)
        # IDE prefix of this stream on CPL (2), M = 1, no PCRC; a CplD, no LN/TH, TD, AT;
        # status SC; reserved bit 7 of the lower address byte clear.
        if (p0 != IDE_PREFIX_BYTE0 or p2 != stream_id or p1 & 0xF9 != 0x21 or kind != cpld
                or h1 & 0x03 or h2 & 0x8C or st_bc & 0xE0 or lower & 0x80):
            break
        if len(w) != 16 + ((h2 & 3) << 8 | h3 or 1024) * 4 + MAC_BYTES:
            break
        out.append((rid, (h1 >> 7 & 1) << 9 | (h1 >> 3 & 1) << 8 | tag,
                    (st_bc & 0xF) << 8 | bc or MAX_PAYLOAD, lower))
    return out
