"""TLP sizing arithmetic (PCIe 6.x §2.2.2, §2.2.7, §2.3.1.1, §7.5.3.4): how a transfer
splits into requests of at most Max_Payload_Size (writes) or Max_Read_Request_Size (reads)
that end on MPS/MRRS-aligned addresses (so none crosses a 4 KiB boundary), and how a
completer splits the answer to a read into completions that end on the Read Completion
Boundary.  The ``count_*`` functions give the same numbers in O(1).
"""

from __future__ import annotations

RCB = 64                        # Read Completion Boundary of the root port (§2.3.1.1)
TLP_SIZES = (128, 256, 512, 1024, 2048, 4096)   # legal MPS / MRRS values (§7.5.3.4)


def split(address: int, length: int, size: int) -> list[tuple[int, int]]:
    """The pieces of *address*+*length* that end on *size*-aligned addresses."""
    if length <= 0:
        return []
    end = address + length
    first_end = (address // size + 1) * size
    if first_end >= end:
        return [(address, length)]
    last = (end - 1) // size * size         # start of the last piece
    return [(address, first_end - address), *((a, size) for a in range(first_end, last, size)),
            (last, end - last)]


def count_pieces(address: int, length: int, size: int) -> int:
    """``len(split(address, length, size))`` in O(1)."""
    return 0 if length <= 0 else (address + length - 1) // size - address // size + 1


def completion_spans(address: int, length: int, mps: int) -> list[tuple[int, int]]:
    """How a completer splits the answer to one read (§2.3.1.1): at most *mps* bytes of
    payload (DW-padded, as the Length field counts it) per completion, every completion
    but the last ending on an RCB boundary."""
    out = []
    pos, end = address, address + length
    while pos < end:
        nxt = end if end - (pos & ~3) <= mps else (pos + mps) & ~(RCB - 1)
        out.append((pos, nxt - pos))
        pos = nxt
    return out


def count_completions(address: int, length: int, mps: int) -> int:
    """``len(completion_spans(address, length, mps))`` in O(1)."""
    if length <= 0:
        return 0
    end = address + length
    if end - (address & ~3) <= mps:
        return 1
    first_end = (address + mps) & ~(RCB - 1)
    return 1 + -(-(end - first_end) // mps)


def count_read_tlps(address: int, length: int, mrrs: int, mps: int) -> tuple[int, int]:
    """(MRd count, CplD count) for reading *length* bytes at *address*, in O(1)."""
    n = count_pieces(address, length, mrrs)
    if n <= 2:
        return n, sum(count_completions(a, k, mps) for a, k in split(address, length, mrrs))
    first = mrrs - address % mrrs
    end = address + length
    last = end - (end - 1) // mrrs * mrrs
    middle = (n - 2) * count_completions(0, mrrs, mps)
    return n, (count_completions(address, first, mps) + middle
               + count_completions(end - last, last, mps))


def check_tlp_size(name: str, value: int) -> int:
    """*value* if it is a legal MPS / MRRS (§7.5.3.4), else ValueError naming *name*."""
    if value not in TLP_SIZES:
        raise ValueError(f"{name} must be one of {', '.join(map(str, TLP_SIZES))}; got {value}")
    return value
