"""IDE TLP protection (PCIe 6.x §6.33.4-§6.33.6): AES-GCM-256, 96-bit MAC, two key sets.

One :class:`IdeTx` / :class:`IdeRx` per IDE stream and direction, with per-sub-stream key
slots and implicit counters (IV per §6.33.5), and aggregation (§6.33.6: a Tx Aggregation
Mode per sub-stream; a receiver that supports it joins the units); any receive failure
leaves the receiver Insecure until reset (§6.33.6).  Wire form, MAC check, key-set
switching, aggregation and what is simplified: docs/ide-and-link.md, "How a TLP is
protected".
"""

from __future__ import annotations

import functools
import hmac
import logging
import secrets
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from operator import itemgetter
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import ide_accel
from .ide_runs import (
    UNIT_PAYLOAD_MAX,
    UNIT_TLPS_MAX,
    UNIT_TLPS_MODES,
    open_units,
    open_units_joined,
    seal_units,
)
from .tlp import IDE_PREFIX_BYTE0, PREFIX_LEN, IdePrefix, SubStream, Tlp, TlpError

__all__ = [
    "KEY_LEN", "MAC_LEN", "UNIT_PAYLOAD_MAX", "UNIT_TLPS_MAX", "UNIT_TLPS_MODES", "Direction",
    "IdeError", "IdeIntegrityError", "IdeKey", "IdeKeyStateError", "IdeRx", "IdeTx", "KeySet",
    "KeySlot", "SubStream", "gcm_iv",
]

log = logging.getLogger(__name__)

KEY_LEN = 32            # AES-256
MAC_LEN = 12            # 96-bit MAC (§6.33.5)
IFV_DEFAULT = 1         # IDE_KM: initial IFV 0x0000_0000_0000_0001 (§6.33.3)
COUNTER_MAX = (1 << 64) - 1


class KeySet(IntEnum):
    """The two key slots per sub-stream and direction (KeySubStream bit 0; IDE prefix K)."""

    K0 = 0
    K1 = 1


KeySlot = KeySet


class Direction(IntEnum):
    """KeySubStream bit 1 (RxTxB) of IDE_KM objects (§6.33.3)."""

    RX = 0
    TX = 1


class IdeError(Exception):
    """Base of IDE errors."""


class IdeIntegrityError(IdeError):
    """A received TLP failed an IDE check; the receiving stream is now Insecure (§6.33.6)."""

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason
        super().__init__(f"IDE stream {stream_id}: {reason}")


class IdeKeyStateError(IdeError):
    """Local misuse: protecting without a GO key set, programming a set in use, ..."""


@dataclass(frozen=True)
class IdeKey:
    """One key as KEY_PROG delivers it: the AES-256 key (crypto-library byte order) and
    the 64-bit IFV, the initial invocation counter."""

    key: bytes = field(repr=False)
    ifv: int = field(default=IFV_DEFAULT, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", bytes(self.key))
        if len(self.key) != KEY_LEN:
            raise ValueError(f"IDE key must be {KEY_LEN} bytes, got {len(self.key)}")
        if not 0 <= self.ifv <= COUNTER_MAX:
            raise ValueError("IFV must fit in 64 bits")

    @classmethod
    def generate(cls, ifv: int = IFV_DEFAULT) -> IdeKey:
        """A fresh random key (as the TSM does for each KEY_PROG)."""
        return cls(secrets.token_bytes(KEY_LEN), ifv)

    @functools.cached_property
    def aead(self) -> AESGCM:
        """The AES-GCM engine of this key (made once: key expansion is not per TLP)."""
        return AESGCM(self.key)

    @functools.cached_property
    def accel(self) -> ide_accel.GcmEngine:
        """This key's engine in the C accelerator (:mod:`teeio.ide_accel`), made once."""
        return ide_accel.gcm(self.key)


_IV = struct.Struct(">4xQ")
_TAG_LEN = 16
_TAG_EXTRA = _TAG_LEN - MAC_LEN         # GCM tag bytes the 96-bit MAC leaves out


def gcm_iv(counter: int) -> bytes:
    """The 96-bit GCM IV: 32 zero bits then the 64-bit counter, big-endian (§6.33.5)."""
    return _IV.pack(counter)


def _seal(key: IdeKey, counter: int, aad: bytes, plaintext: bytes) -> bytes:
    """``C || MAC``: the ciphertext and the tag truncated to its 12 leading bytes."""
    return key.aead.encrypt(_IV.pack(counter), plaintext, aad)[:-_TAG_EXTRA]


def _open(key: IdeKey, counter: int, aad: bytes, ciphertext: bytes, mac: bytes) -> bytes:
    """The plaintext of *ciphertext* once its MAC checks out (InvalidTag otherwise)."""
    iv = _IV.pack(counter)
    enc = key.aead.encrypt
    plain = enc(iv, ciphertext, aad)[:-_TAG_LEN]      # CTR: decryption is encryption
    if not hmac.compare_digest(enc(iv, plain, aad)[-_TAG_LEN:-_TAG_EXTRA], mac):
        raise InvalidTag
    return plain


@dataclass
class _SubState:
    """Key slots, GO flags, the set in use and its counter for one sub-stream."""

    keys: list[IdeKey | None] = field(default_factory=lambda: [None, None], repr=False)
    go: list[bool] = field(default_factory=lambda: [False, False])
    active: KeySet | None = None
    counter: int = 0
    # Rx: the TLPs of an aggregated unit received so far (§6.33.6): (A, C, decoded shell)
    pending: list[tuple[bytes, bytes, Tlp]] = field(default_factory=list, repr=False)


class _IdeEndpoint:
    direction: Direction

    def __init__(self, stream_id: int) -> None:
        if not 0 <= stream_id <= 0xFF:
            raise ValueError(f"stream id {stream_id} out of range 0..255")
        self.stream_id = stream_id
        self._subs = {s: _SubState() for s in SubStream}
        self.log = log.getChild(f"{self.direction.name.lower()}{stream_id}")

    @staticmethod
    def _which(substream: SubStream | None) -> list[SubStream]:
        return list(SubStream) if substream is None else [SubStream(substream)]

    def program(self, key_set: KeySet, substream: SubStream, key: IdeKey) -> None:
        """KEY_PROG: load *key* into slot *key_set*; refused for the set in use."""
        st = self._subs[SubStream(substream)]
        ks = KeySet(key_set)
        if st.active == ks:
            raise IdeKeyStateError(f"stream {self.stream_id} {self.direction.name} "
                                   f"{SubStream(substream).name}: {ks.name} is in use; "
                                   "stop it before reprogramming")
        st.keys[ks] = key
        st.go[ks] = False

    def is_programmed(self, key_set: KeySet, substream: SubStream) -> bool:
        return self._subs[SubStream(substream)].keys[KeySet(key_set)] is not None

    def is_go(self, key_set: KeySet, substream: SubStream) -> bool:
        return self._subs[SubStream(substream)].go[KeySet(key_set)]

    def active_key_set(self, substream: SubStream) -> KeySet | None:
        """The key set this endpoint protects/checks with right now (None: none yet)."""
        return self._subs[SubStream(substream)].active

    def all_active(self) -> bool:
        """Whether every sub-stream has a key set in use."""
        return all(st.active is not None for st in self._subs.values())

    def counter(self, substream: SubStream) -> int:
        """The next invocation counter of *substream* (for tests and diagnostics)."""
        return self._subs[SubStream(substream)].counter

    def stop(self, key_set: KeySet, substream: SubStream | None = None) -> None:
        """K_SET_STOP: invalidate the key set (its later use is an error)."""
        ks = KeySet(key_set)
        for s in self._which(substream):
            st = self._subs[s]
            st.keys[ks] = None
            st.go[ks] = False
            if st.active == ks:
                st.active = None

    def reset(self) -> None:
        """Conventional reset / FLR / link down / session loss: every key invalidated."""
        self._subs = {s: _SubState() for s in SubStream}

    def _require_key(self, st: _SubState, ks: KeySet, s: SubStream) -> IdeKey:
        key = st.keys[ks]
        if key is None:
            raise IdeKeyStateError(f"stream {self.stream_id} {self.direction.name} {s.name}: "
                                   f"{ks.name} is not programmed")
        return key


class IdeTx(_IdeEndpoint):
    """The transmit side of one IDE stream.  :attr:`aggregation`: the Tx Aggregation Mode
    of each sub-stream as TLPs per unit (1: none; 2, 4, 8: §7.9.26.4.1), which
    :meth:`protect_many` applies."""

    direction = Direction.TX

    def __init__(self, stream_id: int) -> None:
        super().__init__(stream_id)
        self.aggregation = {s: 1 for s in SubStream}

    def set_aggregation(self, substream: SubStream, unit_tlps: int) -> None:
        """Tx Aggregation Mode of *substream*: at most *unit_tlps* TLPs per aggregated unit
        (1 turns aggregation off)."""
        if unit_tlps not in UNIT_TLPS_MODES:
            raise ValueError(f"aggregation: {unit_tlps} TLPs per unit is not one of "
                             f"{UNIT_TLPS_MODES}")
        self.aggregation[SubStream(substream)] = unit_tlps

    def go(self, key_set: KeySet, substream: SubStream | None = None) -> None:
        """K_SET_GO (Tx): use *key_set* from the next TLP on; its counter restarts at the IFV."""
        ks = KeySet(key_set)
        for s in self._which(substream):
            st = self._subs[s]
            key = self._require_key(st, ks, s)
            st.go[ks] = True
            if st.active != ks:
                st.active = ks
                st.counter = key.ifv

    def protect(self, tlp: Tlp) -> bytes:
        """``header (A) || AES-GCM ciphertext of the payload || 96-bit MAC``: one TLP, never
        aggregated.

        The TLP gets this stream's id and the active K in its IDE prefix."""
        if tlp.stream_id is not None and tlp.stream_id != self.stream_id:
            raise IdeKeyStateError(f"TLP for stream {tlp.stream_id} handed to the Tx of "
                                   f"stream {self.stream_id}")
        s = tlp.substream
        st = self._subs[s]
        if st.active is None:
            raise IdeKeyStateError(f"stream {self.stream_id} Tx {s.name}: no key set is GO")
        key = self._require_key(st, st.active, s)
        if st.counter > COUNTER_MAX:
            raise IdeKeyStateError(f"stream {self.stream_id} Tx {s.name}: invocation counter "
                                   "exhausted; refresh the keys")
        tlp = replace(tlp, stream_id=self.stream_id, key_set=int(st.active))
        aad = tlp.header()
        wire = aad + _seal(key, st.counter, aad, tlp.data)
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("--> %s K%d ctr %d: %s", s.name, st.active, st.counter, wire.hex())
        st.counter += 1
        return wire

    def protect_many(self, substream: SubStream, t_bit: bool, headers: Sequence[bytes],
                     payloads: Sequence[bytes | memoryview],
                     stream_id: int | None = None) -> list[bytes]:
        """Protect a run of TLPs of one sub-stream given as header bytes without the IDE
        prefix (:func:`teeio.tlp.memory_write_parts` and friends) and DW-padded payloads,
        aggregated as :attr:`aggregation` says (§6.33.6; the run's last TLP always ends a
        unit).  Without aggregation, for each exactly the bytes :meth:`protect` returns for
        the same TLP with *t_bit*, with consecutive counters.  *stream_id*: the stream the
        caller meant (an error if not this one).  All or nothing: nothing is protected if
        any would fail."""
        if stream_id is not None and stream_id != self.stream_id:
            raise IdeKeyStateError(f"TLP for stream {stream_id} handed to the Tx of "
                                   f"stream {self.stream_id}")
        s = SubStream(substream)
        st = self._subs[s]
        if st.active is None:
            raise IdeKeyStateError(f"stream {self.stream_id} Tx {s.name}: no key set is GO")
        key = self._require_key(st, st.active, s)
        ctr = st.counter
        if ctr + len(headers) - 1 > COUNTER_MAX:
            raise IdeKeyStateError(f"stream {self.stream_id} Tx {s.name}: invocation counter "
                                   "exhausted; refresh the keys")
        prefix = bytes((IDE_PREFIX_BYTE0, int(s) << 4 | int(t_bit) << 2 | int(st.active) << 1 | 1,
                        self.stream_id, 0))
        out, units = seal_units(key, ctr, prefix, headers, payloads, self.aggregation[s])
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("--> %s K%d ctr %d..%d: %d TLPs", s.name, st.active, ctr,
                           ctr + units - 1, len(out))
        st.counter = ctr + units
        return out


class IdeRx(_IdeEndpoint):
    """The receive side of one IDE stream.  :attr:`aggregation`: whether it takes
    aggregated units (the port's Aggregation Supported, §6.33.6); without it a TLP without
    a MAC is a failure."""

    direction = Direction.RX

    def __init__(self, stream_id: int, aggregation: bool = False) -> None:
        super().__init__(stream_id)
        self.insecure_reason: str | None = None
        self.aggregation = aggregation

    def go(self, key_set: KeySet, substream: SubStream | None = None) -> None:
        """K_SET_GO (Rx): accept TLPs tagged with *key_set*.  The receiver switches to it
        (counter restarting at the IFV) at the first such TLP; the first GO of a stream
        makes it the set in use at once."""
        ks = KeySet(key_set)
        for s in self._which(substream):
            st = self._subs[s]
            key = self._require_key(st, ks, s)
            st.go[ks] = True
            if st.active is None:
                st.active = ks
                st.counter = key.ifv

    def program(self, key_set: KeySet, substream: SubStream, key: IdeKey) -> None:
        """KEY_PROG (Rx).  The set in use may be reprogrammed once the other set is GO
        here: the partner's Tx has moved to that one (the refresh order GOes Rx before
        Tx), so this receiver switches to it now -- as the partner's first TLP with it
        would make it do (the counter restarting at its IFV) -- and the old slot is free
        for the next refresh.  A TSM may thus alternate K0/K1 without K_SET_STOP, as
        tee-io-validator's key refresh does, whether traffic flowed in between or not."""
        st = self._subs[SubStream(substream)]
        ks, other = KeySet(key_set), KeySet(1 - key_set)
        pending = st.keys[other]
        if st.active == ks and st.go[other] and pending is not None:
            st.active = other
            st.counter = pending.ifv
            st.pending = []
            self.log.debug("%s switched to %s (%s reprogrammed)", SubStream(substream).name,
                           other.name, ks.name)
        super().program(key_set, substream, key)

    def reset(self) -> None:
        super().reset()
        self.insecure_reason = None

    def _fail(self, reason: str) -> IdeIntegrityError:
        if self.insecure_reason is None:
            self.insecure_reason = reason
            self.log.warning("stream %d Insecure: %s", self.stream_id, reason)
        return IdeIntegrityError(self.stream_id, reason)

    def unprotect(self, wire: bytes) -> Tlp:
        """Check and decrypt one protected TLP that carries its own MAC (a unit of one);
        any failure makes the stream Insecure.  A TLP of an aggregated unit is
        :meth:`receive`'s: IdeKeyStateError, nothing changed."""
        if self.aggregation and len(wire) > PREFIX_LEN and wire[0] == IDE_PREFIX_BYTE0:
            sub = _substream(wire[1])
            if not wire[1] & 1 or (sub is not None and self._subs[sub].pending):
                raise IdeKeyStateError(f"stream {self.stream_id}: a TLP of an aggregated "
                                       "unit; use receive()")
        return self.receive(wire)[0]

    def receive(self, wire: bytes) -> list[Tlp]:
        """Check one protected TLP: the TLPs of the unit it completes, decrypted, once the
        unit's MAC checks out (none while an aggregated unit is still open, §6.33.6); any
        failure makes the stream Insecure."""
        wire = bytes(wire)
        if self.insecure_reason is not None:
            raise IdeIntegrityError(self.stream_id,
                                    f"stream is Insecure ({self.insecure_reason})")
        mac_len = MAC_LEN
        image = wire                # the TLP as if it carried its MAC (M set)
        if self.aggregation and len(wire) > PREFIX_LEN and wire[0] == IDE_PREFIX_BYTE0 \
                and not wire[1] & 1:
            mac_len = 0
            image = wire[:1] + bytes((wire[1] | 1,)) + wire[2:]
        try:
            prefix = IdePrefix.decode(image[:PREFIX_LEN])
            hlen = Tlp.header_length(image)
        except (TlpError, IndexError) as e:
            raise self._fail(f"not an IDE TLP: {e}") from None
        if len(wire) < hlen + mac_len:
            raise self._fail(f"truncated: {len(wire)} bytes cannot hold header and MAC")
        if prefix.stream_id != self.stream_id:
            raise self._fail(f"misrouted TLP for stream {prefix.stream_id}")
        end = len(wire) - mac_len
        aad, body, mac = wire[:hlen], wire[hlen:end], wire[end:]
        try:
            shell = Tlp.decode(image[:hlen] + body)
        except TlpError as e:
            raise self._fail(f"malformed IDE TLP: {e}") from None
        s = prefix.substream
        st = self._subs[s]
        ks = KeySet(prefix.key_set)
        if st.pending and ks != st.active:
            raise self._fail(f"{s.name}: K toggled inside an aggregated unit (§6.33.6)")
        key = st.keys[ks]
        if key is None or not st.go[ks]:
            raise self._fail(f"{s.name} TLP uses key set {ks.name}, which is not GO "
                             "(never programmed, stopped or discarded)")
        if st.active != ks:
            # First TLP with the new key set: switch, discard the old set (§6.33.4).
            old = st.active
            if old is not None:
                st.keys[old] = None
                st.go[old] = False
            st.active = ks
            st.counter = key.ifv
            self.log.debug("%s switched to %s", s.name, ks.name)
        if st.counter > COUNTER_MAX:
            raise self._fail(f"{s.name}: invocation counter exhausted")
        st.pending.append((aad, body, shell))
        unit = st.pending
        if len(unit) > 1 and sum(len(b) for _, b, _ in unit) > UNIT_PAYLOAD_MAX:
            raise self._fail(f"{s.name}: aggregated unit carries more than "
                             f"{UNIT_PAYLOAD_MAX // 4} DW of payload (§6.33.6)")
        if mac_len == 0:
            if len(unit) >= UNIT_TLPS_MAX:
                raise self._fail(f"{s.name}: aggregated unit of more than {UNIT_TLPS_MAX} "
                                 "TLPs (§6.33.6)")
            return []
        st.pending = []
        try:
            plain = _open(key, st.counter, b"".join(a for a, _, _ in unit),
                          b"".join(b for _, b, _ in unit), mac)
        except InvalidTag:
            raise self._fail(f"{s.name} MAC check failed (counter {st.counter}, "
                             f"{ks.name})") from None
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("<-- %s K%d ctr %d: %s", s.name, ks, st.counter, wire.hex())
        st.counter += 1
        out = []
        pos = 0
        for _, b, tlp in unit:
            out.append(replace(tlp, data=plain[pos:pos + len(b)]))
            pos += len(b)
        return out

    def open_many(self, wires: Sequence[bytes], start: int, stop: int) -> list[bytes]:
        """Check and decrypt whole units of ``wires[start:stop]`` in order, as
        :meth:`receive` would, while each is the common case: the key set it names is the
        one in use on its sub-stream, no unit is pending there, the counter is not
        exhausted, the unit is complete within the range and its MAC checks out.  Returns
        the plaintext payloads (DW-padded, as on the wire) of the TLPs that passed; the
        first unit that did not is left untouched -- no counter moved, nothing recorded --
        for :meth:`receive` to handle (key-set switch, an open unit, or the failure that
        makes the stream Insecure).

        The caller must have checked every wire's prefix and header as :meth:`receive`
        does first (:func:`teeio.tlp.parse_ide_requests` / ``parse_ide_completions``):
        well-formed, of this stream, sub-stream matching the TLP type."""
        out: list[bytes] = []
        for plains, _ in self._open_runs(wires, start, stop, False):
            out += plains
        return out

    def open_many_joined(self, wires: Sequence[bytes], start: int,
                         stop: int) -> tuple[bytes, int]:
        """:meth:`open_many` with the plaintext payloads joined into one bytes object: it
        and how many TLPs passed."""
        parts: list[bytes] = []
        taken = 0
        for plain, n in self._open_runs(wires, start, stop, True):
            parts.append(plain)
            taken += n
        return b"".join(parts), taken

    def _open_runs(self, wires: Sequence[bytes], start: int, stop: int,
                   joined: bool) -> Iterator[tuple[Any, int]]:
        """:meth:`open_many`'s work, a run of one sub-stream and key set at a time: its
        plaintexts (a list, or *joined* one bytes object) and how many TLPs passed."""
        if self.insecure_reason is not None:
            return
        unit_tlps = UNIT_TLPS_MAX if self.aggregation else 1
        opener = open_units_joined if joined else open_units
        i = start
        while i < stop:
            b1 = wires[i][1]
            sub = b1 >> 4 & 7
            if sub > 2:
                return
            st = self._subs[SubStream(sub)]
            ks = b1 >> 1 & 1
            key = st.keys[ks]
            if st.active != ks or key is None or not st.go[ks] or st.pending:
                return
            # The run of this sub-stream and K (T and M may vary), found in C-level passes.
            kinds = bytes(map(_BYTE1, wires[i:stop])).translate(_SUB_STREAM_K)
            j = stop - len(kinds.lstrip(kinds[:1]))
            plains, taken, units = opener(key, st.counter, wires, i, j, unit_tlps)
            st.counter += units
            yield plains, taken
            i += taken
            if i < j:
                return


_BYTE1 = itemgetter(1)
_SUB_STREAM_K = bytes(b & 0x72 for b in range(256))   # IDE prefix byte 1: sub-stream, K


def _substream(b1: int) -> SubStream | None:
    try:
        return SubStream(b1 >> 4 & 7)
    except ValueError:
        return None
