"""Interrupt signalling to the client: INTx (level, automasked) and MSI-X (edge, PBA)
through the client's eventfds (vfio-user spec "VFIO_USER_DEVICE_SET_IRQS"; linux/vfio.h
semantics; PCIe 6.x §7.7.2 for MSI-X masking and the PBA), or through an :class:`IrqSink`
when a library keeps the eventfds.  Notes: docs/device-internals.md.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

from vfio_user_dev.protocol import (
    ACTION_MASK,
    DATA_MASK,
    IrqInfoFlags,
    IrqSet,
    IrqSetFlags,
    PciIrq,
    ProtocolError,
)

log = logging.getLogger(__name__)


EVENTFD_LINK = "anon_inode:[eventfd]"


_ONE = (1).to_bytes(8, "little")       # an eventfd signal
_MSIX = int(PciIrq.MSIX)                # the dicts' key, as a plain int (cheaper to hash)


def _signal(fd: int) -> None:
    os.write(fd, _ONE)


def is_eventfd(fd: int) -> bool:
    """Whether *fd* is an eventfd (what /proc says the fd is)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == EVENTFD_LINK
    except (OSError, ValueError):
        return False


def take_eventfd(fd: int, what: str) -> None:
    """Check that a client's *fd* is an eventfd (EINVAL if not) and make it non-blocking."""
    if not is_eventfd(fd):
        raise ProtocolError(errno.EINVAL, f"SET_IRQS: {what} fd is not an eventfd")
    os.set_blocking(fd, False)


class IrqSink(Protocol):
    """Where interrupts go when the controller does not hold the client's eventfds.

    ``automask``: whether INTx is automasked after each delivery until the client's
    UNMASK.  False for a sink that cannot promise an UNMASK after every EOI (libvfio-user
    turns QEMU's INTx unmask eventfd into one UNMASK callback and drops the fd, so under
    KVM no UNMASK would ever follow): the controller then re-evaluates the line level on
    each UNMASK it does get and on each new interrupt event instead."""

    automask: bool

    def ready(self, index: int, vector: int) -> bool:
        """Whether an interrupt of this IRQ index and vector can be delivered now."""
        ...

    def signal(self, index: int, vector: int) -> None:
        """Deliver one interrupt; report it with ``delivered`` / ``undelivered``."""
        ...


class IrqController:
    def __init__(self, msix_vectors: int, intx_allowed: Callable[[], bool]) -> None:
        # One error IRQ: the VMM registers its AER error notifier on it (the device has an
        # AER capability); with none, QEMU warns "Could not enable error recovery".
        self.counts: dict[int, int] = {PciIrq.INTX: 1, PciIrq.MSI: 0, PciIrq.MSIX: msix_vectors,
                       PciIrq.ERR: 1, PciIrq.REQ: 0}
        self._intx_allowed = intx_allowed
        self._lock = threading.RLock()
        self.trigger: dict[int, list[int | None]] = {i: [None] * c for i, c in self.counts.items()}
        self.masked: dict[int, list[bool]] = {i: [False] * c for i, c in self.counts.items()}
        self.pending: dict[int, list[bool]] = {i: [False] * c for i, c in self.counts.items()}
        self.intx_asserted = False
        self.signalled = 0
        self.signalled_by_type = {"intx": 0, "msix": 0}
        self.dropped = 0    # interrupts not written: the eventfd counter was full
        self.unmask_fd: int | None = None
        self._retired: list[int] = []
        self._watcher: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self.sink: IrqSink | None = None

    def info_flags(self, index: int) -> int:
        if index == PciIrq.INTX:
            return IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
        if index == PciIrq.MSIX:
            return IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.NORESIZE
        return IrqInfoFlags.EVENTFD

    # -- DEVICE_SET_IRQS --------------------------------------------------------------------
    def set_irqs(self, req: IrqSet, fds: list[int]) -> list[int]:
        """Apply *req*; returns the fds it did not keep (the caller closes them)."""
        if req.index not in self.counts:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: no IRQ index {req.index}")
        n = self.counts[req.index]
        data = req.flags & DATA_MASK
        action = req.flags & ACTION_MASK
        if data == IrqSetFlags.DATA_NONE and req.count == 0 and req.start == 0 \
                and action == IrqSetFlags.ACTION_TRIGGER:
            with self._lock:  # disable every interrupt of this index
                self._release(req.index, 0, n)
            return fds
        if req.start + req.count > n or req.count == 0:
            raise ProtocolError(errno.EINVAL,
                                f"SET_IRQS: vectors {req.start}+{req.count} outside 0..{n}")
        with self._lock:
            if data == IrqSetFlags.DATA_EVENTFD:
                if action == IrqSetFlags.ACTION_UNMASK and req.index == PciIrq.INTX:
                    if len(fds) > 1:
                        raise ProtocolError(errno.EINVAL, "SET_IRQS: one INTx unmask eventfd")
                    fd = fds[0] if fds and fds[0] >= 0 else None
                    if fd is not None:
                        take_eventfd(fd, "INTx unmask")
                    self._set_unmask_fd(fd)
                    return []
                if action != IrqSetFlags.ACTION_TRIGGER:
                    raise ProtocolError(errno.ENOTSUP,
                                        "SET_IRQS: eventfds only for TRIGGER (and INTx UNMASK)")
                if fds and len(fds) != req.count:
                    raise ProtocolError(errno.EINVAL,
                                        f"SET_IRQS: {len(fds)} fds for {req.count} vectors")
                for fd in fds:              # all checked before any vector changes
                    if fd >= 0:
                        take_eventfd(fd, "trigger")
                self._release(req.index, req.start, req.count)
                for i, fd in enumerate(fds):
                    self.trigger[req.index][req.start + i] = None if fd < 0 else fd
                return []
            sel = list(range(req.start, req.start + req.count))
            if data == IrqSetFlags.DATA_BOOL:
                sel = [v for v, b in zip(sel, req.data, strict=True) if b]
            if action == IrqSetFlags.ACTION_TRIGGER:
                for v in sel:
                    self._fire(req.index, v)
            else:
                for v in sel:
                    self.mask(req.index, range(v, v + 1), action == IrqSetFlags.ACTION_MASK)
        return fds

    # -- INTx unmask eventfd (KVM irqfd resampling): a signal on it means UNMASK ----------
    def _set_unmask_fd(self, fd: int | None) -> None:
        old, self.unmask_fd = self.unmask_fd, fd
        if old is not None:
            self._retired.append(old)
        if self._watcher is None and fd is not None:
            self._wake_r, self._wake_w = os.pipe()
            self._watcher = threading.Thread(target=self._watch_unmask, name="intx-unmask",
                                             daemon=True)
            self._watcher.start()
        elif self._watcher is None:
            self._close_retired()
        else:
            os.write(self._wake_w, b"x")

    def _close_retired(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def _watch_unmask(self) -> None:
        while True:
            with self._lock:
                self._close_retired()
                fd = self.unmask_fd
                if fd is None:
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                    self._watcher = None
                    return
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            ready = dict(poller.poll())
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
            if fd in ready:
                with self._lock:
                    if self.unmask_fd == fd:
                        self._unmask_event(fd, ready[fd])

    def _unmask_event(self, fd: int, events: int) -> None:
        """The unmask fd polled ready: one UNMASK if it was signalled.  An fd at end of
        file, hung up or in error would poll ready forever: it is dropped, not watched
        again (INTx goes on without it, as if the client had never set one)."""
        data = b""
        if events & select.POLLIN:
            try:
                data = os.read(fd, 8)
            except BlockingIOError:
                return          # someone else read the counter: nothing to do
            except OSError:
                data = b""
        if not data:
            log.warning("INTx unmask fd %d: %s; no longer watched", fd,
                        "end of file" if events & select.POLLIN else f"poll events {events:#x}")
            self._set_unmask_fd(None)
            return
        self.masked[PciIrq.INTX][0] = False
        self.update_intx()

    def _release(self, index: int, start: int, count: int) -> None:
        for v in range(start, start + count):
            fd = self.trigger[index][v]
            if fd is not None:
                os.close(fd)
            self.trigger[index][v] = None

    def close_all(self) -> None:
        with self._lock:
            self._set_unmask_fd(None)
            for index, n in self.counts.items():
                self._release(index, 0, n)
                self.masked[index] = [False] * n
                self.pending[index] = [False] * n
            self.intx_asserted = False

    # -- device side --------------------------------------------------------------------
    def msix_ready(self, vector: int = 0) -> bool:
        with self._lock:
            if self.counts[_MSIX] <= vector:
                return False
            if self.sink is not None:
                return self.sink.ready(PciIrq.MSIX, vector)
            return self.trigger[_MSIX][vector] is not None

    def mask(self, index: int, vectors: range, masked: bool) -> None:
        """ACTION_MASK / ACTION_UNMASK of *vectors* (an unmask replays what is pending)."""
        with self._lock:
            for v in vectors:
                self.masked[index][v] = masked
                if not masked:
                    self._replay(index, v)

    def raise_msix(self, vector: int) -> None:
        with self._lock:
            if self.masked[_MSIX][vector]:
                self.pending[_MSIX][vector] = True
                return
            self._fire(_MSIX, vector)

    def set_intx(self, level: bool, event: bool = False) -> None:
        """The INTx line level; *event*: a new interrupt event made (or kept) it high.
        Delivered on a rising edge; without automasking (see :class:`IrqSink`) also on a
        new event while the line stays high, since the client's EOI may have lowered it
        on its side without an UNMASK to tell us."""
        with self._lock:
            rising = level and not self.intx_asserted
            self.intx_asserted = level
            if rising or (level and event and not self._automask()):
                self.update_intx()

    def _automask(self) -> bool:
        return self.sink is None or self.sink.automask

    def update_intx(self) -> None:
        """Deliver INTx if asserted, enabled (Command bit 10 clear) and not masked."""
        with self._lock:
            if self.intx_asserted and self._intx_allowed() and not self.masked[PciIrq.INTX][0]:
                self._fire(PciIrq.INTX, 0)

    def _replay(self, index: int, v: int) -> None:
        if index == PciIrq.INTX:
            self.update_intx()
        elif self.pending[index][v]:
            self.pending[index][v] = False
            self._fire(index, v)

    def _fire(self, index: int, v: int) -> None:
        if self.sink is not None:
            if not self.sink.ready(index, v):
                self.undelivered(index, v)
                return
            if index == PciIrq.INTX and self.sink.automask:
                self.masked[index][v] = True  # AUTOMASKED: until UNMASK (or undelivered)
            self.sink.signal(index, v)
            return
        fd = self.trigger[index][v]
        if fd is None:
            if index == PciIrq.MSIX:
                self.pending[index][v] = True
            return
        if index == PciIrq.INTX:
            self.masked[index][v] = True  # AUTOMASKED: until the client's UNMASK
        try:
            _signal(fd)
        except BlockingIOError:
            # The counter is at its maximum: the client has not read this eventfd for
            # 2**64-2 signals; it has one pending, this one adds nothing.
            self.dropped += 1
            if self.dropped == 1:
                log.warning("eventfd of irq %d/%d is full: interrupt dropped", index, v)
            return
        except OSError as exc:
            log.warning("eventfd write failed for irq %d/%d: %s", index, v, exc)
            return
        self.delivered(index, v)

    def delivered(self, index: int, v: int) -> None:
        """One interrupt reached the client."""
        with self._lock:
            self.signalled += 1
            self.signalled_by_type["intx" if index == PciIrq.INTX else "msix"] += 1

    def undelivered(self, index: int, v: int) -> None:
        """A sink could not deliver (no eventfd from the client): an MSI-X vector keeps it
        pending in the PBA; INTx is not left automasked, since no UNMASK will follow."""
        with self._lock:
            if index == PciIrq.MSIX:
                self.pending[index][v] = True
            elif index == PciIrq.INTX:
                self.masked[index][v] = False
