"""TLP header field encodings (PCIe 6.x §2.2.1 Fmt/Type, §2.2.5 byte enables, §2.2.9
Completion Status) and the errors of the TLP codec.

Only what the emulated link carries: memory reads and writes (32- and 64-bit address
forms) and completions with or without data.
"""

from __future__ import annotations

from enum import IntEnum

MAX_PAYLOAD = 4096          # bytes: Length = 0 encodes 1024 DW (§2.2.2)
ADDR32_LIMIT = 1 << 32


class TlpError(ValueError):
    """A TLP that breaks the rules of §2.2 (or that this model does not support)."""


class TlpDecodeError(TlpError):
    """Malformed TLP bytes; keeps the raw bytes and the offset where parsing failed."""

    def __init__(self, message: str, raw: bytes = b"", offset: int = 0) -> None:
        self.message = message
        self.raw = bytes(raw)
        self.offset = offset
        super().__init__(f"{message} (at offset {offset} of {len(raw)} bytes)")


class TlpType(IntEnum):
    """Fmt[2:0] and Type[4:0] as they appear in byte 0 of the header (§2.2.1, Table 2-3)."""

    MRD32 = 0x00    # Fmt 000b: 3 DW, no data
    MRD64 = 0x20    # Fmt 001b: 4 DW, no data
    MWR32 = 0x40    # Fmt 010b: 3 DW, with data
    MWR64 = 0x60    # Fmt 011b: 4 DW, with data
    CPL = 0x0A      # Fmt 000b, Type 0_1010b
    CPLD = 0x4A     # Fmt 010b, Type 0_1010b
    MRD = 0x20      # alias: the 64-bit forms
    MWR = 0x60

    @property
    def has_data(self) -> bool:
        return bool(self & 0x40)

    @property
    def header_dw(self) -> int:
        return 4 if self & 0x20 else 3

    @property
    def is_request(self) -> bool:
        return self in (TlpType.MRD32, TlpType.MRD64, TlpType.MWR32, TlpType.MWR64)

    @property
    def is_completion(self) -> bool:
        return self in (TlpType.CPL, TlpType.CPLD)


class CplStatus(IntEnum):
    """Completion Status (§2.2.9, Table 2-36)."""

    SC = 0      # Successful Completion
    UR = 1      # Unsupported Request
    CRS = 2     # Configuration Request Retry Status
    CA = 4      # Completer Abort


def check_range(name: str, value: int, maximum: int, minimum: int = 0) -> None:
    if not minimum <= value <= maximum:
        raise TlpError(f"{name} = {value} out of range {minimum}..{maximum}")


def byte_span(be: int) -> tuple[int, int]:
    """(first enabled byte, one past the last enabled byte) of a 4-bit byte enable."""
    lo = (be & -be).bit_length() - 1
    return lo, be.bit_length()


def byte_enables(address: int, size: int) -> tuple[int, int, int, int]:
    """(DW-aligned start, first_be, last_be, DW count) for *size* bytes at *address*."""
    if address < 0 or size < 1:
        raise TlpError(f"bad byte range: address 0x{address:x}, size {size}")
    start = address & ~3
    end = address + size
    n = (end - start + 3) // 4
    first = (0xF << (address & 3)) & 0xF
    tail = end & 3
    last = (0xF >> (4 - tail)) if tail else 0xF
    if n == 1:
        return start, first & last, 0, 1
    return start, first, last, n
