"""vfio-user wire format (QEMU ``docs/interop/vfio-user.rst``; host endianness = little).

Every message starts with a 16-byte header::

     0       2       4               8              12              16
    +-------+-------+---------------+---------------+---------------+
    | msgid |  cmd  |  size (all)   |     flags     |     error     |
    +-------+-------+---------------+---------------+---------------+
    flags: bits 0-3 type (0 command, 1 reply), bit 4 No_reply, bit 5 Error

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
import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size  # 16

MAX_DATA_XFER = 1 << 20       # our max_data_xfer_size (spec default)
MAX_MSG_FDS = 8
MAX_MESSAGE = MAX_DATA_XFER + 4096  # any larger message is refused (E2BIG)
# Live DMA maps a client may hold at once: the VERSION capability "max_dma_maps" (the
# spec's default is 65535; a server may announce fewer).  Beyond it DMA_MAP is ENOSPC.
MAX_DMA_MAPS = 4096
# VERSION capabilities are a shallow JSON object ("capabilities" -> "migration" -> its
# fields: depth 3); anything nested deeper is refused before the parser recurses into it.
MAX_JSON_DEPTH = 8


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


class ProtocolError(Exception):
    """A malformed or refused message; ``errno`` goes into the error reply."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Header:
    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def decode(cls, data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise ProtocolError(errno.EINVAL, f"header needs 16 bytes, got {len(data)}")
        return cls(*HEADER.unpack_from(data))

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


def message(msg_id: int, command: int, payload: bytes = b"", flags: int = 0,
            error: int = 0) -> bytes:
    return Header(msg_id, command, HEADER_SIZE + len(payload), flags, error).encode() + payload


def reply(req: Header, payload: bytes = b"") -> bytes:
    return message(req.msg_id, req.command, payload, Flags.REPLY)


def error_reply(req: Header, err: int) -> bytes:
    return message(req.msg_id, req.command, b"", Flags.REPLY | Flags.ERROR, err)


def _need(payload: bytes, size: int, what: str, exact: bool = False) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        raise ProtocolError(errno.EINVAL,
                            f"{what}: payload of {len(payload)} bytes, expected "
                            f"{'exactly ' if exact else 'at least '}{size}")


# --- VERSION -------------------------------------------------------------------------

def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON *text* nests arrays and objects more than *limit* deep, found without
    recursion (brackets inside strings do not count), so that a hostile document cannot
    exhaust the parser's stack."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    capabilities: dict[str, object] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = struct.pack("<HH", self.major, self.minor)
        if self.capabilities:
            body += json.dumps({"capabilities": self.capabilities},
                               separators=(",", ":")).encode() + b"\0"
        return body

    @classmethod
    def decode(cls, payload: bytes) -> Version:
        _need(payload, 4, "VERSION")
        major, minor = struct.unpack_from("<HH", payload)
        caps: dict[str, object] = {}
        rest = payload[4:].rstrip(b"\0")
        if rest:
            # Spec "Version": the capabilities are a NUL-terminated JSON string.  Bounded
            # before parsing: nesting depth (a deep document would raise RecursionError)
            # and, through ValueError, integers longer than the interpreter converts.
            try:
                text = rest.decode()
            except UnicodeDecodeError as exc:
                raise ProtocolError(errno.EINVAL, f"VERSION: bad JSON: {exc}") from None
            if json_too_deep(text):
                raise ProtocolError(errno.EINVAL, f"VERSION: JSON nested deeper than "
                                                  f"{MAX_JSON_DEPTH} levels")
            try:
                doc = json.loads(text)
            except (ValueError, RecursionError) as exc:    # JSONDecodeError is a ValueError
                raise ProtocolError(errno.EINVAL, f"VERSION: bad JSON: {exc}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("capabilities", {}), dict):
                raise ProtocolError(errno.EINVAL, "VERSION: capabilities must be an object")
            caps = dict(doc.get("capabilities", {}))
        return cls(major, minor, caps)


# --- DMA_MAP / DMA_UNMAP -----------------------------------------------------------------

DMA_MAP = struct.Struct("<IIQQQ")      # argsz flags offset address size
DMA_UNMAP = struct.Struct("<IIQQ")     # argsz flags address size


@dataclass(frozen=True)
class DmaMap:
    flags: int
    offset: int
    address: int
    size: int

    def encode(self) -> bytes:
        return DMA_MAP.pack(DMA_MAP.size, self.flags, self.offset, self.address, self.size)

    @classmethod
    def decode(cls, payload: bytes) -> DmaMap:
        _need(payload, DMA_MAP.size, "DMA_MAP", exact=True)
        argsz, flags, offset, address, size = DMA_MAP.unpack(payload)
        if argsz < DMA_MAP.size:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP: argsz {argsz} < 32")
        if size == 0 or address + size > 1 << 64:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP: bad range {address:#x}+{size:#x}")
        return cls(flags, offset, address, size)


@dataclass(frozen=True)
class DmaUnmap:
    argsz: int
    flags: int
    address: int
    size: int

    def encode(self) -> bytes:
        return DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def decode(cls, payload: bytes) -> DmaUnmap:
        _need(payload, DMA_UNMAP.size, "DMA_UNMAP", exact=True)
        argsz, flags, address, size = DMA_UNMAP.unpack(payload)
        if argsz < DMA_UNMAP.size:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP: argsz {argsz} < 24")
        if flags != 0:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP: unsupported flags {flags:#x}")
        return cls(argsz, flags, address, size)


# --- DEVICE_GET_INFO / REGION_INFO / IRQ_INFO ------------------------------------------

DEVICE_INFO = struct.Struct("<IIII")     # argsz flags num_regions num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")   # argsz flags index cap_offset size offset
IRQ_INFO = struct.Struct("<IIII")        # argsz flags index count
IRQ_SET = struct.Struct("<IIIII")        # argsz flags index start count


def decode_argsz(payload: bytes, fixed: int, what: str) -> int:
    _need(payload, 4, what)
    (argsz,) = struct.unpack_from("<I", payload)
    if argsz < fixed:
        raise ProtocolError(errno.EINVAL, f"{what}: argsz {argsz} < {fixed}")
    return int(argsz)


@dataclass(frozen=True)
class RegionInfoRequest:
    argsz: int
    index: int

    @classmethod
    def decode(cls, payload: bytes) -> RegionInfoRequest:
        _need(payload, REGION_INFO.size, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _off = REGION_INFO.unpack_from(payload)
        if argsz < REGION_INFO.size:
            raise ProtocolError(errno.EINVAL, f"DEVICE_GET_REGION_INFO: argsz {argsz} < 32")
        return cls(argsz, index)


@dataclass(frozen=True)
class IrqInfoRequest:
    argsz: int
    index: int

    @classmethod
    def decode(cls, payload: bytes) -> IrqInfoRequest:
        _need(payload, IRQ_INFO.size, "DEVICE_GET_IRQ_INFO")
        argsz, _flags, index, _count = IRQ_INFO.unpack_from(payload)
        if argsz < IRQ_INFO.size:
            raise ProtocolError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO: argsz {argsz} < 16")
        return cls(argsz, index)


@dataclass(frozen=True)
class IrqSet:
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""

    def encode(self) -> bytes:
        return IRQ_SET.pack(IRQ_SET.size + len(self.data), self.flags, self.index,
                            self.start, self.count) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> IrqSet:
        _need(payload, IRQ_SET.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = IRQ_SET.unpack_from(payload)
        data = payload[IRQ_SET.size:]
        if argsz != len(payload):
            raise ProtocolError(errno.EINVAL,
                                f"DEVICE_SET_IRQS: argsz {argsz} != payload {len(payload)}")
        d = flags & DATA_MASK
        a = flags & ACTION_MASK
        unknown = flags & ~int(DATA_MASK | ACTION_MASK)  # int: ~IntFlag would be 0
        if bin(d).count("1") != 1 or bin(a).count("1") != 1 or unknown:
            raise ProtocolError(errno.EINVAL, f"DEVICE_SET_IRQS: bad flags {flags:#x}")
        if d == IrqSetFlags.DATA_BOOL and len(data) != count:
            raise ProtocolError(errno.EINVAL, "DEVICE_SET_IRQS: bool array length != count")
        if d != IrqSetFlags.DATA_BOOL and data:
            raise ProtocolError(errno.EINVAL, "DEVICE_SET_IRQS: unexpected data")
        return cls(flags, index, start, count, bytes(data))


# --- REGION_READ / REGION_WRITE -----------------------------------------------------------

REGION_RW = struct.Struct("<QII")  # offset region count


@dataclass(frozen=True)
class RegionAccess:
    offset: int
    region: int
    count: int
    data: bytes = b""

    def encode(self) -> bytes:
        return REGION_RW.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, payload: bytes, with_data: bool) -> RegionAccess:
        _need(payload, REGION_RW.size, "REGION access")
        offset, region, count = REGION_RW.unpack_from(payload)
        data = payload[REGION_RW.size:]
        if count > MAX_DATA_XFER:
            raise ProtocolError(errno.E2BIG, f"REGION access: count {count} > max_data_xfer_size")
        if with_data and len(data) != count:
            raise ProtocolError(errno.EINVAL,
                                f"REGION_WRITE: count {count} but {len(data)} data bytes")
        if not with_data and data:
            raise ProtocolError(errno.EINVAL, "REGION_READ: unexpected data")
        return cls(offset, region, count, bytes(data))


# --- DMA_READ / DMA_WRITE (server -> client) -------------------------------------------------

DMA_RW = struct.Struct("<QQ")   # address count ; data follows at payload offset 16


def encode_dma_rw(address: int, count: int, data: bytes = b"") -> bytes:
    return DMA_RW.pack(address, count) + data


def decode_dma_rw(payload: bytes, with_data: bool) -> tuple[int, int, bytes]:
    _need(payload, DMA_RW.size, "DMA access")
    address, count = DMA_RW.unpack_from(payload)
    data = payload[DMA_RW.size:]
    if with_data and len(data) != count:
        raise ProtocolError(errno.EINVAL, f"DMA access: count {count}, {len(data)} data bytes")
    if not with_data and data:
        raise ProtocolError(errno.EINVAL, "DMA access: unexpected data")
    return int(address), int(count), bytes(data)
