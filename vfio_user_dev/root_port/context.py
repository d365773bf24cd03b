"""What every part of the root port shares: one lock over configuration and IDE state,
the counters, the refusal accounting, the platform event log and what the link attached
(PCIe 6.x §6.33 IDE, TDISP §11).  Design notes: docs/root-port-internals.md."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vfio_user_dev.link.interfaces import Generation
from vfio_user_dev.platform_events import PlatformEvents


#: the root port's logger (each root port logs on a child of it, named after the port)
class _Stream(Protocol):
    @property
    def stream_id(self) -> int: ...


class RefusedRequest(Protocol):
    """What a refusal records of the request it refused (a ``requests.Request``)."""

    @property
    def write(self) -> bool: ...

    @property
    def requester_id(self) -> int: ...

    @property
    def address(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def t_bit(self) -> bool: ...

    @property
    def stream(self) -> _Stream | None: ...


log = logging.getLogger("vfio_user_dev.root_port")

#: how many refusals the short log keeps
RECENT = 128


class RootPortError(Exception):
    """A configuration request the root port refuses (bad stream, overlap, no backing)."""


@dataclass
class Burst:
    """Refusals of one burst, logged together at the end."""

    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    first: dict[str, str] = field(default_factory=dict)
    fail_messages: list[tuple[int, str]] = field(default_factory=list)   # sent at the end


class PortContext:
    """The state the root port's parts share; its lock guards configuration and IDE state
    and is never held while guest memory is accessed."""

    def __init__(self, completer_id: int, name: str, events: PlatformEvents,
                 aggregation: bool = True, routes: Generation | None = None) -> None:
        self.completer_id = completer_id
        #: Aggregation Supported (PCIe 6.x §6.33.6): the stream ends take aggregated units
        #: and may be told to aggregate what they send
        self.aggregation = aggregation
        self.log = log.getChild(name)
        self.lock = threading.RLock()
        #: bumped after every change of what routes MMIO (the streams, their keys, Enable
        #: and Secure state, private MMIO): see :meth:`changing`
        self.routes = routes if routes is not None else Generation()
        #: the platform's event log (``platform_events.py``): IDE failures, remaps, this
        #: end's stream changes, and what the root port revoked by itself
        self.events = events
        self.counters = {"tlps_in": 0, "tlps_admitted": 0, "completions_out": 0,
                         "completions_discarded": 0, "security_events": 0,
                         "ide_failures": 0, "clear_transfers": 0,
                         "mmio_requests": 0, "mmio_t1": 0, "mmio_not_sent": 0, "mmio_ur": 0,
                         "mmio_completions_discarded": 0}
        self.refusals: collections.Counter[str] = collections.Counter()
        self.recent_refusals: collections.deque[dict[str, object]] = collections.deque(
            maxlen=RECENT)
        # What the link attached (Link.attach_link): its MPS and MRRS, where IDE Fail
        # Messages to the device go, and how MMIO requests reach it.
        self.mps = 256
        self.mrrs = 512
        self.ide_fail_sink: Callable[[int, str], None] | None = None
        self.downstream: Callable[[Sequence[bytes]], list[bytes]] | None = None

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """The lock, held over a change of what routes MMIO; :attr:`routes` is bumped on
        the way out, even when the change failed halfway."""
        with self.lock:
            try:
                yield
            finally:
                self.routes.bump()

    def event(self, kind: str, **data: object) -> None:
        self.events.emit(kind, **data)

    def refuse(self, burst: Burst, req: RefusedRequest | None, reason: str,
               detail: str) -> str:
        """Count a refusal by reason, keep it in the short log; *detail* back."""
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

    def finish_burst(self, burst: Burst) -> None:
        """Log the burst's refusals; send its IDE Fail Messages (outside the lock: the
        device side takes its own)."""
        with self.lock:
            self._log_burst(burst)
        if self.ide_fail_sink is not None:
            for sid, reason in burst.fail_messages:
                self.ide_fail_sink(sid, reason)

    def _log_burst(self, burst: Burst) -> None:
        for reason, n in burst.refused.items():
            level = logging.INFO if reason == "memory" else logging.WARNING
            self.log.log(level, "refused %d TLP(s) (%s): %s", n, reason, burst.first[reason])
