"""TLP capture files: every TLP as it crossed the link, in pcapng (IETF
draft-ietf-opsawg-pcapng §4.1 SHB, §4.2 IDB, §4.3 EPB), link type 147 ``LINKTYPE_USER0``,
the bare TLP (PCIe 6.x §2.2, with the §6.33.4 IDE prefix when protected) as packet data;
the direction in ``epb_flags``, what the fault taps did in an ``opt_comment``.
:func:`read_capture` also reads the older nanosecond pcap with a 4-byte pseudo-header.
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from teeio.tlp import Tlp, is_protected
from vfio_user_dev.link.interfaces import LinkDirection


class CaptureFlags(enum.IntFlag):
    TAMPERED = 1
    DROPPED = 2
    REPLAYED = 4


PCAP_MAGIC_NS = 0xA1B23C4D      # the older captures: nanosecond pcap
LINKTYPE_USER0 = 147
SNAPLEN = 65535
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_PSEUDO = struct.Struct("<BBH")

# pcapng (draft-ietf-opsawg-pcapng): block types, options, EPB flags
PCAPNG_SHB = 0x0A0D0D0A         # §4.1, also the file's first four bytes
PCAPNG_IDB = 0x00000001         # §4.2
PCAPNG_EPB = 0x00000006         # §4.3
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT, OPT_COMMENT = 0, 1                 # §3.5
SHB_USERAPPL = 4                                 # §4.1
IF_NAME, IF_DESCRIPTION, IF_TSRESOL = 2, 3, 9    # §4.2
EPB_FLAGS = 2                                    # §4.3.1
EPB_INBOUND, EPB_OUTBOUND = 0b01, 0b10           # epb_flags bits 1:0
FLAGS_COMMENT = "teeio: "
IF_NAME_VALUE = "pcie-link"
IF_DESCRIPTION_VALUE = ("emulated PCIe link between the root port and the TEE-IO device, "
                        "non-flit TLPs (with the IDE prefix when protected)")


@dataclass(frozen=True)
class CaptureRecord:
    timestamp_ns: int
    direction: LinkDirection
    flags: CaptureFlags
    data: bytes = field(repr=False)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def pcapng_header(snaplen: int = SNAPLEN) -> bytes:
    """The Section Header Block and the one Interface Description Block."""
    shb = _block(PCAPNG_SHB, struct.pack("<IHHq", PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1)
                 + _option(SHB_USERAPPL, b"teeio-emu") + _option(OPT_ENDOFOPT, b""))
    idb = _block(PCAPNG_IDB, struct.pack("<HHI", LINKTYPE_USER0, 0, snaplen)
                 + _option(IF_NAME, IF_NAME_VALUE.encode())
                 + _option(IF_DESCRIPTION, IF_DESCRIPTION_VALUE.encode())
                 + _option(IF_TSRESOL, bytes((9,))) + _option(OPT_ENDOFOPT, b""))
    return shb + idb


def _flag_names(flags: int) -> list[str]:
    return [(f.name or "?").lower() for f in CaptureFlags if flags & f]


def pcapng_packet(timestamp_ns: int, direction: LinkDirection, data: bytes,
                  flags: int = 0) -> bytes:
    """One Enhanced Packet Block (interface 0, nanosecond timestamp)."""
    opts = _option(EPB_FLAGS, struct.pack(
        "<I", EPB_INBOUND if direction == LinkDirection.UPSTREAM else EPB_OUTBOUND))
    if flags:
        opts += _option(OPT_COMMENT, (FLAGS_COMMENT + ",".join(_flag_names(flags))).encode())
    body = (struct.pack("<IIIII", 0, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF,
                        len(data), len(data))
            + data + bytes(-len(data) % 4) + opts + _option(OPT_ENDOFOPT, b""))
    return _block(PCAPNG_EPB, body)


class CaptureWriter:
    """Appends every TLP that crosses the link to a pcapng file (format in the module doc)."""

    def __init__(self, path: Path | str, clock: Callable[[], int] = time.time_ns) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 (kept open)
        self._file.write(pcapng_header())
        self._file.flush()
        self.records = 0

    def write(self, direction: LinkDirection, data: bytes, flags: int = 0) -> None:
        block = pcapng_packet(self._clock(), direction, bytes(data), flags)
        with self._lock:
            if self._file is None:
                return
            self._file.write(block)
            self.records += 1

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_capture(path: Path | str) -> list[CaptureRecord]:
    """Every record of a TLP capture: pcapng (:class:`CaptureWriter`) or the older
    nanosecond pcap with the pseudo-header; ValueError for anything else."""
    raw = Path(path).read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for a capture file")
    magic = int.from_bytes(raw[:4], "little")
    if magic == PCAPNG_SHB:
        return _read_pcapng(path, raw)
    return _read_pcap(path, raw)


def _read_pcap(path: Path | str, raw: bytes) -> list[CaptureRecord]:
    if len(raw) < _PCAP_HEADER.size:
        raise ValueError(f"{path}: too short for a pcap header")
    magic, _major, _minor, _zone, _sig, _snap, linktype = _PCAP_HEADER.unpack_from(raw)
    if magic != PCAP_MAGIC_NS or linktype != LINKTYPE_USER0:
        raise ValueError(f"{path}: not a TLP capture (magic {magic:#x}, link type {linktype})")
    out = []
    pos = _PCAP_HEADER.size
    while pos < len(raw):
        if pos + _PCAP_RECORD.size > len(raw):
            raise ValueError(f"{path}: truncated record header at {pos}")
        sec, nsec, incl, _orig = _PCAP_RECORD.unpack_from(raw, pos)
        pos += _PCAP_RECORD.size
        if incl < _PSEUDO.size or pos + incl > len(raw):
            raise ValueError(f"{path}: truncated record at {pos}")
        direction, flags, _ = _PSEUDO.unpack_from(raw, pos)
        out.append(CaptureRecord(sec * 1_000_000_000 + nsec, LinkDirection(direction),
                                 CaptureFlags(flags), raw[pos + _PSEUDO.size:pos + incl]))
        pos += incl
    return out


def _options(raw: bytes, bo: str) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(raw):
        code, length = struct.unpack_from(bo + "HH", raw, pos)
        if code == OPT_ENDOFOPT:
            return
        yield code, raw[pos + 4:pos + 4 + length]
        pos += 4 + length + (-length % 4)


def _tsresol(value: bytes) -> int:
    """if_tsresol (§4.2.1) as timestamp units per second: MSB 0 a power of 10, 1 of 2."""
    v = value[0] if value else 6
    return int(2 ** (v & 0x7F) if v & 0x80 else 10 ** v)


def _read_pcapng(path: Path | str, raw: bytes) -> list[CaptureRecord]:
    out: list[CaptureRecord] = []
    bo = "<"
    interfaces: list[tuple[int, int]] = []        # (link type, units per second)
    pos = 0
    while pos < len(raw):
        if pos + 12 > len(raw):
            raise ValueError(f"{path}: truncated block at {pos}")
        if int.from_bytes(raw[pos:pos + 4], "little") == PCAPNG_SHB:
            order = raw[pos + 8:pos + 12]
            if order == PCAPNG_BYTE_ORDER_MAGIC.to_bytes(4, "little"):
                bo = "<"
            elif order == PCAPNG_BYTE_ORDER_MAGIC.to_bytes(4, "big"):
                bo = ">"
            else:
                raise ValueError(f"{path}: bad pcapng byte-order magic at {pos}")
            interfaces = []                        # §4.1: interfaces are per section
        btype, total = struct.unpack_from(bo + "II", raw, pos)
        if total < 12 or total % 4 or pos + total > len(raw):
            raise ValueError(f"{path}: truncated or bad block at {pos}")
        body = raw[pos + 8:pos + total - 4]
        if btype == PCAPNG_IDB:
            if len(body) < 8:                      # §4.2: LinkType, Reserved, SnapLen
                raise ValueError(f"{path}: interface description block too short at {pos}")
            linktype, _res, _snap = struct.unpack_from(bo + "HHI", body)
            per_second = 10 ** 6
            for code, value in _options(body[8:], bo):
                if code == IF_TSRESOL:
                    per_second = _tsresol(value)
            interfaces.append((linktype, per_second))
        elif btype == PCAPNG_EPB:
            if len(body) < 20:                     # §4.3: the five fixed fields
                raise ValueError(f"{path}: enhanced packet block too short at {pos}")
            ifid, hi, lo, caplen, _orig = struct.unpack_from(bo + "IIIII", body)
            if 20 + caplen > len(body):
                raise ValueError(f"{path}: packet data past its block at {pos}")
            if ifid >= len(interfaces) or interfaces[ifid][0] != LINKTYPE_USER0:
                raise ValueError(f"{path}: not a TLP capture (packet on interface {ifid} "
                                 f"of another link type)")
            data = body[20:20 + caplen]
            direction = LinkDirection.DOWNSTREAM
            flags = CaptureFlags(0)
            for code, value in _options(body[20 + caplen + (-caplen % 4):], bo):
                if code == EPB_FLAGS and len(value) == 4:
                    inout = struct.unpack(bo + "I", value)[0] & 3
                    direction = (LinkDirection.UPSTREAM if inout == EPB_INBOUND
                                 else LinkDirection.DOWNSTREAM)
                elif code == OPT_COMMENT:
                    text = value.decode("utf-8", "replace")
                    if text.startswith(FLAGS_COMMENT):
                        for name in text[len(FLAGS_COMMENT):].split(","):
                            flags |= CaptureFlags.__members__.get(name.strip().upper(),
                                                                  CaptureFlags(0))
            units = (hi << 32) | lo
            per_second = interfaces[ifid][1]
            out.append(CaptureRecord(units * 1_000_000_000 // per_second, direction, flags,
                                     data))
        pos += total                               # other blocks: skipped
    if not interfaces:
        raise ValueError(f"{path}: not a TLP capture (no interface)")
    if any(lt != LINKTYPE_USER0 for lt, _ in interfaces):
        raise ValueError(f"{path}: not a TLP capture (link type "
                         f"{next(lt for lt, _ in interfaces if lt != LINKTYPE_USER0)})")
    return out



def iter_tlps(records: Sequence[CaptureRecord]) -> Iterator[Tlp]:
    """The TLPs of clear (unprotected) records, decoded (for tests and tools)."""
    for rec in records:
        if not is_protected(rec.data):
            yield Tlp.decode(rec.data)
