"""The PCIe link between the device and its root port, with taps (docs/design.md decision 10).

The device holds only a :class:`LinkEndpoint`.  Its DMA requests cross the
:class:`Link` as TLPs (:mod:`teeio.tlp`) to the root port (``root_port.py``), the only
part that maps guest RAM::

    device DMA engine                                                 guest RAM
      │ read/write                                                       ▲
    LinkEndpoint ── IdeTx ──► Link ──[fault taps]──[capture]──► RootPort: IdeRx, RID,
      (splits by MPS/MRRS)   ◄── IdeRx ◄── ... completions ... ◄──    windows, DmaMapSet

* **Splitting** (PCIe 6.x §2.2.2, §2.2.7, §2.3.1.1).  A write becomes MWr TLPs of at
  most Max_Payload_Size (MPS), a read MRd TLPs of at most Max_Read_Request_Size (MRRS);
  the root port answers each MRd with CplDs of at most MPS, every one but the last
  ending on a Read Completion Boundary (64 B).  Requests end on MPS/MRRS-aligned
  addresses, so none crosses a 4 KiB boundary (both sizes divide 4096).  MPS and MRRS
  are what the guest programs in the device's Device Control register (§7.5.3.4; MPS
  capped by Device Capabilities Max_Payload_Size Supported, §7.5.3.3): the device
  passes them in with :meth:`Link.set_payload_sizes` after every Device Control write
  and reset; a Link built on its own keeps the sizes it was given.
* **Tags** (§2.2.6.2).  Every MRd carries a tag the requester (the device's
  :class:`LinkEndpoint` for DMA, the root port for MMIO) allocates from the tags none of
  its outstanding requests uses (:class:`TagAllocator`), round-robin, so successive
  requests carry different tags: 8-bit tags (256 outstanding) with Extended Tag Field
  Enable set, else 5-bit tags (32 outstanding).  A completion is matched by Requester ID
  and tag; one that matches no outstanding request is an unexpected completion (§2.3.2):
  discarded and counted (``unexpected_completions`` in the endpoint's status).  Posted
  writes need no tag and carry 0.
* **IDE** (§6.33).  When the device's IDE stream is Secure every TLP is protected by the
  device's :class:`~teeio.ide.IdeTx` and checked by the root port's IdeRx; completions
  go the other way.  Otherwise TLPs cross in the clear with T=0.  A failed check makes
  the stream Insecure at the side that saw it, the TLP is discarded and an IDE Fail
  Message goes to the partner (here an out-of-band call, not a Msg TLP), which makes its
  stream Insecure too; both sides count it and call their ``on_ide_fail`` hooks.  A
  non-IDE TLP from a partner whose stream has started IDE on that sub-stream is such a
  failure as well (§6.33.6).
* **T bit** (§11.2.1).  The device's ``tee_dma`` hook says whether its DMA is
  TEE-originated (TDISP: the TDI in RUN on its bound stream).  T=1 needs a Secure
  stream: without one the request is refused at the device and never sent.
* **MMIO** (§11.2.1, docs/design.md decision 10).  CPU accesses to the device's TEE MMIO (BAR0)
  cross the link the other way: the root port sends MRd/MWr TLPs downstream
  (:meth:`Link.send_downstream`), protected on the device's Secure stream if there is
  one -- with T=1 when the TSM turned on private MMIO for the device -- and the
  endpoint hands each request to the device's completer (:class:`MmioCompleter`) and
  sends its completions (T echoed, same stream, CPL sub-stream) back upstream.  The
  same IDE checks apply at both ends: a failed check on a request makes the device's
  stream Insecure and sends an IDE Fail Message to the root port.  An Unsupported
  Request is a Cpl with status UR for a read, nothing for a posted write.
* **Taps.**  A capture file (:class:`CaptureWriter`, format below) gets every TLP as it
  crossed; fault injection (:class:`Fault`) flips a bit of the payload, address, T bit or
  requester ID, drops, or replays a selected TLP (the Nth of a direction, optionally
  filtered by a predicate).
* **Refusals.**  A refused MRd gets an Unsupported Request completion.  A posted write
  the root port refuses or discards (window check, IDE failure, unknown stream) has no
  completion; real hardware would only log it in the root port, here the root port also
  reports it back to the endpoint so the DMA engine can flag the job (the data never
  lands either way).  A TLP lost on the wire is, as on real links, noticed only through
  IDE (the next TLP's MAC fails) or, for a read, a completion timeout.  Any failed
  transfer raises :class:`LinkFault`, a :class:`~vfio_user_dev.dma.DmaFault`, so the
  engine's job ends with STATUS FAULT.
* **Clear fast path.**  With no Secure stream and no tap installed nobody can observe a
  TLP's bytes, so a transfer crosses as one descriptor (:meth:`RootPortPort.clear_write`
  / ``clear_read``): the root port applies the same per-TLP checks (arithmetically, to
  each MPS/MRRS piece) and touches memory once, as the engine did before the link
  existed; TLP counters are computed.  Everything else takes the wire path.
* **Wire path without objects.**  On the wire path TLPs are built, protected, checked and
  parsed a run at a time, as bytes (:func:`~teeio.tlp.memory_write_parts`,
  :meth:`~teeio.ide.IdeTx.protect_many`, :func:`~teeio.tlp.parse_ide_completions`,
  :meth:`~teeio.ide.IdeRx.open_many`): the same bytes and the same checks, in the same
  order, as the per-TLP :class:`~teeio.tlp.Tlp` code, which still handles every TLP the
  common case does not cover (a key-set switch, a failed check, anything malformed,
  clear TLPs).  IDE locks are taken once per run, not per TLP.  The taps build a
  :class:`TlpView` per TLP only when a fault is armed or a capture is open.

Capture file format: pcapng (IETF draft-ietf-opsawg-pcapng, "PCAP Next Generation
Dump File Format"), little-endian, so tcpdump, tshark and Wireshark open it:

* a Section Header Block (§4.1; shb_userappl "teeio-emu");
* one Interface Description Block (§4.2): link type 147 ``LINKTYPE_USER0``, snaplen
  65535, ``if_name`` "pcie-link", ``if_description``, ``if_tsresol`` 9 (nanoseconds).
  The tcpdump link-layer registry has no link type for PCIe TLPs, so one of the
  user-reserved DLTs (147..162) is the honest choice; ``tools/teeio_tlp.lua`` is a
  Wireshark dissector registered on it;
* one Enhanced Packet Block (§4.3) per TLP: the wall-clock time it crossed, and the TLP
  exactly as it crossed as the packet data (for IDE TLPs: prefix + header in clear,
  ciphertext, 12-byte MAC), no pseudo-header.  The direction is in ``epb_flags``
  (§4.3.1, bits 1:0), seen from the root port, where a protocol analyser would sit:
  01 inbound = upstream (device -> root port), 10 outbound = downstream.  What the
  fault taps did to it, if anything, is in an ``opt_comment`` (§3.5)
  ``teeio: tampered,dropped,replayed`` (a subset): TAMPERED a fault changed it,
  DROPPED seen by the tap but not delivered, REPLAYED a duplicate the tap injected.

:func:`read_capture` reads it back, and also the older captures: a nanosecond pcap
(magic ``0xA1B23C4D``, link type 147) whose packets start with a 4-byte pseudo-header
(u8 direction 0 = upstream 1 = downstream, u8 flags bit 0 TAMPERED bit 1 DROPPED bit 2
REPLAYED, u16 0).  ``python -m vfio_user_dev.link FILE`` lists either.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from teeio.ide import MAC_LEN, IdeIntegrityError, IdeKeyStateError, IdeRx, IdeTx
from teeio.pcie.ide_cap import IdeCapability, StreamKind
from teeio.pcie.ide_cap import IdeStream as CapIdeStream
from teeio.platform_channel import StreamState
from teeio.tlp import (
    IDE_PREFIX_BYTE0,
    PREFIX_LEN,
    CplStatus,
    IdePrefix,
    SubStream,
    Tlp,
    TlpError,
    TlpType,
    memory_read_headers,
    memory_write_parts,
    parse_ide_completions,
)
from vfio_user_dev.dma import DmaFault

log = logging.getLogger(__name__)

DEFAULT_MPS = 256
DEFAULT_MRRS = 512
RCB = 64                        # Read Completion Boundary of the root port (§2.3.1.1)
TLP_SIZES = (128, 256, 512, 1024, 2048, 4096)   # legal MPS / MRRS values (§7.5.3.4)
MAX_OUTSTANDING = 256           # 8-bit tags (Extended Tag Field Enable set, §7.5.3.4)
TAGS_5BIT = 32                  # Extended Tag Field Enable clear: tags 0..31 (§2.2.6.2)
DEFAULT_REQUESTER_ID = 0x0100   # 01:00.0, the function behind the root port
ROOT_PORT_ID = 0x0008           # 00:01.0, the completer of every DMA read


# -- splitting ------------------------------------------------------------------------------

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
    if value not in TLP_SIZES:
        raise ValueError(f"{name} must be one of {', '.join(map(str, TLP_SIZES))}; got {value}")
    return value


# -- tags -------------------------------------------------------------------------------------

class TagAllocator:
    """The tags of one requester's outstanding non-posted requests (PCIe 6.x §2.2.6.2):
    each request gets a tag no other outstanding request of the requester carries, handed
    out round-robin so that successive requests carry different tags.  *space* is 256
    (8-bit tags) or 32 (5-bit tags: Extended Tag Field Enable clear)."""

    def __init__(self, space: int = MAX_OUTSTANDING) -> None:
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._next = 0
        self.space = MAX_OUTSTANDING
        self.set_space(space)

    def set_space(self, space: int) -> None:
        if space not in (TAGS_5BIT, MAX_OUTSTANDING):
            raise ValueError(f"tag space must be {TAGS_5BIT} or {MAX_OUTSTANDING}; got {space}")
        with self._lock:
            self.space = space
            self._next %= space

    @property
    def outstanding(self) -> int:
        return len(self._busy)

    def allocate(self, n: int) -> list[int]:
        """*n* free tags (ValueError if fewer are free), now outstanding."""
        with self._lock:
            if n > self.space - len(self._busy):
                raise ValueError(f"{n} tags wanted, {self.space - len(self._busy)} free")
            out: list[int] = []
            tag = self._next
            while len(out) < n:
                if tag not in self._busy and tag < self.space:
                    out.append(tag)
                tag = (tag + 1) % self.space
            self._busy.update(out)
            self._next = tag
            return out

    def free(self, tags: Sequence[int]) -> None:
        """*tags* are no longer outstanding (completed, or given up: completion timeout)."""
        with self._lock:
            self._busy.difference_update(tags)


def read_headers(requester_id: int, pieces: Sequence[tuple[int, int]],
                 tags: Sequence[int]) -> list[bytes]:
    """MRd headers for *pieces*, the i-th tagged ``tags[i]``
    (:func:`~teeio.tlp.memory_read_headers` for each run of consecutive tags)."""
    out: list[bytes] = []
    i = 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and tags[j] == tags[j - 1] + 1:
            j += 1
        out += memory_read_headers(requester_id, pieces[i:j], first_tag=tags[i])
        i = j
    return out


# -- directions, capture --------------------------------------------------------------------

class LinkDirection(enum.IntEnum):
    UPSTREAM = 0      # device -> root port
    DOWNSTREAM = 1    # root port -> device


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


# -- looking into wire bytes (for taps) ------------------------------------------------------

def is_protected(wire: bytes) -> bool:
    """Whether *wire* starts with the IDE prefix (in this model: an IDE-protected TLP)."""
    return wire[:1] == bytes((IDE_PREFIX_BYTE0,))


def prefix_stream_id(wire: bytes) -> int | None:
    """The Stream ID in *wire*'s IDE prefix (None: no valid prefix)."""
    try:
        return IdePrefix.decode(wire[:PREFIX_LEN]).stream_id
    except TlpError:
        return None


def peek(wire: bytes) -> Tlp | None:
    """The TLP's header fields (payload zeroed: it may be ciphertext), or None if the
    header does not parse."""
    try:
        hlen = Tlp.header_length(wire)
        head = wire[:hlen]
        off = PREFIX_LEN if is_protected(wire) else 0
        t = TlpType(head[off])
        n = (head[off + 2] & 3) << 8 | head[off + 3]
        size = ((n or 1024) * 4) if t.has_data else 0
        return Tlp.decode(head + bytes(size))
    except (TlpError, ValueError, IndexError):
        return None


def _t_bit_mask() -> int:
    a = IdePrefix(SubStream.PR, 0, t_bit=False).encode()[1]
    b = IdePrefix(SubStream.PR, 0, t_bit=True).encode()[1]
    return a ^ b


# -- fault injection --------------------------------------------------------------------------

class FaultKind(enum.Enum):
    FLIP_PAYLOAD = "flip-payload"            # bit `bit` of the payload (ciphertext under IDE)
    FLIP_ADDRESS = "flip-address"            # bit `bit` of a request's address (default 12)
    FLIP_T_BIT = "flip-t-bit"                # the T bit of the IDE prefix
    FLIP_REQUESTER_ID = "flip-requester-id"  # bit `bit` of the Requester ID
    DROP = "drop"                            # not delivered
    REPLAY = "replay"                        # delivered, then delivered again


@dataclass(frozen=True)
class TlpView:
    """What a fault predicate sees of a TLP on the wire."""

    direction: LinkDirection
    index: int                 # 1-based count of the TLPs the taps saw in this direction
    wire: bytes = field(repr=False)
    tlp: Tlp | None = field(repr=False)   # header fields (payload zeroed), None if malformed

    @property
    def protected(self) -> bool:
        return is_protected(self.wire)


@dataclass
class Fault:
    """One armed fault: acts on the *nth* (1-based) TLP in *direction*, counted from when
    it was armed, among those *match* accepts (all by default) and that have the field
    the fault changes (a payload, an address, an IDE prefix).  It fires once."""

    kind: FaultKind
    direction: LinkDirection = LinkDirection.UPSTREAM
    nth: int = 1
    match: Callable[[TlpView], bool] | None = None
    bit: int | None = None
    seen: int = 0
    fired: list[TlpView] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.fired)


def _field_span(kind: FaultKind, wire: bytes, tlp: Tlp | None) -> tuple[int, int] | None:
    """(start, end) byte offsets of the field *kind* changes, or None if *wire* has none."""
    if kind in (FaultKind.DROP, FaultKind.REPLAY):
        return (0, len(wire))
    if tlp is None:
        return None
    off = PREFIX_LEN if is_protected(wire) else 0
    hlen = off + tlp.type.header_dw * 4
    if kind is FaultKind.FLIP_PAYLOAD:
        end = len(wire) - (MAC_LEN if off else 0)
        return (hlen, end) if end > hlen else None
    if kind is FaultKind.FLIP_ADDRESS:
        return (off + 8, hlen) if tlp.type.is_request else None
    if kind is FaultKind.FLIP_T_BIT:
        return (1, 2) if off else None
    if kind is FaultKind.FLIP_REQUESTER_ID:
        at = off + (4 if tlp.type.is_request else 8)
        return (at, at + 2)
    raise AssertionError(kind)


_DEFAULT_BIT = {FaultKind.FLIP_PAYLOAD: 0, FaultKind.FLIP_ADDRESS: 12,
                FaultKind.FLIP_REQUESTER_ID: 0}


def _flip(kind: FaultKind, wire: bytes, span: tuple[int, int], bit: int | None) -> bytes:
    out = bytearray(wire)
    start, end = span
    if kind is FaultKind.FLIP_T_BIT:
        out[1] ^= _t_bit_mask()
        return bytes(out)
    b = _DEFAULT_BIT[kind] if bit is None else bit
    # payload: bit 0 is the LSB of its first byte; header fields are big-endian: bit 0 is
    # the field's LSB, in its last byte.
    byte = start + b // 8 if kind is FaultKind.FLIP_PAYLOAD else end - 1 - b // 8
    if not start <= byte < end:
        raise ValueError(f"{kind.value}: bit {b} is outside the field ({end - start} bytes)")
    out[byte] ^= 1 << (b % 8)
    return bytes(out)


# -- IDE stream ends --------------------------------------------------------------------------

class StreamPort(Protocol):
    """One side's IDE stream as the link uses it (:class:`IdeStream`, or a stream block of
    the device's IDE capability through :class:`CapStreamPort`)."""

    @property
    def stream_id(self) -> int: ...

    @property
    def tx(self) -> IdeTx: ...

    @property
    def rx(self) -> IdeRx: ...

    def is_secure(self) -> bool: ...

    def mark_insecure(self, reason: str) -> None:
        """An IDE check failed here: the stream goes Insecure (§6.33.6)."""

    def fail_message(self, reason: str) -> None:
        """The partner's IDE Fail Message arrived for this stream."""


class CapStreamPort:
    """A stream block of the device's IDE extended capability (:mod:`teeio.pcie.ide_cap`)
    as a :class:`StreamPort`: its Secure state, its engines (which the capability replaces
    when the Stream ID changes, so they are looked up every time), failures reported to
    the capability (Status: Insecure; b31 for a received IDE Fail Message)."""

    def __init__(self, block: CapIdeStream) -> None:
        self.block = block

    @property
    def stream_id(self) -> int:
        return self.block.stream_id

    @property
    def tx(self) -> IdeTx:
        return self.block.tx

    @property
    def rx(self) -> IdeRx:
        return self.block.rx

    def is_secure(self) -> bool:
        return self.block.secure

    def mark_insecure(self, reason: str) -> None:
        self.block.cap.report_failure(self.block, reason)

    def fail_message(self, reason: str) -> None:
        self.block.cap.report_fail_message(self.block.stream_id)
        self.mark_insecure(reason)


def capability_streams(cap: IdeCapability) -> list[StreamPort]:
    """The device's streams in the order its DMA prefers them: Selective IDE streams (a
    Default Stream first), then the Link IDE stream."""
    blocks = sorted(cap.streams, key=lambda b: (b.kind != StreamKind.SELECTIVE,
                                                not b.default_stream, b.index))
    return [CapStreamPort(b) for b in blocks]


class IdeStream:
    """One side of a Selective IDE stream: Tx and Rx key state, Enable, and the Secure /
    Insecure state (§6.33.4, §7.9.26: Secure once enabled with a GO key set in every
    sub-stream and direction; any failure makes it Insecure until it is reset and keyed
    again)."""

    def __init__(self, stream_id: int, rid_base: int = 0, rid_limit: int = 0xFFFF) -> None:
        self.stream_id = stream_id
        self.rid_base = rid_base
        self.rid_limit = rid_limit
        self.tx = IdeTx(stream_id)
        self.rx = IdeRx(stream_id)
        self.enabled = False
        self.insecure_reason: str | None = None

    def keys_ready(self) -> bool:
        return self.tx.all_active() and self.rx.all_active()

    def is_secure(self) -> bool:
        return (self.enabled and self.insecure_reason is None
                and self.rx.insecure_reason is None and self.keys_ready())

    def mark_insecure(self, reason: str) -> None:
        if self.insecure_reason is None:
            self.insecure_reason = reason

    def fail_message(self, reason: str) -> None:
        self.mark_insecure(reason)

    def reset(self) -> None:
        """Keys invalidated, Enable clear, Insecure reason forgotten (re-establishment)."""
        self.tx.reset()
        self.rx.reset()
        self.enabled = False
        self.insecure_reason = None

    def state(self) -> StreamState:
        return StreamState.SECURE if self.is_secure() else StreamState.INSECURE


# -- the two ends -----------------------------------------------------------------------------

class LinkFault(DmaFault):
    """A DMA transfer over the link failed (refused, Unsupported Request, completion
    timeout, IDE failure); the data did not (all) land."""


class LinkError(enum.Enum):
    """An error the device's end of the link detected (reported to ``on_error``)."""

    IDE_CHECK_FAILED = "ide_check_failed"        # §6.33.6: the TLP was discarded
    UNSUPPORTED_REQUEST = "unsupported_request"  # §2.3.1: the request was refused (UR)


@dataclass(frozen=True)
class IdeFailEvent:
    """An IDE failure as one side saw it: ``detected`` by its own check, or ``message``:
    the partner's IDE Fail Message."""

    side: str            # "device" or "root_port"
    stream_id: int
    reason: str
    how: str             # "detected" or "message"
    time: float


@dataclass
class RootPortReply:
    """What the root port sends back for a burst: completions (wire bytes) and the
    posted requests it refused (reported to the endpoint, see the module doc)."""

    completions: list[bytes] = field(default_factory=list)
    refused_posted: list[str] = field(default_factory=list)


class RootPortPort(Protocol):
    """The upstream end of the link (``root_port.RootPort``)."""

    def receive(self, wires: Sequence[bytes]) -> RootPortReply: ...

    def clear_write(self, requester_id: int, address: int, data: bytes, mps: int) -> None: ...

    def clear_read(self, requester_id: int, address: int, length: int, mrrs: int) -> bytes: ...

    def ide_fail_message(self, stream_id: int, reason: str) -> None: ...

    def attach_link(self, mps: int, ide_fail_sink: Callable[[int, str], None],
                    downstream: Callable[[Sequence[bytes]], list[bytes]] | None = None,
                    mrrs: int = DEFAULT_MRRS) -> None: ...


@dataclass(frozen=True)
class MmioRequest:
    """A memory request to the device as its completer sees it (PCIe 6.x §11.2.1)."""

    write: bool
    requester_id: int
    address: int                    # byte address of the first enabled byte
    length: int
    data: bytes = field(default=b"", repr=False)    # MWr: the bytes to write
    t_bit: bool = False
    stream_id: int | None = None    # the IDE stream it arrived on; None: in the clear


class MmioCompleter(Protocol):
    """The device's side of MMIO: serve one request."""

    def mmio_request(self, req: MmioRequest) -> bytes | None:
        """The bytes read (MRd) or ``b""`` (MWr done); None: Unsupported Request."""
        ...


@dataclass
class _Pending:
    address: int
    length: int
    data: bytearray = field(default_factory=bytearray)
    status: CplStatus | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is not None or self.status is not None and (
            self.status != CplStatus.SC or len(self.data) == self.length)


class LinkEndpoint:
    """The device's end of the link: DMA reads and writes as TLPs, IDE when Secure."""

    def __init__(self, requester_id: int = DEFAULT_REQUESTER_ID) -> None:
        self.requester_id = requester_id
        self.link: Link | None = None
        self._streams: Callable[[], Sequence[StreamPort]] = list
        # Held around the per-TLP IDE work (protect, check, failure reporting), never
        # around memory access: the lock under which the device's IDE_KM changes keys.
        self._ide_lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        self.tee_dma: Callable[[], bool] = lambda: False
        self.on_ide_fail: list[Callable[[IdeFailEvent], None]] = []
        #: errors the device logs (AER, PCIe 6.x §6.2): an IDE check failed on a TLP it
        #: received, or it completed a request with UR; with the TLP's header
        self.on_error: list[Callable[[LinkError, bytes], None]] = []
        self.ide_failures: list[IdeFailEvent] = []
        self._started: set[tuple[int, SubStream]] = set()
        self._pending: dict[int, _Pending] = {}
        self.tags = TagAllocator()      # the tags of its outstanding DMA reads
        self.counters = {"transfers": 0, "faults": 0, "ur_completions": 0,
                         "completion_timeouts": 0, "unexpected_completions": 0,
                         "refused_posted": 0, "ide_tlps_tx": 0, "ide_tlps_rx": 0,
                         "mmio_requests": 0, "mmio_ur": 0, "mmio_discarded": 0}
        self.mmio_completer: MmioCompleter | None = None
        self.log = log.getChild(f"ep.{requester_id >> 8:02x}:{requester_id >> 3 & 0x1F:02x}."
                                f"{requester_id & 7}")

    # -- configuration ------------------------------------------------------------------
    def attach_stream(self, stream: StreamPort | None,
                      lock: contextlib.AbstractContextManager[object] | None = None) -> None:
        """The one IDE stream the device's DMA uses while it is Secure (None: no IDE).
        *lock*: the one its key management holds while it changes the stream's keys."""
        self._streams = (lambda: [stream]) if stream is not None else list
        self._ide_lock = lock if lock is not None else contextlib.nullcontext()
        self._started.clear()

    def attach_ide_capability(self, cap: IdeCapability,
                              lock: contextlib.AbstractContextManager[object] | None = None
                              ) -> None:
        """Use the streams of the device's IDE capability: DMA goes on the first Secure one
        in :func:`capability_streams` order.  *lock*: the one held while IDE_KM and config
        writes change the capability (the device lock)."""
        self._streams = lambda: capability_streams(cap)
        self._ide_lock = lock if lock is not None else contextlib.nullcontext()
        self._started.clear()

    def set_extended_tags(self, enabled: bool) -> None:
        """Extended Tag Field Enable as the guest programmed it (PCIe 6.x §7.5.3.4 bit 8):
        8-bit tags when set, else 5-bit tags (at most 32 reads outstanding, §2.2.6.2)."""
        self.tags.set_space(MAX_OUTSTANDING if enabled else TAGS_5BIT)

    def _secure_stream(self) -> StreamPort | None:
        for s in self._streams():
            if s.is_secure():
                return s
            self._started = {k for k in self._started if k[0] != s.stream_id}
        return None

    def _stream(self, stream_id: int) -> StreamPort | None:
        """The stream with *stream_id*, a Secure one first (unconfigured blocks share ID 0)."""
        match = [s for s in self._streams() if s.stream_id == stream_id]
        return next((s for s in match if s.is_secure()), match[0] if match else None)

    def _secure_stream_id(self, stream_id: int) -> StreamPort | None:
        for s in self._streams():
            if s.stream_id == stream_id and s.is_secure():
                return s
        return None

    def _require_link(self) -> Link:
        if self.link is None:
            raise LinkFault("device is not connected to a link")
        return self.link

    # -- DMA ----------------------------------------------------------------------------
    def write(self, address: int, data: bytes, *, t_bit: bool | None = None,
              stream_id: int | None = None) -> None:
        """Posted write of *data* at guest *address*; LinkFault if any part did not land.
        *t_bit* (default: the ``tee_dma`` hook) and *stream_id* (default: the first
        Secure stream) choose how it is sent; a named stream must be Secure."""
        if not data:
            return
        _check_range(address, len(data))
        link = self._require_link()
        self.counters["transfers"] += 1
        stream, t_bit = self._route(t_bit, stream_id)
        if stream is None and not link.tapped:
            link.clear_write(self.requester_id, address, data)
            return
        headers, payloads = memory_write_parts(self.requester_id, address, data,
                                               split(address, len(data), link.mps))
        with self._ide_lock:
            wires = self._encode_many(SubStream.PR, headers, payloads, stream, t_bit)
        reply = link.send_upstream(wires)
        self._check_after(stream, reply)

    def read(self, address: int, length: int, *, t_bit: bool | None = None,
             stream_id: int | None = None) -> bytes:
        """*length* bytes at guest *address*; LinkFault if any part could not be read.
        *t_bit* and *stream_id* as for :meth:`write`."""
        if length <= 0:
            return b""
        _check_range(address, length)
        link = self._require_link()
        self.counters["transfers"] += 1
        stream, t_bit = self._route(t_bit, stream_id)
        if stream is None and not link.tapped:
            return link.clear_read(self.requester_id, address, length)
        pieces = split(address, length, link.mrrs)
        out = bytearray()
        pos = 0
        while pos < len(pieces):
            # At most as many MRds outstanding as there are tags (Extended Tag Field Enable
            # may change between batches).
            batch = pieces[pos:pos + self.tags.space]
            pos += len(batch)
            try:
                tags = self.tags.allocate(len(batch))
            except ValueError as exc:
                self.counters["faults"] += 1
                raise LinkFault(f"MRd not sent: {exc}") from None
            try:
                self._pending = {tag: _Pending(a, n) for tag, (a, n) in zip(tags, batch,
                                                                            strict=True)}
                headers = read_headers(self.requester_id, batch, tags)
                with self._ide_lock:
                    wires = self._encode_many(SubStream.NPR, headers, [b""] * len(headers),
                                              stream, t_bit)
                reply = link.send_upstream(wires)
                self._check_after(stream, reply)
                for tag in tags:
                    out += self._take(tag)
            finally:
                # Completed, or given up (completion timeout): the tags are free again.
                self._pending = {}
                self.tags.free(tags)
        return bytes(out)

    def _route(self, t_bit: bool | None = None,
               stream_id: int | None = None) -> tuple[StreamPort | None, bool]:
        with self._ide_lock:
            if stream_id is None:
                stream = self._secure_stream()
            else:
                stream = self._secure_stream_id(stream_id)
                if stream is None:
                    self.counters["faults"] += 1
                    raise LinkFault(f"IDE stream {stream_id} is not Secure: not sent")
        if t_bit is None:
            t_bit = self.tee_dma()
        if t_bit and stream is None:
            self.counters["faults"] += 1
            raise LinkFault("T=1 DMA needs a Secure IDE stream (§11.2.1); none: not sent")
        return stream, t_bit

    def _encode_many(self, substream: SubStream, headers: Sequence[bytes],
                     payloads: Sequence[bytes | memoryview], stream: StreamPort | None,
                     t_bit: bool) -> list[bytes]:
        """The wire bytes of a run of requests: clear (T=0; T=1 never gets here without a
        stream), or protected on *stream* with *t_bit*.  Called under the IDE lock."""
        if stream is None:
            return [h + p for h, p in zip(headers, payloads, strict=True)]
        try:
            wires = stream.tx.protect_many(substream, t_bit, headers, payloads,
                                           stream.stream_id)
        except IdeKeyStateError as exc:
            raise LinkFault(f"IDE stream {stream.stream_id}: cannot protect: {exc}") from None
        self.counters["ide_tlps_tx"] += len(wires)
        return wires

    def _check_after(self, stream: StreamPort | None, reply: RootPortReply) -> None:
        if reply.refused_posted:
            self.counters["refused_posted"] += len(reply.refused_posted)
            self.counters["faults"] += 1
            raise LinkFault(f"root port refused {len(reply.refused_posted)} posted TLP(s): "
                            f"{reply.refused_posted[0]}")
        if stream is not None and not stream.is_secure():
            self.counters["faults"] += 1
            raise LinkFault(f"IDE stream {stream.stream_id} went Insecure during the transfer")

    def _take(self, tag: int) -> bytearray:
        p = self._pending[tag]
        if p.status == CplStatus.SC and len(p.data) == p.length and p.error is None:
            return p.data
        where = f"MRd tag {tag} {p.address:#x}+{p.length}"
        if p.error is not None:
            self.counters["faults"] += 1
            raise LinkFault(f"{where}: {p.error}")
        if p.status is None or (p.status == CplStatus.SC and len(p.data) != p.length):
            self.counters["completion_timeouts"] += 1
            self.counters["faults"] += 1
            raise LinkFault(f"{where}: completion timeout ({len(p.data)} of {p.length} bytes)")
        if p.status != CplStatus.SC:
            self.counters["ur_completions"] += 1
            self.counters["faults"] += 1
            raise LinkFault(f"{where}: completion status {p.status.name}")
        return p.data

    # -- MMIO: requests from the root port ------------------------------------------------
    def receive_requests(self, wires: Sequence[bytes]) -> list[bytes]:
        """Memory requests from the root port (CPU MMIO): each goes through the IDE checks
        of :meth:`_ingress`, then to :attr:`mmio_completer`; returns the completions (wire
        bytes) for the reads, on the request's stream with its T bit (§11.2.1)."""
        out: list[bytes] = []
        for wire in wires:
            with self._ide_lock:
                tlp = self._ingress(wire, "mmio_discarded")
            if tlp is None:
                continue
            if not tlp.type.is_request:
                self.counters["mmio_discarded"] += 1
                self.log.warning("unexpected %s from the root port: discarded", tlp.type.name)
                continue
            self.counters["mmio_requests"] += 1
            write = tlp.type.has_data
            req = MmioRequest(write, tlp.requester_id, tlp.byte_address, tlp.request_byte_count,
                              tlp.payload_bytes() if write else b"", tlp.t_bit, tlp.stream_id)
            result = (self.mmio_completer.mmio_request(req)
                      if self.mmio_completer is not None else None)
            if result is None:
                self.counters["mmio_ur"] += 1
                self._error(LinkError.UNSUPPORTED_REQUEST, _bare_header(tlp))
            if write:
                continue            # posted: a UR is only logged by the completer (§2.3.1)
            cpl = (Tlp.completion_for(tlp, self.requester_id, result) if result is not None
                   else Tlp.completion_for(tlp, self.requester_id, status=CplStatus.UR))
            with self._ide_lock:
                wire_out = self._encode_completion(cpl)
            if wire_out is not None:
                out.append(wire_out)
        return out

    def _encode_completion(self, cpl: Tlp) -> bytes | None:
        if cpl.stream_id is None:
            return cpl.encode()
        stream = self._secure_stream_id(cpl.stream_id)
        if stream is None:
            self.counters["mmio_discarded"] += 1
            self.log.warning("completion not sent: IDE stream %d is no longer Secure",
                             cpl.stream_id)
            return None
        try:
            wire = stream.tx.protect(cpl)
        except IdeKeyStateError as exc:
            self.counters["mmio_discarded"] += 1
            self.log.warning("completion not sent: %s", exc)
            return None
        self.counters["ide_tlps_tx"] += 1
        return wire

    # -- from the link --------------------------------------------------------------------
    def receive(self, wires: Sequence[bytes]) -> None:
        i, n = 0, len(wires)
        while i < n:
            i = self._receive_run(wires, i)
            if i < n:
                with self._ide_lock:
                    tlp = self._ingress(wires[i])
                if tlp is not None:
                    self._completion(tlp)
                i += 1

    def _receive_run(self, wires: Sequence[bytes], start: int) -> int:
        """Take the run of ordinary IDE completions at *start* (successful CplDs on a Secure
        stream, each passing its checks) without building TLP objects; what :meth:`_ingress`
        and :meth:`_completion` do for each, in the same order.  Returns where the run
        stopped: the TLP there (if any) goes through :meth:`_ingress`."""
        first = wires[start]
        if len(first) <= PREFIX_LEN or first[0] != IDE_PREFIX_BYTE0:
            return start
        with self._ide_lock:
            stream = self._stream(first[2])
            if stream is None or not stream.is_secure():
                return start
            rx = stream.rx
            fields = parse_ide_completions(wires, start, rx.stream_id)
            plains = rx.open_many(wires, start, start + len(fields)) if fields else []
            if not plains:
                return start
            self._started.add((stream.stream_id, SubStream.CPL))
            self.counters["ide_tlps_rx"] += len(plains)
        del fields[len(plains):]
        pending, rid = self._pending, self.requester_id
        for i, ((requester, tag, count, lower), plain) in enumerate(zip(fields, plains,
                                                                        strict=True)):
            p = pending.get(tag)
            if p is not None and requester == rid and p.error is None and p.status is None:
                have = len(p.data)
                lead = lower & 3
                if (count == p.length - have and lower == (p.address + have) & 0x7F
                        and lead < len(plain)):
                    p.data += plain[lead:lead + count]
                    p.status = CplStatus.SC if len(p.data) == p.length else None
                    continue
            # Anything unusual: the per-TLP code decides (and records) exactly as ever.
            wire = wires[start + i]
            self._completion(Tlp.decode(bytes(wire[:len(wire) - len(plain) - MAC_LEN])
                                        + bytes(plain)))
        return start + len(plains)

    def _ingress(self, wire: bytes, discard: str = "unexpected_completions") -> Tlp | None:
        """IDE check and decode of one TLP from the root port; None: discarded (counted
        under *discard*)."""
        if is_protected(wire):
            sid = prefix_stream_id(wire)
            stream = None if sid is None else self._secure_stream_id(sid)
            if stream is None:
                self.counters[discard] += 1
                self.log.warning("IDE TLP but the device's stream is not Secure: discarded")
                return None
            try:
                tlp = stream.rx.unprotect(wire)
            except IdeIntegrityError as exc:
                self._ide_failed(stream, exc.reason, wire[PREFIX_LEN:PREFIX_LEN + 16])
                return None
            self._started.add((stream.stream_id, tlp.substream))
            self.counters["ide_tlps_rx"] += 1
            return tlp
        try:
            tlp = Tlp.decode(wire)
        except TlpError as exc:
            self.counters[discard] += 1
            self.log.warning("malformed TLP discarded: %s", exc)
            return None
        for stream in self._streams():
            if (stream.stream_id, tlp.substream) in self._started and stream.is_secure():
                self._ide_failed(stream, f"non-IDE {tlp.type.name} on {tlp.substream.name} "
                                         "after IDE started", _bare_header(tlp))
                return None
        return tlp

    def _ide_failed(self, stream: StreamPort, reason: str, header: bytes = b"") -> None:
        self._error(LinkError.IDE_CHECK_FAILED, header)
        stream.mark_insecure(reason)
        self._record(IdeFailEvent("device", stream.stream_id, reason, "detected", time.time()))
        if self.link is not None:
            self.link.ide_fail_message_upstream(stream.stream_id, reason)

    def ide_fail_message(self, stream_id: int, reason: str) -> None:
        """The root port's IDE Fail Message: the stream is Insecure here too (§6.33.6)."""
        with self._ide_lock:
            stream = self._stream(stream_id)
            if stream is not None:
                stream.fail_message(f"IDE Fail Message from the root port: {reason}")
        self._record(IdeFailEvent("device", stream_id, reason, "message", time.time()))

    def _error(self, kind: LinkError, header: bytes) -> None:
        for fn in list(self.on_error):
            try:
                fn(kind, header)
            except Exception:
                self.log.exception("link error hook failed")

    def _record(self, ev: IdeFailEvent) -> None:
        self.ide_failures.append(ev)
        del self.ide_failures[:-64]
        self.log.warning("IDE stream %d failed (%s): %s", ev.stream_id, ev.how, ev.reason)
        for fn in list(self.on_ide_fail):
            try:
                fn(ev)
            except Exception:
                self.log.exception("IDE fail hook failed")

    def _completion(self, tlp: Tlp) -> None:
        p = self._pending.get(tlp.tag) if tlp.type.is_completion else None
        if p is None or tlp.requester_id != self.requester_id or p.complete:
            self.counters["unexpected_completions"] += 1
            self.log.warning("unexpected %s tag %d for %#06x: discarded", tlp.type.name,
                             tlp.tag, tlp.requester_id)
            return
        if tlp.status != CplStatus.SC:
            p.status = tlp.status
            return
        remaining = p.length - len(p.data)
        expect_lower = (p.address + len(p.data)) & 0x7F
        if tlp.byte_count != remaining or tlp.lower_address != expect_lower:
            p.error = (f"malformed completion (byte count {tlp.byte_count}, lower address "
                       f"{tlp.lower_address:#x}; expected {remaining}, {expect_lower:#x})")
            return
        chunk = tlp.payload_bytes()
        if not chunk or len(chunk) > remaining:
            p.error = f"completion carries {len(chunk)} bytes, {remaining} remain"
            return
        p.data += chunk
        p.status = CplStatus.SC if len(p.data) == p.length else None

    def status(self) -> dict[str, object]:
        with self._ide_lock:
            streams = [{"id": s.stream_id, "state": StreamState.SECURE if s.is_secure()
                        else StreamState.INSECURE}
                       for s in self._streams()]
        return {
            "requester_id": self.requester_id,
            "streams": streams,
            "tag_space": self.tags.space,
            **self.counters,
            "ide_failures": len(self.ide_failures),
            "last_ide_failure": (self.ide_failures[-1].reason if self.ide_failures else None),
        }


def _bare_header(tlp: Tlp) -> bytes:
    """*tlp*'s header without its IDE prefix (what an error Header Log records)."""
    head = tlp.header()
    return head[PREFIX_LEN:] if tlp.stream_id is not None else head


def _check_range(address: int, length: int) -> None:
    if address < 0 or address + length > 1 << 64:
        raise LinkFault(f"bad DMA range {address:#x}+{length:#x}")


class Link:
    """Joins a :class:`LinkEndpoint` (downstream) and a root port (upstream).

    *mps* and *mrrs* are the sizes TLPs are split by until :meth:`set_payload_sizes`
    changes them (the device does after every Device Control write and reset)."""

    def __init__(self, endpoint: LinkEndpoint, root_port: RootPortPort, *,
                 mps: int = DEFAULT_MPS, mrrs: int = DEFAULT_MRRS,
                 capture: CaptureWriter | None = None) -> None:
        self.mps = check_tlp_size("Max_Payload_Size", mps)
        self.mrrs = check_tlp_size("Max_Read_Request_Size", mrrs)
        self.endpoint = endpoint
        self.root_port = root_port
        self.capture = capture
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self.index = {d: 0 for d in LinkDirection}
        self.counters = {f"tlps_{d.name.lower()}": 0 for d in LinkDirection}
        self.counters.update({f"bytes_{d.name.lower()}": 0 for d in LinkDirection})
        self.counters.update(dropped=0, tampered=0, replayed=0, ide_fail_messages_up=0,
                             ide_fail_messages_down=0, clear_transfers=0)
        self.counters.update(mmio_bursts=0)
        self.counters.update(payload_size_changes=0)
        endpoint.link = self
        root_port.attach_link(self.mps, self.ide_fail_message_downstream,
                              self.send_downstream, self.mrrs)

    def set_payload_sizes(self, mps: int, mrrs: int) -> None:
        """The effective Max_Payload_Size and Max_Read_Request_Size from now on (PCIe 6.x
        §7.5.3.4): DMA writes and the root port's completions are split by *mps*, DMA
        reads (and the root port's MMIO reads) by *mrrs*.  A transfer already under way
        keeps the sizes it started with."""
        mps = check_tlp_size("Max_Payload_Size", mps)
        mrrs = check_tlp_size("Max_Read_Request_Size", mrrs)
        if (mps, mrrs) == (self.mps, self.mrrs):
            return
        log.info("link payload sizes: MPS %d -> %d, MRRS %d -> %d", self.mps, mps,
                 self.mrrs, mrrs)
        self.mps, self.mrrs = mps, mrrs
        self.counters["payload_size_changes"] += 1
        self.root_port.attach_link(mps, self.ide_fail_message_downstream,
                                   self.send_downstream, mrrs)

    @property
    def tapped(self) -> bool:
        """Whether something looks at TLP bytes (a capture or an armed fault)."""
        return self.capture is not None or any(not f.done for f in self.faults)

    # -- taps ---------------------------------------------------------------------------
    def inject(self, fault: Fault) -> Fault:
        if fault.nth < 1:
            raise ValueError("Fault.nth counts from 1")
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _tap(self, direction: LinkDirection, wires: Sequence[bytes]) -> list[bytes]:
        name = direction.name.lower()
        with self._lock:
            if self.capture is None and not any(not f.done and f.direction == direction
                                                for f in self.faults):
                # Nothing looks at these TLPs: count them, as the loop below would.
                self.index[direction] += len(wires)
                self.counters[f"tlps_{name}"] += len(wires)
                self.counters[f"bytes_{name}"] += sum(map(len, wires))
                return list(wires)
        out: list[bytes] = []
        for wire in wires:
            with self._lock:
                self.index[direction] += 1
                view = TlpView(direction, self.index[direction], wire,
                               peek(wire) if self.faults else None)
                armed = [f for f in self.faults if not f.done and f.direction == direction]
            copies = [wire]
            flags = CaptureFlags(0)
            for f in armed:
                span = _field_span(f.kind, wire, view.tlp)
                if span is None or (f.match is not None and not f.match(view)):
                    continue
                f.seen += 1
                if f.seen != f.nth:
                    continue
                f.fired.append(view)
                log.warning("fault %s on %s TLP #%d", f.kind.value, direction.name.lower(),
                            view.index)
                if f.kind is FaultKind.DROP:
                    copies = []
                elif f.kind is FaultKind.REPLAY:
                    copies = copies + copies[-1:]
                else:
                    copies = [_flip(f.kind, c, span, f.bit) for c in copies]
                    flags |= CaptureFlags.TAMPERED
            name = direction.name.lower()
            if not copies:
                self.counters["dropped"] += 1
                self._capture(direction, wire, flags | CaptureFlags.DROPPED)
            for i, c in enumerate(copies):
                extra = CaptureFlags.REPLAYED if i else CaptureFlags(0)
                if i:
                    self.counters["replayed"] += 1
                self._capture(direction, c, flags | extra)
                self.counters[f"tlps_{name}"] += 1
                self.counters[f"bytes_{name}"] += len(c)
                out.append(c)
            if flags & CaptureFlags.TAMPERED:
                self.counters["tampered"] += 1
        return out

    def _capture(self, direction: LinkDirection, wire: bytes, flags: int) -> None:
        if self.capture is not None:
            self.capture.write(direction, wire, flags)

    # -- crossing -------------------------------------------------------------------------
    def send_upstream(self, wires: Sequence[bytes]) -> RootPortReply:
        """A burst of TLPs from the device; the root port's completions are delivered to
        the endpoint before this returns."""
        reply = self.root_port.receive(self._tap(LinkDirection.UPSTREAM, wires))
        completions = self._tap(LinkDirection.DOWNSTREAM, reply.completions)
        if self.capture is not None:
            self.capture.flush()
        self.endpoint.receive(completions)
        return reply

    def send_downstream(self, wires: Sequence[bytes]) -> list[bytes]:
        """A burst of memory requests from the root port (MMIO) to the device; returns the
        device's completions as they arrive back upstream, through the taps both ways."""
        self.counters["mmio_bursts"] += 1
        requests = self._tap(LinkDirection.DOWNSTREAM, wires)
        completions = self._tap(LinkDirection.UPSTREAM, self.endpoint.receive_requests(requests))
        if self.capture is not None:
            self.capture.flush()
        return completions

    def clear_write(self, requester_id: int, address: int, data: bytes) -> None:
        self.counters["clear_transfers"] += 1
        self.counters["tlps_upstream"] += count_pieces(address, len(data), self.mps)
        self.counters["bytes_upstream"] += len(data)
        self.root_port.clear_write(requester_id, address, data, self.mps)

    def clear_read(self, requester_id: int, address: int, length: int) -> bytes:
        self.counters["clear_transfers"] += 1
        mrd, cpl = count_read_tlps(address, length, self.mrrs, self.mps)
        self.counters["tlps_upstream"] += mrd
        data = self.root_port.clear_read(requester_id, address, length, self.mrrs)
        self.counters["tlps_downstream"] += cpl
        self.counters["bytes_downstream"] += len(data)
        return data

    def ide_fail_message_upstream(self, stream_id: int, reason: str) -> None:
        self.counters["ide_fail_messages_up"] += 1
        self.root_port.ide_fail_message(stream_id, reason)

    def ide_fail_message_downstream(self, stream_id: int, reason: str) -> None:
        self.counters["ide_fail_messages_down"] += 1
        self.endpoint.ide_fail_message(stream_id, reason)

    def status(self) -> dict[str, object]:
        return {
            "mps": self.mps, "mrrs": self.mrrs,
            "capture": None if self.capture is None else str(self.capture.path),
            "faults_armed": sum(1 for f in self.faults if not f.done),
            **self.counters,
        }

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()


# -- capture listing --------------------------------------------------------------------------

def _describe(rec: CaptureRecord) -> str:
    tlp = peek(rec.data)
    what = "malformed"
    if tlp is not None:
        what = f"{tlp.type.name} rid={tlp.requester_id:04x} tag={tlp.tag}"
        if tlp.type.is_request:
            what += f" addr={tlp.address:#x} len={tlp.length_dw}DW"
        if tlp.stream_id is not None:
            what += f" ide stream={tlp.stream_id} K{tlp.key_set} T={int(tlp.t_bit)}"
    flags = ",".join((f.name or "?").lower() for f in CaptureFlags if rec.flags & f) or "-"
    return (f"{rec.timestamp_ns / 1e9:.6f} {'up  ' if rec.direction == 0 else 'down'} "
            f"{flags:8} {len(rec.data):5} {what}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vfio_user_dev.link",
                                 description="List a TLP capture file (--link-capture): "
                                             "pcapng, or the older pcap form.")
    ap.add_argument("capture", type=Path,
                    help="a --link-capture file (pcapng, or the older nanosecond pcap)")
    ap.add_argument("--hex", action="store_true", help="also print the TLP bytes")
    ns = ap.parse_args(argv)
    try:
        records = read_capture(ns.capture)
    except OSError as exc:
        print(f"error: {ns.capture}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for rec in records:
        print(_describe(rec))
        if ns.hex:
            print("    " + rec.data.hex())
    return 0


def iter_tlps(records: Sequence[CaptureRecord]) -> Iterator[Tlp]:
    """The TLPs of clear (unprotected) records, decoded (for tests and tools)."""
    for rec in records:
        if not is_protected(rec.data):
            yield Tlp.decode(rec.data)


if __name__ == "__main__":
    sys.exit(main())
