"""The CPU's accesses to the device's TEE MMIO through the root port (PCIe 6.x §11.2.1;
TDISP §11): MRd/MWr TLPs down the link with the root port as requester, IDE-protected on
the device's Secure stream, T=1 only once the TSM turned private MMIO on, and never T=1 in
the clear.  Private MMIO is revoked with the stream or the TDI.  Design notes:
docs/root-port-internals.md."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from teeio.ide import IdeIntegrityError, IdeKeyStateError
from teeio.tlp import (
    CplStatus,
    SubStream,
    Tlp,
    TlpError,
    is_protected,
    prefix_stream_id,
    split,
)
from vfio_user_dev.link.interfaces import LinkFault
from vfio_user_dev.root_port.context import Burst, PortContext, RootPortError
from vfio_user_dev.root_port.streams import RootPortStream, StreamTable


class MmioPort:
    """Private MMIO by device requester ID, and the MMIO requests themselves."""

    def __init__(self, ctx: PortContext, streams: StreamTable) -> None:
        self._ctx = ctx
        self._streams = streams
        #: private MMIO (TSM): device requester ID -> the stream its T=1 MMIO goes on
        self.mmio_private: dict[int, int] = {}

    def set_mmio_private(self, requester_id: int, stream_id: int, enable: bool) -> None:
        """Private MMIO (the TSM, after START): the device *requester_id*'s MMIO goes T=1
        on *stream_id*, which must exist here and cover the device's RID; or off again."""
        if not 0 <= requester_id <= 0xFFFF:
            raise RootPortError(f"bad requester ID {requester_id:#x}")
        with self._ctx.changing():
            if enable:
                s = self._streams.get(stream_id)
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
        self._ctx.log.info("private MMIO for RID %#06x %s (stream %d)", requester_id,
                           "on" if enable else "off", stream_id)

    def revoke_where(self, which: Callable[[int, int], bool], reason: str) -> int:
        """Under the lock: switch off the private MMIO whose (requester ID, stream) *which*
        selects, each with its event; how many."""
        closed = [(rid, sid) for rid, sid in self.mmio_private.items() if which(rid, sid)]
        for rid, sid in closed:
            del self.mmio_private[rid]
            self._ctx.routes.bump()
            self._ctx.event("mmio_private", requester_id=rid, stream=sid, enabled=False,
                            reason=reason)
        return len(closed)

    def _route(self, requester_id: int, allow_tee: bool
               ) -> tuple[RootPortStream | None, bool] | str:
        """(stream or None, T) for MMIO to *requester_id*, or why it cannot be sent."""
        sid = self.mmio_private.get(requester_id) if allow_tee else None
        if sid is not None:
            s = self._streams.streams.get(sid)
            if s is None or not s.is_secure():
                return f"private MMIO stream {sid} is not Secure: T=1 request not sent"
            return s, True
        owner = self._streams.of_rid(requester_id)
        if owner is not None and owner.is_secure():
            return owner, False
        return None, False

    def mmio_in_clear(self, requester_id: int, allow_tee: bool = True) -> bool:
        """Whether MMIO to *requester_id* would cross in the clear with T=0 (the device may
        then take a direct path when nothing watches the link).  What it answers changes
        only with ``ctx.routes``."""
        lock = self._ctx.lock            # acquire/release: no context-manager call per access
        lock.acquire()
        try:
            return self._route(requester_id, allow_tee) == (None, False)
        finally:
            lock.release()

    def mmio_read(self, requester_id: int, address: int, length: int, *,
                  allow_tee: bool = True) -> bytes | None:
        """Read *length* bytes of the device's memory space at *address*: MRd TLPs
        down the link.  None if any part was not read (UR, not sent, discarded): the CPU
        then reads all ones.  *allow_tee* False: T=0 whatever private MMIO says (the
        host's own accesses)."""
        pieces = split(address, length, self._ctx.mrrs)
        tlps = [Tlp.memory_read(self._ctx.completer_id, tag, a, n) for tag, (a, n)
                in enumerate(pieces)]
        answers = self._send(requester_id, tlps, allow_tee)
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
        tlps = [Tlp.memory_write(self._ctx.completer_id, 0, a,
                                 data[a - address:a - address + n])
                for a, n in split(address, len(data), self._ctx.mps)]
        return self._send(requester_id, tlps, allow_tee) is not None

    def _send(self, requester_id: int, tlps: list[Tlp], allow_tee: bool
              ) -> dict[int, bytes | None] | None:
        """Send *tlps* (MRd or MWr, T=0, no stream yet) to the device; the read data by
        tag (None: not completed successfully), or None if nothing was sent."""
        ctx = self._ctx
        counters = ctx.counters
        burst = Burst()
        try:
            with ctx.lock:
                route = self._route(requester_id, allow_tee)
                if isinstance(route, str):
                    counters["mmio_not_sent"] += 1
                    ctx.refuse(burst, None, "mmio_not_sent", route)
                    return None
                stream, t_bit = route
                # Tags (PCIe 6.x §2.2.6.2): each MRd gets its own 8-bit tag, round-robin
                # over the root port's requests (the running request count), so successive
                # reads carry different tags; the answers go back under the caller's tags.
                # Posted writes need no tag: 0.
                first = counters["mmio_requests"]
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
                counters["mmio_requests"] += len(tlps)
                if t_bit:
                    counters["mmio_t1"] += len(tlps)
                wires: list[bytes] = []
                for tlp in tlps:
                    if stream is None:
                        wires.append(tlp.encode())
                        continue
                    try:
                        wires.append(stream.tx.protect(replace(tlp, t_bit=t_bit,
                                                               stream_id=stream.stream_id)))
                    except IdeKeyStateError as exc:
                        counters["mmio_not_sent"] += 1
                        ctx.refuse(burst, None, "mmio_not_sent", str(exc))
                        return None
            if ctx.downstream is None:
                raise LinkFault("root port is not connected to a link")
            completions = ctx.downstream(wires)
            answers: dict[int, bytes | None] = {}
            data: dict[int, bytearray] = {tag: bytearray() for tag in reads}
            with ctx.lock:
                for wire in completions:
                    for cpl in self._completions(wire, burst):
                        req = reads.get(cpl.tag)
                        if (req is None or cpl.requester_id != ctx.completer_id
                                or cpl.tag in answers):
                            # No outstanding read with this Requester ID and tag: an Unexpected
                            # Completion (§2.3.2), discarded and counted.
                            counters["mmio_completions_discarded"] += 1
                            ctx.refuse(burst, None, "unexpected_completion",
                                       f"{cpl.type.name} tag {cpl.tag} for "
                                       f"{cpl.requester_id:#06x}: no such read outstanding")
                            continue
                        if t_bit and (stream is None or cpl.stream_id != stream.stream_id):
                            # A T=1 read is answered on its stream or not at all (§11.2.1).
                            counters["mmio_completions_discarded"] += 1
                            answers[cpl.tag] = None
                            continue
                        if cpl.status != CplStatus.SC:
                            counters["mmio_ur"] += 1
                            answers[cpl.tag] = None
                            continue
                        data[cpl.tag] += cpl.payload_bytes()
                        if len(data[cpl.tag]) >= req.request_byte_count:
                            answers[cpl.tag] = bytes(data[cpl.tag])
            return {caller[tag]: got for tag, got in answers.items()}
        finally:
            ctx.finish_burst(burst)

    def _completions(self, wire: bytes, burst: Burst) -> list[Tlp]:
        """IDE check and decode of one completion from the device: the completions it
        delivers (none while an aggregated unit is open, §6.33.6, or if it was discarded;
        all of a unit's with its last TLP).  Under the lock."""
        ctx = self._ctx
        if is_protected(wire):
            sid = prefix_stream_id(wire)
            s = None if sid is None else self._streams.streams.get(sid)
            if s is None or not s.is_secure():
                ctx.counters["mmio_completions_discarded"] += 1
                return []
            try:
                tlps = s.rx.receive(wire)
            except IdeIntegrityError as exc:
                self._streams.ide_failed(s, exc.reason, burst)
                ctx.refuse(burst, None, "ide", exc.reason)
                return []
            s.started.add(SubStream(wire[1] >> 4 & 7))     # checked by receive()
        else:
            try:
                tlp = Tlp.decode(wire)
            except TlpError as exc:
                ctx.refuse(burst, None, "malformed", str(exc))
                return []
            owner = self._streams.of_rid(tlp.completer_id)
            if owner is not None and owner.is_secure() and tlp.substream in owner.started:
                reason = (f"non-IDE {tlp.type.name} from {tlp.completer_id:#06x} on "
                          f"{tlp.substream.name} after IDE started")
                self._streams.ide_failed(owner, reason, burst)
                ctx.refuse(burst, None, "ide", reason)
                return []
            tlps = [tlp]
        out = []
        for tlp in tlps:
            if not tlp.type.is_completion:
                ctx.refuse(burst, None, "malformed",
                           f"{tlp.type.name} where a completion was due")
                continue
            out.append(tlp)
        return out
