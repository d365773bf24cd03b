"""Transaction Layer Packets, non-flit mode (PCIe 6.x §2.2), with the IDE TLP prefix.

Only what the emulated link carries: memory reads and writes (32- and 64-bit address
forms) and completions with or without data, optionally preceded by the IDE
End-End TLP prefix (§6.33.4) that carries the T bit (§11.2.1) and the stream id.

All header fields are big-endian on the wire, as the spec figures draw them.
:meth:`Tlp.header` is the header as transmitted (prefix included): IDE uses exactly
these bytes as the AES-GCM additional authenticated data (§6.33.5).
:meth:`Tlp.encode` is ``header() || payload``; for an IDE TLP that is the plaintext
image the IDE engine (:mod:`teeio.ide`) protects; the MAC is not part of a :class:`Tlp`.

Memory request header, 64-bit form (4 DW; the 3-DW 32-bit form has no Address[63:32]
and carries Address[31:2] | PH in DW2)::

     +0              +1              +2              +3
     7 6 5 4 3 2 1 0 7 6 5 4 3 2 1 0 7 6 5 4 3 2 1 0 7 6 5 4 3 2 1 0
    +-----+---------+-+-----+-+-+-+-+-+-+---+---+---+---------------+
    | Fmt |  Type   |T| TC  |T|A|L|T|T|E|Att| AT|     Length        |  DW0
    |     |         |9|     |8|2|N|H|D|P|1:0|   |                   |
    +-----+---------+-+-----+-+-+-+-+-+-+---+---+-------------------+
    |         Requester ID          |    Tag[7:0]   |LastBE |1st BE |  DW1
    +-------------------------------+---------------+-------+-------+
    |                        Address[63:32]                         |  DW2
    +-----------------------------------------------------------+---+
    |                        Address[31:2]                      |PH |  DW3
    +-----------------------------------------------------------+---+

Completion header (3 DW; DW0 as above)::

    +-------------------------------+-----+-+-------+---------------+
    |         Completer ID          |CplSt|B| Byte Count[11:0]      |  DW1
    |                               |     |C|                       |
    +-------------------------------+-----+-+-------+-+-------------+
    |         Requester ID          |    Tag[7:0]   |R|LowerAddr 6:0|  DW2
    +-------------------------------+---------------+-+-------------+

IDE TLP prefix (End-End prefix, E2E type 0010b; §6.33.4)::

    +-----+---------+-+-----+-+-+-+-+---------------+---------------+
    |1 0 0|1 0 0 1 0|R| Sub |P|T|K|M|   Stream ID   |PR_Sent_Counter|
    |     |         | |Strm |       |               |               |
    +-----+---------+-+-----+-+-+-+-+---------------+---------------+

UNCONFIRMED: byte 0 (0x92) follows from the E2E prefix encoding, but the positions of
M/K/T/P/Sub-Stream inside byte 1 come from PCIe Figure 6-64, which we could not read
(reference notes §3.4, §8).  TSM and device both use this module, so the layout is
consistent end to end; it is not claimed to match silicon bit for bit.

Runs of TLPs can also be encoded and parsed without :class:`Tlp` objects
(:func:`memory_write_parts`, :func:`memory_read_headers`, :func:`completion_parts`,
:func:`parse_ide_requests`, :func:`parse_ide_completions`): the same bytes and fields,
for the link's fast path; the parsers accept only what :meth:`Tlp.decode` accepts and
leave anything unusual to it.

Simplifications: no TLP digest (TD must be 0 — IDE TLPs never carry ECRC), no
address translation (AT = 0), no TPH (TH = 0, PH = 0), no LN; 10-bit tags at most
(14-bit tags exist only in flit mode); no messages, I/O, configuration or atomic TLPs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

MAX_PAYLOAD = 4096          # bytes: Length = 0 encodes 1024 DW (§2.2.2)
ADDR32_LIMIT = 1 << 32
IDE_PREFIX_BYTE0 = 0x92     # Fmt 100b (prefix), Type 1_0010b (E2E, IDE)
PREFIX_LEN = 4


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


class SubStream(IntEnum):
    """IDE sub-streams (§6.33.4): one key and counter per sub-stream and direction."""

    PR = 0      # Posted Requests
    NPR = 1     # Non-Posted Requests
    CPL = 2     # Completions


def substream_of(tlp_type: TlpType) -> SubStream:
    """The IDE sub-stream a TLP type travels on (§6.33.4)."""
    if tlp_type in (TlpType.MWR32, TlpType.MWR64):
        return SubStream.PR
    if tlp_type in (TlpType.MRD32, TlpType.MRD64):
        return SubStream.NPR
    return SubStream.CPL


@dataclass(frozen=True)
class IdePrefix:
    """The NFM IDE TLP prefix (§6.33.4); bit layout in the module docstring (UNCONFIRMED)."""

    substream: SubStream
    stream_id: int
    key_set: int = 0            # K: 0 = K0, 1 = K1
    t_bit: bool = False         # T: TEE-originated (§11.2.1)
    mac: bool = True            # M: a MAC follows this TLP (always, no aggregation here)
    pcrc: bool = False          # P: PCRC present (not supported)
    pr_sent_counter: int = 0

    def __post_init__(self) -> None:
        _check_range("stream_id", self.stream_id, 0xFF)
        _check_range("key_set", self.key_set, 1)
        _check_range("pr_sent_counter", self.pr_sent_counter, 0xFF)
        if self.pcrc:
            raise TlpError("IDE prefix: PCRC (P bit) is not supported by this model")
        if not self.mac:
            raise TlpError("IDE prefix: M = 0 (aggregation) is not supported by this model")

    def encode(self) -> bytes:
        b1 = (int(self.substream) << 4 | int(self.pcrc) << 3 | int(self.t_bit) << 2
              | self.key_set << 1 | int(self.mac))
        return bytes((IDE_PREFIX_BYTE0, b1, self.stream_id, self.pr_sent_counter))

    @classmethod
    def decode(cls, data: bytes) -> IdePrefix:
        if len(data) != PREFIX_LEN:
            raise TlpDecodeError(f"IDE prefix must be {PREFIX_LEN} bytes", data, len(data))
        if data[0] != IDE_PREFIX_BYTE0:
            raise TlpDecodeError(f"not an IDE prefix: byte 0 is 0x{data[0]:02x}, "
                                 f"expected 0x{IDE_PREFIX_BYTE0:02x}", data, 0)
        b1 = data[1]
        if b1 & 0x80:
            raise TlpDecodeError("IDE prefix: reserved bit 7 of byte 1 is set", data, 1)
        try:
            sub = SubStream((b1 >> 4) & 0x7)
        except ValueError:
            raise TlpDecodeError(f"IDE prefix: unknown sub-stream {(b1 >> 4) & 7}",
                                 data, 1) from None
        try:
            return cls(substream=sub, stream_id=data[2], key_set=(b1 >> 1) & 1,
                       t_bit=bool(b1 & 0x04), mac=bool(b1 & 0x01), pcrc=bool(b1 & 0x08),
                       pr_sent_counter=data[3])
        except TlpError as e:
            raise TlpDecodeError(str(e), data, 1) from None


def _check_range(name: str, value: int, maximum: int, minimum: int = 0) -> None:
    if not minimum <= value <= maximum:
        raise TlpError(f"{name} = {value} out of range {minimum}..{maximum}")


def _span(be: int) -> tuple[int, int]:
    """(first enabled byte, one past the last enabled byte) of a 4-bit byte-enable."""
    lo = (be & -be).bit_length() - 1
    return lo, be.bit_length()


@dataclass(frozen=True)
class Tlp:
    """One TLP.

    * Memory requests: ``address`` is the DW-aligned address; ``first_be``/``last_be`` are
      the byte enables (``last_be=None`` means "the usual": 0 for 1 DW, 0xF otherwise,
      and is what decode returns for that value).  MWr: ``data`` is the DW-padded payload
      and ``length`` must stay 0 (derived).  MRd: ``length`` is the DW count requested.
      Use :meth:`memory_write` / :meth:`memory_read` for byte-granular addresses.
    * Completions: ``requester_id``/``tag`` echo the request; ``completer_id``, ``status``,
      ``byte_count`` (1..4096, remaining bytes), ``lower_address``; ``address`` stays 0.
    * IDE: ``stream_id`` not None adds the IDE prefix with ``key_set``, ``t_bit`` and
      ``pr_sent_counter``.  In non-flit mode T exists only in that prefix, so a TLP with
      ``t_bit`` and no stream cannot be encoded.
    """

    type: TlpType
    requester_id: int
    tag: int
    address: int = 0
    data: bytes = b""
    t_bit: bool = False
    completer_id: int = 0
    length: int = 0
    byte_count: int = 0
    lower_address: int = 0
    status: CplStatus = CplStatus.SC
    bcm: bool = False
    first_be: int = 0xF
    last_be: int | None = None
    tc: int = 0
    attr: int = 0               # bit 2 IDO, bit 1 RO, bit 0 NS
    poisoned: bool = False      # EP
    stream_id: int | None = None
    key_set: int = 0
    pr_sent_counter: int = 0

    def __post_init__(self) -> None:
        t = TlpType(self.type)
        object.__setattr__(self, "type", t)
        object.__setattr__(self, "status", CplStatus(self.status))
        object.__setattr__(self, "data", bytes(self.data))
        _check_range("requester_id", self.requester_id, 0xFFFF)
        _check_range("completer_id", self.completer_id, 0xFFFF)
        _check_range("tag", self.tag, 0x3FF)
        _check_range("tc", self.tc, 7)
        _check_range("attr", self.attr, 7)
        _check_range("key_set", self.key_set, 1)
        _check_range("pr_sent_counter", self.pr_sent_counter, 0xFF)
        if self.stream_id is not None:
            _check_range("stream_id", self.stream_id, 0xFF)
        if t.has_data:
            if not self.data or len(self.data) % 4 or len(self.data) > MAX_PAYLOAD:
                raise TlpError(f"{t.name}: payload must be 4..{MAX_PAYLOAD} bytes, a whole "
                               f"number of DW; got {len(self.data)}")
            if self.length:
                raise TlpError(f"{t.name}: length is derived from the payload; leave it 0")
        elif self.data:
            raise TlpError(f"{t.name} carries no payload; got {len(self.data)} bytes")
        if t.is_request:
            self._check_request(t)
        else:
            self._check_completion(t)

    def _check_request(self, t: TlpType) -> None:
        if (self.completer_id or self.byte_count or self.lower_address or self.bcm
                or self.status != CplStatus.SC):
            raise TlpError(f"{t.name}: completion fields must be left at their defaults")
        if not t.has_data:
            _check_range("length (DW)", self.length, 1024, 1)
        if self.address % 4:
            raise TlpError(f"{t.name}: address 0x{self.address:x} is not DW aligned; the "
                           "byte offset goes in first_be (see Tlp.memory_write/memory_read)")
        if t.header_dw == 4:
            if not ADDR32_LIMIT <= self.address < 1 << 64:
                raise TlpError(f"{t.name}: 64-bit form needs an address >= 4 GiB "
                               f"(§2.2.4.1), got 0x{self.address:x}; use the 32-bit form")
        elif self.address >= ADDR32_LIMIT:
            raise TlpError(f"{t.name}: address 0x{self.address:x} needs the 64-bit form")
        n = self.length_dw
        if self.address + n * 4 > 1 << 64 or (
                (self.address & 0xFFF) + n * 4 > 0x1000):
            raise TlpError(f"{t.name}: request crosses a 4 KiB boundary (§2.2.7)")
        _check_range("first_be", self.first_be, 0xF)
        if self.last_be is not None:
            _check_range("last_be", self.last_be, 0xF)
        last = self.last_dw_be
        if n == 1:
            if last:
                raise TlpError(f"{t.name}: 1-DW request must have last_be = 0 (§2.2.5)")
        elif not self.first_be or not last:
            raise TlpError(f"{t.name}: multi-DW request needs non-zero first and last "
                           "byte enables (§2.2.5)")
        if self.last_be is not None and self.last_be == self._default_last_be(n):
            object.__setattr__(self, "last_be", None)

    def _check_completion(self, t: TlpType) -> None:
        if self.address or self.length or self.first_be != 0xF or self.last_be is not None:
            raise TlpError(f"{t.name}: address, length and byte enables are request fields; "
                           "leave them at their defaults")
        _check_range("byte_count", self.byte_count, MAX_PAYLOAD, 1)
        _check_range("lower_address", self.lower_address, 0x7F)
        if t is TlpType.CPLD and self.status != CplStatus.SC:
            raise TlpError("CPLD must have status SC; failed completions carry no data")

    @staticmethod
    def _default_last_be(n: int) -> int:
        return 0 if n == 1 else 0xF

    # --- derived values -------------------------------------------------------------------

    @property
    def length_dw(self) -> int:
        """The Length field value (in DW; 1..1024) or 0 for a completion without data."""
        return len(self.data) // 4 if self.type.has_data else self.length

    @property
    def last_dw_be(self) -> int:
        if self.last_be is not None:
            return self.last_be
        return self._default_last_be(self.length_dw)

    @property
    def substream(self) -> SubStream:
        return substream_of(self.type)

    @property
    def prefix(self) -> IdePrefix | None:
        if self.stream_id is None:
            return None
        return IdePrefix(substream=self.substream, stream_id=self.stream_id,
                         key_set=self.key_set, t_bit=self.t_bit,
                         pr_sent_counter=self.pr_sent_counter)

    @property
    def byte_address(self) -> int:
        """Address of the first enabled byte of a memory request."""
        return self.address + (_span(self.first_be)[0] if self.first_be else 0)

    @property
    def request_byte_count(self) -> int:
        """Bytes a memory request covers (§2.3.1.1, Table 2-39); 1 for a zero-length read."""
        n = self.length_dw
        if n == 1:
            if not self.first_be:
                return 1
            lo, hi = _span(self.first_be)
            return hi - lo
        return n * 4 - _span(self.first_be)[0] - (4 - _span(self.last_dw_be)[1])

    def payload_bytes(self) -> bytes:
        """The bytes the TLP actually moves: MWr data trimmed by the byte enables
        (contiguous enables assumed), CplD data from Lower Address for Byte Count."""
        if self.type in (TlpType.MWR32, TlpType.MWR64):
            start = _span(self.first_be)[0]
            return self.data[start:start + self.request_byte_count]
        if self.type is TlpType.CPLD:
            start = self.lower_address & 3
            return self.data[start:start + self.byte_count]
        return b""

    # --- construction helpers -------------------------------------------------------------

    @classmethod
    def memory_write(cls, requester_id: int, tag: int, address: int, data: bytes,
                     **kw: object) -> Tlp:
        """A MWr for *data* at byte *address*: picks the 32/64-bit form, pads to DW and
        sets the byte enables.  *kw* passes further fields (t_bit, stream_id, tc, ...)."""
        if not data:
            raise TlpError("memory_write: no data (zero-length writes are not modelled)")
        start, first_be, last_be, n = _enables(address, len(data))
        padded = bytes(address % 4) + bytes(data) + bytes(n * 4 - address % 4 - len(data))
        t = TlpType.MWR32 if start < ADDR32_LIMIT else TlpType.MWR64
        return cls(t, requester_id, tag, address=start, data=padded, first_be=first_be,
                   last_be=last_be, **kw)  # type: ignore[arg-type]

    @classmethod
    def memory_read(cls, requester_id: int, tag: int, address: int, size: int,
                    **kw: object) -> Tlp:
        """A MRd of *size* bytes (1..4096, within one 4 KiB page) at byte *address*."""
        _check_range("memory_read size", size, MAX_PAYLOAD, 1)
        start, first_be, last_be, n = _enables(address, size)
        t = TlpType.MRD32 if start < ADDR32_LIMIT else TlpType.MRD64
        return cls(t, requester_id, tag, address=start, length=n, first_be=first_be,
                   last_be=last_be, **kw)  # type: ignore[arg-type]

    @classmethod
    def completion_for(cls, request: Tlp, completer_id: int, data: bytes = b"",
                       status: CplStatus = CplStatus.SC) -> Tlp:
        """The single completion answering a MRd (CplD with *data*, the requested bytes)
        or a failed one (Cpl with *status*).  T echoes the request (§11.2.1) and the
        completion travels on the request's stream."""
        if request.type not in (TlpType.MRD32, TlpType.MRD64):
            raise TlpError(f"completion_for: {request.type.name} is not a non-posted request")
        count = request.request_byte_count
        lower = request.byte_address & 0x7F
        common = dict(requester_id=request.requester_id, tag=request.tag,
                      completer_id=completer_id, byte_count=count, lower_address=lower,
                      t_bit=request.t_bit, stream_id=request.stream_id, tc=request.tc,
                      attr=request.attr)
        if status != CplStatus.SC:
            if data:
                raise TlpError("completion_for: a failed completion carries no data")
            return cls(TlpType.CPL, status=status, **common)  # type: ignore[arg-type]
        if len(data) != count:
            raise TlpError(f"completion_for: request asked for {count} bytes, got {len(data)}")
        off = lower & 3
        padded = bytes(off) + bytes(data)
        padded += bytes(-len(padded) % 4)
        return cls(TlpType.CPLD, data=padded, **common)  # type: ignore[arg-type]

    # --- wire format ----------------------------------------------------------------------

    def header(self) -> bytes:
        """The header bytes in transmission order, the IDE prefix first if present."""
        if self.t_bit and self.stream_id is None:
            raise TlpError("T = 1 needs the IDE prefix: in non-flit mode T is carried only "
                           "there (§11.2.1); set stream_id")
        t = self.type
        n = self.length_dw
        tag = self.tag
        dw0 = bytes((
            int(t),
            (tag >> 9 & 1) << 7 | self.tc << 4 | (tag >> 8 & 1) << 3 | (self.attr >> 2) << 2,
            int(self.poisoned) << 6 | (self.attr & 3) << 4 | (n >> 8 & 3),
            n & 0xFF,
        ))
        if t.is_request:
            body = (self.requester_id.to_bytes(2, "big")
                    + bytes((tag & 0xFF, self.last_dw_be << 4 | self.first_be)))
            if t.header_dw == 4:
                body += self.address.to_bytes(8, "big")
            else:
                body += self.address.to_bytes(4, "big")
        else:
            bc = self.byte_count & 0xFFF        # 4096 encodes as 0
            body = (self.completer_id.to_bytes(2, "big")
                    + bytes((int(self.status) << 5 | int(self.bcm) << 4 | bc >> 8, bc & 0xFF))
                    + self.requester_id.to_bytes(2, "big")
                    + bytes((tag & 0xFF, self.lower_address)))
        prefix = self.prefix
        return (prefix.encode() if prefix else b"") + dw0 + body

    def encode(self) -> bytes:
        """``header() || payload`` (for an IDE TLP: the plaintext image, before the MAC)."""
        return self.header() + self.data

    @staticmethod
    def header_length(data: bytes) -> int:
        """Length of the header (prefix included) at the start of *data*; no validation
        beyond what is needed to find it."""
        off = PREFIX_LEN if data[:1] == bytes((IDE_PREFIX_BYTE0,)) else 0
        if len(data) <= off:
            raise TlpDecodeError("truncated TLP: no header", data, len(data))
        return off + (16 if data[off] & 0x20 else 12)

    @classmethod
    def decode(cls, data: bytes) -> Tlp:
        """Parse a whole TLP (prefix, header, payload); it must consume *data* exactly."""
        data = bytes(data)
        off = 0
        prefix: IdePrefix | None = None
        if len(data) >= 1 and data[0] & 0xE0 == 0x80:
            if len(data) < PREFIX_LEN:
                raise TlpDecodeError("truncated TLP prefix", data, len(data))
            try:
                prefix = IdePrefix.decode(data[:PREFIX_LEN])
            except TlpDecodeError as e:
                raise TlpDecodeError(e.message, data, e.offset) from None
            off = PREFIX_LEN
        if len(data) < off + 4:
            raise TlpDecodeError("truncated TLP header", data, len(data))
        b0, b1, b2, b3 = data[off:off + 4]
        try:
            t = TlpType(b0)
        except ValueError:
            raise TlpDecodeError(f"unsupported Fmt/Type byte 0x{b0:02x}", data, off) from None
        hlen = t.header_dw * 4
        if len(data) < off + hlen:
            raise TlpDecodeError(f"truncated {t.name} header: needs {hlen} bytes", data,
                                 len(data))
        if b1 & 0x03:
            raise TlpDecodeError("LN/TH set: not supported by this model", data, off + 1)
        if b2 & 0x80:
            raise TlpDecodeError("TD set: IDE TLPs carry no ECRC and none is modelled",
                                 data, off + 2)
        if b2 & 0x0C:
            raise TlpDecodeError("AT != 0: address translation is not modelled", data, off + 2)
        if prefix is not None and prefix.substream != substream_of(t):
            raise TlpDecodeError(f"IDE prefix sub-stream {prefix.substream.name} does not "
                                 f"match a {t.name}", data, 1)
        tag = (b1 >> 7 & 1) << 9 | (b1 >> 3 & 1) << 8
        n = (b2 & 3) << 8 | b3
        if t.has_data and n == 0:
            n = 1024
        kw: dict[str, object] = dict(
            tc=b1 >> 4 & 7, attr=(b1 >> 2 & 1) << 2 | (b2 >> 4 & 3), poisoned=bool(b2 & 0x40))
        if prefix is not None:
            kw.update(stream_id=prefix.stream_id, key_set=prefix.key_set, t_bit=prefix.t_bit,
                      pr_sent_counter=prefix.pr_sent_counter)
        h = data[off + 4:off + hlen]
        if t.is_request:
            if not t.has_data:
                kw["length"] = n if n else 1024
            kw.update(requester_id=int.from_bytes(h[0:2], "big"), first_be=h[3] & 0xF,
                      last_be=h[3] >> 4)
            tag |= h[2]
            addr = int.from_bytes(h[4:], "big")
            if addr & 3:
                raise TlpDecodeError("PH bits set: TPH is not modelled", data, off + hlen - 1)
            kw["address"] = addr
        else:
            if t is TlpType.CPL and n:
                raise TlpDecodeError(f"CPL with Length {n}: must be 0", data, off + 3)
            bc = (h[2] & 0xF) << 8 | h[3]
            if h[7] & 0x80:
                raise TlpDecodeError("reserved bit 7 of byte 11 is set", data, off + 11)
            kw.update(completer_id=int.from_bytes(h[0:2], "big"), bcm=bool(h[2] & 0x10),
                      byte_count=bc or MAX_PAYLOAD, requester_id=int.from_bytes(h[4:6], "big"),
                      lower_address=h[7] & 0x7F)
            try:
                kw["status"] = CplStatus(h[2] >> 5)
            except ValueError:
                raise TlpDecodeError(f"reserved completion status {h[2] >> 5}", data,
                                     off + 6) from None
            tag |= h[6]
        body = data[off + hlen:]
        want = n * 4 if t.has_data else 0
        if len(body) != want:
            raise TlpDecodeError(f"{t.name} with Length {n} DW needs {want} payload bytes, "
                                 f"got {len(body)}", data, off + hlen)
        try:
            return cls(t, tag=tag, data=body, **kw)  # type: ignore[arg-type]
        except TlpError as e:
            raise TlpDecodeError(str(e), data, off) from None


def _enables(address: int, size: int) -> tuple[int, int, int, int]:
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


# -- runs of TLPs without Tlp objects (the link's fast path) ----------------------------------
# Each function gives byte for byte what the Tlp class gives for the same TLPs (the unit
# tests compare them); they leave out Tlp's validation, so the callers pass only what it
# would accept: pieces of 1..4096 bytes that do not cross a 4 KiB boundary.

_REQ3 = struct.Struct(">BBBBHBBI")
_REQ4 = struct.Struct(">BBBBHBBQ")
_CPL = struct.Struct(">BBBBHBBHBB")
_SPANS = ((0, 0),) + tuple(_span(be) for be in range(1, 16))   # by byte-enable value
MAC_BYTES = 12      # the IDE MAC that follows a protected TLP (teeio.ide.MAC_LEN)


def _dw0_bits(tag: int, tc: int, attr: int) -> tuple[int, int]:
    """Bytes 1 and 2 of DW0 without the Length bits."""
    return ((tag >> 9 & 1) << 7 | tc << 4 | (tag >> 8 & 1) << 3 | (attr >> 2) << 2,
            (attr & 3) << 4)


def _request_header(kind32: int, requester_id: int, tag: int, address: int, size: int,
                    b1: int, b2: int) -> tuple[bytes, int]:
    """(header, DW count) of one memory request (*kind32*: its 32-bit-address type)."""
    start = address & ~3
    end = address + size
    n = (end - start + 3) >> 2
    first = (0xF << (address & 3)) & 0xF
    tail = end & 3
    last = (0xF >> (4 - tail)) if tail else 0xF
    if n == 1:
        first, last = first & last, 0
    if start < ADDR32_LIMIT:
        return _REQ3.pack(kind32, b1, b2 | n >> 8 & 3, n & 0xFF, requester_id, tag & 0xFF,
                          last << 4 | first, start), n
    return _REQ4.pack(kind32 | 0x20, b1, b2 | n >> 8 & 3, n & 0xFF, requester_id, tag & 0xFF,
                      last << 4 | first, start), n


def memory_write_parts(requester_id: int, address: int, data: bytes,
                       pieces: Sequence[tuple[int, int]], *, tag: int = 0, tc: int = 0,
                       attr: int = 0) -> tuple[list[bytes], list[bytes | memoryview]]:
    """Headers (no IDE prefix) and DW-padded payloads of the MWr TLPs that write the
    byte ranges *pieces* of *data* (which starts at byte *address*): for each piece
    ``(a, n)``, ``Tlp.memory_write(requester_id, tag, a, data[a - address:][:n], tc=tc,
    attr=attr)``'s ``header()`` and ``data``."""
    b1, b2 = _dw0_bits(tag, tc, attr)
    view = memoryview(data)
    headers: list[bytes] = []
    payloads: list[bytes | memoryview] = []
    kind = int(TlpType.MWR32)
    req3, req4 = _REQ3.pack, _REQ4.pack
    tag8 = tag & 0xFF
    for a, n in pieces:
        off = a - address
        if not (a | n) & 3 and n > 4:           # whole DWs, more than one: all bytes enabled
            dws = n >> 2
            if a < ADDR32_LIMIT:
                headers.append(req3(kind, b1, b2 | dws >> 8 & 3, dws & 0xFF, requester_id,
                                    tag8, 0xFF, a))
            else:
                headers.append(req4(kind | 0x20, b1, b2 | dws >> 8 & 3, dws & 0xFF,
                                    requester_id, tag8, 0xFF, a))
            payloads.append(view[off:off + n])
            continue
        header, dws = _request_header(kind, requester_id, tag, a, n, b1, b2)
        headers.append(header)
        lead = a & 3
        payloads.append(bytes(lead) + view[off:off + n] + bytes(dws * 4 - lead - n))
    return headers, payloads


def memory_read_headers(requester_id: int, pieces: Sequence[tuple[int, int]], *,
                        first_tag: int = 0, tc: int = 0, attr: int = 0) -> list[bytes]:
    """Headers (no IDE prefix) of MRd TLPs for the byte ranges *pieces*, tagged
    *first_tag*, *first_tag* + 1, ...: ``Tlp.memory_read(requester_id, tag, a, n, tc=tc,
    attr=attr).header()`` for each."""
    out = []
    kind = int(TlpType.MRD32)
    for i, (a, n) in enumerate(pieces):
        tag = first_tag + i
        b1, b2 = _dw0_bits(tag, tc, attr)
        out.append(_request_header(kind, requester_id, tag, a, n, b1, b2)[0])
    return out


def completion_parts(requester_id: int, tag: int, completer_id: int, address: int,
                     data: bytes | memoryview, spans: Sequence[tuple[int, int]], *,
                     tc: int = 0, attr: int = 0) -> tuple[list[bytes], list[bytes | memoryview]]:
    """Headers (no IDE prefix) and DW-padded payloads of the CplDs that return *data*
    (read at byte *address*) in the byte ranges *spans*, each carrying the bytes still
    due as its Byte Count: ``Tlp(CPLD, requester_id, tag, data=padded, completer_id=...,
    byte_count=remaining, lower_address=a & 0x7F, tc=tc, attr=attr)``."""
    b1, b2 = _dw0_bits(tag, tc, attr)
    view = memoryview(data)
    remaining = len(view)
    headers: list[bytes] = []
    payloads: list[bytes | memoryview] = []
    for a, n in spans:
        off = a - address
        lead = a & 3
        dws = (lead + n + 3) >> 2
        bc = remaining & 0xFFF                  # 4096 encodes as 0
        headers.append(_CPL.pack(TlpType.CPLD, b1, b2 | dws >> 8 & 3, dws & 0xFF,
                                 completer_id, bc >> 8, bc & 0xFF, requester_id, tag & 0xFF,
                                 a & 0x7F))
        if lead == 0 and dws * 4 == n:
            payloads.append(view[off:off + n])
        else:
            payloads.append(bytes(lead) + view[off:off + n] + bytes(dws * 4 - lead - n))
        remaining -= n
    return headers, payloads


# (write, requester_id, tag, tc, attr, t_bit, byte_address, byte_count, first_byte)
RequestFields = tuple[bool, int, int, int, int, bool, int, int, int]
# (requester_id, tag, byte_count, lower_address)
CompletionFields = tuple[int, int, int, int]


_HEAD = struct.Struct(">BBBBBBBBHBB")   # IDE prefix, DW0, DW1 of a request (12 bytes)
_ADDR32 = struct.Struct(">I")
_ADDR64 = struct.Struct(">Q")
_CPL_HEAD = struct.Struct(">BBBBBBBBHBBHBB")   # IDE prefix and a completion header


def parse_ide_requests(wires: Sequence[bytes], start: int, stream_id: int) -> list[RequestFields]:
    """The fields of ``wires[start:]``, IDE-protected memory requests of stream
    *stream_id*, up to the first one that is anything else or that :meth:`Tlp.decode`
    (with the MAC stripped) would not accept exactly so.  ``first_byte``: where the
    enabled bytes start in the (DW-padded) payload."""
    out: list[RequestFields] = []
    spans = _SPANS
    head, addr32, addr64 = _HEAD.unpack_from, _ADDR32.unpack_from, _ADDR64.unpack_from
    for i in range(start, len(wires)):
        w = wires[i]
        size = len(w)
        if size < 16 + MAC_BYTES:
            break
        p0, p1, p2, _, kind, h1, h2, h3, rid, tag, be = head(w)
        # Prefix: IDE, this stream, M = 1, no PCRC, reserved 0, the request's sub-stream
        # (PR 0 / NPR 1 in bits 6:4); header: no LN/TH, TD, AT.
        if p0 != IDE_PREFIX_BYTE0 or p2 != stream_id or h1 & 0x03 or h2 & 0x8C:
            break
        if kind & 0xDF == 0x40:                 # MWr32 0x40, MWr64 0x60
            write = True
            if p1 & 0xF9 != 0x01:
                break
        elif kind & 0xDF == 0x00:               # MRd32 0x00, MRd64 0x20
            write = False
            if p1 & 0xF9 != 0x11:
                break
        else:
            break
        n = (h2 & 3) << 8 | h3 or 1024
        if kind & 0x20:
            if size < 20 + MAC_BYTES:
                break
            hlen = 20
            address = addr64(w, 12)[0]
            if address < ADDR32_LIMIT:
                break
        else:
            hlen = 16
            address = addr32(w, 12)[0]
        if (size != hlen + MAC_BYTES + (n << 2 if write else 0) or address & 3
                or (address & 0xFFF) + (n << 2) > 0x1000):
            break
        first, last = be & 0xF, be >> 4
        if not first or (last if n == 1 else not last):
            break
        lo, hi = spans[first]
        out.append((write, rid, (h1 >> 7 & 1) << 9 | (h1 >> 3 & 1) << 8 | tag,
                    h1 >> 4 & 7, (h1 >> 2 & 1) << 2 | (h2 >> 4 & 3), bool(p1 & 0x04),
                    address + lo, hi - lo if n == 1 else (n << 2) - lo - 4 + spans[last][1],
                    lo))
    return out


def parse_ide_completions(wires: Sequence[bytes], start: int,
                          stream_id: int) -> list[CompletionFields]:
    """The fields of ``wires[start:]``, IDE-protected successful CplDs of stream
    *stream_id*, up to the first one that is anything else or that :meth:`Tlp.decode`
    (with the MAC stripped) would not accept exactly so."""
    out: list[CompletionFields] = []
    head = _CPL_HEAD.unpack_from
    cpld = int(TlpType.CPLD)
    for i in range(start, len(wires)):
        w = wires[i]
        if len(w) < 16 + MAC_BYTES:
            break
        p0, p1, p2, _, kind, h1, h2, h3, _cid, st_bc, bc, rid, tag, lower = head(w)
        # IDE prefix of this stream on CPL (2), M = 1, no PCRC; a CplD, no LN/TH, TD, AT;
        # status SC; reserved bit 7 of the lower address byte clear.
        if (p0 != IDE_PREFIX_BYTE0 or p2 != stream_id or p1 & 0xF9 != 0x21 or kind != cpld
                or h1 & 0x03 or h2 & 0x8C or st_bc & 0xE0 or lower & 0x80):
            break
        if len(w) != 16 + ((h2 & 3) << 8 | h3 or 1024) * 4 + MAC_BYTES:
            break
        out.append((rid, (h1 >> 7 & 1) << 9 | (h1 >> 3 & 1) << 8 | tag,
                    (st_bc & 0xF) << 8 | bc or MAX_PAYLOAD, lower))
    return out
