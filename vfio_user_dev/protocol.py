"""vfio-user wire format (QEMU ``docs/interop/vfio-user.rst``; host endianness = little).

Every message starts with a 16-byte header::

     0       2       4               8              12              16
    +-------+-------+---------------+---------------+---------------+
    | msgid |  cmd  |  size (all)   |     flags     |     error     |
    +-------+-------+---------------+---------------+---------------+
    flags: bits 0-3 type (0 command, 1 reply), bit 4 No_reply, bit 5 Error

Every header and payload is declared on :mod:`teeio.codec`; the struct constants
(``HEADER``, ``DMA_MAP``, ``REGION_RW``...) are compiled from those declarations, and the
hot messages (the header, REGION_READ/REGION_WRITE) encode and decode through them.
Decoders take the payload (bytes after the header) and validate it; a short or
inconsistent payload raises :class:`ProtocolError` carrying the errno the reply
must use.  Interop note (DMA_READ/DMA_WRITE): we use the spec's layout,
``u64 address; u64 count; data[]`` (data at payload offset 16), which is what
QEMU 11.1 speaks (checked end to end by the share=off boot); early QEMU patch
series declared ``count`` as u32 with the data at offset 12 -- a server built on
those headers would corrupt every DMA (QEMU answers E2BIG to its writes).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Self

from teeio.codec import REST, DecodeError, Reader, Struct, data, declare, u16, u32, u64

from .wire import (
    MAX_JSON_DEPTH,
    Argsz,
    Capabilities,
    ProtocolError,
    Unused,
    VfioDecodeError,
    compile_layout,
    json_too_deep,
)

__all__ = [
    "ACTION_MASK", "DATA_MASK", "DEVICE_INFO", "DMA_MAP", "DMA_RW", "DMA_UNMAP", "HEADER",
    "HEADER_SIZE", "IRQ_INFO", "IRQ_SET", "MAX_DATA_XFER", "MAX_DMA_MAPS", "MAX_JSON_DEPTH",
    "MAX_MESSAGE", "MAX_MSG_FDS", "REGION_INFO", "REGION_MSG", "REGION_RW", "TYPE_MASK",
    "Command", "DeviceFlags", "DeviceInfo", "DmaAccess", "DmaFlags", "DmaMap", "DmaUnmap",
    "Flags", "Header", "IrqInfo", "IrqInfoFlags", "IrqInfoRequest", "IrqSet", "IrqSetFlags",
    "PciIrq", "PciRegion", "ProtocolError", "RegionAccess", "RegionFlags", "RegionInfo",
    "RegionInfoRequest", "VfioDecodeError", "Version", "decode_argsz", "decode_dma_rw",
    "encode_dma_rw", "error_reply", "json_too_deep", "message", "reply",
]

HEADER_SIZE = 16

MAX_DATA_XFER = 1 << 20       # our max_data_xfer_size (spec default)
MAX_MSG_FDS = 8
MAX_MESSAGE = MAX_DATA_XFER + 4096  # any larger message is refused (E2BIG)
# Live DMA maps a client may hold at once: the VERSION capability "max_dma_maps" (the
# spec's default is 65535; a server may announce fewer).  Beyond it DMA_MAP is ENOSPC.
MAX_DMA_MAPS = 4096


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class Flags(IntFlag):
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


TYPE_MASK = 0xF


class DeviceFlags(IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlags(IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


DATA_MASK = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
ACTION_MASK = IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER


class DmaFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


# PCI region and IRQ indices (linux/vfio.h VFIO_PCI_*_INDEX)
class PciRegion(IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class PciIrq(IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


# --- messages ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Message(Struct):
    """A vfio-user header or payload.  ``decode`` names the message in its errors
    (``WHAT``), takes trailing bytes only where the spec lets ``argsz`` grow
    (``TRAILING``), then applies the rules the layout cannot say (:meth:`_validate`)."""

    DECODE_ERROR = VfioDecodeError
    WHAT: ClassVar[str] = ""
    TRAILING: ClassVar[bool] = False

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None) -> Self:
        try:
            obj = cls.pull(Reader(buf), ctx) if cls.TRAILING else super().decode(buf, ctx)
        except DecodeError as exc:
            raise VfioDecodeError(exc.raw, exc.offset, f"{cls.WHAT}: {exc.reason}") from None
        obj._validate()
        return obj

    def _validate(self) -> None:
        """Raise :class:`ProtocolError` for a decoded message the server must refuse."""


@dataclass(frozen=True)
class Header(_Message):
    WHAT = "header"
    msg_id: int = u16()
    command: int = u16()
    size: int = u32()
    flags: int = u32()
    error: int = u32(0)

    # The hot path: one precompiled struct (HEADER, from the declaration above) both ways;
    # its range checks stand in for the field checks.
    def __post_init__(self) -> None:
        try:
            HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)
        except struct.error as exc:
            raise ValueError(f"Header: {exc}") from None

    def encode(self, ctx: Any = None) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None) -> Self:
        """The header at the start of *buf*; what follows is not looked at."""
        if len(buf) < HEADER_SIZE:
            raise VfioDecodeError(buf, len(buf), f"header needs 16 bytes, got {len(buf)}")
        obj = object.__new__(cls)
        d = obj.__dict__
        d["msg_id"], d["command"], d["size"], d["flags"], d["error"] = HEADER.unpack_from(buf)
        return obj

    @property
    def is_reply(self) -> bool:
        return (self.flags & TYPE_MASK) == Flags.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & Flags.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & Flags.ERROR)

    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"UNKNOWN({self.command})"


HEADER = compile_layout(Header)


def message(msg_id: int, command: int, payload: bytes = b"", flags: int = 0,
            error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def reply(req: Header, payload: bytes = b"") -> bytes:
    return message(req.msg_id, req.command, payload, Flags.REPLY)


def error_reply(req: Header, err: int) -> bytes:
    return message(req.msg_id, req.command, b"", Flags.REPLY | Flags.ERROR, err)


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise VfioDecodeError(payload, len(payload), f"{what}: payload of {len(payload)} "
                                                     f"bytes, expected at least {size}")


# --- VERSION -------------------------------------------------------------------------

@dataclass(frozen=True)
class Version(_Message):
    """Spec "Version": major, minor, then the capabilities as a NUL-terminated JSON
    string ``{"capabilities": {...}}`` (absent when there are none)."""

    WHAT = "VERSION"
    major: int = u16()
    minor: int = u16()
    capabilities: dict[str, object] = declare(Capabilities(), default=None)

    def __init__(self, major: int, minor: int,
                 capabilities: dict[str, object] | None = None) -> None:
        object.__setattr__(self, "major", major)
        object.__setattr__(self, "minor", minor)
        object.__setattr__(self, "capabilities", {} if capabilities is None else capabilities)
        self.__post_init__()


# --- DMA_MAP / DMA_UNMAP -----------------------------------------------------------------

@dataclass(frozen=True)
class DmaMap(_Message):
    """argsz (32 when sent; a larger one is accepted), flags, offset, address, size."""

    WHAT = "DMA_MAP"
    argsz: int = declare(Argsz(32), init=False)
    flags: int = u32()
    offset: int = u64()
    address: int = u64()
    size: int = u64()

    def _validate(self) -> None:
        if self.size == 0 or self.address + self.size > 1 << 64:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP: bad range {self.address:#x}"
                                              f"+{self.size:#x}")


@dataclass(frozen=True)
class DmaUnmap(_Message):
    WHAT = "DMA_UNMAP"
    argsz: int = u32()
    flags: int = u32()
    address: int = u64()
    size: int = u64()

    def _validate(self) -> None:
        if self.argsz < DMA_UNMAP.size:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP: argsz {self.argsz} < 24")
        if self.flags != 0:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP: unsupported flags {self.flags:#x}")


DMA_MAP = compile_layout(DmaMap)
DMA_UNMAP = compile_layout(DmaUnmap)


# --- DEVICE_GET_INFO / REGION_INFO / IRQ_INFO ------------------------------------------

@dataclass(frozen=True)
class DeviceInfo(_Message):
    """DEVICE_GET_INFO reply."""

    WHAT = "DEVICE_GET_INFO"
    argsz: int = u32()
    flags: int = u32()
    num_regions: int = u32()
    num_irqs: int = u32()


@dataclass(frozen=True)
class RegionInfo(_Message):
    """DEVICE_GET_REGION_INFO reply (the request has the same layout)."""

    WHAT = "DEVICE_GET_REGION_INFO"
    argsz: int = u32()
    flags: int = u32()
    index: int = u32()
    cap_offset: int = u32()
    size: int = u64()
    offset: int = u64()


@dataclass(frozen=True)
class IrqInfo(_Message):
    """DEVICE_GET_IRQ_INFO reply (the request has the same layout)."""

    WHAT = "DEVICE_GET_IRQ_INFO"
    argsz: int = u32()
    flags: int = u32()
    index: int = u32()
    count: int = u32()


DEVICE_INFO = compile_layout(DeviceInfo)
REGION_INFO = compile_layout(RegionInfo)
IRQ_INFO = compile_layout(IrqInfo)


def decode_argsz(payload: bytes, fixed: int, what: str) -> int:
    _need(payload, 4, what)
    argsz = Reader(payload).pull_u32()
    if argsz < fixed:
        raise VfioDecodeError(payload, 0, f"{what}: argsz {argsz} < {fixed}")
    return argsz


@dataclass(frozen=True)
class RegionInfoRequest(_Message):
    """What the server reads of a DEVICE_GET_REGION_INFO request: argsz (at least 32,
    anything beyond ignored) and the index."""

    WHAT = "DEVICE_GET_REGION_INFO"
    TRAILING = True
    argsz: int = u32()
    _flags: None = declare(Unused(4), init=False)
    index: int = u32()
    _rest: None = declare(Unused(20), init=False)      # cap_offset, size, offset

    def _validate(self) -> None:
        if self.argsz < REGION_INFO.size:
            raise ProtocolError(errno.EINVAL, f"DEVICE_GET_REGION_INFO: argsz {self.argsz} < 32")


@dataclass(frozen=True)
class IrqInfoRequest(_Message):
    """What the server reads of a DEVICE_GET_IRQ_INFO request: argsz (at least 16) and
    the index."""

    WHAT = "DEVICE_GET_IRQ_INFO"
    TRAILING = True
    argsz: int = u32()
    _flags: None = declare(Unused(4), init=False)
    index: int = u32()
    _count: None = declare(Unused(4), init=False)

    def _validate(self) -> None:
        if self.argsz < IRQ_INFO.size:
            raise ProtocolError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO: argsz {self.argsz} < 16")


# --- DEVICE_SET_IRQS ----------------------------------------------------------------------

@dataclass(frozen=True)
class IrqSet(_Message):
    """argsz (the whole payload), flags (one DATA_*, one ACTION_*), index, start, count,
    then a bool per vector with DATA_BOOL."""

    WHAT = "DEVICE_SET_IRQS"
    argsz: int = declare(Argsz(20, tail="data"), init=False)
    flags: int = u32()
    index: int = u32()
    start: int = u32()
    count: int = u32()
    data: bytes = data(REST, b"")

    def _validate(self) -> None:
        d = self.flags & DATA_MASK
        a = self.flags & ACTION_MASK
        unknown = self.flags & ~int(DATA_MASK | ACTION_MASK)  # int: ~IntFlag would be 0
        if bin(d).count("1") != 1 or bin(a).count("1") != 1 or unknown:
            raise ProtocolError(errno.EINVAL, f"DEVICE_SET_IRQS: bad flags {self.flags:#x}")
        if d == IrqSetFlags.DATA_BOOL and len(self.data) != self.count:
            raise ProtocolError(errno.EINVAL, "DEVICE_SET_IRQS: bool array length != count")
        if d != IrqSetFlags.DATA_BOOL and self.data:
            raise ProtocolError(errno.EINVAL, "DEVICE_SET_IRQS: unexpected data")


IRQ_SET = compile_layout(IrqSet)


# --- REGION_READ / REGION_WRITE -----------------------------------------------------------

@dataclass(frozen=True)
class RegionAccess(_Message):
    """offset, region, count, then the data (REGION_WRITE and the REGION_READ reply)."""

    WHAT = "REGION access"
    offset: int = u64()
    region: int = u32()
    count: int = u32()
    data: bytes = data(REST, b"")

    # The hot path, as for Header: REGION_RW (compiled from the declaration) both ways.
    def __post_init__(self) -> None:
        try:
            REGION_RW.pack(self.offset, self.region, self.count)
        except struct.error as exc:
            raise ValueError(f"RegionAccess: {exc}") from None
        if not isinstance(self.data, bytes):
            raise ValueError("RegionAccess: data must be bytes")

    def encode(self, ctx: Any = None) -> bytes:
        return REGION_RW.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None, *,
               with_data: bool | None = None) -> Self:
        """REGION_READ request (``with_data`` false: no data allowed) or REGION_WRITE
        request / REGION_READ reply (``with_data``: exactly ``count`` bytes)."""
        with_data = bool(ctx) if with_data is None else with_data
        if len(buf) < REGION_RW.size:
            raise VfioDecodeError(buf, len(buf), f"REGION access: payload of {len(buf)} "
                                                 f"bytes, expected at least 16")
        offset, region, count = REGION_RW.unpack_from(buf)
        tail = buf[REGION_RW.size:]
        if count > MAX_DATA_XFER:
            raise ProtocolError(errno.E2BIG, f"REGION access: count {count} > "
                                             f"max_data_xfer_size")
        if with_data and len(tail) != count:
            raise VfioDecodeError(buf, REGION_RW.size, f"REGION_WRITE: count {count} but "
                                                       f"{len(tail)} data bytes")
        if not with_data and tail:
            raise VfioDecodeError(buf, REGION_RW.size, "REGION_READ: unexpected data")
        obj = object.__new__(cls)
        obj.__dict__.update(offset=offset, region=region, count=count, data=bytes(tail))
        return obj


REGION_RW = compile_layout(RegionAccess)
#: a REGION_READ/REGION_WRITE message up to its data: header and access in one struct
REGION_MSG = struct.Struct(HEADER.format + REGION_RW.format.lstrip("<"))


# --- DMA_READ / DMA_WRITE (server -> client) -------------------------------------------------

@dataclass(frozen=True)
class DmaAccess(_Message):
    """address, count (u64: the spec's layout, data at payload offset 16), then the data
    (DMA_WRITE and the DMA_READ reply)."""

    WHAT = "DMA access"
    address: int = u64()
    count: int = u64()
    data: bytes = data(REST, b"")


DMA_RW = compile_layout(DmaAccess)


def encode_dma_rw(address: int, count: int, data: bytes = b"") -> bytes:
    """A DmaAccess's bytes, through its compiled layout (DMA_RW)."""
    return DMA_RW.pack(address, count) + data


def decode_dma_rw(payload: bytes, with_data: bool) -> tuple[int, int, bytes]:
    _need(payload, DMA_RW.size, "DMA access")
    address, count = DMA_RW.unpack_from(payload)
    data = bytes(payload[DMA_RW.size:])
    if with_data and len(data) != count:
        raise VfioDecodeError(payload, DMA_RW.size, f"DMA access: count {count}, "
                                                    f"{len(data)} data bytes")
    if not with_data and data:
        raise VfioDecodeError(payload, DMA_RW.size, "DMA access: unexpected data")
    return int(address), int(count), data
