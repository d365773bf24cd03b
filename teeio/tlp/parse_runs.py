"""Runs of IDE-protected memory requests and completions parsed from wire bytes, without
:class:`Tlp` objects (PCIe 6.x §2.2 headers behind the §6.33.4 IDE prefix; with
aggregation, §6.33.6, TLPs without a MAC too): the link's fast path.

The parsers accept only what :meth:`Tlp.decode` (with the MAC stripped) accepts exactly so
and stop at the first TLP that is anything else, leaving it to the per-TLP code.  Once a
TLP is parsed, the header of the one that would continue it (the next address, or the
next completion of the same read) is predicted and each following TLP is checked against
it with one comparison; the ``*_runs`` parsers return such a run as the first TLP's fields
and how many TLPs it holds.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter

from .fields import ADDR32_LIMIT, MAX_PAYLOAD, TlpType, byte_span
from .prefix import IDE_PREFIX_BYTE0, MAC_BYTES

# (write, requester_id, tag, tc, attr, t_bit, byte_address, byte_count, first_byte)
RequestFields = tuple[bool, int, int, int, int, bool, int, int, int]
# (requester_id, tag, byte_count, lower_address)
CompletionFields = tuple[int, int, int, int]
#: a run: the first TLP's fields and how many TLPs (it and those that continue it: each
#: the next ``byte_count`` bytes, all bytes enabled, an MRd with the next tag, the fields
#: otherwise the same)
RequestRun = tuple[RequestFields, int]
#: a run of the completions of one read: the first one's fields and how many (each the
#: next whole payload of the same size, aligned, Byte Count and Lower Address following)
CompletionRun = tuple[CompletionFields, int]

_HEAD = struct.Struct(">BBBBBBBBHBB")   # IDE prefix, DW0, DW1 of a request (12 bytes)
_ADDR32 = struct.Struct(">I")
_ADDR64 = struct.Struct(">Q")
_CPL_HEAD = struct.Struct(">BBBBBBBBHBBHBB")   # IDE prefix and a completion header
_SPANS = ((0, 0),) + tuple(byte_span(be) for be in range(1, 16))   # by byte-enable value
_BC = struct.Struct(">H")
_ADDR_END = {16: ADDR32_LIMIT, 20: 1 << 64}    # by header length (prefix included)
_TAG_BE_ALL = [bytes((tag, 0xFF)) for tag in range(256)]    # Tag[7:0], every byte enabled
_BYTE0, _BYTE1 = itemgetter(0), itemgetter(1)


def parse_ide_request_runs(wires: Sequence[bytes], start: int, stream_id: int,
                           aggregation: bool = False) -> list[RequestRun]:
    """:func:`parse_ide_requests` as runs: a run of TLPs that each continue the one before
    (same prefix but M, same header but the address -- and an MRd's tag, one up -- the
    next ``byte_count`` bytes, all bytes enabled) is one entry."""
    out: list[RequestRun] = []
    spans = _SPANS
    head, addr32, addr64 = _HEAD.unpack_from, _ADDR32.unpack_from, _ADDR64.unpack_from
    m_mask = 0xF8 if aggregation else 0xF9
    i, end = start, len(wires)
    while i < end:
        w = wires[i]
        size = len(w)
        if size < 16:
            break
        p0, p1, p2, _, kind, h1, h2, h3, rid, tag, be = head(w)
        # Prefix: IDE, this stream, M = 1 (or either with aggregation), no PCRC, reserved
        # 0, the request's sub-stream (PR 0 / NPR 1 in bits 6:4); header: no LN/TH, TD, AT.
        if p0 != IDE_PREFIX_BYTE0 or p2 != stream_id or h1 & 0x03 or h2 & 0x8C:
            break
        if kind & 0xDF == 0x40:                 # MWr32 0x40, MWr64 0x60
            write = True
            if p1 & m_mask != 0x01 & m_mask:
                break
        elif kind & 0xDF == 0x00:               # MRd32 0x00, MRd64 0x20
            write = False
            if p1 & m_mask != 0x11 & m_mask:
                break
        else:
            break
        mac = MAC_BYTES if p1 & 1 else 0
        n = (h2 & 3) << 8 | h3 or 1024
        if kind & 0x20:
            if size < 20 + mac:
                break
            hlen = 20
            address = addr64(w, 12)[0]
            if address < ADDR32_LIMIT:
                break
        else:
            if size < 16 + mac:
                break
            hlen = 16
            address = addr32(w, 12)[0]
        step = n << 2
        data = step if write else 0
        if size != hlen + mac + data or address & 3 or (address & 0xFFF) + step > 0x1000:
            break
        first, last = be & 0xF, be >> 4
        if not first or (last if n == 1 else not last):
            break
        lo, hi = spans[first]
        count = hi - lo if n == 1 else step - lo - 4 + spans[last][1]
        fields = (write, rid, (h1 >> 7 & 1) << 9 | (h1 >> 3 & 1) << 8 | tag, h1 >> 4 & 7,
                  (h1 >> 2 & 1) << 2 | (h2 >> 4 & 3), bool(p1 & 0x04), address + lo, count,
                  lo)
        i += 1
        k = 1
        if count == step and n > 1:             # all bytes enabled: predict the next one
            b1, b0 = p1 | 1, p1 & 0xFE
            with_mac, without = hlen + data + MAC_BYTES, hlen + data
            pack = _ADDR64.pack if hlen == 20 else _ADDR32.pack
            nxt = address + step
            # How many could follow: up to the end of the wires, none crossing 4 KiB (only
            # within this page unless step divides 4 KiB and the address is a multiple of
            # it), while the address fits the header's form -- and, for MRds, each with the
            # next tag (its low byte not wrapping).
            last = min(nxt + (end - i) * step, _ADDR_END[hlen])
            if 0x1000 % step or nxt % step:
                last = min(last, (nxt | 0xFFF) + 2 - step)
            if write:
                fixed = w[2:12]                 # stream, counter, DW0, DW1
                guesses = [fixed + pack(nxt)] if nxt < last else []
            else:                               # (all bytes enabled: BE 0xFF)
                fixed, tag_be = w[2:10], _TAG_BE_ALL    # stream, counter, DW0, RID | tag, BE
                last = min(last, nxt + (0xFF - tag) * step)
                guesses = [fixed + tag_be[tag + 1] + pack(nxt)] if nxt < last else []
            # The first guess alone, then the rest at once.
            frame = (p0, b1, b0 if aggregation else -1, with_mac, without)
            if guesses and _matching(wires, i, guesses, *frame):
                i += 1
                k += 1
                if write:
                    guesses = [fixed + pack(a) for a in range(nxt + step, last, step)]
                else:
                    guesses = [fixed + tag_be[t] + pack(a)
                               for t, a in zip(range(tag + 2, 0x100),
                                               range(nxt + step, last, step), strict=False)]
                more = _matching(wires, i, guesses, *frame)
                i += more
                k += more
        out.append((fields, k))
    return out


def _matching(wires: Sequence[bytes], i: int, preds: list[bytes], p0: int, b1: int, b0: int,
              with_mac: int, without: int) -> int:
    """How many of ``wires[i:]``, one after the other, are exactly as predicted: bytes 2..
    of each its prediction, byte 0 *p0*, byte 1 *b1* with the MAC (*with_mac* bytes in
    all) or *b0* without it (*without* bytes; -1: not allowed).  The checks run over the
    whole window in C-level passes; only a mismatch is looked for one by one."""
    got = wires[i:i + len(preds)]
    lengths = list(map(len, got))
    if not lengths:
        return 0
    if min(lengths) < 2:                # a runt: the run ends before the first one
        n = next(j for j, size in enumerate(lengths) if size < 2)
        if not n:
            return 0
        got, lengths = got[:n], lengths[:n]
    n = len(got)
    heads = list(map(bytes.startswith, got, preds, repeat(2)))
    firsts = bytes(map(_BYTE0, got))
    seconds = bytes(map(_BYTE1, got))
    sizes = {b1: with_mac, b0: without}
    want = [sizes.get(c, -1) for c in seconds]
    if all(heads) and firsts.count(p0) == n and lengths == want:
        return n
    for j in range(n):
        if not (heads[j] and firsts[j] == p0 and lengths[j] == want[j]):
            return j
    return n


def parse_ide_requests(wires: Sequence[bytes], start: int, stream_id: int,
                       aggregation: bool = False) -> list[RequestFields]:
    """The fields of ``wires[start:]``, IDE-protected memory requests of stream
    *stream_id*, up to the first one that is anything else or that :meth:`Tlp.decode`
    (with the MAC stripped) would not accept exactly so.  ``first_byte``: where the
    enabled bytes start in the (DW-padded) payload.  *aggregation*: TLPs of aggregated
    units (M clear, no MAC, §6.33.6) are taken too."""
    out: list[RequestFields] = []
    for f, k in parse_ide_request_runs(wires, start, stream_id, aggregation):
        out.append(f)
        write, rid, tag, tc, attr, t_bit, a, count, lo = f
        step = 0 if write else 1
        out += [(write, rid, tag + j * step, tc, attr, t_bit, a + j * count, count, lo)
                for j in range(1, k)]
    return out


def parse_ide_completion_runs(wires: Sequence[bytes], start: int, stream_id: int,
                              aggregation: bool = False) -> list[CompletionRun]:
    """:func:`parse_ide_completions` as runs: a run of CplDs of one read that each carry
    the next payload of the same size, DW-aligned (Byte Count down by it, Lower Address
    up by it) is one entry."""
    out: list[CompletionRun] = []
    head = _CPL_HEAD.unpack_from
    cpld = int(TlpType.CPLD)
    m_mask = 0xF8 if aggregation else 0xF9
    want = 0x21 & m_mask
    bc_of = _BC.pack
    i, end = start, len(wires)
    while i < end:
        w = wires[i]
        size = len(w)
        if size < 16:
            break
        p0, p1, p2, _, kind, h1, h2, h3, _cid, st_bc, bc, rid, tag, lower = head(w)
        # IDE prefix of this stream on CPL (2), M = 1 (or either with aggregation), no
        # PCRC; a CplD, no LN/TH, TD, AT; status SC; reserved bit 7 of the lower address
        # byte clear.
        if (p0 != IDE_PREFIX_BYTE0 or p2 != stream_id or p1 & m_mask != want or kind != cpld
                or h1 & 0x03 or h2 & 0x8C or st_bc & 0xE0 or lower & 0x80):
            break
        step = ((h2 & 3) << 8 | h3 or 1024) * 4
        if size != 16 + step + (MAC_BYTES if p1 & 1 else 0):
            break
        count = (st_bc & 0xF) << 8 | bc or MAX_PAYLOAD
        out_tag = (h1 >> 7 & 1) << 9 | (h1 >> 3 & 1) << 8 | tag
        i += 1
        k = 1
        if not lower & 3 and not step & 0x7F:    # aligned, whole 128s: predict the next
            b1, b0 = p1 | 1, p1 & 0xFE
            with_mac, without = 16 + step + MAC_BYTES, 16 + step
            # stream, counter, DW0, Completer ID | Byte Count | RID, tag, Lower Address
            fixed, tail = w[2:10], w[12:16]     # (Lower Address: up by 128s, unchanged)
            for pred in [fixed + bc_of(r) + tail
                         for r in range(count - step, max(0, count - (end - i + 1) * step),
                                        -step)]:
                w = wires[i]
                # (bytes 2.. as predicted first: a runt never gets its byte 1 read)
                if not (w.startswith(pred, 2) and w[0] == p0
                        and ((c := w[1]) == b1 and len(w) == with_mac
                             or aggregation and c == b0 and len(w) == without)):
                    break
                i += 1
                k += 1
        out.append(((rid, out_tag, count, lower), k))
    return out


def parse_ide_completions(wires: Sequence[bytes], start: int, stream_id: int,
                          aggregation: bool = False) -> list[CompletionFields]:
    """The fields of ``wires[start:]``, IDE-protected successful CplDs of stream
    *stream_id*, up to the first one that is anything else or that :meth:`Tlp.decode`
    (with the MAC stripped) would not accept exactly so.  *aggregation*: TLPs of
    aggregated units (M clear, no MAC, §6.33.6) are taken too."""
    out: list[CompletionFields] = []
    for (rid, tag, count, lower), k in parse_ide_completion_runs(wires, start, stream_id,
                                                                  aggregation):
        step = cpl_payload_length(wires[start + len(out)])
        out += [(rid, tag, count - j * step, (lower + j * step) & 0x7F) for j in range(k)]
    return out


def cpl_payload_length(wire: bytes) -> int:
    """Payload bytes of the IDE-protected completion *wire* (its Length field)."""
    return ((wire[6] & 3) << 8 | wire[7] or 1024) * 4
