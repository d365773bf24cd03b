"""TLP headers from templates (PCIe 6.x §2.2.7 memory requests, §2.2.9 completions): the
regular middle of a transfer -- whole MPS- or MRRS-sized TLPs one after the other -- built
from one header template each, only the address, tag or Byte Count filled in per TLP; the
irregular ends through :mod:`.build_runs`.  Byte for byte what :class:`~.packet.Tlp`
gives (the unit tests compare them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from operator import itemgetter

from .build_runs import completion_parts, dw0_bits, memory_read_headers, memory_write_parts
from .fields import ADDR32_LIMIT, TlpType
from .sizing import RCB, completion_spans, split

__all__ = ["completion_headers", "completion_run", "completion_runs", "memory_read_tagged",
           "memory_write_split"]

_ADDR32 = struct.Struct(">I").pack
_ADDR64 = struct.Struct(">Q").pack
_BC = struct.Struct(">H").pack
_TAG_LOWER0 = [bytes((tag, 0)) for tag in range(256)]   # Tag[7:0], Lower Address 0
_TAG_BE_ALL = [bytes((tag, 0xFF)) for tag in range(256)]  # Tag[7:0], every byte enabled
_ADDRESS, _LENGTH, _TAG = itemgetter(0), itemgetter(1), itemgetter(2)


def _contiguous(pieces: Sequence[tuple[int, ...]], address: int, length: int) -> bool:
    """Whether *pieces* are ranges of *length* bytes one after the other from *address*
    (checked in C-level passes, no per-piece bytecode)."""
    n = len(pieces)
    return (list(map(_ADDRESS, pieces)) == list(range(address, address + n * length, length))
            and list(map(_LENGTH, pieces)).count(length) == n)


def memory_write_split(requester_id: int, address: int, data: bytes | memoryview, size: int,
                       *, tag: int = 0, tc: int = 0, attr: int = 0
                       ) -> tuple[list[bytes], list[bytes | memoryview]]:
    """``memory_write_parts(requester_id, address, data, split(address, len(data), size),
    ...)``; the whole *size*-byte TLPs between the first and the last from a template."""
    n = len(data)
    end = address + n
    first_end = (address // size + 1) * size
    last = (end - 1) // size * size
    if first_end >= last or size <= 4:
        return memory_write_parts(requester_id, address, data, split(address, n, size),
                                  tag=tag, tc=tc, attr=attr)
    view = memoryview(data)
    headers, payloads = memory_write_parts(requester_id, address, view[:first_end - address],
                                           [(address, first_end - address)], tag=tag, tc=tc,
                                           attr=attr)
    b1, b2 = dw0_bits(tag, tc, attr)
    dws = size >> 2
    kind = int(TlpType.MWR32)
    dw1 = requester_id.to_bytes(2, "big") + bytes((tag & 0xFF, 0xFF))
    for lo, hi in ((first_end, min(last, ADDR32_LIMIT)), (max(first_end, ADDR32_LIMIT), last)):
        if lo >= hi:
            continue
        wide = lo >= ADDR32_LIMIT
        head = bytes((kind | 0x20 if wide else kind, b1, b2 | dws >> 8 & 3, dws & 0xFF)) + dw1
        pack = _ADDR64 if wide else _ADDR32
        headers += [head + pack(a) for a in range(lo, hi, size)]
        payloads += [view[o:o + size] for o in range(lo - address, hi - address, size)]
    h, p = memory_write_parts(requester_id, last, view[last - address:], [(last, end - last)],
                              tag=tag, tc=tc, attr=attr)
    return headers + h, payloads + p


def completion_run(requester_id: int, tag: int, completer_id: int, address: int,
                   data: bytes | memoryview, mps: int, *, tc: int = 0, attr: int = 0
                   ) -> tuple[list[bytes], list[bytes | memoryview]]:
    """``completion_parts(requester_id, tag, completer_id, address, data,
    completion_spans(address, len(data), mps), ...)``: after the first, every completion but
    the last carries *mps* bytes from an RCB boundary; those from a template."""
    n = len(data)
    end = address + n
    first_end = end if end - (address & ~3) <= mps else (address + mps) & ~(RCB - 1)
    if first_end == end or mps % 128 or end - first_end <= mps:
        return completion_parts(requester_id, tag, completer_id, address, data,
                                completion_spans(address, n, mps), tc=tc, attr=attr)
    view = memoryview(data)
    last = first_end + (end - first_end - 1) // mps * mps     # where the last one starts
    headers, payloads = completion_parts(requester_id, tag, completer_id, address, view,
                                         [(address, first_end - address)], tc=tc, attr=attr)
    b1, b2 = dw0_bits(tag, tc, attr)
    dws = mps >> 2
    pre = bytes((TlpType.CPLD, b1, b2 | dws >> 8 & 3, dws & 0xFF)) + completer_id.to_bytes(
        2, "big")
    # Lower Address stays first_end's: each step is a multiple of 128 bytes.
    post = requester_id.to_bytes(2, "big") + bytes((tag & 0xFF, first_end & 0x7F))
    headers += [pre + _BC(r & 0xFFF) + post for r in range(end - first_end, end - last, -mps)]
    payloads += [view[o:o + mps] for o in range(first_end - address, last - address, mps)]
    h, p = completion_parts(requester_id, tag, completer_id, last, view[last - address:],
                            [(last, end - last)], tc=tc, attr=attr)
    return headers + h, payloads + p


def memory_read_tagged(requester_id: int, pieces: Sequence[tuple[int, int]],
                       tags: Sequence[int], *, tc: int = 0, attr: int = 0) -> list[bytes]:
    """Headers of MRds for *pieces*, the i-th tagged ``tags[i]``:
    ``memory_read_headers(requester_id, [piece], first_tag=tag, ...)[0]`` for each; whole
    DWs (more than one, 8-bit tags) from a template."""
    out: list[bytes] = []
    kind = int(TlpType.MRD32)
    b1, b2 = dw0_bits(0, tc, attr)
    rid = requester_id.to_bytes(2, "big")
    if len(pieces) > 2:                 # the middle: whole MRRS-sized reads, as a rule
        a0, n = pieces[1]
        middle, mid_tags = pieces[1:-1], tags[1:-1]
        if (not (a0 | n) & 3 and n > 4 and a0 >= ADDR32_LIMIT and max(mid_tags) <= 0xFF
                and _contiguous(middle, a0, n)):
            dws = n >> 2
            head = bytes((kind | 0x20, b1, b2 | dws >> 8 & 3, dws & 0xFF)) + rid
            tag_be = _TAG_BE_ALL
            return (memory_read_tagged(requester_id, pieces[:1], tags[:1], tc=tc, attr=attr)
                    + [head + tag_be[t] + _ADDR64(a) for a, t in zip(
                        range(a0, a0 + n * len(middle), n), mid_tags, strict=True)]
                    + memory_read_tagged(requester_id, pieces[-1:], tags[-1:], tc=tc,
                                         attr=attr))
    heads: dict[tuple[int, bool], bytes] = {}
    for (a, n), tag in zip(pieces, tags, strict=True):
        if (a | n) & 3 or n <= 4 or tag > 0xFF:
            out += memory_read_headers(requester_id, [(a, n)], first_tag=tag, tc=tc,
                                       attr=attr)
            continue
        wide = a >= ADDR32_LIMIT
        known = heads.get((n, wide))
        if known is None:
            dws = n >> 2
            known = heads[(n, wide)] = bytes((kind | 0x20 if wide else kind, b1,
                                              b2 | dws >> 8 & 3, dws & 0xFF)) + rid
        out.append(known + bytes((tag, 0xFF)) + (_ADDR64(a) if wide else _ADDR32(a)))
    return out


def completion_headers(requester_id: int, completer_id: int,
                       pieces: Sequence[tuple[int, int, int]], mps: int, *, tc: int = 0,
                       attr: int = 0) -> tuple[list[bytes], list[int]]:
    """The headers and payload lengths of the CplDs answering reads of *pieces* (address,
    length, tag), in order: those of :func:`completion_runs`."""
    headers: list[bytes] = []
    lengths: list[int] = []
    _completions(requester_id, completer_id, pieces, None, mps, tc, attr, headers, lengths,
                 [])
    return headers, lengths


def completion_runs(requester_id: int, completer_id: int,
                    pieces: Sequence[tuple[int, int, int]], data: bytes | memoryview,
                    mps: int, *, tc: int = 0, attr: int = 0
                    ) -> tuple[list[bytes], list[bytes | memoryview]]:
    """The CplDs answering reads of *pieces* (address, length, tag) whose data follow one
    another in *data*: :func:`completion_run` for each in turn.  A read of whole
    *mps*-sized completions from a 128-byte boundary takes them from one template."""
    headers: list[bytes] = []
    payloads: list[bytes | memoryview] = []
    _completions(requester_id, completer_id, pieces, memoryview(data), mps, tc, attr,
                 headers, [], payloads)
    return headers, payloads


def _completions(requester_id: int, completer_id: int,
                 pieces: Sequence[tuple[int, int, int]], view: memoryview | None, mps: int,
                 tc: int, attr: int, headers: list[bytes], lengths: list[int],
                 payloads: list[bytes | memoryview]) -> None:
    """Headers of the CplDs for *pieces* into *headers*; their payloads (from *view*)
    into *payloads* or, without *view*, their lengths into *lengths*."""
    b1, b2 = dw0_bits(0, tc, attr)
    dws = mps >> 2
    pre = bytes((TlpType.CPLD, b1, b2 | dws >> 8 & 3, dws & 0xFF)) + completer_id.to_bytes(
        2, "big")
    rid = requester_id.to_bytes(2, "big")
    # The common case: every read of the same length, from a 128-byte boundary, of whole
    # mps-sized completions, 8-bit tags: every header from one template.
    a0, n0 = (pieces[0][0], pieces[0][1]) if pieces else (0, 0)
    if (n0 and not (a0 & 0x7F or n0 % mps or mps % 128) and max(map(_TAG, pieces)) <= 0xFF
            and _contiguous(pieces, a0, n0)):
        bcs = [pre + _BC(r & 0xFFF) + rid for r in range(n0, 0, -mps)]
        posts = _TAG_LOWER0
        headers += [bc + posts[tag] for _, _, tag in pieces for bc in bcs]
        if view is None:
            lengths += [mps] * (len(bcs) * len(pieces))
        else:
            payloads += [view[o:o + mps] for o in range(0, n0 * len(pieces), mps)]
        return
    counts: dict[int, list[bytes]] = {}     # Byte Count fields of a regular read, by length
    off = 0
    for a, n, tag in pieces:
        if a & 0x7F or n % mps or mps % 128 or tag > 0xFF:
            h, p = completion_run(requester_id, tag, completer_id, a,
                                  view[off:off + n] if view is not None else bytes(n), mps,
                                  tc=tc, attr=attr)
            headers += h
            if view is None:
                lengths += [len(x) for x in p]
            else:
                payloads += p
            off += n
            continue
        fields = counts.get(n)
        if fields is None:
            fields = counts[n] = [_BC(r & 0xFFF) for r in range(n, 0, -mps)]
        post = rid + bytes((tag, 0))          # Lower Address 0: from a 128-byte boundary
        headers += [pre + bc + post for bc in fields]
        if view is None:
            lengths += [mps] * len(fields)
        else:
            payloads += [view[o:o + mps] for o in range(off, off + n, mps)]
        off += n
