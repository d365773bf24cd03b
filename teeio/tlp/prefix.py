"""The IDE TLP prefix (PCIe 6.x §6.33.4, non-flit mode): the End-End prefix that carries
the sub-stream, key set, T bit (§11.2.1) and Stream ID of an IDE TLP, and the framing of
an IDE TLP on the wire (prefix, header, ciphertext, MAC; §6.33.5).

The prefix's byte 0 (0x92) follows from the E2E prefix encoding; the positions of
M/K/T/P/Sub-Stream inside byte 1 (PCIe Figure 6-64) are unconfirmed.  TSM and device
both use this module, so the layout is consistent end to end; it is not claimed to match
silicon bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .fields import TlpDecodeError, TlpError, TlpType, check_range

IDE_PREFIX_BYTE0 = 0x92     # Fmt 100b (prefix), Type 1_0010b (E2E, IDE)
PREFIX_LEN = 4
MAC_BYTES = 12              # the IDE MAC that follows a protected TLP (teeio.ide.MAC_LEN)


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
    """The non-flit IDE TLP prefix (§6.33.4)::

        +-----+---------+-+-----+-+-+-+-+---------------+---------------+
        |1 0 0|1 0 0 1 0|R| Sub |P|T|K|M|   Stream ID   |PR_Sent_Counter|
        |     |         | |Strm |       |               |               |
        +-----+---------+-+-----+-+-+-+-+---------------+---------------+
    """

    substream: SubStream
    stream_id: int
    key_set: int = 0            # K: 0 = K0, 1 = K1
    t_bit: bool = False         # T: TEE-originated (§11.2.1)
    mac: bool = True            # M: a MAC follows this TLP (always, no aggregation here)
    pcrc: bool = False          # P: PCRC present (not supported)
    pr_sent_counter: int = 0

    def __post_init__(self) -> None:
        check_range("stream_id", self.stream_id, 0xFF)
        check_range("key_set", self.key_set, 1)
        check_range("pr_sent_counter", self.pr_sent_counter, 0xFF)
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


def is_protected(wire: bytes) -> bool:
    """Whether *wire* starts with the IDE prefix (in this model: an IDE-protected TLP)."""
    return wire[:1] == bytes((IDE_PREFIX_BYTE0,))


def with_mac_bit(wire: bytes) -> bytes:
    """*wire* with the IDE prefix's M bit set: a TLP of an aggregated unit (§6.33.6) as the
    codec reads a TLP (:class:`IdePrefix` models M = 1 only).  Unchanged if it has no IDE
    prefix."""
    if len(wire) < 2 or wire[0] != IDE_PREFIX_BYTE0 or wire[1] & 1:
        return bytes(wire)
    return bytes((wire[0], wire[1] | 1)) + bytes(wire[2:])


def prefix_stream_id(wire: bytes) -> int | None:
    """The Stream ID in *wire*'s IDE prefix (None: no valid prefix; M may be clear)."""
    try:
        return IdePrefix.decode(with_mac_bit(wire[:PREFIX_LEN])).stream_id
    except TlpError:
        return None
