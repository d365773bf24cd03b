"""Checks on the TLPs arriving from the device (PCIe 6.x §6.33.4-§6.33.6, §11.2.1; TDISP
§11), in order: IDE (the stream the prefix names, its Rx, the requester inside its RID
range; no clear TLP once IDE started), then the trusted-DMA windows (T=1 wholly inside an
active window of its requester and stream with the access it allows; T=0 touching none).
Every refusal is counted by reason.  Design notes: docs/root-port-internals.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from teeio.ide import IdeIntegrityError
from teeio.tlp import (
    IDE_PREFIX_BYTE0,
    PREFIX_LEN,
    SubStream,
    Tlp,
    TlpError,
    is_protected,
    parse_ide_request_runs,
    peek,
    prefix_stream_id,
    split,
)
from vfio_user_dev.dma import Copy
from vfio_user_dev.link.interfaces import LinkFault, RootPortReply
from vfio_user_dev.root_port.context import Burst, PortContext
from vfio_user_dev.root_port.requests import Admitted, Request
from vfio_user_dev.root_port.streams import RootPortStream, StreamTable
from vfio_user_dev.root_port.windows import WindowTable

#: a clear-path plan: runs of (start, length, refusal reason or None, pinned map ids)
Plan = list[tuple[int, int, str | None, frozenset[int] | None]]


class Ingress:
    """Admission of the device's requests: the wire path's methods run under the lock (the
    caller's), the clear path's plan takes it."""

    def __init__(self, ctx: PortContext, streams: StreamTable, windows: WindowTable) -> None:
        self._ctx = ctx
        self._streams = streams
        self._windows = windows

    def receive_one(self, wire: bytes, burst: Burst, reply: RootPortReply,
                    admitted: list[Admitted]) -> None:
        """Check one TLP (through a :class:`~teeio.tlp.Tlp`); admitted requests go to
        *admitted*, refused posted writes to *reply*."""
        self._ctx.counters["tlps_in"] += 1
        reqs = self._decode(wire, burst)
        if isinstance(reqs, str):
            head = peek(wire)
            if head is not None and head.type.is_request and head.type.has_data:
                reply.refused_posted.append(reqs)   # a posted write that never lands
            return
        for req in reqs:
            self._admit(req, burst, reply, admitted, *self.check(req))

    def _admit(self, req: Request, burst: Burst, reply: RootPortReply,
               admitted: list[Admitted], pin: frozenset[int] | None, reason: str | None,
               detail: str) -> None:
        if reason is not None:
            self._ctx.refuse(burst, req, reason, detail)
            if req.write:
                reply.refused_posted.append(detail)
            else:
                admitted.append(Admitted(req, None, refused=True))
            return
        self._ctx.counters["tlps_admitted"] += 1
        admitted.append(Admitted(req, pin))

    def receive_run(self, wires: Sequence[bytes], start: int, burst: Burst,
                    reply: RootPortReply, admitted: list[Admitted]) -> int:
        """Take the run of ordinary IDE requests at *start* (well-formed, on one Secure
        stream, passing the IDE check) without TLP objects, doing for each what
        :meth:`receive_one` would; contiguous admitted requests of one kind become one
        gathered request.  Returns where the run stopped: the TLP there (if any) is
        :meth:`receive_one`'s."""
        first = wires[start]
        if len(first) <= PREFIX_LEN or first[0] != IDE_PREFIX_BYTE0:
            return start
        stream = self._streams.streams.get(first[2])
        if stream is None or not stream.is_secure():
            return start
        rx = stream.rx
        found = parse_ide_request_runs(wires, start, rx.stream_id, rx.aggregation)
        total = sum(k for _, k in found)
        # The payloads of the TLPs that passed, one after the other (DW-padded, as sent).
        joined, taken = rx.open_many_joined(wires, start, start + total) if found else (b"", 0)
        if not taken:
            return start
        self._ctx.counters["tlps_in"] += taken
        quick = not self._windows.windows   # no window to check against, nor to pin to
        in_range = stream.has_rid
        run: Request | None = None          # contiguous admitted requests being gathered
        parts: list[tuple[int, int]] = []   # its payloads (writes): ranges of joined
        pieces: list[tuple[int, int, int]] = []
        gathered = 0
        kinds = set()
        pos = off = 0
        for (write, rid, tag, tc, attr, t_bit, a, count, lo), k in found:
            if pos >= taken:
                break
            k = min(k, taken - pos)         # a run is k TLPs, each the next count bytes
            size = (lo + count + 3) & ~3 if write else 0    # each one's payload
            kinds.add(write)
            if quick and not t_bit and in_range(rid):   # admitted, not pinned (check)
                if (run is None or run.address + run.length != a or run.write != write
                        or run.requester_id != rid or run.tc != tc or run.attr != attr):
                    if run is not None:
                        self._close_run(run, joined, parts, pieces, admitted)
                    run = Request(write, rid, a, 0, False, stream, tc=tc, attr=attr)
                    parts, pieces = [], []
                run.length += count * k
                if k == 1:
                    if write:
                        parts.append((off + lo, off + lo + count))
                    pieces.append((a, count, tag))
                elif write:                 # whole payloads (lo 0), one after the other
                    parts.append((off, off + k * count))
                    pieces += [(b, count, tag) for b in range(a, a + k * count, count)]
                else:                       # MRds with consecutive tags
                    pieces += [(b, count, tag + j) for j, b in
                               enumerate(range(a, a + k * count, count))]
                gathered += k
                pos += k
                off += size * k
                continue
            if run is not None:
                self._close_run(run, joined, parts, pieces, admitted)
                run = None
            for j in range(k):
                at = off + j * size + lo
                req = Request(write, rid, a + j * count, count, t_bit, stream,
                              tag=tag if write else tag + j, tc=tc, attr=attr,
                              data=joined[at:at + count] if write else b"")
                self._admit(req, burst, reply, admitted, *self.check(req))
            pos += k
            off += size * k
        if run is not None:
            self._close_run(run, joined, parts, pieces, admitted)
        stream.started.update(SubStream.PR if k else SubStream.NPR for k in kinds)
        self._ctx.counters["tlps_admitted"] += gathered
        return start + taken

    @staticmethod
    def _close_run(run: Request, joined: bytes, parts: list[tuple[int, int]],
                   pieces: list[tuple[int, int, int]], admitted: list[Admitted]) -> None:
        if run.write:
            if all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1)):
                run.data = joined[parts[0][0]:parts[-1][1]]     # all of it: no copy
            else:
                view = memoryview(joined)
                run.data = b"".join([view[s:e] for s, e in parts])
        run.pieces = pieces
        admitted.append(Admitted(run, None))

    def _decode(self, wire: bytes, burst: Burst) -> list[Request] | str:
        """IDE check and decode of one TLP: the requests it delivers (none while an
        aggregated unit is open, all of the unit's with its last TLP, §6.33.6), or why it
        was discarded."""
        refuse = self._ctx.refuse
        stream: RootPortStream | None = None
        if is_protected(wire):
            sid = prefix_stream_id(wire)
            if sid is None:
                return refuse(burst, None, "malformed", "bad IDE prefix")
            stream = self._streams.streams.get(sid)
            if stream is None:
                return refuse(burst, None, "misrouted", f"IDE TLP for unknown stream {sid}")
            if not stream.is_secure():      # already failed (or not enabled): discard only
                return refuse(burst, None, "ide", f"IDE TLP on stream {sid}, which is "
                              f"not Secure ({stream.insecure_reason or 'not enabled'})")
            try:
                tlps = stream.rx.receive(wire)
            except IdeIntegrityError as exc:
                self._streams.ide_failed(stream, exc.reason, burst)
                return refuse(burst, None, "ide", exc.reason)
            stream.started.add(SubStream(wire[1] >> 4 & 7))     # checked by receive()
        else:
            try:
                tlp = Tlp.decode(wire)
            except TlpError as exc:
                return refuse(burst, None, "malformed", str(exc))
            owner = self._streams.of_rid(tlp.requester_id)
            if owner is not None and owner.is_secure() and tlp.substream in owner.started:
                reason = (f"non-IDE {tlp.type.name} from RID {tlp.requester_id:#06x} on "
                          f"{tlp.substream.name} after IDE started")
                self._streams.ide_failed(owner, reason, burst)
                return refuse(burst, None, "ide", reason)
            tlps = [tlp]
        out = []
        for tlp in tlps:
            if not tlp.type.is_request:
                return refuse(burst, None, "malformed",
                              f"unexpected {tlp.type.name} from the device")
            write = tlp.type.has_data
            out.append(Request(write, tlp.requester_id, tlp.byte_address,
                               tlp.request_byte_count, tlp.t_bit, stream, tag=tlp.tag,
                               tc=tlp.tc, attr=tlp.attr,
                               data=tlp.payload_bytes() if write else b""))
        return out

    def check(self, req: Request) -> tuple[frozenset[int] | None, str | None, str]:
        """(pinned map ids, refusal reason key or None, detail) for one request."""
        a, n = req.address, req.length
        if req.stream is not None and not req.stream.has_rid(req.requester_id):
            return None, "rid_outside_stream", (f"RID {req.requester_id:#06x} is outside "
                                                f"stream {req.stream.stream_id}'s RID range")
        if req.t_bit:
            sid = req.stream.stream_id if req.stream is not None else None
            w = self._windows.lookup(req.requester_id, sid, a, n)
            if w is None:
                return None, "t1_outside_window", (f"T=1 {a:#x}+{n} is in no window of RID "
                                                   f"{req.requester_id:#06x} stream {sid}")
            if w.suspended:
                return None, "window_suspended", (f"window {w.window_id} suspended: "
                                                  f"{w.suspended}")
            if not (w.write if req.write else w.read):
                return None, "window_access", (f"window {w.window_id} does not allow "
                                               f"{'writes' if req.write else 'reads'}")
            return w.map_ids, None, ""
        w = self._windows.touching(a, n)
        if w is not None:
            return None, "t0_into_window", f"T=0 {a:#x}+{n} touches window {w.window_id}"
        return None, None, ""

    # -- clear fast path (no IDE, nobody watching the wire; see link/endpoint.py) ------------
    def clear_copy_many(self, rid: int, copies: Sequence[Copy],
                        copy: Callable[[Sequence[Copy], Callable[[], bool] | None], int],
                        proceed: Callable[[], bool] | None = None) -> int:
        """T=0 copies (each a read of its source whose data is written to its
        destination) that :meth:`clear_plan` would admit whole, refusing nothing, done by
        *copy* (outside the lock, as memory is always touched; *proceed* asked before
        each) and counted as those plans would count them.  Those before the first that
        would not be admitted whole; how many *copy* did.  A window granted meanwhile
        stops it: the rest were checked against the windows before."""
        ctx = self._ctx
        windows = self._windows
        with ctx.lock:
            owner = self._streams.of_rid(rid)
            if owner is not None and owner.is_secure() and owner.started:
                return 0
            granted = windows.granted
            touching = windows.touching
            n = 0
            for src, dst, length in copies:
                if touching(src, length) is not None or touching(dst, length) is not None:
                    break
                n += 1

        def go_on() -> bool:    # the windows last, the nearest to the memmove
            return (proceed is None or proceed()) and windows.granted == granted
        done = copy(copies if n == len(copies) else copies[:n], go_on) if n else 0
        if done:
            with ctx.lock:
                counters = ctx.counters
                counters["clear_transfers"] += 2 * done
                counters["tlps_admitted"] += 2 * done
        return done

    def clear_plan(self, write: bool, rid: int, address: int, length: int, size: int,
                   burst: Burst) -> Plan:
        """Runs (start, length, refusal reason or None, pin) for a T=0 transfer split into
        *size*-byte TLPs, each checked as the wire path would.  Takes the lock."""
        with self._ctx.lock:
            self._ctx.counters["clear_transfers"] += 1
            owner = self._streams.of_rid(rid)
            sub = SubStream.PR if write else SubStream.NPR
            if owner is not None and owner.is_secure() and sub in owner.started:
                why = (f"non-IDE {'MWr' if write else 'MRd'} from RID {rid:#06x} on "
                       f"{sub.name} after IDE started")
                self._ctx.refuse(burst, None, "ide", why)
                self._streams.ide_failed(owner, why, burst)
                raise LinkFault(f"IDE stream {owner.stream_id}: {why}")
            if self._windows.touching(address, length) is None:
                self._ctx.counters["tlps_admitted"] += 1
                return [(address, length, None, None)]
            runs: Plan = []
            for a, n in split(address, length, size):
                req = Request(write, rid, a, n)
                pin, reason, detail = self.check(req)
                if reason is not None:
                    self._ctx.refuse(burst, req, reason, detail)
                else:
                    self._ctx.counters["tlps_admitted"] += 1
                if runs and runs[-1][2] == reason and runs[-1][3] == pin \
                        and runs[-1][0] + runs[-1][1] == a:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, reason, pin)
                else:
                    runs.append((a, n, reason, pin))
            return runs
