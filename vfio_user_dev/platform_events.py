"""The platform's event log: what changed TDI, stream or window truth, in order.

docs/design.md "state has one owner": the DSM owns the TDI state, the platform (root port, link)
owns its end of each stream and the trusted windows, the TSM owns the VM bindings.  The
owners report every change here, and the TSM reads them over the authenticated platform
channel (platform op ``events``), as a real host TSM learns from IDE Fail Messages
(PCIe 6.x §6.33.7), AER/DPC (§6.2, §6.2.11), hot-plug and reset notifications.

Each event is a JSON-able dict: ``seq`` (1, 2, ... per device-server run), ``time`` (UNIX
seconds), ``kind`` and the kind's own fields.  The kinds:

=======================  =================================================================
``client_connected``     a vfio-user client (the VMM) connected
``client_disconnected``  it went away (``reason``); its DMA maps and eventfds are dropped
``device_reset``         ``reason``: ``client_reset`` (DEVICE_RESET), ``client_gone``,
                         ``flr`` (Initiate FLR, §6.6.2), ``host_flr``
``command``              the Command register's Memory Space / Bus Master Enable changed
                         (``memory``, ``bus_master``, ``by``: ``vmm`` or ``host``)
``tdi``                  the DSM moved the TDI: ``before``, ``after``, ``event``
``ide_stream``           the device's end of a stream changed: ``end`` = ``device``,
                         ``stream``, ``state``, ``event``
``ide_registers``        config space written in the IDE capability (``offset``, ``size``,
                         ``by``: ``vmm`` or ``host``)
``rp_stream``            the root port's end of a stream changed: ``end`` = ``root_port``,
                         ``stream``, ``state``, ``reason``
``ide_fail``             an IDE check failed (``how``: detected / message)
``remap``                the client remapped memory under a window (the window suspended)
``window_revoked``       the platform revoked a window by itself (``window``, ``reason``)
``mmio_private``         private MMIO of a requester switched (``enabled``, ``reason``)
=======================  =================================================================

The log keeps the last :data:`MAX_EVENTS`.  A reader asks for the events after the last
``seq`` it saw; if some of them were dropped meanwhile the answer says ``lost`` and the
reader must re-read the state (``status``) instead of trusting the gap.  ``boot`` is a
random id of this log: a different one means the device server restarted and every
``seq`` before is void.  :meth:`since` may wait for the next event (a long poll), which
is how the TSM hears of an event within milliseconds without polling.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_EVENTS = 4096
#: The longest a reader may wait for the next event in one call.
MAX_WAIT = 30.0

Event = dict[str, object]


class PlatformEvents:
    """An ordered, bounded, thread-safe log with a long poll.  Emitting never blocks on a
    reader: listeners run synchronously but must only queue or record."""

    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self.boot = os.urandom(8).hex()
        self._events: collections.deque[tuple[int, Event]] = collections.deque(
            maxlen=max_events)
        self._seq = 0
        self._cond = threading.Condition(threading.Lock())
        self.listeners: list[Callable[[Event], None]] = []
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._seq

    def emit(self, kind: str, **data: object) -> Event:
        with self._cond:
            self._seq += 1
            ev: Event = {"seq": self._seq, "time": time.time(), "kind": kind, **data}
            self._events.append((self._seq, ev))
            self.counts[kind] += 1
            self._cond.notify_all()
        log.debug("platform event %s", ev)
        for listener in list(self.listeners):
            listener(ev)
        return ev

    def since(self, seq: int = 0, wait: float = 0.0,
              kinds: frozenset[str] | None = None) -> tuple[list[Event], bool]:
        """The events numbered after *seq* (of *kinds*, if given), waiting up to *wait*
        seconds (at most :data:`MAX_WAIT`) for one if there is none yet; and whether some
        after *seq* were dropped from the log (``lost``)."""
        deadline = time.monotonic() + max(0.0, min(wait, MAX_WAIT))
        with self._cond:
            while True:
                out = [e for n, e in self._events
                       if n > seq and (kinds is None or e["kind"] in kinds)]
                oldest = self._events[0][0] if self._events else self._seq + 1
                lost = seq + 1 < oldest and seq < self._seq
                if out or lost:
                    return out, lost
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], False
                self._cond.wait(left)

    def wake(self) -> None:
        """Wake every waiting reader (closing)."""
        with self._cond:
            self._cond.notify_all()
