"""Trusted-DMA windows (TDISP §11; PCIe 6.x §6.33): guest ranges the TSM grants to a TDI
in RUN, each for one requester ID and IDE stream, pinned to the DMA maps that backed them
when granted.  A client remap under a window suspends it (a security event) until the TSM
re-authorises it.  Design notes: docs/root-port-internals.md."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vfio_user_dev.dma import Backing, DmaFault, DmaMapSet, MapEvent
from vfio_user_dev.root_port.context import PortContext, RootPortError
from vfio_user_dev.root_port.streams import StreamTable


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


class WindowTable:
    """The windows by window ID: granted, re-authorised and revoked by the TSM, revoked by
    the root port itself (by requester or stream), looked up by the ingress checks."""

    def __init__(self, ctx: PortContext, dma: DmaMapSet, streams: StreamTable) -> None:
        self._ctx = ctx
        self._dma = dma
        self._streams = streams
        self.windows: dict[int, Window] = {}
        self._next_window = 1
        #: why a trusted window may not be granted to a requester now (None: it may); the
        #: platform sets it: only a TDI in RUN gets windows
        self.gate: Callable[[int], str | None] | None = None
        dma.listeners.append(self._map_changed)

    def authorise_window(self, requester_id: int, stream_id: int, base: int, size: int,
                         read: bool = True, write: bool = True) -> Window:
        """A trusted-DMA window for T=1 DMA of *requester_id* on *stream_id*; it records
        the maps that back the range now (all of it must be mapped)."""
        if size <= 0 or base < 0 or base + size > 1 << 64 or not 0 <= requester_id <= 0xFFFF:
            raise RootPortError(f"bad window {base:#x}+{size:#x} for RID {requester_id:#x}")
        if not (read or write):
            raise RootPortError("a window must allow reads, writes or both")
        refusal = self.gate(requester_id) if self.gate is not None else None
        if refusal is not None:
            raise RootPortError(f"no window for RID {requester_id:#06x}: {refusal}")
        with self._ctx.lock:
            self._streams.get(stream_id)
            for w in self.windows.values():
                if w.overlaps(base, size):
                    raise RootPortError(f"{base:#x}+{size:#x} overlaps window {w.window_id}")
            try:
                backing = self._dma.backing(base, size)
            except DmaFault as exc:
                raise RootPortError(f"window {base:#x}+{size:#x} is not wholly mapped: "
                                    f"{exc}") from None
            w = Window(self._next_window, requester_id, stream_id, base, size, read, write,
                       backing)
            self._next_window += 1
            self.windows[w.window_id] = w
        self._ctx.log.info("window %d authorised: RID %#06x stream %d %#x+%#x %s, maps %s",
                           w.window_id, requester_id, stream_id, base, size,
                           w.as_dict()["access"], sorted(w.map_ids))
        return w

    def reauthorise_window(self, window_id: int) -> Window:
        """Record the current backing of a (suspended) window and make it active again."""
        with self._ctx.lock:
            w = self._window(window_id)
            try:
                w.backing = self._dma.backing(w.base, w.size)
            except DmaFault as exc:
                raise RootPortError(f"window {window_id} is not wholly mapped: {exc}") from None
            w.suspended = None
        self._ctx.log.info("window %d re-authorised, maps %s", window_id, sorted(w.map_ids))
        return w

    def revoke_window(self, window_id: int) -> None:
        with self._ctx.lock:
            self._window(window_id)
            del self.windows[window_id]
        self._ctx.log.info("window %d revoked", window_id)

    def _window(self, window_id: int) -> Window:
        w = self.windows.get(window_id)
        if w is None:
            raise RootPortError(f"no window {window_id}")
        return w

    def revoke_where(self, which: Callable[[int, int], bool], reason: str) -> int:
        """Under the lock: revoke the windows whose (requester ID, stream) *which* selects,
        each with its event; how many."""
        gone = [w for w in self.windows.values() if which(w.requester_id, w.stream_id)]
        for w in gone:
            del self.windows[w.window_id]
            self._ctx.event("window_revoked", window=w.window_id, requester_id=w.requester_id,
                            reason=reason)
        return len(gone)

    @property
    def granted(self) -> int:
        """How many windows were ever granted: a range found touching none is looked at
        again once this moved."""
        return self._next_window - 1

    # -- look-ups (under the lock) ------------------------------------------------------------
    def lookup(self, requester_id: int, stream_id: int | None, address: int,
               length: int) -> Window | None:
        """The window of *requester_id* on *stream_id* that covers the range, if any."""
        for w in self.windows.values():
            if w.requester_id == requester_id and w.stream_id == stream_id \
                    and w.covers(address, length):
                return w
        return None

    def touching(self, address: int, length: int) -> Window | None:
        """The first window the range overlaps, if any."""
        for w in self.windows.values():
            if w.overlaps(address, length):
                return w
        return None

    # -- map changes by the client: security events -----------------------------------------
    def _map_changed(self, ev: MapEvent) -> None:
        b = ev.backing
        with self._ctx.lock:
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
                self._ctx.event("remap", window=w.window_id, op=ev.kind,
                                backing=b.as_dict(), window_suspended=first)
                self._ctx.counters["security_events"] += 1
                self._ctx.log.warning("SECURITY: window %d (%#x+%#x): %s; DMA into it refused "
                                      "until re-authorised", w.window_id, w.base, w.size, why)
