"""Rate-limited logging of what a client can provoke at will (vfio-user spec "Error
Handling": every refused message is answered; the log must not be flooded by them)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from vfio_user_dev.enforcement import LOG_FIRST

LOG_INTERVAL = 10.0     # seconds: after LOG_FIRST lines of a kind, at most one per interval


class LogLimiter:
    """Log lines by kind that a client can provoke at will, without letting it flood the
    log: the first *first* of each kind (LOG_FIRST, as TDISP refusals are logged), then at
    most one per *interval* seconds, saying how many of that kind were suppressed since
    the previous line.  ``counts`` keeps every occurrence by kind."""

    def __init__(self, logger: logging.Logger, first: int = LOG_FIRST,
                 interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.first = first
        self.interval = interval
        self.clock = clock
        self.counts: collections.Counter[str] = collections.Counter()
        self.suppressed: collections.Counter[str] = collections.Counter()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, level: int, msg: str, *args: object,
                 exc_info: BaseException | bool = False) -> bool:
        """Count one *kind* and log *msg* unless rate-limited; whether it was logged."""
        with self._lock:
            self.counts[kind] += 1
            now = self.clock()
            last = self._last.get(kind)
            if self.counts[kind] > self.first and last is not None \
                    and now - last < self.interval:
                self.suppressed[kind] += 1
                return False
            self._last[kind] = now
            dropped = self.suppressed.pop(kind, 0)
        if dropped:
            msg += " (%d more suppressed since the previous line)"
            args += (dropped,)
        self.log.log(level, msg, *args, exc_info=exc_info)
        return True
