"""The root port (PCIe 6.x §6.33 IDE, §11.2.1; TDISP §11): the only part of the device
server that maps guest RAM.  :class:`RootPort` composes its stream ends, trusted-DMA
windows, private MMIO, ingress checks and DMA execution, and revokes what is trusted when
a TDI leaves RUN, its device is reset or its stream leaves Secure.  Design notes:
docs/root-port-internals.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from teeio.ide import Direction, IdeKey, KeySet
from teeio.tlp import SubStream
from vfio_user_dev.dma import Copy, DmaMapSet
from vfio_user_dev.link.interfaces import ROOT_PORT_ID, Generation, RootPortReply
from vfio_user_dev.platform_events import PlatformEvents
from vfio_user_dev.root_port.context import Burst, PortContext
from vfio_user_dev.root_port.ingress import Ingress
from vfio_user_dev.root_port.memory import DmaExecutor
from vfio_user_dev.root_port.mmio import MmioPort
from vfio_user_dev.root_port.requests import Admitted, runs
from vfio_user_dev.root_port.streams import RootPortStream, StreamTable
from vfio_user_dev.root_port.windows import Window, WindowTable


class RootPort:
    """The upstream end of the link; the TSM programs it through platform control."""

    def __init__(self, dma: DmaMapSet, *, completer_id: int = ROOT_PORT_ID,
                 name: str = "rp0", events: PlatformEvents | None = None,
                 aggregation: bool = True, routes: Generation | None = None) -> None:
        self.dma = dma
        self._ctx = ctx = PortContext(completer_id, name,
                                      events if events is not None else PlatformEvents(),
                                      aggregation, routes)
        self._streams = StreamTable(ctx, self._revoke_stream)
        self._windows = WindowTable(ctx, dma, self._streams)
        self._mmio = MmioPort(ctx, self._streams)
        self._ingress = Ingress(ctx, self._streams, self._windows)
        self._executor = DmaExecutor(ctx, dma, self._ingress)
        self._lock = ctx.lock
        self.log = ctx.log
        self.platform_events = ctx.events
        self.counters = ctx.counters
        self.refusals = ctx.refusals
        self.recent_refusals = ctx.recent_refusals
        self.streams: dict[int, RootPortStream] = self._streams.streams
        self.windows: dict[int, Window] = self._windows.windows
        self.mmio_private: dict[int, int] = self._mmio.mmio_private
        #: bumped after every change of what :meth:`mmio_in_clear` answers from (its own
        #: unless *routes* is given)
        self.routes = ctx.routes

    @property
    def completer_id(self) -> int:
        """The root port's ID: Requester ID of its MMIO, Completer ID of its completions."""
        return self._ctx.completer_id

    @property
    def mps(self) -> int:
        """The link's Max_Payload_Size: completions and MMIO writes are split by it."""
        return self._ctx.mps

    @property
    def mrrs(self) -> int:
        """The link's Max_Read_Request_Size: MMIO reads are split by it."""
        return self._ctx.mrrs

    @property
    def window_gate(self) -> Callable[[int], str | None] | None:
        """Why a trusted window may not be granted to a requester now (None: it may); the
        platform sets it: only a TDI in RUN gets windows."""
        return self._windows.gate

    @window_gate.setter
    def window_gate(self, gate: Callable[[int], str | None] | None) -> None:
        self._windows.gate = gate

    def attach_link(self, mps: int, ide_fail_sink: Callable[[int, str], None],
                    downstream: Callable[[Sequence[bytes]], list[bytes]] | None = None,
                    mrrs: int = 512) -> None:
        """Called by the Link: its MPS (completions are split by it) and MRRS, where IDE
        Fail Messages to the device go, and how MMIO requests reach it (*downstream*:
        request wires in, completion wires out)."""
        self._ctx.mps = mps
        self._ctx.mrrs = mrrs
        self._ctx.ide_fail_sink = ide_fail_sink
        self._ctx.downstream = downstream

    # -- IDE streams (streams.py) -------------------------------------------------------------
    def setup_stream(self, stream_id: int, rid_base: int = 0, rid_limit: int = 0xFFFF) -> None:
        self._streams.setup_stream(stream_id, rid_base, rid_limit)

    def remove_stream(self, stream_id: int) -> None:
        self._streams.remove_stream(stream_id)

    def has_stream(self, stream_id: int) -> bool:
        return self._streams.has_stream(stream_id)

    def program_key(self, stream_id: int, key_set: KeySet, direction: Direction,
                    substream: SubStream, key: IdeKey) -> None:
        self._streams.program_key(stream_id, key_set, direction, substream, key)

    def key_programmed(self, stream_id: int, key_set: KeySet, direction: Direction,
                       substream: SubStream) -> bool:
        return self._streams.key_programmed(stream_id, key_set, direction, substream)

    def key_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream | None = None) -> None:
        self._streams.key_set_go(stream_id, key_set, direction, substream)

    def key_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                     substream: SubStream | None = None) -> None:
        self._streams.key_set_stop(stream_id, key_set, direction, substream)

    @property
    def aggregation_supported(self) -> bool:
        """Aggregation Supported (PCIe 6.x §6.33.6) at this port."""
        return self._ctx.aggregation

    def set_aggregation(self, stream_id: int, unit_tlps: dict[SubStream, int]) -> None:
        self._streams.set_aggregation(stream_id, unit_tlps)

    def enable_stream(self, stream_id: int, enable: bool = True) -> str:
        return self._streams.enable_stream(stream_id, enable)

    def reset_stream(self, stream_id: int) -> None:
        self._streams.reset_stream(stream_id)

    def invalidate_all(self, reason: str) -> None:
        self._streams.invalidate_all(reason)

    def ide_fail_message(self, stream_id: int, reason: str) -> None:
        self._streams.ide_fail_message(stream_id, reason)

    # -- trusted-DMA windows (windows.py) -----------------------------------------------------
    def authorise_window(self, requester_id: int, stream_id: int, base: int, size: int,
                         read: bool = True, write: bool = True) -> Window:
        return self._windows.authorise_window(requester_id, stream_id, base, size, read, write)

    def reauthorise_window(self, window_id: int) -> Window:
        return self._windows.reauthorise_window(window_id)

    def revoke_window(self, window_id: int) -> None:
        self._windows.revoke_window(window_id)

    # -- MMIO: the CPU's accesses to the device's TEE MMIO (mmio.py) --------------------------
    def set_mmio_private(self, requester_id: int, stream_id: int, enable: bool) -> None:
        self._mmio.set_mmio_private(requester_id, stream_id, enable)

    def mmio_in_clear(self, requester_id: int, allow_tee: bool = True) -> bool:
        return self._mmio.mmio_in_clear(requester_id, allow_tee)

    def mmio_read(self, requester_id: int, address: int, length: int, *,
                  allow_tee: bool = True) -> bytes | None:
        return self._mmio.mmio_read(requester_id, address, length, allow_tee=allow_tee)

    def mmio_write(self, requester_id: int, address: int, data: bytes, *,
                   allow_tee: bool = True) -> bool:
        return self._mmio.mmio_write(requester_id, address, data, allow_tee=allow_tee)

    # -- DMA from the device (ingress.py, memory.py) ------------------------------------------
    def receive(self, wires: Sequence[bytes]) -> RootPortReply:
        """A burst of TLPs from the device: checked under the lock (runs of ordinary IDE
        requests a run at a time, the rest one by one), then executed outside it."""
        reply = RootPortReply()
        burst = Burst()
        admitted: list[Admitted] = []
        with self._lock:
            i, n = 0, len(wires)
            while i < n:
                i = self._receive_run(wires, i, burst, reply, admitted)
                if i < n:
                    self._ingress.receive_one(wires[i], burst, reply, admitted)
                    i += 1
        for run in runs(admitted):
            self._executor.execute(run, reply, burst)
        self._ctx.finish_burst(burst)
        return reply

    def _receive_run(self, wires: Sequence[bytes], start: int, burst: Burst,
                     reply: RootPortReply, admitted: list[Admitted]) -> int:
        """The fast path over the run of ordinary IDE requests at *start*; where it stopped
        (tests replace it to drive every TLP through the per-TLP path)."""
        return self._ingress.receive_run(wires, start, burst, reply, admitted)

    def clear_write(self, requester_id: int, address: int, data: bytes, mps: int) -> None:
        self._executor.clear_write(requester_id, address, data, mps)

    def clear_read(self, requester_id: int, address: int, length: int, mrrs: int) -> bytes:
        return self._executor.clear_read(requester_id, address, length, mrrs)

    def copy_direct_many(self, requester_id: int, copies: Sequence[Copy],
                         proceed: Callable[[], bool] | None = None) -> int:
        return self._executor.copy_direct_many(requester_id, copies, proceed)

    # -- events -------------------------------------------------------------------------------
    def events_since(self, seq: int = 0, kinds: Sequence[str] | None = None
                     ) -> list[dict[str, object]]:
        """Platform events numbered after *seq* (of *kinds*, if given)."""
        return self.platform_events.since(
            seq, kinds=None if kinds is None else frozenset(kinds))[0]

    # -- enforcement that never waits for the TSM (TDISP §11) ---------------------------------
    def revoke_requester(self, requester_id: int, reason: str) -> int:
        """The TDI of *requester_id* left RUN (or its device was reset): revoke its trusted
        windows and switch its private MMIO off, here and now.  Returns how many windows."""
        with self._lock:
            windows, mmio = self._revoke(lambda rid, _sid: rid == requester_id, reason)
        if windows or mmio:
            self.log.warning("RID %#06x: %d window(s) revoked%s: %s", requester_id, windows,
                             ", private MMIO off" if mmio else "", reason)
        return windows

    def device_reset(self, requester_id: int, reason: str) -> None:
        """The device *requester_id* was reset: its IDE keys are gone (PCIe 6.x §6.33.6), so
        this end of every stream that carries it leaves Secure too (keys invalidated), and
        its windows and private MMIO are revoked.  T=0 MMIO and DMA then work in the clear;
        the TSM keys the stream again before the next LOCK."""
        self.revoke_requester(requester_id, reason)
        self._streams.reset_carrying(requester_id, reason)

    def _revoke_stream(self, stream_id: int, reason: str) -> None:
        """Under the lock: the stream went Insecure; nothing trusted rides on it any more."""
        self._revoke(lambda _rid, sid: sid == stream_id, reason)

    def _revoke(self, which: Callable[[int, int], bool], reason: str) -> tuple[int, int]:
        """Under the lock: revoke the windows and the private MMIO whose (requester ID,
        stream) *which* selects, each with its event; how many of each."""
        return (self._windows.revoke_where(which, reason),
                self._mmio.revoke_where(which, reason))

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "completer_id": self.completer_id,
                "aggregation_supported": self._ctx.aggregation,
                "streams": [s.as_dict() for s in self.streams.values()],
                "windows": [w.as_dict() for w in self.windows.values()],
                "refusals": dict(self.refusals),
                "refusals_total": sum(self.refusals.values()),
                "recent_refusals": list(self.recent_refusals)[-16:],
                "mmio_private": {f"{rid:#06x}": sid for rid, sid in self.mmio_private.items()},
                "last_event_seq": self.platform_events.last_seq,
                **self.counters,
            }
