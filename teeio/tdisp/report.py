"""The TDI report (PCIe 6.x §11.3.11, Table 11-15) and its transfer in portions.

::

    [0..1]   INTERFACE_INFO            [2..3] reserved
    [4..5]   MSI_X_MESSAGE_CONTROL     [6..7] LNR_CONTROL
    [8..11]  TPH_CONTROL               [12..15] MMIO_RANGE_COUNT = N
    [16..]   N x MMIO_RANGE (16 B: first 4K page u64, pages u32, attributes u16, range id u16)
    [16+16N] DEVICE_SPECIFIC_INFO_LEN u32, then that many bytes

GET_DEVICE_INTERFACE_REPORT asks for (OFFSET, LENGTH); the device answers with a portion of
at most LENGTH bytes and the REMAINDER_LENGTH still to come (§11.3.9–11.3.10).  The device
side is :func:`report_portion`, the requester side :class:`ReportReader`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .codec import (
    DeviceInterfaceReportResponse,
    GetDeviceInterfaceReport,
    MmioRange,
    TdispDecodeError,
)
from .defs import INTERFACE_INFO_RESERVED, InterfaceInfo

__all__ = ["DeviceInterfaceReport", "MmioRange", "ReportReader", "page_number",
           "report_portion"]

_FIXED = struct.Struct("<HHHHII")     # info, rsvd, msix, lnr, tph, count
MAX_REPORT_SIZE = 0xFFFF              # OFFSET/LENGTH are u16, so a report must fit 64 KiB


def page_number(address: int, mmio_reporting_offset: int) -> int:
    """First 4K page number as reported: (address + MMIO_REPORTING_OFFSET) mod 2**64 >> 12."""
    return ((address + mmio_reporting_offset) & 0xFFFFFFFFFFFFFFFF) >> 12


@dataclass(frozen=True)
class DeviceInterfaceReport:
    interface_info: InterfaceInfo = InterfaceInfo(0)
    msi_x_message_control: int = 0
    lnr_control: int = 0
    tph_control: int = 0
    mmio_ranges: tuple[MmioRange, ...] = ()
    device_specific_info: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.interface_info <= 0xFFFF or self.interface_info & INTERFACE_INFO_RESERVED:
            raise ValueError(f"INTERFACE_INFO 0x{self.interface_info:x}: reserved bits")
        object.__setattr__(self, "interface_info", InterfaceInfo(self.interface_info))
        for name, bits in (("msi_x_message_control", 16), ("lnr_control", 16),
                           ("tph_control", 32)):
            if not 0 <= getattr(self, name) < 1 << bits:
                raise ValueError(f"{name} does not fit in {bits} bits")
        object.__setattr__(self, "mmio_ranges", tuple(self.mmio_ranges))
        object.__setattr__(self, "device_specific_info", bytes(self.device_specific_info))
        if len(self.encode()) > MAX_REPORT_SIZE:
            raise ValueError("TDI report larger than 65535 bytes")

    def encode(self) -> bytes:
        return (_FIXED.pack(self.interface_info, 0, self.msi_x_message_control,
                            self.lnr_control, self.tph_control, len(self.mmio_ranges))
                + b"".join(r.encode() for r in self.mmio_ranges)
                + struct.pack("<I", len(self.device_specific_info))
                + self.device_specific_info)

    @classmethod
    def decode(cls, data: bytes) -> DeviceInterfaceReport:
        raw = bytes(data)
        if len(raw) < _FIXED.size:
            raise TdispDecodeError("TDI report truncated", raw, len(raw))
        info, rsvd, msix, lnr, tph, count = _FIXED.unpack_from(raw)
        if info & INTERFACE_INFO_RESERVED:
            raise TdispDecodeError(f"INTERFACE_INFO 0x{info:04x}: reserved bits set", raw, 0)
        if rsvd:
            raise TdispDecodeError("reserved report bytes 2..3 not zero", raw, 2)
        off = _FIXED.size
        if len(raw) < off + MmioRange.SIZE * count + 4:
            raise TdispDecodeError(f"MMIO_RANGE_COUNT {count} runs past the end", raw, 12)
        ranges = tuple(MmioRange.decode_at(raw, off + i * MmioRange.SIZE) for i in range(count))
        off += MmioRange.SIZE * count
        (n,) = struct.unpack_from("<I", raw, off)
        if len(raw) != off + 4 + n:
            raise TdispDecodeError(f"DEVICE_SPECIFIC_INFO_LEN {n} does not match the "
                                   f"{len(raw) - off - 4} bytes that follow", raw, off)
        return cls(InterfaceInfo(info), msix, lnr, tph, ranges, raw[off + 4:])


def report_portion(report: bytes, request: GetDeviceInterfaceReport,
                   max_portion: int = 0xFFFF) -> DeviceInterfaceReportResponse:
    """Device side: the portion *request* asks for (at most LENGTH and *max_portion*
    bytes).  An OFFSET at or beyond the end of the report is INVALID_REQUEST (§11.3.9);
    LENGTH 0 is INVALID_REQUEST too (no progress possible)."""
    if request.offset >= len(report):
        raise TdispDecodeError(f"OFFSET {request.offset} beyond the {len(report)}-byte report",
                               request.encode(), 16)
    n = min(request.length, max_portion, len(report) - request.offset)
    if n <= 0:
        raise TdispDecodeError("LENGTH 0", request.encode(), 18)
    end = request.offset + n
    return DeviceInterfaceReportResponse(request.function_id, report[request.offset:end],
                                         len(report) - end)


class ReportReader:
    """Requester side: ask for portions of at most *chunk* bytes until REMAINDER_LENGTH is 0.

    ``while (req := reader.next_request()) is not None: reader.feed(send(req))``;
    then :meth:`report` decodes the reassembled bytes."""

    def __init__(self, function_id: int, chunk: int = 0xFFFF) -> None:
        if not 1 <= chunk <= 0xFFFF:
            raise ValueError("chunk must be 1..65535")
        self.function_id = function_id
        self.chunk = chunk
        self._buf = bytearray()
        self._remaining: int | None = None      # unknown before the first portion

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def next_request(self) -> GetDeviceInterfaceReport | None:
        if self.done:
            return None
        length = self.chunk if self._remaining is None else min(self.chunk, self._remaining)
        return GetDeviceInterfaceReport(self.function_id, len(self._buf), length)

    def feed(self, response: DeviceInterfaceReportResponse) -> None:
        req = self.next_request()
        if req is None:
            raise ValueError("report already complete")
        raw = response.encode()
        if response.function_id != self.function_id:
            raise TdispDecodeError("report portion for another INTERFACE_ID", raw, 4)
        if not 0 < len(response.portion) <= req.length:
            raise TdispDecodeError(f"PORTION_LENGTH {len(response.portion)} not in "
                                   f"1..{req.length}", raw, 16)
        if (self._remaining is not None
                and len(response.portion) + response.remainder_length != self._remaining):
            raise TdispDecodeError("PORTION_LENGTH + REMAINDER_LENGTH inconsistent with the "
                                   "previous portion", raw, 18)
        if len(self._buf) + len(response.portion) + response.remainder_length > MAX_REPORT_SIZE:
            raise TdispDecodeError("report would exceed 65535 bytes", raw, 18)
        self._buf += response.portion
        self._remaining = response.remainder_length

    def report_bytes(self) -> bytes:
        if not self.done:
            raise ValueError("report incomplete")
        return bytes(self._buf)

    def report(self) -> DeviceInterfaceReport:
        return DeviceInterfaceReport.decode(self.report_bytes())
