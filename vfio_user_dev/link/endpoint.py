"""The device's end of the link (PCIe 6.x §2: the requester of DMA reads and writes as
memory request TLPs, split by MPS/MRRS; the completer of MMIO requests, §11.2.1), with the
IDE checks of every TLP it sends or receives (§6.33.5; failures and IDE Fail Messages
§6.33.6) and the T bit rules (§11.2.1: T=1 only on a Secure stream).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from teeio.ide import IdeIntegrityError, IdeKeyStateError
from teeio.pcie.ide_cap import IdeCapability
from teeio.platform_channel import StreamState
from teeio.tlp import (
    IDE_PREFIX_BYTE0,
    PREFIX_LEN,
    CplStatus,
    SubStream,
    Tlp,
    TlpError,
    is_protected,
    memory_write_split,
    parse_ide_completion_runs,
    prefix_stream_id,
    split,
)
from vfio_user_dev.dma import Copy
from vfio_user_dev.link.interfaces import (
    DEFAULT_REQUESTER_ID,
    IdeFailEvent,
    LinkError,
    LinkFault,
    MmioCompleter,
    MmioRequest,
    RootPortReply,
    UpstreamPort,
)
from vfio_user_dev.link.reads import OutstandingReads
from vfio_user_dev.link.streams import StreamPort, capability_streams
from vfio_user_dev.link.tags import MAX_OUTSTANDING, TAGS_5BIT, TagAllocator, read_headers

log = logging.getLogger(__package__)


class LinkEndpoint:
    """The device's end of the link: DMA reads and writes as TLPs, IDE when Secure."""

    def __init__(self, requester_id: int = DEFAULT_REQUESTER_ID) -> None:
        self.requester_id = requester_id
        self.link: UpstreamPort | None = None
        self._streams: Callable[[], Sequence[StreamPort]] = list
        self._any_secure: Callable[[], bool] = _never     # whether any of them is Secure
        # Held around the per-TLP IDE work (protect, check, failure reporting), never
        # around memory access: the lock under which the device's IDE_KM changes keys.
        self._ide_lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        self.tee_dma: Callable[[], bool] = lambda: False
        self.on_ide_fail: list[Callable[[IdeFailEvent], None]] = []
        #: errors the device logs (AER, PCIe 6.x §6.2): an IDE check failed on a TLP it
        #: received, or it completed a request with UR; with the TLP's header
        self.on_error: list[Callable[[LinkError, bytes], None]] = []
        self.ide_failures: list[IdeFailEvent] = []
        self._started: set[tuple[int, SubStream]] = set()
        self.tags = TagAllocator()      # the tags of its outstanding DMA reads
        self.counters = {"transfers": 0, "faults": 0, "ur_completions": 0,
                         "completion_timeouts": 0, "unexpected_completions": 0,
                         "refused_posted": 0, "ide_tlps_tx": 0, "ide_tlps_rx": 0,
                         "mmio_requests": 0, "mmio_ur": 0, "mmio_discarded": 0}
        self.mmio_completer: MmioCompleter | None = None
        self.log = log.getChild(f"ep.{requester_id >> 8:02x}:{requester_id >> 3 & 0x1F:02x}."
                                f"{requester_id & 7}")
        self.reads = OutstandingReads(self.counters, self.log)

    # -- configuration ------------------------------------------------------------------
    def attach_stream(self, stream: StreamPort | None,
                      lock: contextlib.AbstractContextManager[object] | None = None) -> None:
        """The one IDE stream the device's DMA uses while it is Secure (None: no IDE).
        *lock*: the one its key management holds while it changes the stream's keys."""
        self._streams = (lambda: [stream]) if stream is not None else list
        self._any_secure = stream.is_secure if stream is not None else _never
        self._ide_lock = lock if lock is not None else contextlib.nullcontext()
        self._started.clear()

    def attach_ide_capability(self, cap: IdeCapability,
                              lock: contextlib.AbstractContextManager[object] | None = None
                              ) -> None:
        """Use the streams of the device's IDE capability: DMA goes on the first Secure one
        in :func:`capability_streams` order.  *lock*: the one held while IDE_KM and config
        writes change the capability (the device lock)."""
        self._streams = lambda: capability_streams(cap)
        self._any_secure = lambda: any(b.secure for b in cap.streams)
        self._ide_lock = lock if lock is not None else contextlib.nullcontext()
        self._started.clear()

    def set_extended_tags(self, enabled: bool) -> None:
        """Extended Tag Field Enable as the guest programmed it (PCIe 6.x §7.5.3.4 bit 8):
        8-bit tags when set, else 5-bit tags (at most 32 reads outstanding, §2.2.6.2)."""
        self.tags.set_space(MAX_OUTSTANDING if enabled else TAGS_5BIT)

    def _secure_stream(self) -> StreamPort | None:
        if not self._started and not self._any_secure():
            return None         # what the loop below finds, without ordering the streams
        for s in self._streams():
            if s.is_secure():
                return s
            self._started = {k for k in self._started if k[0] != s.stream_id}
        return None

    def _stream(self, stream_id: int) -> StreamPort | None:
        """The stream with *stream_id*, a Secure one first (unconfigured blocks share ID 0)."""
        match = [s for s in self._streams() if s.stream_id == stream_id]
        return next((s for s in match if s.is_secure()), match[0] if match else None)

    def _secure_stream_id(self, stream_id: int) -> StreamPort | None:
        for s in self._streams():
            if s.stream_id == stream_id and s.is_secure():
                return s
        return None

    def _require_link(self) -> UpstreamPort:
        if self.link is None:
            raise LinkFault("device is not connected to a link")
        return self.link

    # -- DMA ----------------------------------------------------------------------------
    def write(self, address: int, data: bytes, *, t_bit: bool | None = None,
              stream_id: int | None = None) -> None:
        """Posted write of *data* at guest *address*; LinkFault if any part did not land.
        *t_bit* (default: the ``tee_dma`` hook) and *stream_id* (default: the first
        Secure stream) choose how it is sent; a named stream must be Secure."""
        if not data:
            return
        _check_dma_range(address, len(data))
        link = self._require_link()
        self.counters["transfers"] += 1
        stream, t_bit = self._route(t_bit, stream_id)
        if stream is None and not link.tapped:
            link.clear_write(self.requester_id, address, data)
            return
        headers, payloads = memory_write_split(self.requester_id, address, data, link.mps)
        with self._ide_lock:
            wires = self._encode_many(SubStream.PR, headers, payloads, stream, t_bit)
        reply = link.send_upstream(wires)
        self._check_after(stream, reply)

    def read(self, address: int, length: int, *, t_bit: bool | None = None,
             stream_id: int | None = None) -> bytes:
        """*length* bytes at guest *address*; LinkFault if any part could not be read.
        *t_bit* and *stream_id* as for :meth:`write`."""
        if length <= 0:
            return b""
        _check_dma_range(address, length)
        link = self._require_link()
        self.counters["transfers"] += 1
        stream, t_bit = self._route(t_bit, stream_id)
        if stream is None and not link.tapped:
            return link.clear_read(self.requester_id, address, length)
        pieces = split(address, length, link.mrrs)
        out: list[bytes] = []
        pos = 0
        while pos < len(pieces):
            # At most as many MRds outstanding as there are tags (Extended Tag Field Enable
            # may change between batches).
            batch = pieces[pos:pos + self.tags.space]
            pos += len(batch)
            try:
                tags = self.tags.allocate(len(batch))
            except ValueError as exc:
                self.counters["faults"] += 1
                raise LinkFault(f"MRd not sent: {exc}") from None
            try:
                self.reads.start(tags, batch, link.mps)
                headers = read_headers(self.requester_id, batch, tags)
                with self._ide_lock:
                    wires = self._encode_many(SubStream.NPR, headers, [b""] * len(headers),
                                              stream, t_bit)
                reply = link.send_upstream(wires)
                self._check_after(stream, reply)
                out.append(self.reads.take_all())
            finally:
                # Completed, or given up (completion timeout): the tags are free again.
                self.reads.clear()
                self.tags.free(tags)
        return out[0] if len(out) == 1 else b"".join(out)

    def copy_clear(self, src: int, dst: int, length: int, *, direct_only: bool = False
                   ) -> bool:
        """A T=0 read of *src* whose data is written to *dst*, when both go in the clear
        with nobody watching the link (as one memmove where the root port can; with
        *direct_only*, only that way).  False, and nothing sent, otherwise: the caller
        reads and writes."""
        if length <= 0:
            return True
        if not _copy_in_range(src, dst, length):
            _check_dma_range(src, length)      # raises, saying which
            _check_dma_range(dst, length)
        link = self.link
        if link is None:
            raise LinkFault("device is not connected to a link")
        if not self._clear_path(link):
            return False
        if not link.clear_copy(self.requester_id, src, dst, length, direct_only=direct_only):
            return False
        self.counters["transfers"] += 2
        return True

    def _clear_path(self, link: UpstreamPort) -> bool:
        """Whether DMA may skip the TLPs: nobody watches *link* and no stream is in use."""
        if link.tapped:
            return False
        with self._ide_lock:
            # A Secure stream carries every DMA (T=0 too); one that was used (started)
            # is looked at by the TLP path, which drops it once it is no longer Secure.
            return not (self._started or self._any_secure())

    def copy_clear_many(self, copies: Sequence[Copy],
                        proceed: Callable[[], bool] | None = None) -> int:
        """Copies (source, destination, length) done as :meth:`copy_clear` does with
        *direct_only*, in order, the link's state looked at once for all of them and
        *proceed* asked before each; it stops before the first it cannot do that way (a
        bad range included).  How many: the caller does the next one otherwise."""
        n = 0
        for src, dst, length in copies:
            if length <= 0 or not _copy_in_range(src, dst, length):
                break
            n += 1
        link = self.link
        if not n or link is None or not self._clear_path(link):
            return 0
        done = link.clear_copy_many(self.requester_id,
                                    copies if n == len(copies) else copies[:n], proceed)
        self.counters["transfers"] += 2 * done
        return done

    def _route(self, t_bit: bool | None = None,
               stream_id: int | None = None) -> tuple[StreamPort | None, bool]:
        with self._ide_lock:
            if stream_id is None:
                stream = self._secure_stream()
            else:
                stream = self._secure_stream_id(stream_id)
                if stream is None:
                    self.counters["faults"] += 1
                    raise LinkFault(f"IDE stream {stream_id} is not Secure: not sent")
        if t_bit is None:
            t_bit = self.tee_dma()
        if t_bit and stream is None:
            self.counters["faults"] += 1
            raise LinkFault("T=1 DMA needs a Secure IDE stream (§11.2.1); none: not sent")
        return stream, t_bit

    def _encode_many(self, substream: SubStream, headers: Sequence[bytes],
                     payloads: Sequence[bytes | memoryview], stream: StreamPort | None,
                     t_bit: bool) -> list[bytes]:
        """The wire bytes of a run of requests: clear (T=0; T=1 never gets here without a
        stream), or protected on *stream* with *t_bit*.  Called under the IDE lock."""
        if stream is None:
            return [h + p for h, p in zip(headers, payloads, strict=True)]
        try:
            wires = stream.tx.protect_many(substream, t_bit, headers, payloads,
                                           stream.stream_id)
        except IdeKeyStateError as exc:
            raise LinkFault(f"IDE stream {stream.stream_id}: cannot protect: {exc}") from None
        self.counters["ide_tlps_tx"] += len(wires)
        return wires

    def _check_after(self, stream: StreamPort | None, reply: RootPortReply) -> None:
        if reply.refused_posted:
            self.counters["refused_posted"] += len(reply.refused_posted)
            self.counters["faults"] += 1
            raise LinkFault(f"root port refused {len(reply.refused_posted)} posted TLP(s): "
                            f"{reply.refused_posted[0]}")
        if stream is not None and not stream.is_secure():
            self.counters["faults"] += 1
            raise LinkFault(f"IDE stream {stream.stream_id} went Insecure during the transfer")

    # -- MMIO: requests from the root port ------------------------------------------------
    def receive_requests(self, wires: Sequence[bytes]) -> list[bytes]:
        """Memory requests from the root port (CPU MMIO): each goes through the IDE checks
        of :meth:`_ingress`, then to :attr:`mmio_completer`; returns the completions (wire
        bytes) for the reads, on the request's stream with its T bit (§11.2.1)."""
        out: list[bytes] = []
        for wire in wires:
            with self._ide_lock:
                tlps = self._ingress(wire, "mmio_discarded")
            for tlp in tlps:
                cpl = self._mmio_request(tlp)
                if cpl is None:
                    continue
                with self._ide_lock:
                    wire_out = self._encode_completion(cpl)
                if wire_out is not None:
                    out.append(wire_out)
        return out

    def _mmio_request(self, tlp: Tlp) -> Tlp | None:
        """One memory request from the root port to :attr:`mmio_completer`: the completion
        to send back (None: a posted write, or discarded)."""
        if not tlp.type.is_request:
            self.counters["mmio_discarded"] += 1
            self.log.warning("unexpected %s from the root port: discarded", tlp.type.name)
            return None
        self.counters["mmio_requests"] += 1
        write = tlp.type.has_data
        req = MmioRequest(write, tlp.requester_id, tlp.byte_address, tlp.request_byte_count,
                          tlp.payload_bytes() if write else b"", tlp.t_bit, tlp.stream_id)
        result = (self.mmio_completer.mmio_request(req)
                  if self.mmio_completer is not None else None)
        if result is None:
            self.counters["mmio_ur"] += 1
            self._error(LinkError.UNSUPPORTED_REQUEST, bare_header(tlp))
        if write:
            return None         # posted: a UR is only logged by the completer (§2.3.1)
        return (Tlp.completion_for(tlp, self.requester_id, result) if result is not None
                else Tlp.completion_for(tlp, self.requester_id, status=CplStatus.UR))

    def _encode_completion(self, cpl: Tlp) -> bytes | None:
        if cpl.stream_id is None:
            return cpl.encode()
        stream = self._secure_stream_id(cpl.stream_id)
        if stream is None:
            self.counters["mmio_discarded"] += 1
            self.log.warning("completion not sent: IDE stream %d is no longer Secure",
                             cpl.stream_id)
            return None
        try:
            wire = stream.tx.protect(cpl)
        except IdeKeyStateError as exc:
            self.counters["mmio_discarded"] += 1
            self.log.warning("completion not sent: %s", exc)
            return None
        self.counters["ide_tlps_tx"] += 1
        return wire

    # -- from the link --------------------------------------------------------------------
    def receive(self, wires: Sequence[bytes]) -> None:
        i, n = 0, len(wires)
        while i < n:
            i = self._receive_run(wires, i)
            if i < n:
                with self._ide_lock:
                    tlps = self._ingress(wires[i])
                for tlp in tlps:
                    self.reads.complete(tlp, self.requester_id)
                i += 1

    def _receive_run(self, wires: Sequence[bytes], start: int) -> int:
        """Take the run of ordinary IDE completions at *start* (successful CplDs on a Secure
        stream, each passing its checks) without building TLP objects; what :meth:`_ingress`
        and :meth:`OutstandingReads.complete` do for each, in the same order.  Returns where the run
        stopped: the TLP there (if any) goes through :meth:`_ingress`."""
        first = wires[start]
        if len(first) <= PREFIX_LEN or first[0] != IDE_PREFIX_BYTE0:
            return start
        with self._ide_lock:
            stream = self._stream(first[2])
            if stream is None or not stream.is_secure():
                return start
            rx = stream.rx
            # The common case: the batch's completions just as predicted, one comparison each.
            n = self.reads.match(wires, start, rx.stream_id, rx.aggregation, self.requester_id)
            if n:
                joined, taken = rx.open_many_joined(wires, start, start + n)
                if taken == n:
                    self._started.add((stream.stream_id, SubStream.CPL))
                    self.counters["ide_tlps_rx"] += n
                    self.reads.complete_all(joined)
                    return start + n
                plains = self.reads.split_payloads(joined, taken)
            found = parse_ide_completion_runs(wires, start, rx.stream_id, rx.aggregation)
            if not n:
                total = sum(k for _, k in found)
                plains = rx.open_many(wires, start, start + total) if found else []
            if not plains:
                return start
            self._started.add((stream.stream_id, SubStream.CPL))
            self.counters["ide_tlps_rx"] += len(plains)
        self.reads.complete_runs(found, plains, wires, start, self.requester_id)
        return start + len(plains)

    def _ingress(self, wire: bytes, discard: str = "unexpected_completions") -> list[Tlp]:
        """IDE check and decode of one TLP from the root port: the TLPs it delivers (none
        if it was discarded, counted under *discard*, or while an aggregated unit is open;
        all of the unit's with its last TLP, §6.33.6)."""
        if is_protected(wire):
            sid = prefix_stream_id(wire)
            stream = None if sid is None else self._secure_stream_id(sid)
            if stream is None:
                self.counters[discard] += 1
                self.log.warning("IDE TLP but the device's stream is not Secure: discarded")
                return []
            try:
                tlps = stream.rx.receive(wire)
            except IdeIntegrityError as exc:
                self._ide_failed(stream, exc.reason, wire[PREFIX_LEN:PREFIX_LEN + 16])
                return []
            self._started.add((stream.stream_id, SubStream(wire[1] >> 4 & 7)))
            self.counters["ide_tlps_rx"] += 1
            return tlps
        try:
            tlp = Tlp.decode(wire)
        except TlpError as exc:
            self.counters[discard] += 1
            self.log.warning("malformed TLP discarded: %s", exc)
            return []
        for stream in self._streams():
            if (stream.stream_id, tlp.substream) in self._started and stream.is_secure():
                self._ide_failed(stream, f"non-IDE {tlp.type.name} on {tlp.substream.name} "
                                         "after IDE started", bare_header(tlp))
                return []
        return [tlp]

    def _ide_failed(self, stream: StreamPort, reason: str, header: bytes = b"") -> None:
        self._error(LinkError.IDE_CHECK_FAILED, header)
        stream.mark_insecure(reason)
        self._record(IdeFailEvent("device", stream.stream_id, reason, "detected", time.time()))
        if self.link is not None:
            self.link.ide_fail_message_upstream(stream.stream_id, reason)

    def ide_fail_message(self, stream_id: int, reason: str) -> None:
        """The root port's IDE Fail Message: the stream is Insecure here too (§6.33.6)."""
        with self._ide_lock:
            stream = self._stream(stream_id)
            if stream is not None:
                stream.fail_message(f"IDE Fail Message from the root port: {reason}")
        self._record(IdeFailEvent("device", stream_id, reason, "message", time.time()))

    def _error(self, kind: LinkError, header: bytes) -> None:
        for fn in list(self.on_error):
            try:
                fn(kind, header)
            except Exception:
                self.log.exception("link error hook failed")

    def _record(self, ev: IdeFailEvent) -> None:
        self.ide_failures.append(ev)
        del self.ide_failures[:-64]
        self.log.warning("IDE stream %d failed (%s): %s", ev.stream_id, ev.how, ev.reason)
        for fn in list(self.on_ide_fail):
            try:
                fn(ev)
            except Exception:
                self.log.exception("IDE fail hook failed")

    def status(self) -> dict[str, object]:
        with self._ide_lock:
            streams = [{"id": s.stream_id, "state": StreamState.SECURE if s.is_secure()
                        else StreamState.INSECURE}
                       for s in self._streams()]
        return {
            "requester_id": self.requester_id,
            "streams": streams,
            "tag_space": self.tags.space,
            **self.counters,
            "ide_failures": len(self.ide_failures),
            "last_ide_failure": (self.ide_failures[-1].reason if self.ide_failures else None),
        }


def bare_header(tlp: Tlp) -> bytes:
    """*tlp*'s header without its IDE prefix (what an error Header Log records)."""
    head = tlp.header()
    return head[PREFIX_LEN:] if tlp.stream_id is not None else head


def _never() -> bool:
    return False


_ADDRESS_END = 1 << 64


def _copy_in_range(src: int, dst: int, length: int) -> bool:
    """Whether both ranges of a copy lie in the 64-bit address space."""
    return src >= 0 and dst >= 0 and (src if src > dst else dst) + length <= _ADDRESS_END


def _check_dma_range(address: int, length: int) -> None:
    if address < 0 or address + length > _ADDRESS_END:
        raise LinkFault(f"bad DMA range {address:#x}+{length:#x}")
