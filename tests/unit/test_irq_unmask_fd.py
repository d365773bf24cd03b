"""INTx unmask eventfd (what QEMU asks for under KVM: irqfd resampling)."""

from __future__ import annotations

import errno
import os
import select
import time

import pytest

from vfio_user_dev.irq import IrqController
from vfio_user_dev.protocol import IrqSet, IrqSetFlags, PciIrq, ProtocolError

EVENTFD = IrqSetFlags.DATA_EVENTFD


def _fired(fd: int, timeout: float = 2.0) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        os.read(fd, 8)
    return bool(r)


def test_signal_on_unmask_fd_unmasks_and_refires_while_asserted() -> None:
    irq = IrqController(4, lambda: True)
    trig, unmask = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0)
    my_trig = os.dup(trig)
    irq.set_irqs(IrqSet(EVENTFD | IrqSetFlags.ACTION_TRIGGER, PciIrq.INTX, 0, 1), [trig])
    irq.set_irqs(IrqSet(EVENTFD | IrqSetFlags.ACTION_UNMASK, PciIrq.INTX, 0, 1), [unmask])
    my_unmask = os.dup(unmask)
    try:
        irq.set_intx(True)
        assert _fired(my_trig)
        assert not _fired(my_trig, 0.2), "automasked: no second interrupt before the unmask"
        os.write(my_unmask, (1).to_bytes(8, "little"))   # what KVM does at the guest's EOI
        assert _fired(my_trig), "still asserted after unmask: fires again"
        irq.set_intx(False)
        os.write(my_unmask, (1).to_bytes(8, "little"))
        assert not _fired(my_trig, 0.2), "deasserted: unmask alone raises nothing"
    finally:
        irq.close_all()
        deadline = time.monotonic() + 2
        while irq._watcher is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert irq._watcher is None
        with pytest.raises(OSError):
            os.fstat(unmask)  # the controller closed its copy
        os.close(my_trig)
        os.close(my_unmask)


def test_mask_eventfd_is_refused() -> None:
    irq = IrqController(4, lambda: True)
    fd = os.eventfd(0)
    try:
        with pytest.raises(ProtocolError) as exc:
            irq.set_irqs(IrqSet(EVENTFD | IrqSetFlags.ACTION_MASK, PciIrq.INTX, 0, 1), [fd])
        assert exc.value.errno == errno.ENOTSUP
    finally:
        os.close(fd)


def test_pipe_is_not_an_unmask_eventfd() -> None:
    irq = IrqController(4, lambda: True)
    r, w = os.pipe()
    try:
        with pytest.raises(ProtocolError) as exc:
            irq.set_irqs(IrqSet(EVENTFD | IrqSetFlags.ACTION_UNMASK, PciIrq.INTX, 0, 1), [r])
        assert exc.value.errno == errno.EINVAL
        assert irq.unmask_fd is None and irq._watcher is None
    finally:
        os.close(r)
        os.close(w)


def test_watcher_drops_an_unmask_fd_at_end_of_file_instead_of_spinning() -> None:
    # Past the eventfd check (an fd that goes bad later, or a transport that installs one
    # directly): a pipe at end of file polls readable forever, and the watcher must not
    # spin on it.
    irq = IrqController(4, lambda: True)
    r, w = os.pipe()
    os.close(w)
    with irq._lock:
        irq._set_unmask_fd(r)
    deadline = time.monotonic() + 2
    while (irq.unmask_fd is not None or irq._watcher is not None) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert irq.unmask_fd is None, "the watcher still watches an fd at end of file"
    assert irq._watcher is None, "the watcher thread did not stop"
    with pytest.raises(OSError):
        os.fstat(r)     # retired and closed by the controller
    irq.close_all()
