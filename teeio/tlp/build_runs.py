"""Runs of memory request and completion TLPs built as bytes, without :class:`Tlp`
objects (PCIe 6.x §2.2.7 memory requests, §2.2.9 completions): the link's fast path.

Each function gives byte for byte what the :class:`~teeio.tlp.packet.Tlp` class gives for
the same TLPs (the unit tests compare them); they leave out its validation, so the
callers pass only what it would accept: pieces of 1..4096 bytes that do not cross a
4 KiB boundary.  The regular middle of a transfer is built from header templates in
:mod:`.templates`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .fields import ADDR32_LIMIT, TlpType

_REQ3 = struct.Struct(">BBBBHBBI")
_REQ4 = struct.Struct(">BBBBHBBQ")
_CPL = struct.Struct(">BBBBHBBHBB")


def dw0_bits(tag: int, tc: int, attr: int) -> tuple[int, int]:
    """Bytes 1 and 2 of DW0 without the Length bits."""
    return ((tag >> 9 & 1) << 7 | tc << 4 | (tag >> 8 & 1) << 3 | (attr >> 2) << 2,
            (attr & 3) << 4)


def _request_header(kind32: int, requester_id: int, tag: int, address: int, size: int,
                    b1: int, b2: int) -> tuple[bytes, int]:
    """(header, DW count) of one memory request (*kind32*: its 32-bit-address type)."""
    start = address & ~3
    end = address + size
    n = (end - start + 3) >> 2
    first = (0xF << (address & 3)) & 0xF
    tail = end & 3
    last = (0xF >> (4 - tail)) if tail else 0xF
    if n == 1:
        first, last = first & last, 0
    if start < ADDR32_LIMIT:
        return _REQ3.pack(kind32, b1, b2 | n >> 8 & 3, n & 0xFF, requester_id, tag & 0xFF,
                          last << 4 | first, start), n
    return _REQ4.pack(kind32 | 0x20, b1, b2 | n >> 8 & 3, n & 0xFF, requester_id, tag & 0xFF,
                      last << 4 | first, start), n


def memory_write_parts(requester_id: int, address: int, data: bytes | memoryview,
                       pieces: Sequence[tuple[int, int]], *, tag: int = 0, tc: int = 0,
                       attr: int = 0) -> tuple[list[bytes], list[bytes | memoryview]]:
    """Headers (no IDE prefix) and DW-padded payloads of the MWr TLPs that write the
    byte ranges *pieces* of *data* (which starts at byte *address*): for each piece
    ``(a, n)``, ``Tlp.memory_write(requester_id, tag, a, data[a - address:][:n], tc=tc,
    attr=attr)``'s ``header()`` and ``data``."""
    b1, b2 = dw0_bits(tag, tc, attr)
    view = memoryview(data)
    headers: list[bytes] = []
    payloads: list[bytes | memoryview] = []
    kind = int(TlpType.MWR32)
    req3, req4 = _REQ3.pack, _REQ4.pack
    tag8 = tag & 0xFF
    for a, n in pieces:
        off = a - address
        if not (a | n) & 3 and n > 4:           # whole DWs, more than one: all bytes enabled
            dws = n >> 2
            if a < ADDR32_LIMIT:
                headers.append(req3(kind, b1, b2 | dws >> 8 & 3, dws & 0xFF, requester_id,
                                    tag8, 0xFF, a))
            else:
                headers.append(req4(kind | 0x20, b1, b2 | dws >> 8 & 3, dws & 0xFF,
                                    requester_id, tag8, 0xFF, a))
            payloads.append(view[off:off + n])
            continue
        header, dws = _request_header(kind, requester_id, tag, a, n, b1, b2)
        headers.append(header)
        lead = a & 3
        payloads.append(bytes(lead) + view[off:off + n] + bytes(dws * 4 - lead - n))
    return headers, payloads


def memory_read_headers(requester_id: int, pieces: Sequence[tuple[int, int]], *,
                        first_tag: int = 0, tc: int = 0, attr: int = 0) -> list[bytes]:
    """Headers (no IDE prefix) of MRd TLPs for the byte ranges *pieces*, tagged
    *first_tag*, *first_tag* + 1, ...: ``Tlp.memory_read(requester_id, tag, a, n, tc=tc,
    attr=attr).header()`` for each."""
    out = []
    kind = int(TlpType.MRD32)
    for i, (a, n) in enumerate(pieces):
        tag = first_tag + i
        b1, b2 = dw0_bits(tag, tc, attr)
        out.append(_request_header(kind, requester_id, tag, a, n, b1, b2)[0])
    return out


def completion_parts(requester_id: int, tag: int, completer_id: int, address: int,
                     data: bytes | memoryview, spans: Sequence[tuple[int, int]], *,
                     tc: int = 0, attr: int = 0) -> tuple[list[bytes], list[bytes | memoryview]]:
    """Headers (no IDE prefix) and DW-padded payloads of the CplDs that return *data*
    (read at byte *address*) in the byte ranges *spans*, each carrying the bytes still
    due as its Byte Count: ``Tlp(CPLD, requester_id, tag, data=padded, completer_id=...,
    byte_count=remaining, lower_address=a & 0x7F, tc=tc, attr=attr)``."""
    b1, b2 = dw0_bits(tag, tc, attr)
    view = memoryview(data)
    remaining = len(view)
    headers: list[bytes] = []
    payloads: list[bytes | memoryview] = []
    for a, n in spans:
        off = a - address
        lead = a & 3
        dws = (lead + n + 3) >> 2
        bc = remaining & 0xFFF                  # 4096 encodes as 0
        headers.append(_CPL.pack(TlpType.CPLD, b1, b2 | dws >> 8 & 3, dws & 0xFF,
                                 completer_id, bc >> 8, bc & 0xFF, requester_id, tag & 0xFF,
                                 a & 0x7F))
        if lead == 0 and dws * 4 == n:
            payloads.append(view[off:off + n])
        else:
            payloads.append(bytes(lead) + view[off:off + n] + bytes(dws * 4 - lead - n))
        remaining -= n
    return headers, payloads

