"""The platform's event log: what changed TDI, stream or window truth, in order.

docs/design.md "state has one owner": the owners report every change here and the TSM reads
them over the platform channel with a long poll (decision 18), as a host TSM learns from
IDE Fail Messages (PCIe 6.x §6.33.7), AER/DPC and resets.  The event kinds and the
``lost``/``boot`` rules are in docs/tdisp-and-tsm.md, "The event log".
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
