"""One Transaction Layer Packet, non-flit mode (PCIe 6.x §2.2): memory requests (§2.2.7)
and completions (§2.2.9), optionally behind the IDE prefix (§6.33.4).

Header fields are big-endian on the wire, as the spec figures draw them.
:meth:`Tlp.header` is the header as transmitted (prefix included): IDE uses exactly these
bytes as the AES-GCM additional authenticated data (§6.33.5).  :meth:`Tlp.encode` is
``header() || payload``; the IDE MAC is not part of a :class:`Tlp`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import (
    ADDR32_LIMIT,
    MAX_PAYLOAD,
    CplStatus,
    TlpDecodeError,
    TlpError,
    TlpType,
    byte_enables,
    byte_span,
    check_range,
)
from .prefix import (
    IDE_PREFIX_BYTE0,
    PREFIX_LEN,
    IdePrefix,
    SubStream,
    is_protected,
    substream_of,
    with_mac_bit,
)

# Memory request header, 64-bit form (4 DW; the 3-DW 32-bit form has no Address[63:32]
# and carries Address[31:2] | PH in DW2)::
#
#      +0              +1              +2              +3
#      7 6 5 4 3 2 1 0 7 6 5 4 3 2 1 0 7 6 5 4 3 2 1 0 7 6 5 4 3 2 1 0
#     +-----+---------+-+-----+-+-+-+-+-+-+---+---+---+---------------+
#     | Fmt |  Type   |T| TC  |T|A|L|T|T|E|Att| AT|     Length        |  DW0
#     |     |         |9|     |8|2|N|H|D|P|1:0|   |                   |
#     +-----+---------+-+-----+-+-+-+-+-+-+---+---+-------------------+
#     |         Requester ID          |    Tag[7:0]   |LastBE |1st BE |  DW1
#     +-------------------------------+---------------+-------+-------+
#     |                        Address[63:32]                         |  DW2
#     +-----------------------------------------------------------+---+
#     |                        Address[31:2]                      |PH |  DW3
#     +-----------------------------------------------------------+---+
#
# Completion header (3 DW; DW0 as above)::
#
#     +-------------------------------+-----+-+-------+---------------+
#     |         Completer ID          |CplSt|B| Byte Count[11:0]      |  DW1
#     |                               |     |C|                       |
#     +-------------------------------+-----+-+-------+-+-------------+
#     |         Requester ID          |    Tag[7:0]   |R|LowerAddr 6:0|  DW2
#     +-------------------------------+---------------+-+-------------+


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
        check_range("requester_id", self.requester_id, 0xFFFF)
        check_range("completer_id", self.completer_id, 0xFFFF)
        check_range("tag", self.tag, 0x3FF)
        check_range("tc", self.tc, 7)
        check_range("attr", self.attr, 7)
        check_range("key_set", self.key_set, 1)
        check_range("pr_sent_counter", self.pr_sent_counter, 0xFF)
        if self.stream_id is not None:
            check_range("stream_id", self.stream_id, 0xFF)
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
            check_range("length (DW)", self.length, 1024, 1)
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
        check_range("first_be", self.first_be, 0xF)
        if self.last_be is not None:
            check_range("last_be", self.last_be, 0xF)
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
        check_range("byte_count", self.byte_count, MAX_PAYLOAD, 1)
        check_range("lower_address", self.lower_address, 0x7F)
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
        return self.address + (byte_span(self.first_be)[0] if self.first_be else 0)

    @property
    def request_byte_count(self) -> int:
        """Bytes a memory request covers (§2.3.1.1, Table 2-39); 1 for a zero-length read."""
        n = self.length_dw
        if n == 1:
            if not self.first_be:
                return 1
            lo, hi = byte_span(self.first_be)
            return hi - lo
        return n * 4 - byte_span(self.first_be)[0] - (4 - byte_span(self.last_dw_be)[1])

    def payload_bytes(self) -> bytes:
        """The bytes the TLP actually moves: MWr data trimmed by the byte enables
        (contiguous enables assumed), CplD data from Lower Address for Byte Count."""
        if self.type in (TlpType.MWR32, TlpType.MWR64):
            start = byte_span(self.first_be)[0]
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
        start, first_be, last_be, n = byte_enables(address, len(data))
        padded = bytes(address % 4) + bytes(data) + bytes(n * 4 - address % 4 - len(data))
        t = TlpType.MWR32 if start < ADDR32_LIMIT else TlpType.MWR64
        return cls(t, requester_id, tag, address=start, data=padded, first_be=first_be,
                   last_be=last_be, **kw)  # type: ignore[arg-type]

    @classmethod
    def memory_read(cls, requester_id: int, tag: int, address: int, size: int,
                    **kw: object) -> Tlp:
        """A MRd of *size* bytes (1..4096, within one 4 KiB page) at byte *address*."""
        check_range("memory_read size", size, MAX_PAYLOAD, 1)
        start, first_be, last_be, n = byte_enables(address, size)
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


def peek(wire: bytes) -> Tlp | None:
    """The TLP's header fields (payload zeroed: it may be ciphertext; a TLP of an
    aggregated unit read as if M were set), or None if the header does not parse."""
    try:
        hlen = Tlp.header_length(wire)
        head = with_mac_bit(wire[:hlen])
        off = PREFIX_LEN if is_protected(wire) else 0
        t = TlpType(head[off])
        n = (head[off + 2] & 3) << 8 | head[off + 3]
        size = ((n or 1024) * 4) if t.has_data else 0
        return Tlp.decode(head + bytes(size))
    except (TlpError, ValueError, IndexError):
        return None
