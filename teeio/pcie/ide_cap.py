"""IDE Extended Capability (PCIe 6.x §7.9.26, Ext Cap ID 0x0030) and the stream state it reports.

:func:`build` lays out (by default) one Link and two Selective IDE stream blocks;
:class:`IdeCapability` keeps Status truthful (Secure only while enabled with every key GO,
§6.33.3) and is the IDE_KM key store.  The register layout and what is simplified:
docs/ide-and-link.md, "The IDE capability, register by register".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from ..ide import (
    Direction,
    IdeIntegrityError,
    IdeKey,
    IdeKeyStateError,
    IdeRx,
    IdeTx,
    KeySet,
    SubStream,
)
from ..tlp import Tlp
from .config import ConfigSpace, ExtCapId

log = logging.getLogger(__name__)

IDE_CAP_VERSION = 1
LINK_BLOCK_SIZE = 8
SEL_BLOCK_BASE_SIZE = 20
ADDR_BLOCK_SIZE = 12


class IdeCapReg(IntFlag):
    """IDE Capability register (+0x04) bits."""

    LINK_IDE = 1 << 0
    SELECTIVE_IDE = 1 << 1
    FLOW_THROUGH = 1 << 2
    PARTIAL_HEADER_ENC = 1 << 3
    AGGREGATION = 1 << 4
    PCRC = 1 << 5
    IDE_KM = 1 << 6
    SEL_IDE_CFG_REQ = 1 << 7
    TEE_LIMITED = 1 << 24


class StreamCtl(IntFlag):
    """Stream Control bits we give meaning to (Link and Selective)."""

    ENABLE = 1 << 0
    DEFAULT_STREAM = 1 << 22      # Selective only
    TEE_LIMITED = 1 << 23         # Selective only


# Tx Aggregation Mode NPR [3:2], PR [5:4], CPL [7:6] (§7.9.26.4.1 / .5.2): 00b none,
# 01b up to 2 TLPs, 10b up to 4, 11b up to 8 per aggregated unit (§6.33.6).
CTL_AGG_SHIFT = {SubStream.NPR: 2, SubStream.PR: 4, SubStream.CPL: 6}
CTL_AGG_MASK = 0xFC
AGG_UNIT_TLPS = (1, 2, 4, 8)    # by Tx Aggregation Mode value
CTL_ALG_SHIFT, CTL_ALG_MASK = 14, 0x1F << 14
CTL_TC_SHIFT, CTL_TC_MASK = 19, 0x7 << 19
CTL_ID_SHIFT, CTL_ID_MASK = 24, 0xFF << 24
STS_STATE_MASK = 0xF
STS_FAIL_MSG = 1 << 31
ALG_AES_GCM_256_96 = 0


class StreamState(IntEnum):
    """Stream Status [3:0] (§7.9.26.4.2)."""

    INSECURE = 0
    SECURE = 2


class StreamKind(IntEnum):
    LINK = 0
    SELECTIVE = 1


Listener = Callable[["IdeStream", str], None]


@dataclass(eq=False)
class IdeStream:
    """One stream register block plus its IDE engines and state."""

    cap: IdeCapability = field(repr=False)
    kind: StreamKind
    index: int
    base: int                   # absolute config offset of the block
    tx: IdeTx
    rx: IdeRx
    secure: bool = False
    failure: str | None = None  # latched reason for Insecure, cleared by Enable 0 -> 1
    _ctl: int = 0               # last control value seen (to detect transitions)

    # -- register offsets ----------------------------------------------------------------
    @property
    def ctl_off(self) -> int:
        return self.base + (0 if self.kind is StreamKind.LINK else 4)

    @property
    def sts_off(self) -> int:
        return self.ctl_off + 4

    @property
    def end(self) -> int:
        if self.kind is StreamKind.LINK:
            return self.base + LINK_BLOCK_SIZE
        return self.base + SEL_BLOCK_BASE_SIZE + ADDR_BLOCK_SIZE * self.n_addr

    @property
    def n_addr(self) -> int:
        if self.kind is StreamKind.LINK:
            return 0
        return self.cap.cs.get(self.base, 4) & 0xF

    # -- decoded fields ------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.cap.cs.get(self.ctl_off, 4)

    @property
    def enabled(self) -> bool:
        return bool(self.control & StreamCtl.ENABLE)

    @property
    def stream_id(self) -> int:
        return self.control >> CTL_ID_SHIFT

    @property
    def algorithm(self) -> int:
        return (self.control & CTL_ALG_MASK) >> CTL_ALG_SHIFT

    @property
    def tc(self) -> int:
        return (self.control & CTL_TC_MASK) >> CTL_TC_SHIFT

    def tx_aggregation(self, substream: SubStream) -> int:
        """TLPs per aggregated unit its Tx Aggregation Mode selects for *substream* (1:
        no aggregation)."""
        return AGG_UNIT_TLPS[self.control >> CTL_AGG_SHIFT[SubStream(substream)] & 3]

    @property
    def default_stream(self) -> bool:
        return bool(self.control & StreamCtl.DEFAULT_STREAM)

    @property
    def tee_limited(self) -> bool:
        return bool(self.control & StreamCtl.TEE_LIMITED)

    @property
    def state(self) -> StreamState:
        return StreamState.SECURE if self.secure else StreamState.INSECURE

    @property
    def rid_range(self) -> tuple[int, int] | None:
        """(RID Base, RID Limit) if RID Association 2 is Valid (Selective only)."""
        if self.kind is StreamKind.LINK:
            return None
        r1 = self.cap.cs.get(self.base + 0x0C, 4)
        r2 = self.cap.cs.get(self.base + 0x10, 4)
        if not r2 & 1:
            return None
        return (r2 >> 8) & 0xFFFF, (r1 >> 8) & 0xFFFF

    def address_ranges(self) -> list[tuple[int, int]]:
        """Valid Address Association ranges as (base, limit inclusive)."""
        out = []
        for i in range(self.n_addr):
            off = self.base + SEL_BLOCK_BASE_SIZE + ADDR_BLOCK_SIZE * i
            a1 = self.cap.cs.get(off, 4)
            if not a1 & 1:
                continue
            limit = self.cap.cs.get(off + 4, 4) << 32 | ((a1 >> 20) & 0xFFF) << 20 | 0xFFFFF
            base = self.cap.cs.get(off + 8, 4) << 32 | ((a1 >> 8) & 0xFFF) << 20
            out.append((base, limit))
        return out

    def keys_ready(self) -> bool:
        """All six (Rx/Tx × PR/NPR/CPL) have a programmed key set that went GO."""
        return all(any(e.is_go(ks, s) for ks in KeySet)
                   for e in (self.tx, self.rx) for s in SubStream)

    # -- traffic -------------------------------------------------------------------------
    def protect(self, tlp: Tlp) -> bytes:
        """Protect a TLP for transmission on this stream (it must be Secure)."""
        if not self.secure:
            raise IdeKeyStateError(f"IDE stream {self.stream_id} is not Secure"
                                   f"{f' ({self.failure})' if self.failure else ''}")
        try:
            return self.tx.protect(tlp)
        except IdeKeyStateError as e:
            self.cap.report_failure(self, f"Tx: {e}")
            raise

    def unprotect(self, wire: bytes) -> Tlp:
        """Check a received IDE TLP; a failure makes the stream Insecure and is re-raised."""
        if not self.secure:
            raise IdeIntegrityError(self.stream_id, "stream is not Secure"
                                    f"{f' ({self.failure})' if self.failure else ''}")
        try:
            return self.rx.unprotect(wire)
        except IdeIntegrityError as e:
            self.cap.report_failure(self, e.reason)
            raise

    def receive(self, wire: bytes) -> list[Tlp]:
        """Check a received IDE TLP: the TLPs of the aggregated unit it completes (none
        while one is open, §6.33.6); a failure makes the stream Insecure and is re-raised."""
        if not self.secure:
            raise IdeIntegrityError(self.stream_id, "stream is not Secure"
                                    f"{f' ({self.failure})' if self.failure else ''}")
        try:
            return self.rx.receive(wire)
        except IdeIntegrityError as e:
            self.cap.report_failure(self, e.reason)
            raise


class IdeCapability:
    """The IDE capability of one function: registers in a ConfigSpace + stream state."""

    def __init__(self, cs: ConfigSpace, offset: int, streams: list[IdeStream],
                 name: str = "", aggregation: bool = False) -> None:
        self.cs = cs
        self.offset = offset
        self.streams = streams
        #: Aggregation Supported (§6.33.6): the receivers take aggregated units and the Tx
        #: Aggregation Mode fields are writable
        self.aggregation = aggregation
        self.listeners: list[Listener] = []
        self.log = log.getChild(name) if name else log

    @property
    def end(self) -> int:
        return self.streams[-1].end if self.streams else self.offset + 0x0C

    def set_aggregation_supported(self, on: bool) -> None:
        """Aggregation Supported (IDE Capability bit 4, §6.33.6): the Tx Aggregation Mode
        fields of every stream block become writable (or read 0 again) and the receivers
        take aggregated units (or refuse them)."""
        reg = self.cs.get(self.offset + 4, 4) & ~IdeCapReg.AGGREGATION
        self.cs.poke(self.offset + 4, 4, reg | (IdeCapReg.AGGREGATION if on else 0))
        self.aggregation = on
        for st in self.streams:
            ctl = st.ctl_off
            mask = int.from_bytes(self.cs.wmask[ctl:ctl + 4], "little") & ~CTL_AGG_MASK
            self.cs.wmask[ctl:ctl + 4] = (mask | (CTL_AGG_MASK if on else 0)).to_bytes(
                4, "little")
            if not on:
                self.cs.poke(ctl, 4, self.cs.get(ctl, 4) & ~CTL_AGG_MASK)
            st.rx.aggregation = on
            for sub in CTL_AGG_SHIFT:
                st.tx.set_aggregation(sub, st.tx_aggregation(sub))

    def contains(self, off: int, size: int = 1) -> bool:
        return off < self.end and off + size > self.offset

    # -- host config writes ----------------------------------------------------------------
    def config_write(self, off: int, data: bytes) -> None:
        """A config write from the host: apply it with the register masks, then react."""
        self.cs.write(off, data)
        self.after_write(off, len(data))

    def after_write(self, off: int, size: int) -> None:
        """React to a config write already applied to the ConfigSpace."""
        if not self.contains(off, size):
            return
        for st in self.streams:
            ctl = st.control
            old, st._ctl = st._ctl, ctl
            if ctl == old:
                continue
            was_on, on = bool(old & StreamCtl.ENABLE), bool(ctl & StreamCtl.ENABLE)
            changed = (old ^ ctl) & (CTL_ID_MASK | CTL_TC_MASK | CTL_ALG_MASK)
            if changed & CTL_ID_MASK:
                # New Stream ID: the engines (and their keys) belong to the old one.
                st.tx, st.rx = IdeTx(st.stream_id), IdeRx(st.stream_id, self.aggregation)
            for sub in CTL_AGG_SHIFT:
                st.tx.set_aggregation(sub, st.tx_aggregation(sub))
            if on and not was_on:
                st.failure = None
            elif was_on and on and changed:
                self._fail(st, "Stream ID/TC/algorithm changed while enabled")
            elif was_on and not on:
                self._notify(st, "disabled")
            self._evaluate(st)

    # -- key store (teeio.ide_km.IdeKeyStore) ----------------------------------------------
    def ide_registers(self) -> tuple[int, ...]:
        return tuple(self.cs.get(o, 4) for o in range(self.offset + 4, self.end, 4))

    def stream(self, stream_id: int) -> IdeStream | None:
        """The block carrying *stream_id* (an enabled one first)."""
        match = [s for s in self.streams if s.stream_id == stream_id]
        for s in match:
            if s.enabled:
                return s
        return match[0] if match else None

    def _require(self, stream_id: int) -> IdeStream:
        st = self.stream(stream_id)
        if st is None:
            raise IdeKeyStateError(f"no IDE stream block has Stream ID {stream_id}")
        return st

    def has_stream(self, stream_id: int) -> bool:
        return self.stream(stream_id) is not None

    @staticmethod
    def _engine(st: IdeStream, direction: Direction) -> IdeTx | IdeRx:
        return st.tx if direction == Direction.TX else st.rx

    def program_key(self, stream_id: int, key_set: KeySet, direction: Direction,
                    substream: SubStream, key: IdeKey) -> None:
        st = self._require(stream_id)
        self._engine(st, direction).program(key_set, substream, key)
        self._evaluate(st)

    def key_programmed(self, stream_id: int, key_set: KeySet, direction: Direction,
                       substream: SubStream) -> bool:
        st = self.stream(stream_id)
        return st is not None and self._engine(st, direction).is_programmed(key_set, substream)

    def key_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream) -> None:
        st = self._require(stream_id)
        self._engine(st, direction).go(key_set, substream)
        self._evaluate(st)

    def key_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                     substream: SubStream) -> None:
        st = self._require(stream_id)
        self._engine(st, direction).stop(key_set, substream)
        self._evaluate(st)      # stop alone never turns Secure into Insecure

    # -- events the device reports ---------------------------------------------------------
    def report_failure(self, st: IdeStream, reason: str) -> None:
        """Integrity failure or use of a stopped/unprogrammed key set on *st* (§6.33.6)."""
        self._fail(st, reason)

    def report_integrity_failure(self, stream_id: int, reason: str = "integrity check "
                                 "failed") -> None:
        st = self.stream(stream_id)
        if st is not None:
            self._fail(st, reason)

    def report_fail_message(self, stream_id: int) -> None:
        """The partner sent an IDE Fail Message for *stream_id*: Status b31 (RW1C)."""
        st = self.stream(stream_id)
        if st is not None:
            self.cs.poke(st.sts_off, 4, self.cs.get(st.sts_off, 4) | STS_FAIL_MSG)

    def invalidate_all(self, reason: str) -> None:
        """Session loss (IDE_KM session closed): every key invalid, every stream Insecure."""
        for st in self.streams:
            st.tx.reset()
            st.rx.reset()
            self._fail(st, reason)

    def link_down(self) -> None:
        """DL_Down: all streams Insecure (§6.33.6), keys invalidated."""
        self.invalidate_all("link down")

    def reset(self) -> None:
        """Conventional reset or FLR: registers to defaults, keys invalidated (§6.33.6)."""
        for st in self.streams:
            st.tx, st.rx = IdeTx(0), IdeRx(0, self.aggregation)
            for o in range(st.ctl_off, st.end, 4):
                if o != st.base or st.kind is StreamKind.LINK:
                    self.cs.poke(o, 4, 0)
            st._ctl = 0
            was = st.secure
            st.secure, st.failure = False, None
            if was:
                self._notify(st, "reset")

    # -- state -------------------------------------------------------------------------------
    def _fail(self, st: IdeStream, reason: str) -> None:
        if st.failure is None:
            st.failure = reason
        was = st.secure
        st.secure = False
        self._write_state(st)
        if was:
            self.log.warning("IDE stream %d (%s %d) Insecure: %s", st.stream_id,
                             st.kind.name.lower(), st.index, reason)
            self._notify(st, f"insecure: {reason}")

    def _evaluate(self, st: IdeStream) -> None:
        if not st.enabled:
            st.secure = False
        elif not st.secure and st.failure is None and st.keys_ready():
            if st.algorithm != ALG_AES_GCM_256_96:
                self.log.info("IDE stream %d: algorithm %d is not supported; stays Insecure",
                              st.stream_id, st.algorithm)
            else:
                st.secure = True
                self.log.info("IDE stream %d (%s %d) Secure", st.stream_id,
                              st.kind.name.lower(), st.index)
                self._notify(st, "secure")
        self._write_state(st)

    def _write_state(self, st: IdeStream) -> None:
        sts = self.cs.get(st.sts_off, 4) & ~STS_STATE_MASK
        self.cs.poke(st.sts_off, 4, sts | st.state)

    def _notify(self, st: IdeStream, event: str) -> None:
        for cb in list(self.listeners):
            cb(st, event)


def build(cs: ConfigSpace, offset: int, *, link: bool = True, n_selective: int = 2,
          n_addr: int = 1, tee_limited: bool = True, name: str = "",
          aggregation: bool = False) -> IdeCapability:
    """Add the IDE extended capability at *offset* and return its model.  *aggregation*:
    Aggregation Supported (§6.33.6), with writable Tx Aggregation Mode fields."""
    if not 1 <= n_selective <= 256:
        raise ValueError("need 1..256 selective IDE streams")
    if not 0 <= n_addr <= 15:
        raise ValueError("need 0..15 address association blocks")
    cap = (IdeCapReg.SELECTIVE_IDE | IdeCapReg.IDE_KM | (n_selective - 1) << 16
           | (IdeCapReg.LINK_IDE if link else 0) | (IdeCapReg.TEE_LIMITED if tee_limited else 0))
    # Algorithms [12:8] = 0 (AES-GCM-256, 96-bit MAC); #TCs - 1 [15:13] = 0.
    sel_size = SEL_BLOCK_BASE_SIZE + ADDR_BLOCK_SIZE * n_addr
    body_len = 8 + (LINK_BLOCK_SIZE if link else 0) + n_selective * sel_size
    cs.add_ext_capability(offset, ExtCapId.IDE, IDE_CAP_VERSION, bytes(body_len))
    cs.set(offset + 4, 4, int(cap))
    cs.set(offset + 8, 4, 0)                                  # IDE Control: RsvdP

    ctl_common = int(StreamCtl.ENABLE) | CTL_ALG_MASK | CTL_TC_MASK | CTL_ID_MASK
    model = IdeCapability(cs, offset, [], name)
    off = offset + 0x0C
    if link:
        cs.set(off, 4, 0, wmask=ctl_common)
        cs.set(off + 4, 4, 0, w1c=STS_FAIL_MSG)
        model.streams.append(IdeStream(model, StreamKind.LINK, 0, off, IdeTx(0), IdeRx(0)))
        off += LINK_BLOCK_SIZE
    sel_ctl = ctl_common | int(StreamCtl.DEFAULT_STREAM) | (
        int(StreamCtl.TEE_LIMITED) if tee_limited else 0)
    for i in range(n_selective):
        cs.set(off, 4, n_addr)                                # Selective Capability: RO
        cs.set(off + 4, 4, 0, wmask=sel_ctl)
        cs.set(off + 8, 4, 0, w1c=STS_FAIL_MSG)
        cs.set(off + 0x0C, 4, 0, wmask=0x00FFFF00)            # RID Limit
        cs.set(off + 0x10, 4, 0, wmask=0xFFFFFF01)            # Seg Base, RID Base, Valid
        for a in range(n_addr):
            ab = off + SEL_BLOCK_BASE_SIZE + ADDR_BLOCK_SIZE * a
            cs.set(ab, 4, 0, wmask=0xFFFFFF01)                # Limit/Base lower, Valid
            cs.set(ab + 4, 4, 0, wmask=0xFFFFFFFF)            # Memory Limit Upper
            cs.set(ab + 8, 4, 0, wmask=0xFFFFFFFF)            # Memory Base Upper
        model.streams.append(IdeStream(model, StreamKind.SELECTIVE, i, off, IdeTx(0),
                                       IdeRx(0)))
        off += sel_size
    if aggregation:
        model.set_aggregation_supported(True)
    return model
