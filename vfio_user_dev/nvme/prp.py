"""PRP entries and lists (NVMe 1.4 §4.3): the guest pages a command's data occupies."""

from __future__ import annotations

from collections.abc import Callable

from vfio_user_dev.nvme.spec import PAGE, CommandError, Status

ReadMem = Callable[[int, int], bytes]
ENTRIES_PER_PAGE = PAGE // 8


def segments(prp1: int, prp2: int, length: int, read: ReadMem) -> list[tuple[int, int]]:
    """(address, length) pieces for *length* bytes described by PRP1/PRP2.

    PRP1 may carry an offset (dword aligned); PRP2 is the second page when the data spans
    two pages, else a PRP list pointer; every list entry is page aligned, and the last
    entry of a full list page points to the next list page (§4.3, Figure 87)."""
    if prp1 & 0x3:
        raise CommandError(Status.PRP_OFFSET_INVALID, f"PRP1 {prp1:#x} not dword aligned")
    first = min(length, PAGE - (prp1 & (PAGE - 1)))
    out = [(prp1, first)]
    left = length - first
    if left == 0:
        return out
    if left <= PAGE:
        if prp2 & (PAGE - 1):
            raise CommandError(Status.PRP_OFFSET_INVALID, f"PRP2 {prp2:#x} has an offset")
        out.append((prp2, left))
        return out
    if prp2 & 0x7:
        raise CommandError(Status.PRP_OFFSET_INVALID, f"PRP list {prp2:#x} not qword aligned")
    pages = -(-left // PAGE)
    list_addr = prp2
    while pages:
        room = (PAGE - (list_addr & (PAGE - 1))) // 8
        take = pages if pages <= room else room - 1       # last slot chains to the next page
        raw = read(list_addr, take * 8 + (8 if take < pages else 0))
        for i in range(take):
            entry = int.from_bytes(raw[8 * i:8 * i + 8], "little")
            if entry & (PAGE - 1):
                raise CommandError(Status.PRP_OFFSET_INVALID,
                                   f"PRP entry {entry:#x} has an offset")
            n = min(left, PAGE)
            out.append((entry, n))
            left -= n
        pages -= take
        if pages:
            list_addr = int.from_bytes(raw[8 * take:8 * take + 8], "little")
            if list_addr & 0x7:
                raise CommandError(Status.PRP_OFFSET_INVALID,
                                   f"chained PRP list {list_addr:#x} not qword aligned")
    return out
