"""The emulated platform around one device function (docs/design.md decision 10 made literal).

:class:`Platform` composes the DMA map set, the root port, the link, the event log and the
device; the transports talk to it, and TEE MMIO reaches the device as TLPs (PCIe 6.x
§11.2.1).  It revokes windows and private MMIO itself when the TDI leaves RUN
(docs/design.md "state has one owner"; the whole picture: "Architecture overview").

A CPU access to BAR0 takes the direct path -- to the completer without TLPs -- when the
TDI is CONFIG_UNLOCKED (read on every access), nothing watches the link and the root port
routes the device's MMIO in the clear with T=0.  The last two are decided once and kept
with the value of :attr:`Platform.changes`, which the link bumps after every change of
its taps, the root port after every change of its MMIO routing and the platform after a
device reset or a client gone; they are decided again as soon as the value moves.
"""

from __future__ import annotations

from teeio.tdisp.defs import TdiState
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.dma import DmaMapSet
from vfio_user_dev.link.capture import CaptureWriter
from vfio_user_dev.link.interfaces import DEFAULT_MPS, DEFAULT_MRRS, Generation
from vfio_user_dev.link.wire import Link
from vfio_user_dev.personality import PersonalityFactory
from vfio_user_dev.personality.accelerator import AcceleratorPersonality
from vfio_user_dev.platform_events import Event, PlatformEvents
from vfio_user_dev.protocol import PciRegion
from vfio_user_dev.root_port import RootPort

DEFAULT_SERIAL = 0x7E10_0000_0000_0001
# The access path's constants, looked up once (an enum class attribute costs a call).
_BAR0 = int(PciRegion.BAR0)
_UNLOCKED = TdiState.CONFIG_UNLOCKED


class Platform:
    def __init__(self, serial: int = DEFAULT_SERIAL, *, mps: int = DEFAULT_MPS,
                 mrrs: int = DEFAULT_MRRS, capture: CaptureWriter | None = None,
                 personality: PersonalityFactory = AcceleratorPersonality) -> None:
        self.events = PlatformEvents()
        #: bumped after every change the direct path depends on (module docstring)
        self.changes = Generation()
        self.dma = DmaMapSet()
        self.root_port = RootPort(self.dma, events=self.events, routes=self.changes)
        self.device = TeeIoDevice(serial, mps=mps, mrrs=mrrs, events=self.events,
                                  personality=personality)
        self.link = Link(self.device.link_end, self.root_port, mps=mps, mrrs=mrrs,
                         capture=capture, taps=self.changes)
        self.device.link_attached()         # the link follows Device Control from now on
        self.device.personality.memory_attached(self.dma.direct)
        self._device_lock = self.device.lock
        self._unlocked_read, self._unlocked_write = self.device.unlocked_completer()
        self._bar0_size = self.device.layout.bar0_size
        self.events.listeners.append(self._enforce)
        self.root_port.window_gate = self._window_gate
        # The VMM's direct-path decision (module docstring): the requester it was made for
        # and the value of changes read before it was made (-1: none made yet).
        self._direct = False
        self._direct_rid = -1
        self._direct_gen = -1

    def _window_gate(self, requester_id: int) -> str | None:
        """Trusted-DMA windows only for a TDI in RUN (a function without TDISP: any)."""
        dev = self.device
        if requester_id != dev.link_end.requester_id or dev.tdisp is None:
            return None
        state = dev.tdi_state()
        return None if state is TdiState.RUN else f"its TDI is {state.name}, not RUN"

    # -- enforcement (module docstring) ------------------------------------------------------
    def _enforce(self, ev: Event) -> None:
        rid = ev.get("requester_id")
        if not isinstance(rid, int):
            return
        if ev["kind"] == "tdi" and ev.get("after") != TdiState.RUN.name:
            self.root_port.revoke_requester(
                rid, f"TDI {ev.get('before')} -> {ev.get('after')} on {ev.get('event')}")
        elif ev["kind"] == "device_reset":
            self.root_port.device_reset(rid, f"device reset ({ev.get('reason')})")
            self.changes.bump()       # however the device was reset (module docstring)

    def _decide(self, rid: int, host: bool) -> bool:
        """Whether nothing watches the link and MMIO to *rid* crosses in the clear with
        T=0 (*host*: the host's own access, never T=1).  Kept for the VMM's accesses with
        the value of :attr:`changes` read before deciding: a change made meanwhile moves
        it."""
        gen = self.changes.value
        direct = not self.link.tapped and self.root_port.mmio_in_clear(rid, not host)
        if not host:
            self._direct, self._direct_rid, self._direct_gen = direct, rid, gen
        return direct

    # -- the transports' view ---------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int, *,
                    host: bool = False) -> bytes:
        """A read of region *index* (the VMM's; *host*: the host's own path, always T=0).
        BAR0 is the CPU's access: MRd TLPs from the root port down the link (T=1 once the
        TSM opened private MMIO), or the direct path (module docstring); all ones when
        not completed.  Under the device's lock, so an access and a TDI transition never
        interleave."""
        if index != _BAR0:
            return self.device.region_read(index, offset, count, host=host)
        if count == 0 or offset < 0 or offset + count > self._bar0_size:
            self.device.check_bounds(index, offset, count)     # refuses, saying why
        dev = self.device
        lock = self._device_lock
        got: bytes | None
        lock.acquire()          # not "with": no bound methods made on every access
        try:
            rid = dev.link_end.requester_id
            tdisp = dev.tdisp         # dev.tdi_state(), without the call
            state = _UNLOCKED if tdisp is None else tdisp.state
            if state is _UNLOCKED and (
                    self._direct if not host and rid == self._direct_rid
                    and self._direct_gen == self.changes.value else self._decide(rid, host)):
                # T=0 in the clear, nothing watching: straight to the completer (what it
                # does with the root port's MmioRequest of T=0 in the clear)
                got = self._unlocked_read(offset, count)
            else:
                got = self.root_port.mmio_read(rid, dev.bar0_address() + offset, count,
                                               allow_tee=not host)
        finally:
            lock.release()
        return b"\xff" * count if got is None else got

    def region_write(self, index: int, offset: int, data: bytes, *,
                     host: bool = False) -> None:
        """A write to region *index*; BAR0 as :meth:`region_read` says, with MWr TLPs."""
        if index != _BAR0:
            self.device.region_write(index, offset, data, host=host)
            return
        count = len(data)
        if count == 0 or offset < 0 or offset + count > self._bar0_size:
            self.device.check_bounds(index, offset, count)     # refuses, saying why
        if type(data) is not bytes:
            data = bytes(data)
        dev = self.device
        lock = self._device_lock
        lock.acquire()
        try:
            rid = dev.link_end.requester_id
            tdisp = dev.tdisp         # dev.tdi_state(), without the call
            state = _UNLOCKED if tdisp is None else tdisp.state
            if state is _UNLOCKED and (
                    self._direct if not host and rid == self._direct_rid
                    and self._direct_gen == self.changes.value else self._decide(rid, host)):
                self._unlocked_write(offset, data)        # as in region_read
            else:
                self.root_port.mmio_write(rid, dev.bar0_address() + offset, data,
                                          allow_tee=not host)
        finally:
            lock.release()

    def reset(self, reason: str = "client_reset") -> None:
        """The device is reset (*reason* in its event); the platform follows its events."""
        self.device.reset(reason)

    def client_gone(self, reason: str, client: int = 0) -> None:
        """The VMM went away: what a host does when a VM's device is released -- reset the
        device (a TDI in LOCKED/RUN goes to ERROR, the root port revokes its windows), then
        drop the VMM's memory and eventfds."""
        self.events.emit("client_disconnected", client=client, reason=reason)
        self.device.reset("client_gone")
        self.dma.clear()
        self.device.irq.close_all()
        self.changes.bump()

    def tdi_status(self) -> dict[str, object]:
        return {**self.device.tdi_status(),
                "private_mmio": self.root_port.mmio_private.get(
                    self.device.link_end.requester_id)}

    def stats(self) -> dict[str, object]:
        refusals = self.device.tdisp_refusals()
        for reason, n in self.root_port.refusals.items():
            if reason.startswith(("t0_", "t1_", "window_", "mmio_")):
                refusals[f"root_port.{reason}"] = n
        return {**self.device.stats(), "tdi": self.tdi_status(), "tdisp_refusals": refusals,
                "dma_maps_live": len(self.dma.snapshot()),
                "dma_maps_total": self.dma.maps_total, "link": self.link.status(),
                "platform_events": self.events.last_seq}

    def close(self) -> None:
        self.device.close()
        self.link.close()
        self.events.wake()
