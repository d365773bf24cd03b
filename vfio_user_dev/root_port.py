"""The root port: the only part of the device server that maps guest RAM (docs/design.md
decision 10).

Every TLP the device sends over the link is checked here, in this order:

1. **IDE** (PCIe 6.x §6.33.4-§6.33.6).  A TLP with the IDE prefix goes to the Rx of the
   stream it names; a failure (MAC, counter, key set, misrouting) makes that stream
   Insecure, discards the TLP and sends an IDE Fail Message to the device.  A TLP
   without the prefix from a requester whose Secure stream has started IDE on that
   sub-stream is a failure too.  The requester must lie in the stream's RID range.
2. **Trusted-DMA windows** (IOMMU-style; docs/design.md "Trust model: DMA").  The TSM authorises
   windows, each for one requester ID and stream.  T=1 DMA must lie wholly inside an
   active window of its requester and stream, with the access (read/write) it allows;
   T=0 DMA must not touch any window.  Every refusal is counted by reason, kept in a
   short log and logged (one line per burst and reason).
3. **Memory** through the DMA map set.  A window remembers which maps (map id, file
   inode, offset) backed it when it was authorised, and accesses through it are pinned
   to those maps.  A later DMA_MAP/DMA_UNMAP by the client that touches a window's
   range suspends the window and is recorded as a security event; DMA into it is refused
   until the TSM re-authorises it.  Nothing is silently followed.

**MMIO** (PCIe 6.x §11.2.1; docs/design.md decision 10).  The root port is also the requester of
the CPU's accesses to the device's TEE MMIO (BAR0): :meth:`RootPort.mmio_read` /
:meth:`RootPort.mmio_write` send MRd/MWr TLPs down the link (Requester ID = the root
port).  With a Secure stream to the device they are IDE-protected on it (PR for writes,
NPR for reads; the completions come back on CPL, each with its own counters); T=1 only
after the TSM turned on *private MMIO* for the device on that stream
(:meth:`RootPort.set_mmio_private`, platform op ``mmio_private``) -- and then never in
the clear: if that stream is not Secure the access is not sent at all (reads return all
ones).  The host's own accesses (docs/design.md decision 12) are always T=0.  A completion that
fails its IDE check makes the stream Insecure as DMA does; a completion to a T=1 read
that is not on the request's stream, or an Unsupported Request, reads as all ones.

Refused reads get an Unsupported Request completion; refused posted writes are dropped
and reported back to the endpoint (see ``link.py``).  Read completions are split by MPS
on RCB boundaries and, for a request that came over IDE, protected by the root port's
Tx of the same stream with T echoed (§11.2.1).

Runs of ordinary IDE requests (well-formed, of one Secure stream, key set in use, MAC
good) are checked and decrypted as bytes, a run at a time, with no TLP objects
(:func:`~teeio.tlp.parse_ide_requests`, :meth:`~teeio.ide.IdeRx.open_many`), and
contiguous admitted writes are gathered into one memory access; the checks, their order
and what is recorded are those of the per-TLP path, which takes every TLP the run does not.

The TSM programs all of this through the platform control socket (``platform_ctl.py``):
stream setup, IDE keys (the same KEY_PROG / K_SET_GO / K_SET_STOP steps IDE_KM gives
the device), Enable, windows; and reads the status and events.  The lock here guards
configuration and IDE state; it is never held while guest memory is accessed (a socket
DMA may wait for the client, whose connection thread reports map changes here).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from teeio.ide import Direction, IdeIntegrityError, IdeKey, IdeKeyStateError, KeySet
from teeio.platform_channel import StreamState
from teeio.tlp import (
    IDE_PREFIX_BYTE0,
    PREFIX_LEN,
    CplStatus,
    SubStream,
    Tlp,
    TlpError,
    TlpType,
    completion_parts,
    completion_spans,
    is_protected,
    parse_ide_requests,
    peek,
    prefix_stream_id,
    split,
)
from vfio_user_dev.dma import Backing, DmaFault, DmaMapSet, MapEvent
from vfio_user_dev.link.interfaces import ROOT_PORT_ID, LinkFault, RootPortReply
from vfio_user_dev.link.streams import IdeStreamEnd
from vfio_user_dev.platform_events import PlatformEvents

log = logging.getLogger(__name__)

RECENT = 128


class RootPortError(Exception):
    """A configuration request the root port refuses (bad stream, overlap, no backing)."""


@dataclass
class Window:
    """A trusted-DMA window: guest range, who may use it, what backed it when authorised."""

    window_id: int
    requester_id: int
    stream_id: int
    base: int
    size: int
    read: bool
    write: bool
    backing: tuple[Backing, ...]
    suspended: str | None = None

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def map_ids(self) -> frozenset[int]:
        return frozenset(b.map_id for b in self.backing)

    def overlaps(self, address: int, length: int) -> bool:
        return address < self.end and self.base < address + length

    def covers(self, address: int, length: int) -> bool:
        return self.base <= address and address + length <= self.end

    def as_dict(self) -> dict[str, object]:
        return {"id": self.window_id, "requester_id": self.requester_id,
                "stream_id": self.stream_id, "base": self.base, "size": self.size,
                "access": ("r" if self.read else "") + ("w" if self.write else ""),
                "state": "suspended" if self.suspended else "active",
                "suspended_reason": self.suspended,
                "backing": [b.as_dict() for b in self.backing]}


class RootPortStream(IdeStreamEnd):
    """The root port's end of one Selective IDE stream, plus the sub-streams on which IDE
    TLPs have arrived (after which a non-IDE TLP from its requesters is a failure)."""

    def __init__(self, stream_id: int, rid_base: int, rid_limit: int) -> None:
        super().__init__(stream_id, rid_base, rid_limit)
        self.started: set[SubStream] = set()

    def reset(self) -> None:
        super().reset()
        self.started.clear()

    def has_rid(self, rid: int) -> bool:
        return self.rid_base <= rid <= self.rid_limit

    def as_dict(self) -> dict[str, object]:
        keys: dict[str, dict[str, object]] = {}
        for d, end in (("tx", self.tx), ("rx", self.rx)):
            keys[d] = {}
            for s in SubStream:
                active = end.active_key_set(s)
                keys[d][s.name] = {
                    "active": None if active is None else active.name,
                    **{k.name: ("go" if end.is_go(k, s) else
                                "programmed" if end.is_programmed(k, s) else "empty")
                       for k in KeySet}}
        return {"id": self.stream_id, "state": self.state(), "enabled": self.enabled,
                "rid_base": self.rid_base, "rid_limit": self.rid_limit,
                "insecure_reason": self.insecure_reason or self.rx.insecure_reason,
                "started": sorted(s.name for s in self.started), "keys": keys}


@dataclass
class _Request:
    """One memory request as the checks see it (from a TLP, or a clear-path piece); or a
    run of contiguous admitted requests of one kind gathered by the fast path, whose TLPs'
    byte ranges and tags are in *pieces*."""

    write: bool
    requester_id: int
    address: int            # of the first enabled byte
    length: int             # bytes covered
    t_bit: bool = False
    stream: RootPortStream | None = None
    tag: int = 0
    tc: int = 0
    attr: int = 0
    data: bytes = b""
    pieces: list[tuple[int, int, int]] | None = None    # (address, length, tag)

    @property
    def tlps(self) -> int:
        return 1 if self.pieces is None else len(self.pieces)

    def each(self) -> Iterator[_Request]:
        """The request of each TLP (this one unless it is a gathered run)."""
        if self.pieces is None:
            yield self
            return
        off = 0
        for a, n, tag in self.pieces:
            yield _Request(self.write, self.requester_id, a, n, self.t_bit, self.stream,
                           tag=tag, tc=self.tc, attr=self.attr,
                           data=self.data[off:off + n] if self.write else b"")
            off += n


@dataclass
class _Admitted:
    req: _Request
    pin: frozenset[int] | None
    refused: bool = False       # a refused MRd, answered with UR


@dataclass
class _Burst:
    """Refusals of one burst, logged together at the end."""

    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    first: dict[str, str] = field(default_factory=dict)
    fail_messages: list[tuple[int, str]] = field(default_factory=list)   # sent at the end


class RootPort:
    def __init__(self, dma: DmaMapSet, *, completer_id: int = ROOT_PORT_ID,
                 name: str = "rp0", events: PlatformEvents | None = None) -> None:
        self.dma = dma
        self.completer_id = completer_id
        self.log = log.getChild(name)
        self.streams: dict[int, RootPortStream] = {}
        self.windows: dict[int, Window] = {}
        self._next_window = 1
        self._lock = threading.RLock()
        self.refusals: collections.Counter[str] = collections.Counter()
        self.recent_refusals: collections.deque[dict[str, object]] = collections.deque(
            maxlen=RECENT)
        #: the platform's event log (``platform_events.py``): IDE failures, remaps, this
        #: end's stream changes, and what the root port revoked by itself
        self.platform_events = events if events is not None else PlatformEvents()
        self.counters = {"tlps_in": 0, "tlps_admitted": 0, "completions_out": 0,
                         "completions_discarded": 0, "security_events": 0,
                         "ide_failures": 0, "clear_transfers": 0}
        self.counters.update(mmio_requests=0, mmio_t1=0, mmio_not_sent=0, mmio_ur=0,
                             mmio_completions_discarded=0)
        self.mps = 256
        self.mrrs = 512
        self._ide_fail_sink: Callable[[int, str], None] | None = None
        self._downstream: Callable[[Sequence[bytes]], list[bytes]] | None = None
        #: private MMIO (TSM): device requester ID -> the stream its T=1 MMIO goes on
        self.mmio_private: dict[int, int] = {}
        #: why a trusted window may not be granted to a requester now (None: it may); the
        #: platform sets it: only a TDI in RUN gets windows
        self.window_gate: Callable[[int], str | None] | None = None
        dma.listeners.append(self._map_changed)

    def attach_link(self, mps: int, ide_fail_sink: Callable[[int, str], None],
                    downstream: Callable[[Sequence[bytes]], list[bytes]] | None = None,
                    mrrs: int = 512) -> None:
        """Called by the Link: its MPS (completions are split by it) and MRRS, where IDE
        Fail Messages to the device go, and how MMIO requests reach it (*downstream*:
        request wires in, completion wires out)."""
        self.mps = mps
        self.mrrs = mrrs
        self._ide_fail_sink = ide_fail_sink
        self._downstream = downstream

    # -- configuration (the TSM, through platform_ctl) --------------------------------------
    def setup_stream(self, stream_id: int, rid_base: int = 0, rid_limit: int = 0xFFFF) -> None:
        """(Re)create stream *stream_id* for requesters *rid_base*..*rid_limit*: no keys,
        Enable clear, Insecure."""
        if not 0 <= stream_id <= 0xFF or not 0 <= rid_base <= rid_limit <= 0xFFFF:
            raise RootPortError(f"bad stream {stream_id} or RID range {rid_base:#x}.."
                                f"{rid_limit:#x}")
        with self._lock:
            for other in self.streams.values():
                if other.stream_id != stream_id and other.rid_base <= rid_limit \
                        and rid_base <= other.rid_limit:
                    raise RootPortError(f"RID range {rid_base:#06x}..{rid_limit:#06x} overlaps "
                                        f"stream {other.stream_id}'s")
            old = self.streams.get(stream_id)
            self.streams[stream_id] = RootPortStream(stream_id, rid_base, rid_limit)
            if old is not None:
                self._revoke_stream(stream_id, f"stream {stream_id} set up again")
        self.log.info("stream %d set up for RIDs %#06x..%#06x", stream_id, rid_base, rid_limit)

    def remove_stream(self, stream_id: int) -> None:
        with self._lock:
            self._stream(stream_id)
            del self.streams[stream_id]
            self._revoke_stream(stream_id, f"stream {stream_id} removed")
            self._event("rp_stream", end="root_port", stream=stream_id, state="removed",
                        reason="removed by the TSM")
        self.log.info("stream %d removed", stream_id)

    def _stream(self, stream_id: int) -> RootPortStream:
        s = self.streams.get(stream_id)
        if s is None:
            raise RootPortError(f"no stream {stream_id} at the root port")
        return s

    def has_stream(self, stream_id: int) -> bool:
        with self._lock:
            return stream_id in self.streams

    def program_key(self, stream_id: int, key_set: KeySet, direction: Direction,
                    substream: SubStream, key: IdeKey) -> None:
        with self._lock:
            s = self._stream(stream_id)
            end = s.rx if direction == Direction.RX else s.tx
            try:
                end.program(key_set, substream, key)
            except IdeKeyStateError as exc:
                raise RootPortError(str(exc)) from None
        self.log.info("stream %d %s %s %s key programmed", stream_id, Direction(direction).name,
                      SubStream(substream).name, KeySet(key_set).name)

    def key_programmed(self, stream_id: int, key_set: KeySet, direction: Direction,
                       substream: SubStream) -> bool:
        with self._lock:
            s = self._stream(stream_id)
            end = s.rx if direction == Direction.RX else s.tx
            return end.is_programmed(key_set, substream)

    def key_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream | None = None) -> None:
        with self._lock:
            s = self._stream(stream_id)
            end = s.rx if direction == Direction.RX else s.tx
            try:
                end.go(key_set, substream)
            except IdeKeyStateError as exc:
                raise RootPortError(str(exc)) from None
        self.log.info("stream %d %s %s K_SET_GO %s", stream_id, Direction(direction).name,
                      "all" if substream is None else SubStream(substream).name,
                      KeySet(key_set).name)

    def key_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                     substream: SubStream | None = None) -> None:
        with self._lock:
            s = self._stream(stream_id)
            before = s.state()
            (s.rx if direction == Direction.RX else s.tx).stop(key_set, substream)
            if s.state() != before:
                self._stream_event(s, f"K_SET_STOP {KeySet(key_set).name}")
        self.log.info("stream %d %s K_SET_STOP %s", stream_id, Direction(direction).name,
                      KeySet(key_set).name)

    def enable_stream(self, stream_id: int, enable: bool = True) -> str:
        """Set or clear Enable; Secure needs a GO key set in all six (direction, sub-stream)
        slots.  Returns the state."""
        with self._lock:
            s = self._stream(stream_id)
            if enable and not s.keys_ready():
                raise RootPortError(f"stream {stream_id}: not every sub-stream and direction "
                                    "has a GO key set")
            if enable and (s.insecure_reason or s.rx.insecure_reason):
                raise RootPortError(f"stream {stream_id} is Insecure "
                                    f"({s.insecure_reason or s.rx.insecure_reason}); reset "
                                    "and key it again")
            before = s.state()
            s.enabled = enable
            state = s.state()
            if state != before:
                self._stream_event(s, "Enable " + ("set" if enable else "cleared"))
        self.log.info("stream %d %s: %s", stream_id, "enabled" if enable else "disabled", state)
        return state

    def reset_stream(self, stream_id: int) -> None:
        with self._lock:
            s = self._stream(stream_id)
            s.reset()
            self._stream_event(s, "reset by the TSM")
        self.log.info("stream %d reset: keys invalidated, Insecure", stream_id)

    def invalidate_all(self, reason: str) -> None:
        with self._lock:
            for s in self.streams.values():
                s.reset()
                self._stream_event(s, reason)
        self.log.warning("every root-port IDE key invalidated: %s", reason)

    def authorise_window(self, requester_id: int, stream_id: int, base: int, size: int,
                         read: bool = True, write: bool = True) -> Window:
        """A trusted-DMA window for T=1 DMA of *requester_id* on *stream_id*; it records
        the maps that back the range now (all of it must be mapped)."""
        if size <= 0 or base < 0 or base + size > 1 << 64 or not 0 <= requester_id <= 0xFFFF:
            raise RootPortError(f"bad window {base:#x}+{size:#x} for RID {requester_id:#x}")
        if not (read or write):
            raise RootPortError("a window must allow reads, writes or both")
        refusal = self.window_gate(requester_id) if self.window_gate is not None else None
        if refusal is not None:
            raise RootPortError(f"no window for RID {requester_id:#06x}: {refusal}")
        with self._lock:
            self._stream(stream_id)
            for w in self.windows.values():
                if w.overlaps(base, size):
                    raise RootPortError(f"{base:#x}+{size:#x} overlaps window {w.window_id}")
            try:
                backing = self.dma.backing(base, size)
            except DmaFault as exc:
                raise RootPortError(f"window {base:#x}+{size:#x} is not wholly mapped: "
                                    f"{exc}") from None
            w = Window(self._next_window, requester_id, stream_id, base, size, read, write,
                       backing)
            self._next_window += 1
            self.windows[w.window_id] = w
        self.log.info("window %d authorised: RID %#06x stream %d %#x+%#x %s, maps %s",
                      w.window_id, requester_id, stream_id, base, size,
                      w.as_dict()["access"], sorted(w.map_ids))
        return w

    def reauthorise_window(self, window_id: int) -> Window:
        """Record the current backing of a (suspended) window and make it active again."""
        with self._lock:
            w = self._window(window_id)
            try:
                w.backing = self.dma.backing(w.base, w.size)
            except DmaFault as exc:
                raise RootPortError(f"window {window_id} is not wholly mapped: {exc}") from None
            w.suspended = None
        self.log.info("window %d re-authorised, maps %s", window_id, sorted(w.map_ids))
        return w

    def revoke_window(self, window_id: int) -> None:
        with self._lock:
            self._window(window_id)
            del self.windows[window_id]
        self.log.info("window %d revoked", window_id)

    def _window(self, window_id: int) -> Window:
        w = self.windows.get(window_id)
        if w is None:
            raise RootPortError(f"no window {window_id}")
        return w

    # -- MMIO: the CPU's accesses to the device's TEE MMIO (§11.2.1) --------------------------
    def set_mmio_private(self, requester_id: int, stream_id: int, enable: bool) -> None:
        """Private MMIO (the TSM, after START): the device *requester_id*'s MMIO goes T=1
        on *stream_id*, which must exist here and cover the device's RID; or off again."""
        if not 0 <= requester_id <= 0xFFFF:
            raise RootPortError(f"bad requester ID {requester_id:#x}")
        with self._lock:
            if enable:
                s = self._stream(stream_id)
                if not s.has_rid(requester_id):
                    raise RootPortError(f"stream {stream_id} does not cover RID "
                                        f"{requester_id:#06x}")
                self.mmio_private[requester_id] = stream_id
            else:
                current = self.mmio_private.get(requester_id)
                if current is not None and current != stream_id:
                    raise RootPortError(f"private MMIO of RID {requester_id:#06x} is on stream "
                                        f"{current}, not {stream_id}")
                self.mmio_private.pop(requester_id, None)
        self.log.info("private MMIO for RID %#06x %s (stream %d)", requester_id,
                      "on" if enable else "off", stream_id)

    def _mmio_route(self, requester_id: int, allow_tee: bool
                    ) -> tuple[RootPortStream | None, bool] | str:
        """(stream or None, T) for MMIO to *requester_id*, or why it cannot be sent."""
        sid = self.mmio_private.get(requester_id) if allow_tee else None
        if sid is not None:
            s = self.streams.get(sid)
            if s is None or not s.is_secure():
                return f"private MMIO stream {sid} is not Secure: T=1 request not sent"
            return s, True
        owner = self._stream_of_rid(requester_id)
        if owner is not None and owner.is_secure():
            return owner, False
        return None, False

    def mmio_in_clear(self, requester_id: int, allow_tee: bool = True) -> bool:
        """Whether MMIO to *requester_id* would cross in the clear with T=0 (the device may
        then take a direct path when nothing watches the link)."""
        with self._lock:
            return self._mmio_route(requester_id, allow_tee) == (None, False)

    def mmio_read(self, requester_id: int, address: int, length: int, *,
                  allow_tee: bool = True) -> bytes | None:
        """Read *length* bytes of the device's memory space at *address*: MRd TLPs
        down the link.  None if any part was not read (UR, not sent, discarded): the CPU
        then reads all ones.  *allow_tee* False: T=0 whatever private MMIO says (the
        host's own accesses)."""
        pieces = split(address, length, self.mrrs)
        tlps = [Tlp.memory_read(self.completer_id, tag, a, n) for tag, (a, n)
                in enumerate(pieces)]
        answers = self._mmio(requester_id, tlps, allow_tee)
        if answers is None:
            return None
        out = bytearray()
        for tag, (_a, n) in enumerate(pieces):
            got = answers.get(tag)
            if got is None or len(got) != n:
                return None
            out += got
        return bytes(out)

    def mmio_write(self, requester_id: int, address: int, data: bytes, *,
                   allow_tee: bool = True) -> bool:
        """Write *data* to the device's memory space at *address*: posted MWr TLPs.
        False if it was not sent (there is no completion to say more)."""
        tlps = [Tlp.memory_write(self.completer_id, 0, a, data[a - address:a - address + n])
                for a, n in split(address, len(data), self.mps)]
        return self._mmio(requester_id, tlps, allow_tee) is not None

    def _mmio(self, requester_id: int, tlps: list[Tlp], allow_tee: bool
              ) -> dict[int, bytes | None] | None:
        """Send *tlps* (MRd or MWr, T=0, no stream yet) to the device; the read data by
        tag (None: not completed successfully), or None if nothing was sent."""
        burst = _Burst()
        try:
            with self._lock:
                route = self._mmio_route(requester_id, allow_tee)
                if isinstance(route, str):
                    self.counters["mmio_not_sent"] += 1
                    self._refuse(burst, None, "mmio_not_sent", route)
                    return None
                stream, t_bit = route
                # Tags (PCIe 6.x §2.2.6.2): each MRd gets its own 8-bit tag, round-robin
                # over the root port's requests (the running request count), so successive
                # reads carry different tags; the answers go back under the caller's tags.
                # Posted writes need no tag: 0.
                first = self.counters["mmio_requests"]
                caller: dict[int, int] = {}         # tag on the wire -> the caller's
                retagged: list[Tlp] = []
                for i, t in enumerate(tlps):
                    if not t.type.has_data:
                        tag = (first + i) & 0xFF
                        if tag in caller:
                            raise LinkFault("more MMIO reads in one burst than 8-bit tags")
                        caller[tag] = t.tag
                        t = replace(t, tag=tag)
                    retagged.append(t)
                tlps = retagged
                reads = {t.tag: t for t in tlps if not t.type.has_data}
                self.counters["mmio_requests"] += len(tlps)
                if t_bit:
                    self.counters["mmio_t1"] += len(tlps)
                wires: list[bytes] = []
                for tlp in tlps:
                    if stream is None:
                        wires.append(tlp.encode())
                        continue
                    try:
                        wires.append(stream.tx.protect(replace(tlp, t_bit=t_bit,
                                                               stream_id=stream.stream_id)))
                    except IdeKeyStateError as exc:
                        self.counters["mmio_not_sent"] += 1
                        self._refuse(burst, None, "mmio_not_sent", str(exc))
                        return None
            if self._downstream is None:
                raise LinkFault("root port is not connected to a link")
            completions = self._downstream(wires)
            answers: dict[int, bytes | None] = {}
            data: dict[int, bytearray] = {tag: bytearray() for tag in reads}
            with self._lock:
                for wire in completions:
                    cpl = self._mmio_completion(wire, burst)
                    if cpl is None:
                        continue
                    req = reads.get(cpl.tag)
                    if (req is None or cpl.requester_id != self.completer_id
                            or cpl.tag in answers):
                        # No outstanding read with this Requester ID and tag: an Unexpected
                        # Completion (§2.3.2), discarded and counted.
                        self.counters["mmio_completions_discarded"] += 1
                        self._refuse(burst, None, "unexpected_completion",
                                     f"{cpl.type.name} tag {cpl.tag} for "
                                     f"{cpl.requester_id:#06x}: no such read outstanding")
                        continue
                    if t_bit and (stream is None or cpl.stream_id != stream.stream_id):
                        # A T=1 read is answered on its stream or not at all (§11.2.1).
                        self.counters["mmio_completions_discarded"] += 1
                        answers[cpl.tag] = None
                        continue
                    if cpl.status != CplStatus.SC:
                        self.counters["mmio_ur"] += 1
                        answers[cpl.tag] = None
                        continue
                    data[cpl.tag] += cpl.payload_bytes()
                    if len(data[cpl.tag]) >= req.request_byte_count:
                        answers[cpl.tag] = bytes(data[cpl.tag])
            return {caller[tag]: got for tag, got in answers.items()}
        finally:
            self._finish_burst(burst)

    def _mmio_completion(self, wire: bytes, burst: _Burst) -> Tlp | None:
        """IDE check and decode of one completion from the device.  Under the lock."""
        if is_protected(wire):
            sid = prefix_stream_id(wire)
            s = None if sid is None else self.streams.get(sid)
            if s is None or not s.is_secure():
                self.counters["mmio_completions_discarded"] += 1
                return None
            try:
                tlp = s.rx.unprotect(wire)
            except IdeIntegrityError as exc:
                self._ide_failed(s, exc.reason, burst)
                self._refuse(burst, None, "ide", exc.reason)
                return None
            s.started.add(tlp.substream)
        else:
            try:
                tlp = Tlp.decode(wire)
            except TlpError as exc:
                self._refuse(burst, None, "malformed", str(exc))
                return None
            owner = self._stream_of_rid(tlp.completer_id)
            if owner is not None and owner.is_secure() and tlp.substream in owner.started:
                reason = (f"non-IDE {tlp.type.name} from {tlp.completer_id:#06x} on "
                          f"{tlp.substream.name} after IDE started")
                self._ide_failed(owner, reason, burst)
                self._refuse(burst, None, "ide", reason)
                return None
        if not tlp.type.is_completion:
            self._refuse(burst, None, "malformed", f"{tlp.type.name} where a completion was due")
            return None
        return tlp

    # -- map changes by the client: security events -----------------------------------------
    def _map_changed(self, ev: MapEvent) -> None:
        b = ev.backing
        with self._lock:
            for w in self.windows.values():
                if not w.overlaps(b.address, b.size):
                    continue
                if ev.kind == "unmap" and b.map_id not in w.map_ids:
                    continue
                why = (f"client {'un' if ev.kind == 'unmap' else ''}mapped {b.address:#x}+"
                       f"{b.size:#x} (map {b.map_id})")
                first = w.suspended is None
                if first:
                    w.suspended = why
                self._event("remap", window=w.window_id, op=ev.kind, backing=b.as_dict(),
                            window_suspended=first)
                self.counters["security_events"] += 1
                self.log.warning("SECURITY: window %d (%#x+%#x): %s; DMA into it refused until "
                                 "re-authorised", w.window_id, w.base, w.size, why)

    def _event(self, kind: str, **data: object) -> None:
        self.platform_events.emit(kind, **data)

    def events_since(self, seq: int = 0, kinds: Sequence[str] | None = None
                     ) -> list[dict[str, object]]:
        """Platform events numbered after *seq* (of *kinds*, if given)."""
        return self.platform_events.since(
            seq, kinds=None if kinds is None else frozenset(kinds))[0]

    # -- enforcement that never waits for the TSM (docs/design.md "state has one owner") ---
    def revoke_requester(self, requester_id: int, reason: str) -> int:
        """The TDI of *requester_id* left RUN (or its device was reset): revoke its trusted
        windows and switch its private MMIO off, here and now.  Returns how many windows."""
        with self._lock:
            windows, mmio = self._revoke(lambda rid, _sid: rid == requester_id, reason)
        if windows or mmio:
            self.log.warning("RID %#06x: %d window(s) revoked%s: %s", requester_id, windows,
                             ", private MMIO off" if mmio else "", reason)
        return windows

    def _revoke_stream(self, stream_id: int, reason: str) -> None:
        """Under the lock: the stream went Insecure; nothing trusted rides on it any more."""
        self._revoke(lambda _rid, sid: sid == stream_id, reason)

    def _revoke(self, which: Callable[[int, int], bool], reason: str) -> tuple[int, int]:
        """Under the lock: revoke the windows and the private MMIO whose (requester ID,
        stream) *which* selects, each with its event; how many of each."""
        gone = [w for w in self.windows.values() if which(w.requester_id, w.stream_id)]
        for w in gone:
            del self.windows[w.window_id]
            self._event("window_revoked", window=w.window_id, requester_id=w.requester_id,
                        reason=reason)
        closed = [(rid, sid) for rid, sid in self.mmio_private.items() if which(rid, sid)]
        for rid, sid in closed:
            del self.mmio_private[rid]
            self._event("mmio_private", requester_id=rid, stream=sid, enabled=False,
                        reason=reason)
        return len(gone), len(closed)

    def _stream_event(self, s: RootPortStream, reason: str) -> None:
        """Under the lock: this end of *s* changed; if it is no longer Secure, revoke."""
        state = s.state()
        self._event("rp_stream", end="root_port", stream=s.stream_id, state=state,
                    reason=reason)
        if state is not StreamState.SECURE:
            self._revoke_stream(s.stream_id, f"stream {s.stream_id} {state}: {reason}")

    def device_reset(self, requester_id: int, reason: str) -> None:
        """The device *requester_id* was reset: its IDE keys are gone (PCIe 6.x §6.33.6), so
        this end of every stream that carries it leaves Secure too (keys invalidated), and
        its windows and private MMIO are revoked.  T=0 MMIO and DMA then work in the clear;
        the TSM keys the stream again before the next LOCK."""
        self.revoke_requester(requester_id, reason)
        with self._lock:
            for s in self.streams.values():
                if s.has_rid(requester_id) and (s.enabled or s.keys_ready()
                                                or s.state() is StreamState.SECURE):
                    s.reset()
                    self._stream_event(s, reason)

    # -- IDE failures -------------------------------------------------------------------------
    def _ide_failed(self, stream: RootPortStream, reason: str, burst: _Burst) -> None:
        stream.mark_insecure(reason)
        self.counters["ide_failures"] += 1
        self._event("ide_fail", stream=stream.stream_id, how="detected", reason=reason)
        self._stream_event(stream, f"IDE check failed: {reason}")
        self.log.warning("IDE stream %d Insecure: %s; IDE Fail Message sent", stream.stream_id,
                         reason)
        burst.fail_messages.append((stream.stream_id, reason))

    def _finish_burst(self, burst: _Burst) -> None:
        """Log the burst's refusals; send its IDE Fail Messages (outside the lock: the
        device side takes its own)."""
        with self._lock:
            self._log_burst(burst)
        if self._ide_fail_sink is not None:
            for sid, reason in burst.fail_messages:
                self._ide_fail_sink(sid, reason)

    def ide_fail_message(self, stream_id: int, reason: str) -> None:
        """The device's IDE Fail Message: the stream is Insecure here too (§6.33.6)."""
        with self._lock:
            s = self.streams.get(stream_id)
            self.counters["ide_failures"] += 1
            self._event("ide_fail", stream=stream_id, how="message", reason=reason)
            if s is not None:
                s.mark_insecure(f"IDE Fail Message from the device: {reason}")
                self._stream_event(s, f"IDE Fail Message from the device: {reason}")
        self.log.warning("IDE Fail Message from the device for stream %d: %s", stream_id,
                         reason)

    # -- checks -------------------------------------------------------------------------------
    def _stream_of_rid(self, rid: int) -> RootPortStream | None:
        for s in self.streams.values():
            if s.has_rid(rid):
                return s
        return None

    def _check(self, req: _Request) -> tuple[frozenset[int] | None, str | None, str]:
        """(pinned map ids, refusal reason key or None, detail) for one request."""
        a, n = req.address, req.length
        if req.stream is not None and not req.stream.has_rid(req.requester_id):
            return None, "rid_outside_stream", (f"RID {req.requester_id:#06x} is outside "
                                                f"stream {req.stream.stream_id}'s RID range")
        if req.t_bit:
            sid = req.stream.stream_id if req.stream is not None else None
            for w in self.windows.values():
                if w.requester_id == req.requester_id and w.stream_id == sid and w.covers(a, n):
                    if w.suspended:
                        return None, "window_suspended", (f"window {w.window_id} suspended: "
                                                          f"{w.suspended}")
                    if not (w.write if req.write else w.read):
                        return None, "window_access", (f"window {w.window_id} does not allow "
                                                       f"{'writes' if req.write else 'reads'}")
                    return w.map_ids, None, ""
            return None, "t1_outside_window", (f"T=1 {a:#x}+{n} is in no window of RID "
                                               f"{req.requester_id:#06x} stream {sid}")
        for w in self.windows.values():
            if w.overlaps(a, n):
                return None, "t0_into_window", f"T=0 {a:#x}+{n} touches window {w.window_id}"
        return None, None, ""

    def _refuse(self, burst: _Burst, req: _Request | None, reason: str, detail: str) -> str:
        self.refusals[reason] += 1
        burst.refused[reason] += 1
        burst.first.setdefault(reason, detail)
        entry: dict[str, object] = {"time": time.time(), "reason": reason, "detail": detail}
        if req is not None:
            entry.update(kind="MWr" if req.write else "MRd", requester_id=req.requester_id,
                         address=req.address, length=req.length, t_bit=req.t_bit,
                         stream_id=None if req.stream is None else req.stream.stream_id)
        self.recent_refusals.append(entry)
        return detail

    def _log_burst(self, burst: _Burst) -> None:
        for reason, n in burst.refused.items():
            level = logging.INFO if reason == "memory" else logging.WARNING
            self.log.log(level, "refused %d TLP(s) (%s): %s", n, reason, burst.first[reason])

    # -- wire path ----------------------------------------------------------------------------
    def receive(self, wires: Sequence[bytes]) -> RootPortReply:
        reply = RootPortReply()
        burst = _Burst()
        admitted: list[_Admitted] = []
        with self._lock:
            i, n = 0, len(wires)
            while i < n:
                i = self._receive_run(wires, i, burst, reply, admitted)
                if i < n:
                    self._receive_one(wires[i], burst, reply, admitted)
                    i += 1
        for run in _runs(admitted):
            self._execute(run, reply, burst)
        self._finish_burst(burst)
        return reply

    def _receive_one(self, wire: bytes, burst: _Burst, reply: RootPortReply,
                     admitted: list[_Admitted]) -> None:
        self.counters["tlps_in"] += 1
        req = self._ingress(wire, burst)
        if isinstance(req, str):
            head = peek(wire)
            if head is not None and head.type.is_request and head.type.has_data:
                reply.refused_posted.append(req)    # a posted write that never lands
            return
        self._admit(req, burst, reply, admitted, *self._check(req))

    def _admit(self, req: _Request, burst: _Burst, reply: RootPortReply,
               admitted: list[_Admitted], pin: frozenset[int] | None, reason: str | None,
               detail: str) -> None:
        if reason is not None:
            self._refuse(burst, req, reason, detail)
            if req.write:
                reply.refused_posted.append(detail)
            else:
                admitted.append(_Admitted(req, None, refused=True))
            return
        self.counters["tlps_admitted"] += 1
        admitted.append(_Admitted(req, pin))

    def _receive_run(self, wires: Sequence[bytes], start: int, burst: _Burst,
                     reply: RootPortReply, admitted: list[_Admitted]) -> int:
        """Take the run of ordinary IDE requests at *start* (well-formed, on one Secure
        stream, passing the IDE check) without TLP objects, doing for each what
        :meth:`_receive_one` would; contiguous admitted requests of one kind become one
        gathered request.  Returns where the run stopped: the TLP there (if any) is
        :meth:`_receive_one`'s."""
        first = wires[start]
        if len(first) <= PREFIX_LEN or first[0] != IDE_PREFIX_BYTE0:
            return start
        stream = self.streams.get(first[2])
        if stream is None or not stream.is_secure():
            return start
        fields = parse_ide_requests(wires, start, stream.rx.stream_id)
        plains = stream.rx.open_many(wires, start, start + len(fields)) if fields else []
        if not plains:
            return start
        self.counters["tlps_in"] += len(plains)
        quick = not self.windows            # no window to check against, nor to pin to
        in_range = stream.has_rid
        run: _Request | None = None         # contiguous admitted requests being gathered
        parts: list[bytes] = []             # its payloads (writes)
        pieces: list[tuple[int, int, int]] = []
        gathered = 0
        kinds = set()
        del fields[len(plains):]
        for (write, rid, tag, tc, attr, t_bit, a, count, lo), plain in zip(fields, plains,
                                                                           strict=True):
            kinds.add(write)
            if quick and not t_bit and in_range(rid):   # admitted, not pinned (_check)
                if (run is None or run.address + run.length != a or run.write != write
                        or run.requester_id != rid or run.tc != tc or run.attr != attr):
                    if run is not None:
                        self._close_run(run, parts, pieces, admitted)
                    run = _Request(write, rid, a, 0, False, stream, tc=tc, attr=attr)
                    parts, pieces = [], []
                run.length += count
                if write:
                    parts.append(plain[lo:lo + count])
                pieces.append((a, count, tag))
                gathered += 1
                continue
            if run is not None:
                self._close_run(run, parts, pieces, admitted)
                run = None
            req = _Request(write, rid, a, count, t_bit, stream, tag=tag, tc=tc, attr=attr,
                           data=bytes(plain[lo:lo + count]) if write else b"")
            self._admit(req, burst, reply, admitted, *self._check(req))
        if run is not None:
            self._close_run(run, parts, pieces, admitted)
        stream.started.update(SubStream.PR if k else SubStream.NPR for k in kinds)
        self.counters["tlps_admitted"] += gathered
        return start + len(plains)

    @staticmethod
    def _close_run(run: _Request, parts: list[bytes], pieces: list[tuple[int, int, int]],
                   admitted: list[_Admitted]) -> None:
        if run.write:
            run.data = b"".join(parts)
        run.pieces = pieces
        admitted.append(_Admitted(run, None))

    def _ingress(self, wire: bytes, burst: _Burst) -> _Request | str:
        """IDE check and decode of one TLP: the request, or why it was discarded."""
        stream: RootPortStream | None = None
        if is_protected(wire):
            sid = prefix_stream_id(wire)
            if sid is None:
                return self._refuse(burst, None, "malformed", "bad IDE prefix")
            stream = self.streams.get(sid)
            if stream is None:
                return self._refuse(burst, None, "misrouted", f"IDE TLP for unknown stream {sid}")
            if not stream.is_secure():      # already failed (or not enabled): discard only
                return self._refuse(burst, None, "ide", f"IDE TLP on stream {sid}, which is "
                                    f"not Secure ({stream.insecure_reason or 'not enabled'})")
            try:
                tlp = stream.rx.unprotect(wire)
            except IdeIntegrityError as exc:
                self._ide_failed(stream, exc.reason, burst)
                return self._refuse(burst, None, "ide", exc.reason)
            stream.started.add(tlp.substream)
        else:
            try:
                tlp = Tlp.decode(wire)
            except TlpError as exc:
                return self._refuse(burst, None, "malformed", str(exc))
            owner = self._stream_of_rid(tlp.requester_id)
            if owner is not None and owner.is_secure() and tlp.substream in owner.started:
                reason = (f"non-IDE {tlp.type.name} from RID {tlp.requester_id:#06x} on "
                          f"{tlp.substream.name} after IDE started")
                self._ide_failed(owner, reason, burst)
                return self._refuse(burst, None, "ide", reason)
        if not tlp.type.is_request:
            return self._refuse(burst, None, "malformed",
                                f"unexpected {tlp.type.name} from the device")
        write = tlp.type.has_data
        return _Request(write, tlp.requester_id, tlp.byte_address, tlp.request_byte_count,
                        tlp.t_bit, stream, tag=tlp.tag, tc=tlp.tc, attr=tlp.attr,
                        data=tlp.payload_bytes() if write else b"")

    def _execute(self, run: list[_Admitted], reply: RootPortReply, burst: _Burst) -> None:
        first = run[0]
        if first.refused:
            self._complete([(req, None) for adm in run for req in adm.req.each()], reply)
            return
        start = first.req.address
        total = sum(a.req.length for a in run)
        if first.req.write:
            try:
                self.dma.write(start, b"".join(a.req.data for a in run), first.pin)
                return
            except DmaFault:
                pass
            for adm in run:               # find exactly which TLPs could not land
                for req in adm.req.each():
                    try:
                        self.dma.write(req.address, req.data, adm.pin)
                    except DmaFault as exc:
                        with self._lock:
                            self._refuse(burst, req, "memory", str(exc))
                        reply.refused_posted.append(str(exc))
            return
        answers: list[tuple[_Request, bytes | memoryview | None]] = []
        try:
            data = self.dma.read(start, total, first.pin)
        except DmaFault:
            for adm in run:
                for req in adm.req.each():
                    try:
                        got: bytes | None = self.dma.read(req.address, req.length, adm.pin)
                    except DmaFault as exc:
                        with self._lock:
                            self._refuse(burst, req, "memory", str(exc))
                        got = None
                    answers.append((req, got))
            self._complete(answers, reply)
            return
        view = memoryview(data)
        pos = 0
        for adm in run:
            answers.append((adm.req, view[pos:pos + adm.req.length]))
            pos += adm.req.length
        self._complete(answers, reply)

    def _complete(self, answers: Sequence[tuple[_Request, bytes | memoryview | None]],
                  reply: RootPortReply) -> None:
        """The completions answering MRds (or gathered runs of them), in order: for each,
        CplDs of its data, or UR if None; T echoes the request and the completions travel
        on its stream (§11.2.1).  Consecutive CplDs on one stream with one T are protected
        as a run."""
        with self._lock:
            group: list[tuple[_Request, bytes | memoryview]] = []
            for req, data in answers:
                if group and (data is None or req.stream is not group[0][0].stream
                              or req.t_bit != group[0][0].t_bit):
                    self._complete_group(group, reply)
                    group = []
                if data is not None:
                    group.append((req, data))
                    continue
                stream = req.stream
                if stream is not None and not stream.is_secure():
                    self.counters["completions_discarded"] += 1
                    continue
                ur = Tlp(TlpType.CPL, req.requester_id, req.tag, completer_id=self.completer_id,
                         byte_count=req.length, lower_address=req.address & 0x7F,
                         status=CplStatus.UR, t_bit=req.t_bit,
                         stream_id=None if stream is None else stream.stream_id,
                         tc=req.tc, attr=req.attr)
                self._send_completions([ur], stream, reply)
            if group:
                self._complete_group(group, reply)

    def _complete_group(self, group: list[tuple[_Request, bytes | memoryview]],
                        reply: RootPortReply) -> None:
        """CplDs for MRds of one stream (or none) and one T bit.  Under the lock."""
        stream, t_bit = group[0][0].stream, group[0][0].t_bit
        if stream is not None and not stream.is_secure():     # one per MRd, as ever
            self.counters["completions_discarded"] += sum(r.tlps for r, _ in group)
            return
        headers: list[bytes] = []
        payloads: list[bytes | memoryview] = []
        for req, data in group:
            base = req.address
            for a, n, tag in req.pieces or ((base, req.length, req.tag),):
                h, p = completion_parts(req.requester_id, tag, self.completer_id, a,
                                        data[a - base:a - base + n],
                                        completion_spans(a, n, self.mps), tc=req.tc,
                                        attr=req.attr)
                headers += h
                payloads += p
        if stream is None:
            reply.completions += [h + p for h, p in zip(headers, payloads, strict=True)]
            self.counters["completions_out"] += len(headers)
            return
        try:
            wires = stream.tx.protect_many(SubStream.CPL, t_bit, headers, payloads)
        except IdeKeyStateError:
            # One by one, so each completion is sent or counted as discarded on its own.
            tlps = [replace(Tlp.decode(h + p), t_bit=t_bit, stream_id=stream.stream_id)
                    for h, p in zip(headers, payloads, strict=True)]
            self._send_completions(tlps, stream, reply)
            return
        reply.completions += wires
        self.counters["completions_out"] += len(wires)

    def _send_completions(self, tlps: list[Tlp], stream: RootPortStream | None,
                          reply: RootPortReply) -> None:
        for tlp in tlps:
            if stream is None:
                reply.completions.append(tlp.encode())
            else:
                try:
                    reply.completions.append(stream.tx.protect(tlp))
                except IdeKeyStateError as exc:
                    self.counters["completions_discarded"] += 1
                    self.log.warning("completion not sent: %s", exc)
                    continue
            self.counters["completions_out"] += 1

    # -- clear fast path (no IDE, nobody watching the wire; see link.py) ---------------------
    def clear_write(self, requester_id: int, address: int, data: bytes, mps: int) -> None:
        burst = _Burst()
        try:
            runs = self._clear_plan(True, requester_id, address, len(data), mps, burst)
            failed = [r[2] for r in runs if r[2] is not None]
            for start, length, reason, pin in runs:
                if reason is None:
                    off = start - address
                    part = data if length == len(data) else data[off:off + length]
                    try:
                        self.dma.write(start, part, pin)
                    except DmaFault as exc:
                        with self._lock:
                            self._refuse(burst, _Request(True, requester_id, start, length),
                                         "memory", str(exc))
                        raise
            if failed:
                raise LinkFault(f"root port refused posted TLP(s): {burst.first[failed[0]]}")
        finally:
            self._finish_burst(burst)

    def clear_read(self, requester_id: int, address: int, length: int, mrrs: int) -> bytes:
        burst = _Burst()
        try:
            runs = self._clear_plan(False, requester_id, address, length, mrrs, burst)
            for _start, _length, reason, _pin in runs:
                if reason is not None:
                    raise LinkFault(f"MRd refused (Unsupported Request): {burst.first[reason]}")
            out = []
            for start, n, _reason, pin in runs:
                try:
                    out.append(self.dma.read(start, n, pin))
                except DmaFault as exc:
                    with self._lock:
                        self._refuse(burst, _Request(False, requester_id, start, n), "memory",
                                     str(exc))
                    raise
            return b"".join(out)
        finally:
            self._finish_burst(burst)

    def _clear_plan(self, write: bool, rid: int, address: int, length: int, size: int,
                    burst: _Burst) -> list[tuple[int, int, str | None, frozenset[int] | None]]:
        """Runs (start, length, refusal reason or None, pin) for a T=0 transfer split into
        *size*-byte TLPs, each checked as the wire path would."""
        with self._lock:
            self.counters["clear_transfers"] += 1
            owner = self._stream_of_rid(rid)
            sub = SubStream.PR if write else SubStream.NPR
            if owner is not None and owner.is_secure() and sub in owner.started:
                why = (f"non-IDE {'MWr' if write else 'MRd'} from RID {rid:#06x} on "
                       f"{sub.name} after IDE started")
                self._refuse(burst, None, "ide", why)
                self._ide_failed(owner, why, burst)
                raise LinkFault(f"IDE stream {owner.stream_id}: {why}")
            if not any(w.overlaps(address, length) for w in self.windows.values()):
                self.counters["tlps_admitted"] += 1
                return [(address, length, None, None)]
            runs: list[tuple[int, int, str | None, frozenset[int] | None]] = []
            for a, n in split(address, length, size):
                req = _Request(write, rid, a, n)
                pin, reason, detail = self._check(req)
                if reason is not None:
                    self._refuse(burst, req, reason, detail)
                else:
                    self.counters["tlps_admitted"] += 1
                if runs and runs[-1][2] == reason and runs[-1][3] == pin \
                        and runs[-1][0] + runs[-1][1] == a:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, reason, pin)
                else:
                    runs.append((a, n, reason, pin))
            return runs

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "completer_id": self.completer_id,
                "streams": [s.as_dict() for s in self.streams.values()],
                "windows": [w.as_dict() for w in self.windows.values()],
                "refusals": dict(self.refusals),
                "refusals_total": sum(self.refusals.values()),
                "recent_refusals": list(self.recent_refusals)[-16:],
                "mmio_private": {f"{rid:#06x}": sid for rid, sid in self.mmio_private.items()},
                "last_event_seq": self.platform_events.last_seq,
                **self.counters,
            }


def _runs(admitted: list[_Admitted]) -> Iterator[list[_Admitted]]:
    """Consecutive admitted requests of one kind, contiguous, with the same pin, grouped so
    that each group is one memory access."""
    run: list[_Admitted] = []
    for adm in admitted:
        if run:
            last = run[-1]
            same = (adm.req.write == last.req.write and adm.pin == last.pin
                    and adm.refused == last.refused
                    and (adm.refused or last.req.address + last.req.length == adm.req.address))
            if not same:
                yield run
                run = []
        run.append(adm)
    if run:
        yield run
