"""The link itself (PCIe 6.x §2: the Transaction Layer's TLPs between two ports): joins
the device's :class:`~vfio_user_dev.link.endpoint.LinkEndpoint` (downstream) and the root
port (upstream), carries bursts of TLPs both ways through the taps (capture, fault
injection), counts them, and holds the MPS / MRRS TLPs are split by (§7.5.3.4).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from teeio.tlp import check_tlp_size, count_pieces, count_read_tlps, peek
from vfio_user_dev.dma import Copy
from vfio_user_dev.link.capture import CaptureFlags, CaptureWriter
from vfio_user_dev.link.faults import Fault, TlpView, apply_faults
from vfio_user_dev.link.interfaces import (
    DEFAULT_MPS,
    DEFAULT_MRRS,
    Generation,
    LinkDirection,
    RootPortPort,
    RootPortReply,
)

if TYPE_CHECKING:
    from vfio_user_dev.link.endpoint import LinkEndpoint

log = logging.getLogger(__package__)


class Link:
    """Joins a :class:`LinkEndpoint` (downstream) and a root port (upstream).

    *mps* and *mrrs* are the sizes TLPs are split by until :meth:`set_payload_sizes`
    changes them (the device does after every Device Control write and reset).
    :attr:`taps` (its own unless given) is bumped after every change of :attr:`tapped`
    (a capture set or cleared, a fault armed, fired or cleared)."""

    def __init__(self, endpoint: LinkEndpoint, root_port: RootPortPort, *,
                 mps: int = DEFAULT_MPS, mrrs: int = DEFAULT_MRRS,
                 capture: CaptureWriter | None = None, taps: Generation | None = None
                 ) -> None:
        self.mps = check_tlp_size("Max_Payload_Size", mps)
        self.mrrs = check_tlp_size("Max_Read_Request_Size", mrrs)
        self.endpoint = endpoint
        self.root_port = root_port
        self.taps = taps if taps is not None else Generation()
        self._writer = capture
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self.index = {d: 0 for d in LinkDirection}
        self.counters = {f"tlps_{d.name.lower()}": 0 for d in LinkDirection}
        self.counters.update({f"bytes_{d.name.lower()}": 0 for d in LinkDirection})
        self.counters.update(dropped=0, tampered=0, replayed=0, ide_fail_messages_up=0,
                             ide_fail_messages_down=0, clear_transfers=0)
        self.counters.update(mmio_bursts=0)
        self.counters.update(payload_size_changes=0)
        #: (TLPs upstream, downstream) of a clear copy, by what they depend on
        self._copy_tlps: dict[tuple[int, int, int, int, int], tuple[int, int]] = {}
        endpoint.link = self
        root_port.attach_link(self.mps, self.ide_fail_message_downstream,
                              self.send_downstream, self.mrrs)

    def set_payload_sizes(self, mps: int, mrrs: int) -> None:
        """The effective Max_Payload_Size and Max_Read_Request_Size from now on (PCIe 6.x
        §7.5.3.4): DMA writes and the root port's completions are split by *mps*, DMA
        reads (and the root port's MMIO reads) by *mrrs*.  A transfer already under way
        keeps the sizes it started with."""
        mps = check_tlp_size("Max_Payload_Size", mps)
        mrrs = check_tlp_size("Max_Read_Request_Size", mrrs)
        if (mps, mrrs) == (self.mps, self.mrrs):
            return
        log.info("link payload sizes: MPS %d -> %d, MRRS %d -> %d", self.mps, mps,
                 self.mrrs, mrrs)
        self.mps, self.mrrs = mps, mrrs
        self.counters["payload_size_changes"] += 1
        self.root_port.attach_link(mps, self.ide_fail_message_downstream,
                                   self.send_downstream, mrrs)

    @property
    def tapped(self) -> bool:
        """Whether something looks at TLP bytes (a capture or an armed fault)."""
        return self._writer is not None or bool(self.faults) and any(
            not f.done for f in self.faults)

    # -- taps (each change bumps :attr:`taps`, after it is made) ------------------------
    @property
    def capture(self) -> CaptureWriter | None:
        """Where every TLP crossing is written (None: nowhere)."""
        return self._writer

    @capture.setter
    def capture(self, writer: CaptureWriter | None) -> None:
        with self._lock:
            self._writer = writer
        self.taps.bump()

    def inject(self, fault: Fault) -> Fault:
        if fault.nth < 1:
            raise ValueError("Fault.nth counts from 1")
        with self._lock:
            self.faults.append(fault)
        self.taps.bump()
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
        self.taps.bump()

    def _tap(self, direction: LinkDirection, wires: Sequence[bytes]) -> list[bytes]:
        name = direction.name.lower()
        with self._lock:
            if self._writer is None and not any(not f.done and f.direction == direction
                                                 for f in self.faults):
                # Nothing looks at these TLPs: count them, as the loop below would.
                self.index[direction] += len(wires)
                self.counters[f"tlps_{name}"] += len(wires)
                self.counters[f"bytes_{name}"] += sum(map(len, wires))
                return list(wires)
        out: list[bytes] = []
        for wire in wires:
            with self._lock:
                self.index[direction] += 1
                view = TlpView(direction, self.index[direction], wire,
                               peek(wire) if self.faults else None)
                armed = [f for f in self.faults if not f.done and f.direction == direction]
            copies, tampered = apply_faults(armed, view)
            if armed:
                self.taps.bump()        # one of them may have fired: done, no longer armed
            flags = CaptureFlags.TAMPERED if tampered else CaptureFlags(0)
            if not copies:
                self.counters["dropped"] += 1
                self._capture(direction, wire, flags | CaptureFlags.DROPPED)
            for i, c in enumerate(copies):
                extra = CaptureFlags.REPLAYED if i else CaptureFlags(0)
                if i:
                    self.counters["replayed"] += 1
                self._capture(direction, c, flags | extra)
                self.counters[f"tlps_{name}"] += 1
                self.counters[f"bytes_{name}"] += len(c)
                out.append(c)
            if flags & CaptureFlags.TAMPERED:
                self.counters["tampered"] += 1
        return out

    def _capture(self, direction: LinkDirection, wire: bytes, flags: int) -> None:
        capture = self._writer
        if capture is not None:
            capture.write(direction, wire, flags)

    # -- crossing -------------------------------------------------------------------------
    def send_upstream(self, wires: Sequence[bytes]) -> RootPortReply:
        """A burst of TLPs from the device; the root port's completions are delivered to
        the endpoint before this returns."""
        reply = self.root_port.receive(self._tap(LinkDirection.UPSTREAM, wires))
        completions = self._tap(LinkDirection.DOWNSTREAM, reply.completions)
        capture = self._writer
        if capture is not None:
            capture.flush()
        self.endpoint.receive(completions)
        return reply

    def send_downstream(self, wires: Sequence[bytes]) -> list[bytes]:
        """A burst of memory requests from the root port (MMIO) to the device; returns the
        device's completions as they arrive back upstream, through the taps both ways."""
        self.counters["mmio_bursts"] += 1
        requests = self._tap(LinkDirection.DOWNSTREAM, wires)
        completions = self._tap(LinkDirection.UPSTREAM, self.endpoint.receive_requests(requests))
        capture = self._writer
        if capture is not None:
            capture.flush()
        return completions

    def clear_write(self, requester_id: int, address: int, data: bytes) -> None:
        self.counters["clear_transfers"] += 1
        self.counters["tlps_upstream"] += count_pieces(address, len(data), self.mps)
        self.counters["bytes_upstream"] += len(data)
        self.root_port.clear_write(requester_id, address, data, self.mps)

    def clear_read(self, requester_id: int, address: int, length: int) -> bytes:
        self.counters["clear_transfers"] += 1
        mrd, cpl = count_read_tlps(address, length, self.mrrs, self.mps)
        self.counters["tlps_upstream"] += mrd
        data = self.root_port.clear_read(requester_id, address, length, self.mrrs)
        self.counters["tlps_downstream"] += cpl
        self.counters["bytes_downstream"] += len(data)
        return data

    def clear_copy(self, requester_id: int, src: int, dst: int, length: int, *,
                   direct_only: bool = False) -> bool:
        """:meth:`clear_read` of *src* whose data :meth:`clear_write` puts at *dst*, with
        the same counts; as one memmove where the root port can.  *direct_only*: only
        that way (False, and nothing done, when it cannot)."""
        if self.clear_copy_many(requester_id, ((src, dst, length),)):
            return True
        if direct_only:
            return False
        self.clear_write(requester_id, dst, self.clear_read(requester_id, src, length))
        return True

    def clear_copy_many(self, requester_id: int, copies: Sequence[Copy],
                        proceed: Callable[[], bool] | None = None) -> int:
        """Copies done as memmoves by the root port (:meth:`clear_copy`'s way, *proceed*
        asked before each), from the first while it can; each counted as its read and
        write.  How many."""
        done = self.root_port.copy_direct_many(requester_id, copies, proceed)
        if done:
            mrrs, mps, cache = self.mrrs, self.mps, self._copy_tlps
            up = down = moved = 0
            for src, dst, length in copies[:done] if done < len(copies) else copies:
                # TLP counts depend on the addresses only below 4 KiB (MPS, MRRS <= 4096)
                key = (src & 0xFFF, dst & 0xFFF, length, mrrs, mps)
                tlps = cache.get(key)
                if tlps is None:
                    if len(cache) >= 256:
                        cache.clear()
                    mrd, cpl = count_read_tlps(src, length, mrrs, mps)
                    tlps = cache[key] = (mrd + count_pieces(dst, length, mps), cpl)
                up += tlps[0]
                down += tlps[1]
                moved += length
            counters = self.counters
            counters["clear_transfers"] += 2 * done
            counters["tlps_upstream"] += up
            counters["tlps_downstream"] += down
            counters["bytes_downstream"] += moved
            counters["bytes_upstream"] += moved
        return done

    def ide_fail_message_upstream(self, stream_id: int, reason: str) -> None:
        self.counters["ide_fail_messages_up"] += 1
        self.root_port.ide_fail_message(stream_id, reason)

    def ide_fail_message_downstream(self, stream_id: int, reason: str) -> None:
        self.counters["ide_fail_messages_down"] += 1
        self.endpoint.ide_fail_message(stream_id, reason)

    def status(self) -> dict[str, object]:
        return {
            "mps": self.mps, "mrrs": self.mrrs,
            "capture": None if self._writer is None else str(self._writer.path),
            "faults_armed": sum(1 for f in self.faults if not f.done),
            **self.counters,
        }

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
