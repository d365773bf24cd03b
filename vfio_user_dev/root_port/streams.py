"""The root port's ends of its Selective IDE streams (PCIe 6.x §6.33): keys per key set,
direction and sub-stream, Enable, Secure/Insecure; an IDE check failure or the device's
IDE Fail Message makes a stream Insecure (§6.33.6), and whatever trusted rode on it is
revoked (TDISP §11).  Design notes: docs/root-port-internals.md."""

from __future__ import annotations

from collections.abc import Callable

from teeio.ide import Direction, IdeKey, IdeKeyStateError, KeySet
from teeio.platform_channel import StreamState
from teeio.tlp import SubStream
from vfio_user_dev.link.streams import IdeStreamEnd
from vfio_user_dev.root_port.context import Burst, PortContext, RootPortError


class RootPortStream(IdeStreamEnd):
    """The root port's end of one Selective IDE stream, plus the sub-streams on which IDE
    TLPs have arrived (after which a non-IDE TLP from its requesters is a failure)."""

    def __init__(self, stream_id: int, rid_base: int, rid_limit: int,
                 aggregation: bool = False) -> None:
        super().__init__(stream_id, rid_base, rid_limit, aggregation)
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
                "started": sorted(s.name for s in self.started), "keys": keys,
                "aggregation": {s.name: self.tx.aggregation[s] for s in SubStream}}


class StreamTable:
    """The stream ends by stream ID, as the TSM configures them (platform control: the
    KEY_PROG / K_SET_GO / K_SET_STOP steps IDE_KM gives the device, Enable, reset).
    *revoke_stream* (under the lock) revokes what rides on a stream that left Secure.
    Every change is made under ``ctx.changing()`` or, already under the lock, bumps
    ``ctx.routes`` itself: MMIO routing (``mmio.py``) reads these streams."""

    def __init__(self, ctx: PortContext, revoke_stream: Callable[[int, str], None]) -> None:
        self._ctx = ctx
        self._revoke_stream = revoke_stream
        self.streams: dict[int, RootPortStream] = {}

    # -- configuration (the TSM, through platform_ctl) --------------------------------------
    def setup_stream(self, stream_id: int, rid_base: int = 0, rid_limit: int = 0xFFFF) -> None:
        """(Re)create stream *stream_id* for requesters *rid_base*..*rid_limit*: no keys,
        Enable clear, Insecure."""
        if not 0 <= stream_id <= 0xFF or not 0 <= rid_base <= rid_limit <= 0xFFFF:
            raise RootPortError(f"bad stream {stream_id} or RID range {rid_base:#x}.."
                                f"{rid_limit:#x}")
        with self._ctx.changing():
            for other in self.streams.values():
                if other.stream_id != stream_id and other.rid_base <= rid_limit \
                        and rid_base <= other.rid_limit:
                    raise RootPortError(f"RID range {rid_base:#06x}..{rid_limit:#06x} overlaps "
                                        f"stream {other.stream_id}'s")
            old = self.streams.get(stream_id)
            self.streams[stream_id] = RootPortStream(stream_id, rid_base, rid_limit,
                                                     self._ctx.aggregation)
            if old is not None:
                self._revoke_stream(stream_id, f"stream {stream_id} set up again")
        self._ctx.log.info("stream %d set up for RIDs %#06x..%#06x", stream_id, rid_base,
                           rid_limit)

    def remove_stream(self, stream_id: int) -> None:
        with self._ctx.changing():
            self.get(stream_id)
            del self.streams[stream_id]
            self._revoke_stream(stream_id, f"stream {stream_id} removed")
            self._ctx.event("rp_stream", end="root_port", stream=stream_id, state="removed",
                            reason="removed by the TSM")
        self._ctx.log.info("stream %d removed", stream_id)

    def get(self, stream_id: int) -> RootPortStream:
        """Stream *stream_id*; RootPortError if there is none."""
        s = self.streams.get(stream_id)
        if s is None:
            raise RootPortError(f"no stream {stream_id} at the root port")
        return s

    def has_stream(self, stream_id: int) -> bool:
        with self._ctx.lock:
            return stream_id in self.streams

    def of_rid(self, rid: int) -> RootPortStream | None:
        """The stream whose RID range holds *rid*, if any."""
        for s in self.streams.values():
            if s.has_rid(rid):
                return s
        return None

    def program_key(self, stream_id: int, key_set: KeySet, direction: Direction,
                    substream: SubStream, key: IdeKey) -> None:
        with self._ctx.changing():
            s = self.get(stream_id)
            end = s.rx if direction == Direction.RX else s.tx
            try:
                end.program(key_set, substream, key)
            except IdeKeyStateError as exc:
                raise RootPortError(str(exc)) from None
        self._ctx.log.info("stream %d %s %s %s key programmed", stream_id,
                           Direction(direction).name, SubStream(substream).name,
                           KeySet(key_set).name)

    def key_programmed(self, stream_id: int, key_set: KeySet, direction: Direction,
                       substream: SubStream) -> bool:
        with self._ctx.lock:
            s = self.get(stream_id)
            end = s.rx if direction == Direction.RX else s.tx
            return end.is_programmed(key_set, substream)

    def key_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream | None = None) -> None:
        with self._ctx.changing():
            s = self.get(stream_id)
            end = s.rx if direction == Direction.RX else s.tx
            try:
                end.go(key_set, substream)
            except IdeKeyStateError as exc:
                raise RootPortError(str(exc)) from None
        self._ctx.log.info("stream %d %s %s K_SET_GO %s", stream_id, Direction(direction).name,
                           "all" if substream is None else SubStream(substream).name,
                           KeySet(key_set).name)

    def key_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                     substream: SubStream | None = None) -> None:
        with self._ctx.changing():
            s = self.get(stream_id)
            before = s.state()
            (s.rx if direction == Direction.RX else s.tx).stop(key_set, substream)
            if s.state() != before:
                self.changed(s, f"K_SET_STOP {KeySet(key_set).name}")
        self._ctx.log.info("stream %d %s K_SET_STOP %s", stream_id, Direction(direction).name,
                           KeySet(key_set).name)

    def set_aggregation(self, stream_id: int, unit_tlps: dict[SubStream, int]) -> None:
        """The Tx Aggregation Mode of the root port's end of *stream_id*, per sub-stream
        (TLPs per unit: 1, 2, 4 or 8; §6.33.6).  Software sets it before Enable (§6.33.6):
        refused while the stream is enabled."""
        with self._ctx.changing():
            s = self.get(stream_id)
            if s.enabled:
                raise RootPortError(f"stream {stream_id} is enabled: set aggregation before "
                                    "Enable (§6.33.6)")
            try:
                s.set_aggregation(unit_tlps)
            except ValueError as exc:
                raise RootPortError(str(exc)) from None
        self._ctx.log.info("stream %d Tx aggregation: %s", stream_id,
                           ", ".join(f"{SubStream(k).name} {v}" for k, v in unit_tlps.items()))

    def enable_stream(self, stream_id: int, enable: bool = True) -> str:
        """Set or clear Enable; Secure needs a GO key set in all six (direction, sub-stream)
        slots.  Returns the state."""
        with self._ctx.changing():
            s = self.get(stream_id)
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
                self.changed(s, "Enable " + ("set" if enable else "cleared"))
        self._ctx.log.info("stream %d %s: %s", stream_id, "enabled" if enable else "disabled",
                           state)
        return state

    def reset_stream(self, stream_id: int) -> None:
        with self._ctx.changing():
            s = self.get(stream_id)
            s.reset()
            self.changed(s, "reset by the TSM")
        self._ctx.log.info("stream %d reset: keys invalidated, Insecure", stream_id)

    def invalidate_all(self, reason: str) -> None:
        with self._ctx.changing():
            for s in self.streams.values():
                s.reset()
                self.changed(s, reason)
        self._ctx.log.warning("every root-port IDE key invalidated: %s", reason)

    def reset_carrying(self, requester_id: int, reason: str) -> None:
        """The device *requester_id* was reset (its keys are gone, §6.33.6): this end of
        every stream that carries it and is keyed, enabled or Secure is reset too."""
        with self._ctx.changing():
            for s in self.streams.values():
                if s.has_rid(requester_id) and (s.enabled or s.keys_ready()
                                                or s.state() is StreamState.SECURE):
                    s.reset()
                    self.changed(s, reason)

    def changed(self, s: RootPortStream, reason: str) -> None:
        """Under the lock: this end of *s* changed; if it is no longer Secure, revoke."""
        self._ctx.routes.bump()
        state = s.state()
        self._ctx.event("rp_stream", end="root_port", stream=s.stream_id, state=state,
                        reason=reason)
        if state is not StreamState.SECURE:
            self._revoke_stream(s.stream_id, f"stream {s.stream_id} {state}: {reason}")

    # -- IDE failures (§6.33.6) ---------------------------------------------------------------
    def ide_failed(self, stream: RootPortStream, reason: str, burst: Burst) -> None:
        """Under the lock: an IDE check failed on *stream*: Insecure, and an IDE Fail
        Message to the device when the burst finishes."""
        stream.mark_insecure(reason)
        self._ctx.counters["ide_failures"] += 1
        self._ctx.event("ide_fail", stream=stream.stream_id, how="detected", reason=reason)
        self.changed(stream, f"IDE check failed: {reason}")
        self._ctx.log.warning("IDE stream %d Insecure: %s; IDE Fail Message sent",
                              stream.stream_id, reason)
        burst.fail_messages.append((stream.stream_id, reason))

    def ide_fail_message(self, stream_id: int, reason: str) -> None:
        """The device's IDE Fail Message: the stream is Insecure here too (§6.33.6)."""
        with self._ctx.changing():
            s = self.streams.get(stream_id)
            self._ctx.counters["ide_failures"] += 1
            self._ctx.event("ide_fail", stream=stream_id, how="message", reason=reason)
            if s is not None:
                s.mark_insecure(f"IDE Fail Message from the device: {reason}")
                self.changed(s, f"IDE Fail Message from the device: {reason}")
        self._ctx.log.warning("IDE Fail Message from the device for stream %d: %s", stream_id,
                              reason)
