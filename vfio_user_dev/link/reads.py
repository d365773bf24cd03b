"""The outstanding DMA reads of the device's end of the link and the completions that
answer them (PCIe 6.x §2.2.6.2 Requester ID and tag matching, §2.3.1.1 Byte Count and
Lower Address of split completions, §2.3.2 unexpected completions, completion timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter

from teeio.tlp import (
    IDE_PREFIX_BYTE0,
    MAC_BYTES,
    PREFIX_LEN,
    CompletionRun,
    CplStatus,
    Tlp,
    completion_headers,
)
from vfio_user_dev.link.interfaces import LinkFault

CPL_HEADER_LEN = PREFIX_LEN + 12        # IDE prefix and a 3-DW completion header
_BYTE0, _BYTE1 = itemgetter(0), itemgetter(1)
# IDE prefix byte 1 with T and K masked out (and M too where aggregation allows it clear)
_SUB_STREAM_M = {False: bytes(b & 0xF9 for b in range(256)),
                 True: bytes(b & 0xF8 for b in range(256))}


@dataclass
class PendingRead:
    """One MRd waiting for its completions."""

    address: int
    length: int
    data: bytearray = field(default_factory=bytearray)
    status: CplStatus | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is not None or self.status is not None and (
            self.status != CplStatus.SC or len(self.data) == self.length)


class OutstandingReads:
    """The MRds of one batch, by tag, and what their completions brought.  Counts
    ``unexpected_completions``, ``completion_timeouts``, ``ur_completions`` and ``faults``
    in the endpoint's *counters*.

    The common case needs no per-read state: when the batch's completions arrive in one
    burst exactly as the completer splits them (PCIe 6.x §2.3.1.1, at the link's MPS) --
    :meth:`expected` predicts each one's header, :meth:`match` compares -- and pass the IDE
    check, their payloads joined are the data (:meth:`take_all`).  Anything else goes
    through the per-read table :attr:`pending`, made when first needed."""

    def __init__(self, counters: dict[str, int], log: logging.Logger) -> None:
        self._pending: dict[int, PendingRead] | None = {}
        self._tags: Sequence[int] = ()
        self._pieces: Sequence[tuple[int, int]] = ()
        self._mps = 0
        self._lengths: list[int] = []           # of the completions match() expected
        self._joined: bytes | None = None
        self._counters = counters
        self._log = log

    @property
    def pending(self) -> dict[int, PendingRead]:
        """The outstanding MRds by tag (made when first needed)."""
        if self._pending is None:
            self._pending = {tag: PendingRead(a, n) for tag, (a, n) in zip(
                self._tags, self._pieces, strict=True)}
        return self._pending

    def start(self, tags: Sequence[int], pieces: Sequence[tuple[int, int]],
              mps: int = 0) -> None:
        """MRds for *pieces* are about to go out, the i-th tagged ``tags[i]``; *mps*: the
        Max_Payload_Size the completer splits their completions by (0: unknown, no
        prediction)."""
        self._tags, self._pieces, self._mps = tags, pieces, mps
        self._pending = None
        self._joined = None

    def clear(self) -> None:
        """Completed, or given up (completion timeout)."""
        self._tags, self._pieces = (), ()
        self._pending = {}
        self._joined = None

    def expected(self, requester_id: int, completer_id: int) -> tuple[list[bytes], list[int]]:
        """The headers (without the IDE prefix) and payload lengths of the batch's CplDs
        as a completer with *completer_id* sends them, all successful, split at the MPS
        on RCB boundaries; ``([], [])`` unless no completion has come yet and every read is
        of whole DWs (then the payloads are exactly the data)."""
        if self._pending is not None or not self._mps or [
                1 for a, n in self._pieces if (a | n) & 3]:
            return [], []
        return completion_headers(requester_id, completer_id,
                                  [(a, n, t) for (a, n), t in zip(self._pieces, self._tags,
                                                                  strict=True)], self._mps)

    def match(self, wires: Sequence[bytes], start: int, stream_id: int, aggregation: bool,
              requester_id: int) -> int:
        """How many of ``wires[start:]`` are the batch's completions as :meth:`expected`
        predicts them (IDE-protected on *stream_id*, the MAC where M says, §6.33.6): all
        of them, or 0."""
        first = wires[start]
        if len(first) < 16:
            return 0
        headers, lengths = self.expected(requester_id, first[8] << 8 | first[9])
        self._lengths = lengths
        n = len(headers)
        if not n or len(wires) - start < n:
            return 0
        want = 0x20 if aggregation else 0x21     # CPL, M (masked out with aggregation)
        got = wires[start:start + n]
        # One comparison per completion, in C: its header is the one predicted.
        if not all(map(bytes.startswith, got, headers, repeat(PREFIX_LEN))):
            return 0
        # Prefixes: IDE, CPL with the MAC (or either with aggregation, §6.33.6), this
        # stream, PR_Sent_Counter 0 -- in C-level passes too.
        seconds = bytes(map(_BYTE1, got))
        if (bytes(map(_BYTE0, got)).count(IDE_PREFIX_BYTE0) != n
                or seconds.translate(_SUB_STREAM_M[aggregation]).count(want) != n
                or not all(map(bytes.startswith, got, repeat(bytes((stream_id, 0))),
                               repeat(2)))):
            return 0
        sizes = list(map(len, got))
        if aggregation:                     # the MAC only where M says
            sizes = [size - (c & 1) * MAC_BYTES for size, c in zip(sizes, seconds,
                                                                    strict=True)]
            extra = 0
        else:
            extra = MAC_BYTES
        if sizes != [CPL_HEADER_LEN + extra + size for size in lengths]:
            return 0
        return n

    def complete_all(self, joined: bytes) -> None:
        """The batch's completions, as :meth:`match` found them, passed the IDE check:
        *joined* is their payloads, one after the other: the batch's data."""
        self._joined = joined
        self._pending = {}

    def split_payloads(self, joined: bytes, count: int) -> list[bytes]:
        """The payloads of the first *count* completions :meth:`match` found, from
        *joined*, one after the other."""
        out = []
        pos = 0
        for size in self._lengths[:count]:
            out.append(joined[pos:pos + size])
            pos += size
        return out

    def take_all(self) -> bytes:
        """The data of the whole batch, in order; LinkFault if any part did not arrive."""
        if self._joined is not None:
            return self._joined
        return b"".join([self.take(tag) for tag in self._tags])

    def take(self, tag: int) -> bytearray:
        """The data read by the MRd tagged *tag*; LinkFault if it did not all arrive."""
        p = self.pending[tag]
        if p.status == CplStatus.SC and len(p.data) == p.length and p.error is None:
            return p.data
        where = f"MRd tag {tag} {p.address:#x}+{p.length}"
        counters = self._counters
        if p.error is not None:
            counters["faults"] += 1
            raise LinkFault(f"{where}: {p.error}")
        if p.status is None or (p.status == CplStatus.SC and len(p.data) != p.length):
            counters["completion_timeouts"] += 1
            counters["faults"] += 1
            raise LinkFault(f"{where}: completion timeout ({len(p.data)} of {p.length} bytes)")
        if p.status != CplStatus.SC:
            counters["ur_completions"] += 1
            counters["faults"] += 1
            raise LinkFault(f"{where}: completion status {p.status.name}")
        return p.data

    def complete(self, tlp: Tlp, requester_id: int) -> None:
        """A completion (already through the IDE checks) for *requester_id*."""
        p = self.pending.get(tlp.tag) if tlp.type.is_completion else None
        if p is None or tlp.requester_id != requester_id or p.complete:
            self._counters["unexpected_completions"] += 1
            self._log.warning("unexpected %s tag %d for %#06x: discarded", tlp.type.name,
                              tlp.tag, tlp.requester_id)
            return
        if tlp.status != CplStatus.SC:
            p.status = tlp.status
            return
        remaining = p.length - len(p.data)
        expect_lower = (p.address + len(p.data)) & 0x7F
        if tlp.byte_count != remaining or tlp.lower_address != expect_lower:
            p.error = (f"malformed completion (byte count {tlp.byte_count}, lower address "
                       f"{tlp.lower_address:#x}; expected {remaining}, {expect_lower:#x})")
            return
        chunk = tlp.payload_bytes()
        if not chunk or len(chunk) > remaining:
            p.error = f"completion carries {len(chunk)} bytes, {remaining} remain"
            return
        p.data += chunk
        p.status = CplStatus.SC if len(p.data) == p.length else None

    def complete_runs(self, runs: Sequence[CompletionRun], plains: Sequence[bytes],
                      wires: Sequence[bytes], start: int, requester_id: int) -> None:
        """Ordinary successful CplDs ``wires[start:start + len(plains)]`` (parsed as
        *runs*, :func:`teeio.tlp.parse_ide_completion_runs`; their decrypted payloads
        *plains*) without building TLP objects: what :meth:`complete` does for each, in
        the same order.  A run's completions after its first each carry the next whole
        payload of the read, so when the first is in order they all are."""
        pending = self.pending
        pos, n = 0, len(plains)
        for (requester, tag, count, lower), k in runs:
            if pos >= n:
                break
            k = min(k, n - pos)
            p = pending.get(tag)
            if (p is not None and requester == requester_id and p.error is None
                    and p.status is None):
                have = len(p.data)
                lead = lower & 3
                plain = plains[pos]
                if (count == p.length - have and lower == (p.address + have) & 0x7F
                        and lead < len(plain)):
                    if k == 1:
                        p.data += plain[lead:lead + count]
                    else:                   # lead 0: whole payloads, Byte Count following
                        p.data += b"".join(plains[pos:pos + k])[:count]
                    p.status = CplStatus.SC if len(p.data) == p.length else None
                    pos += k
                    continue
            # Anything unusual: the per-TLP code decides (and records) exactly as ever.
            for j in range(pos, pos + k):
                wire = wires[start + j]             # prefix (M set: checked) and header
                image = bytes((wire[0], wire[1] | 1)) + bytes(wire[2:CPL_HEADER_LEN])
                self.complete(Tlp.decode(image + bytes(plains[j])), requester_id)
            pos += k
