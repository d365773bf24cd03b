"""Fault injection on the link's taps: flip a bit of a TLP's payload, address, T bit
(PCIe 6.x §6.33.4 IDE prefix, §11.2.1) or Requester ID (§2.2.6.2), drop it, or replay it;
the Nth TLP of a direction, optionally filtered by a predicate.  What IDE (§6.33.6) is
there to catch.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from teeio.ide import MAC_LEN
from teeio.tlp import PREFIX_LEN, IdePrefix, SubStream, Tlp, is_protected
from vfio_user_dev.link.interfaces import LinkDirection

log = logging.getLogger(__package__)


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


def field_span(kind: FaultKind, wire: bytes, tlp: Tlp | None) -> tuple[int, int] | None:
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


def _t_bit_mask() -> int:
    a = IdePrefix(SubStream.PR, 0, t_bit=False).encode()[1]
    b = IdePrefix(SubStream.PR, 0, t_bit=True).encode()[1]
    return a ^ b


def apply_faults(armed: Sequence[Fault], view: TlpView) -> tuple[list[bytes], bool]:
    """What crosses instead of ``view.wire`` once the *armed* faults (in order) have
    looked at it: no copy (dropped), one, or more (replayed); and whether a fault changed
    it.  A fault that fires records *view* and is done."""
    wire = view.wire
    copies = [wire]
    tampered = False
    for f in armed:
        span = field_span(f.kind, wire, view.tlp)
        if span is None or (f.match is not None and not f.match(view)):
            continue
        f.seen += 1
        if f.seen != f.nth:
            continue
        f.fired.append(view)
        log.warning("fault %s on %s TLP #%d", f.kind.value, view.direction.name.lower(),
                    view.index)
        if f.kind is FaultKind.DROP:
            copies = []
        elif f.kind is FaultKind.REPLAY:
            copies = copies + copies[-1:]
        else:
            copies = [_flip(f.kind, c, span, f.bit) for c in copies]
            tampered = True
    return copies, tampered
