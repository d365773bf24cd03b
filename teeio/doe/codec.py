"""DOE data objects and DOE Discovery (PCIe 6.3 §6.30.1), declared on :mod:`teeio.codec`.

Data object (Tables 6-28/6-29), little-endian DWs::

     31        24 23          16 15                              0
    +------------+--------------+--------------------------------+
    |  reserved  | Data Obj Type|           Vendor ID            |  DW0 (Header 1)
    +--+--+------+--------------+-----+--------------------------+
    |rsvd | Connection ID (29:18)     |  Length in DW (17:0)     |  DW1 (Header 2)
    +-----+---------------------------+--------------------------+
    |                 payload, zero-padded to a DW                |  DW2 ...
    +-------------------------------------------------------------+

    Length counts the two header DWs; 0 encodes 2^18 DW (1 MiB), 1 is not allowed.

A malformed object is a :class:`DoeDecodeError` (the core's DecodeError): the receiver
silently discards it (§6.30.1).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Self

from teeio.codec import (
    REST,
    Data,
    DecodeError,
    Field,
    Reader,
    Reserved,
    Struct,
    UInt,
    Writer,
    declare,
    u8,
    u16,
)
from teeio.lite_dataclass import dataclass

__all__ = [
    "DISCOVERY_VERSION", "HEADER_BYTES", "INVALID_VENDOR_ID", "MAX_OBJECT_BYTES",
    "MAX_OBJECT_DW", "PCI_SIG_VENDOR_ID", "DataObjectType", "DiscoveryRequest",
    "DiscoveryResponse", "DoeDecodeError", "DoeError", "DoeObject", "DoeUnsupportedError",
    "pad_dw", "protocol_name",
]

MAX_OBJECT_DW = 1 << 18      # §6.30.1: 2 DW .. 2^18 DW
MAX_OBJECT_BYTES = 4 * MAX_OBJECT_DW
HEADER_BYTES = 8
DISCOVERY_VERSION = 2        # §6.30.1.1 Table 6-30: 02h when the capability version is >= 2
PCI_SIG_VENDOR_ID = 0x0001
INVALID_VENDOR_ID = 0xFFFF   # Discovery response for an index out of range


class DataObjectType(IntEnum):
    """PCI-SIG defined data object types, Vendor ID 0001h (§6.30.1.1 Table 6-33)."""

    DOE_DISCOVERY = 0x00
    CMA_SPDM = 0x01
    SECURED_CMA_SPDM = 0x02
    CMA_SPDM_CONNECTION_ID = 0x03
    SECURED_CMA_SPDM_CONNECTION_ID = 0x04
    ASYNC_MESSAGE = 0x05


_CONNECTION_ID_TYPES = (DataObjectType.CMA_SPDM_CONNECTION_ID,
                        DataObjectType.SECURED_CMA_SPDM_CONNECTION_ID)


def protocol_name(vendor_id: int, data_object_type: int) -> str:
    """``VVVV:TT`` in hex, as Linux names the files in ``doe_features``."""
    return f"{vendor_id:04x}:{data_object_type:02x}"


def pad_dw(data: bytes) -> bytes:
    """Zero-pad *data* to a whole number of DWs (§6.30.1)."""
    return data + bytes(-len(data) % 4)


def _has_connection_id(vendor_id: int, data_object_type: int) -> bool:
    return vendor_id == PCI_SIG_VENDOR_ID and data_object_type in _CONNECTION_ID_TYPES


# -- errors -------------------------------------------------------------------------------------

class DoeError(ValueError):
    """A DOE object that cannot be processed; keeps the raw bytes and the offending offset."""

    def __init__(self, message: str, data: bytes = b"", offset: int = 0) -> None:
        super().__init__(message)
        self.data = data
        self.offset = offset


class DoeDecodeError(DoeError, DecodeError):
    """Malformed object (bad length, reserved bits set): silently discarded (§6.30.1).
    The core's (raw, offset, reason); :attr:`data` is :attr:`raw`."""

    def __init__(self, raw: bytes | bytearray | memoryview, offset: int, reason: str) -> None:
        DecodeError.__init__(self, raw, offset, reason)
        self.data = self.raw


class DoeUnsupportedError(DoeError):
    """No handler for the object's Vendor ID / Data Object Type."""


# -- DOE field kinds ----------------------------------------------------------------------------

class _Reserved(Reserved):
    """Reserved bits named as the spec names them; ``checked=False``: ignored on receipt
    (Table 6-30: responders ignore Discovery request bits 31:16), zero when sent."""

    def __init__(self, size: int, what: str, checked: bool = True) -> None:
        super().__init__(size)
        self.what, self.checked = what, checked

    def pull(self, r: Reader, known: Any, ctx: Any) -> Any:
        at = r.pos
        v = r.pull_uint(self.size, self.name)
        if v and self.checked:
            raise r.fail(f"reserved bits {self.what} are {v:#x}", at)
        return None


class _Header2(Field):
    """Header DW1: Length (17:0, from the payload; 0 = 2^18 DW), Connection ID (29:18,
    only for the connection-id types), reserved 31:30.  The field's value is the
    Connection ID; decoding checks Length against the bytes received."""

    def pull(self, r: Reader, known: Any, ctx: Any) -> Any:
        at = r.pos
        dw1 = r.pull_u32(self.name)
        if dw1 >> 30:
            raise r.fail(f"reserved bits 31:30 of header DW1 are set ({dw1:#010x})", at)
        length = dw1 & (MAX_OBJECT_DW - 1) or MAX_OBJECT_DW
        if length == 1:
            raise r.fail("header DW1 Length 1 is not allowed", at)
        received = (r.end - at + 4) // 4
        if length != received:
            raise r.fail(f"header DW1 says {length} DW, {received} DW received", at)
        conn = (dw1 >> 18) & 0xFFF
        if conn and not _has_connection_id(known["vendor_id"], known["data_object_type"]):
            raise r.fail(f"reserved bits 29:18 of header DW1 are {conn:#x}", at)
        return conn

    def push(self, w: Writer, value: Any, known: Any, ctx: Any) -> None:
        length = (2 + len(known["payload"]) // 4) & (MAX_OBJECT_DW - 1)   # 2^18 DW -> 0
        w.push_u32(length | value << 18)

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFF:
            raise ValueError(f"connection id {value!r} exceeds 12 bits")

    def strategy(self, known: Any, ctx: Any) -> Any:
        # composed from the core's strategies: hypothesis stays teeio.codec's import
        mask = 0xFFF if _has_connection_id(known["vendor_id"], known["data_object_type"]) else 0
        return UInt(2).strategy(known, ctx).map(lambda v: v & mask)


class _Payload(Data):
    """The rest of the object: whole DWs (Length says how many)."""

    def __init__(self) -> None:
        super().__init__(REST)

    def check(self, value: Any) -> None:
        super().check(value)
        if len(value) % 4:
            raise ValueError(f"DOE payload of {len(value)} bytes is not DW-padded")
        if HEADER_BYTES + len(value) > MAX_OBJECT_BYTES:
            raise ValueError(f"DOE payload of {len(value)} bytes exceeds 2^18 DW")

    def strategy(self, known: Any, ctx: Any) -> Any:
        return super().strategy(known, ctx).map(lambda b: b[:len(b) & ~3])


# -- data objects -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DoeObject(Struct):
    """One data object; *payload* is already DW-padded (use :func:`pad_dw`)."""

    DECODE_ERROR = DoeDecodeError
    vendor_id: int = u16()
    data_object_type: int = u8()
    _r0: None = declare(_Reserved(1, "31:24 of header DW0"), init=False)
    connection_id: int = declare(_Header2(), default=0)
    payload: bytes = declare(_Payload(), default=b"")

    def __init__(self, vendor_id: int, data_object_type: int, payload: bytes = b"",
                 connection_id: int = 0) -> None:
        """Arguments in the order callers use (payload before the Connection ID)."""
        object.__setattr__(self, "vendor_id", vendor_id)
        object.__setattr__(self, "data_object_type", data_object_type)
        object.__setattr__(self, "payload", bytes(payload))
        object.__setattr__(self, "connection_id", connection_id)
        self.__post_init__()
        if connection_id and not self._has_connection_id():
            raise ValueError("only the PCI-SIG connection-id types carry a connection id")

    def _has_connection_id(self) -> bool:
        return _has_connection_id(self.vendor_id, self.data_object_type)

    @property
    def length_dw(self) -> int:
        return 2 + len(self.payload) // 4

    @property
    def protocol(self) -> tuple[int, int]:
        return self.vendor_id, self.data_object_type

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None) -> Self:
        data = bytes(buf)
        if len(data) < HEADER_BYTES:
            raise DoeDecodeError(data, len(data), f"DOE object of {len(data)} bytes is "
                                                  "shorter than its header")
        if len(data) % 4:
            raise DoeDecodeError(data, len(data), f"DOE object of {len(data)} bytes is not a "
                                                  "whole number of DWs")
        return super().decode(data, ctx)


# -- DOE Discovery (§6.30.1.1) ------------------------------------------------------------------

@dataclass(frozen=True)
class DiscoveryRequest(Struct):
    """Request DW (Table 6-30): [7:0] Index, [15:8] DOE Discovery Version, [31:16] reserved
    (responders ignore it)."""

    DECODE_ERROR = DoeDecodeError
    index: int = u8()
    version: int = u8(DISCOVERY_VERSION)
    _r0: None = declare(_Reserved(2, "31:16", checked=False), init=False)


@dataclass(frozen=True)
class DiscoveryResponse(Struct):
    """Response DW (Table 6-31): [15:0] Vendor ID (FFFFh: bad index), [23:16] type, [31:24] next."""

    DECODE_ERROR = DoeDecodeError
    vendor_id: int = u16()
    data_object_type: int = u8()
    next_index: int = u8()

    @property
    def valid(self) -> bool:
        return self.vendor_id != INVALID_VENDOR_ID
