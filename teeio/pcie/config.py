"""PCI configuration space with hardware write semantics (PCIe 6.x §7.5, §7.8).

Every byte has a write mask (RW bits) and a write-1-to-clear mask (RW1C bits);
all other bits are read-only to software.  BAR sizing then works as on hardware:
writing all ones leaves only the size-aligned address bits set.

Capabilities are laid out with :meth:`ConfigSpace.add_capability` (legacy list,
0x40-0xFF, linked from 0x34) and :meth:`ConfigSpace.add_ext_capability`
(extended list from 0x100, 4 KiB space).
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

CONFIG_SIZE = 4096
LEGACY_SIZE = 256


class Reg(IntEnum):
    """Type 0 header offsets (PCIe 6.x §7.5.1)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_CODE = 0x09
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BAR0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITIES_POINTER = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(IntFlag):
    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR_ENABLE = 1 << 8
    INTERRUPT_DISABLE = 1 << 10


class Status(IntFlag):
    INTERRUPT_STATUS = 1 << 3
    CAPABILITIES_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


STATUS_RW1C = (Status.MASTER_DATA_PARITY_ERROR | Status.SIGNALED_TARGET_ABORT
               | Status.RECEIVED_TARGET_ABORT | Status.RECEIVED_MASTER_ABORT
               | Status.SIGNALED_SYSTEM_ERROR | Status.DETECTED_PARITY_ERROR)


class CapId(IntEnum):
    """Capability IDs (PCI Code and ID Assignment Specification)."""

    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class ExtCapId(IntEnum):
    ADVANCED_ERROR_REPORTING = 0x0001
    DEVICE_SERIAL_NUMBER = 0x0003
    DOE = 0x002E
    IDE = 0x0030


class DevCap(IntFlag):
    """PCI Express capability: Device Capabilities register, +0x04 (PCIe 6.x §7.5.3.3).
    Bits 2:0 are Max_Payload_Size Supported (:func:`payload_size_code`)."""

    MAX_PAYLOAD_SIZE_SUPPORTED = 0x7
    EXTENDED_TAG_FIELD_SUPPORTED = 1 << 5
    ROLE_BASED_ERROR_REPORTING = 1 << 15
    FUNCTION_LEVEL_RESET = 1 << 28
    TEE_IO_SUPPORTED = 1 << 30


class DevCtl(IntFlag):
    """PCI Express capability: Device Control register, +0x08 (PCIe 6.x §7.5.3.4).
    Bits 7:5 are Max_Payload_Size, bits 14:12 Max_Read_Request_Size (encoded as
    :func:`payload_size_code`)."""

    CORRECTABLE_ERROR_REPORTING = 1 << 0
    NON_FATAL_ERROR_REPORTING = 1 << 1
    FATAL_ERROR_REPORTING = 1 << 2
    UNSUPPORTED_REQUEST_REPORTING = 1 << 3
    RELAXED_ORDERING = 1 << 4
    MAX_PAYLOAD_SIZE = 0x7 << 5
    EXTENDED_TAG_FIELD = 1 << 8
    PHANTOM_FUNCTIONS = 1 << 9
    AUX_POWER_PM = 1 << 10
    NO_SNOOP = 1 << 11
    MAX_READ_REQUEST_SIZE = 0x7 << 12
    INITIATE_FLR = 1 << 15


DEVCTL_MPS_SHIFT = 5
DEVCTL_MRRS_SHIFT = 12
PAYLOAD_SIZES = (128, 256, 512, 1024, 2048, 4096)   # encodings 000b..101b (§7.5.3.3-4)


def payload_size_code(size: int) -> int:
    """The 3-bit encoding of a Max_Payload_Size (Supported) or Max_Read_Request_Size
    value: 000b = 128 B ... 101b = 4096 B (§7.5.3.3, §7.5.3.4)."""
    if size not in PAYLOAD_SIZES:
        raise ValueError(f"{size} B is not a payload size the 3-bit field encodes "
                         f"({', '.join(map(str, PAYLOAD_SIZES))})")
    return PAYLOAD_SIZES.index(size)


def payload_size(code: int) -> int | None:
    """The size a 3-bit field encodes; None for the reserved encodings 110b and 111b."""
    return PAYLOAD_SIZES[code] if 0 <= code < len(PAYLOAD_SIZES) else None


class ConfigSpace:
    """Bytes plus masks; writes honour RO/RW/RW1C bit by bit."""

    def __init__(self, size: int = CONFIG_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self._last_cap = 0
        self._last_ext = 0

    # -- raw setters used while building the layout -----------------------------------
    def set(self, off: int, width: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        self._check(off, width)
        self.data[off:off + width] = value.to_bytes(width, "little")
        self.wmask[off:off + width] = wmask.to_bytes(width, "little")
        self.w1cmask[off:off + width] = w1c.to_bytes(width, "little")

    def get(self, off: int, width: int) -> int:
        self._check(off, width)
        return int.from_bytes(self.data[off:off + width], "little")

    def poke(self, off: int, width: int, value: int) -> None:
        """Device-side update (ignores masks), e.g. Interrupt Status."""
        self._check(off, width)
        self.data[off:off + width] = value.to_bytes(width, "little")

    def _check(self, off: int, width: int) -> None:
        if off < 0 or width < 0 or off + width > self.size:
            raise ValueError(f"config access {off:#x}+{width} outside {self.size:#x} bytes")

    # -- software access ----------------------------------------------------------------
    def read(self, off: int, count: int) -> bytes:
        self._check(off, count)
        return bytes(self.data[off:off + count])

    def write(self, off: int, value: bytes) -> None:
        self._check(off, len(value))
        for i, b in enumerate(value):
            o = off + i
            old = self.data[o]
            new = (old & ~self.wmask[o]) | (b & self.wmask[o])
            new &= ~(b & self.w1cmask[o]) & 0xFF
            self.data[o] = new

    # -- capability lists ---------------------------------------------------------------
    def add_capability(self, off: int, cap_id: int, body: bytes) -> None:
        """Place a legacy capability (ID, next, body...) at *off* and link it."""
        if off < 0x40 or off + 2 + len(body) > LEGACY_SIZE or off % 4:
            raise ValueError(f"bad capability offset {off:#x}")
        self.set(off, 1, cap_id)
        self.set(off + 1, 1, 0)
        self.data[off + 2:off + 2 + len(body)] = body
        if self._last_cap:
            self.set(self._last_cap + 1, 1, off)
        else:
            self.set(Reg.CAPABILITIES_POINTER, 1, off)
            self.data[Reg.STATUS] |= Status.CAPABILITIES_LIST
        self._last_cap = off

    def add_ext_capability(self, off: int, cap_id: int, version: int, body: bytes) -> None:
        """Place an extended capability (PCIe §7.6.3 header) at *off* and link it."""
        if off < 0x100 or off % 4 or off + 4 + len(body) > self.size:
            raise ValueError(f"bad extended capability offset {off:#x}")
        if not self._last_ext and off != 0x100:
            raise ValueError("the first extended capability must sit at 0x100")
        self.set(off, 4, cap_id | (version << 16))
        self.data[off + 4:off + 4 + len(body)] = body
        if self._last_ext:
            hdr = self.get(self._last_ext, 4)
            self.set(self._last_ext, 4, (hdr & 0x000FFFFF) | (off << 20))
        self._last_ext = off

    def find_capability(self, cap_id: int) -> int | None:
        ptr = self.data[Reg.CAPABILITIES_POINTER] & 0xFC
        seen = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            if self.data[ptr] == cap_id:
                return ptr
            ptr = self.data[ptr + 1] & 0xFC
        return None

    def find_ext_capability(self, cap_id: int) -> int | None:
        off = 0x100
        seen = set()
        while off and off not in seen:
            seen.add(off)
            hdr = self.get(off, 4)
            if hdr & 0xFFFF == cap_id:
                return off
            off = (hdr >> 20) & 0xFFC
        return None


def bar_wmask(size: int, is_64: bool = False, prefetch: bool = False) -> tuple[int, int]:
    """(initial value, write mask) of a memory BAR of *size* bytes (§7.5.1.2.1)."""
    if size & (size - 1) or size < 16:
        raise ValueError("BAR size must be a power of two >= 16")
    low = (0b10 << 1 if is_64 else 0) | (1 << 3 if prefetch else 0)
    return low, (~(size - 1)) & 0xFFFFFFF0


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)
