"""Admitted DMA against guest memory, and the completions back (PCIe 6.x §2.2.9: split by
MPS on RCB boundaries; §11.2.1: on the request's stream with T echoed, IDE-protected by the
root port's Tx).  Guest memory is only touched here, never under the lock.  Design notes:
docs/root-port-internals.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from teeio.ide import IdeKeyStateError
from teeio.tlp import CplStatus, SubStream, Tlp, TlpType, completion_runs
from vfio_user_dev.dma import Copy, DmaFault, DmaMapSet
from vfio_user_dev.link.interfaces import LinkFault, RootPortReply
from vfio_user_dev.root_port.context import Burst, PortContext
from vfio_user_dev.root_port.ingress import Ingress
from vfio_user_dev.root_port.requests import Admitted, Request
from vfio_user_dev.root_port.streams import RootPortStream


class DmaExecutor:
    """Carries out admitted requests on the DMA map set (pinned to a window's maps) and
    answers reads; the clear fast path's transfers too."""

    def __init__(self, ctx: PortContext, dma: DmaMapSet, ingress: Ingress) -> None:
        self._ctx = ctx
        self._dma = dma
        self._ingress = ingress

    def execute(self, run: list[Admitted], reply: RootPortReply, burst: Burst) -> None:
        """One run of admitted requests (:func:`~.requests.runs`) as one memory access;
        on a fault, TLP by TLP to find which could not land."""
        first = run[0]
        if first.refused:
            self._complete([(req, None) for adm in run for req in adm.req.each()], reply)
            return
        start = first.req.address
        total = sum(a.req.length for a in run)
        if first.req.write:
            try:
                self._dma.write(start, b"".join(a.req.data for a in run), first.pin)
                return
            except DmaFault:
                pass
            for adm in run:               # find exactly which TLPs could not land
                for req in adm.req.each():
                    try:
                        self._dma.write(req.address, req.data, adm.pin)
                    except DmaFault as exc:
                        with self._ctx.lock:
                            self._ctx.refuse(burst, req, "memory", str(exc))
                        reply.refused_posted.append(str(exc))
            return
        answers: list[tuple[Request, bytes | memoryview | None]] = []
        try:
            data = self._dma.read(start, total, first.pin)
        except DmaFault:
            for adm in run:
                for req in adm.req.each():
                    try:
                        got: bytes | None = self._dma.read(req.address, req.length, adm.pin)
                    except DmaFault as exc:
                        with self._ctx.lock:
                            self._ctx.refuse(burst, req, "memory", str(exc))
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

    def _complete(self, answers: Sequence[tuple[Request, bytes | memoryview | None]],
                  reply: RootPortReply) -> None:
        """The completions answering MRds (or gathered runs of them), in order: for each,
        CplDs of its data, or UR if None; T echoes the request and the completions travel
        on its stream (§11.2.1).  Consecutive CplDs on one stream with one T are protected
        as a run."""
        with self._ctx.lock:
            group: list[tuple[Request, bytes | memoryview]] = []
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
                    self._ctx.counters["completions_discarded"] += 1
                    continue
                ur = Tlp(TlpType.CPL, req.requester_id, req.tag,
                         completer_id=self._ctx.completer_id, byte_count=req.length,
                         lower_address=req.address & 0x7F, status=CplStatus.UR,
                         t_bit=req.t_bit,
                         stream_id=None if stream is None else stream.stream_id,
                         tc=req.tc, attr=req.attr)
                self._send_completions([ur], stream, reply)
            if group:
                self._complete_group(group, reply)

    def _complete_group(self, group: list[tuple[Request, bytes | memoryview]],
                        reply: RootPortReply) -> None:
        """CplDs for MRds of one stream (or none) and one T bit.  Under the lock."""
        counters = self._ctx.counters
        stream, t_bit = group[0][0].stream, group[0][0].t_bit
        if stream is not None and not stream.is_secure():     # one per MRd, as ever
            counters["completions_discarded"] += sum(r.tlps for r, _ in group)
            return
        headers: list[bytes] = []
        payloads: list[bytes | memoryview] = []
        for req, data in group:
            h, p = completion_runs(req.requester_id, self._ctx.completer_id,
                                   req.pieces or ((req.address, req.length, req.tag),), data,
                                   self._ctx.mps, tc=req.tc, attr=req.attr)
            headers += h
            payloads += p
        if stream is None:
            reply.completions += [h + p for h, p in zip(headers, payloads, strict=True)]
            counters["completions_out"] += len(headers)
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
        counters["completions_out"] += len(wires)

    def _send_completions(self, tlps: list[Tlp], stream: RootPortStream | None,
                          reply: RootPortReply) -> None:
        for tlp in tlps:
            if stream is None:
                reply.completions.append(tlp.encode())
            else:
                try:
                    reply.completions.append(stream.tx.protect(tlp))
                except IdeKeyStateError as exc:
                    self._ctx.counters["completions_discarded"] += 1
                    self._ctx.log.warning("completion not sent: %s", exc)
                    continue
            self._ctx.counters["completions_out"] += 1

    # -- clear fast path (no IDE, nobody watching the wire; see link/endpoint.py) ------------
    def clear_write(self, requester_id: int, address: int, data: bytes, mps: int) -> None:
        burst = Burst()
        try:
            runs = self._ingress.clear_plan(True, requester_id, address, len(data), mps,
                                            burst)
            failed = [r[2] for r in runs if r[2] is not None]
            for start, length, reason, pin in runs:
                if reason is None:
                    off = start - address
                    part = data if length == len(data) else data[off:off + length]
                    try:
                        self._dma.write(start, part, pin)
                    except DmaFault as exc:
                        with self._ctx.lock:
                            self._ctx.refuse(burst, Request(True, requester_id, start, length),
                                             "memory", str(exc))
                        raise
            if failed:
                raise LinkFault(f"root port refused posted TLP(s): {burst.first[failed[0]]}")
        finally:
            self._ctx.finish_burst(burst)

    def copy_direct_many(self, requester_id: int, copies: Sequence[Copy],
                         proceed: Callable[[], bool] | None = None) -> int:
        """T=0 copies (a read of the source whose data goes to the destination), each as
        one memmove, while both ranges are admitted whole (as :meth:`clear_read` and
        :meth:`clear_write` would) into mapped memory and *proceed* (asked before each)
        agrees; how many, from the first (the rest: nothing done or counted)."""
        return self._ingress.clear_copy_many(requester_id, copies, self._dma.copy_direct_many,
                                             proceed)

    def clear_read(self, requester_id: int, address: int, length: int, mrrs: int) -> bytes:
        burst = Burst()
        try:
            runs = self._ingress.clear_plan(False, requester_id, address, length, mrrs, burst)
            for _start, _length, reason, _pin in runs:
                if reason is not None:
                    raise LinkFault(f"MRd refused (Unsupported Request): {burst.first[reason]}")
            out = []
            for start, n, _reason, pin in runs:
                try:
                    out.append(self._dma.read(start, n, pin))
                except DmaFault as exc:
                    with self._ctx.lock:
                        self._ctx.refuse(burst, Request(False, requester_id, start, n),
                                         "memory", str(exc))
                    raise
            return b"".join(out)
        finally:
            self._ctx.finish_burst(burst)
