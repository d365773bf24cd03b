"""Lock-step tests of device reset and of client sessions ending and starting."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from teeio.device_regs import CMD_GO, DmaError, Irq, Op, R, St
from teeio.pcie.config import Reg
from tests.support.lockstep import (
    BAR0,
    CONFIG,
    MEM_BM,
    enable_device,
    error_code,
    event_fired,
    expect_error,
    mapped,
    memfd,
    ok,
    read_id,
    recv,
    region_write_payload,
    run_job,
    run_job_quiet,
    send,
    start_job,
    wait_until,
)
from tests.support.servers import RunningServer, both_backends
from vfio_user_dev import protocol as p
from vfio_user_dev.protocol import Command, Flags, Header, IrqSetFlags, PciIrq

pytestmark = [pytest.mark.timeout(10), both_backends]

GUEST = 0x8000_0000
RW = p.DmaFlags.READ | p.DmaFlags.WRITE


def test_device_reset_resets_registers_but_keeps_dma_maps(server: RunningServer) -> None:
    c = server.client()
    fd = memfd("lockstep-reset", 0x2000)
    try:
        ok(c, Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, 0x2000).encode(), fds=[fd])
        enable_device(c)
        c.write32(BAR0, R.SCRATCH, 0xDEADBEEF)
        c.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
        assert run_job(c, Op.FILL, dst=GUEST, length=8, pattern=0x55555555) == St.DONE
        assert c.read32(BAR0, R.DMA_JOBS) == 1
        generation = server.device.generation

        assert ok(c, Command.DEVICE_RESET) == b""

        assert server.device.generation == generation + 1
        for reg in (R.SCRATCH, R.STATUS, R.INT_STATUS, R.INT_ENABLE, R.DMA_JOBS,
                    R.DMA_BYTES_LO, R.DMA_LEN):
            assert c.read32(BAR0, reg) == 0, reg.name
        assert c.read32(BAR0, R.ID) == 0x7E101234  # RO identity survives
        assert c.read32(CONFIG, Reg.COMMAND) & 0xFFFF == 0  # config space reset too
        # DMA maps belong to the client: still there, still usable.
        assert server.machine.dma.snapshot() == [(GUEST, 0x2000, RW, True)]
        enable_device(c)
        assert run_job(c, Op.FILL, dst=GUEST + 0x1000, length=4, pattern=0x04030201) == St.DONE
        assert os.pread(fd, 4, 0x1000) == b"\1\2\3\4"
    finally:
        os.close(fd)


@pytest.mark.socket_dma
def test_device_reset_keeps_local_maps_and_session(server: RunningServer) -> None:
    c = server.client()
    mem = c.map_local(GUEST, 0x1000)
    c.reset()
    assert server.machine.dma.snapshot() == [(GUEST, 0x1000, RW, False)]
    enable_device(c)
    st = run_job_quiet(c, server.device, Op.FILL, dst=GUEST, length=4, pattern=0xAABBCCDD)
    assert st == St.DONE
    assert bytes(mem.data[:4]) == b"\xDD\xCC\xBB\xAA"


def test_disconnect_resets_device_and_next_client_starts_clean(server: RunningServer) -> None:
    name = "lockstep-reconnect"
    c1 = server.client()
    fd = memfd(name, 0x1000)
    ok(c1, Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, 0x1000).encode(), fds=[fd])
    os.close(fd)
    c1.map_local(GUEST + 0x1000, 0x1000)
    c1.write32(BAR0, R.SCRATCH, 0x12345678)
    c1.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
    enable_device(c1)
    assert run_job(c1, Op.FILL, dst=GUEST, length=4, pattern=7) == St.DONE
    assert len(server.machine.dma.snapshot()) == 2
    assert server.server.clients == 1
    generation = server.device.generation
    c1.close()

    c2 = server.client(negotiate=False)
    # The server serves one client at a time: c2's VERSION is answered only once
    # c1's session has been torn down (maps dropped, device reset).
    ok(c2, Command.VERSION, p.Version(0, 0, {"max_msg_fds": 8}).encode())
    assert server.server.clients == 2
    assert c2.read32(BAR0, R.SCRATCH) == 0
    assert c2.read32(BAR0, R.INT_ENABLE) == 0
    assert c2.read32(BAR0, R.DMA_JOBS) == 0
    assert c2.read32(CONFIG, Reg.COMMAND) & 0xFFFF == 0
    assert server.machine.dma.snapshot() == []
    assert not mapped(name)
    assert server.device.generation > generation
    stats = server.machine.stats()
    assert stats["dma_maps_live"] == 0
    assert stats["dma_maps_total"] == 2
    assert stats["dma_jobs"] == 1  # lifetime counters survive the reset
    # The old client's maps are really gone for the device.
    enable_device(c2)
    st = run_job(c2, Op.FILL, dst=GUEST, length=4, pattern=7)
    assert error_code(st) == DmaError.FAULT


@pytest.mark.python_only("libvfio-user negotiates VERSION itself and drops a client that "
                         "starts with anything else")
def test_new_client_must_negotiate_again(server: RunningServer) -> None:
    c1 = server.client()
    read_id(c1)
    c1.close()
    c2 = server.client(negotiate=False)
    expect_error(c2, Command.REGION_READ, p.RegionAccess(0, 0, 4).encode(), errno.EINVAL)
    ok(c2, Command.VERSION, p.Version(0, 0).encode())
    read_id(c2)


@pytest.mark.socket_dma
def test_disconnect_while_dma_read_outstanding(server: RunningServer) -> None:
    c1 = server.client()
    c1.map_local(GUEST, 0x2000)
    enable_device(c1)
    held: list[tuple[Header, bytes]] = []
    c1.on_server_request = lambda h, b: held.append((h, b)) is None
    start_job(c1, Op.COPY, src=GUEST, dst=GUEST + 0x1000, length=64)
    if not held:
        held.append(recv(c1))
    assert held[0][0].command == Command.DMA_READ
    c1.close()  # never answered

    c2 = server.client()
    assert c2.read32(BAR0, R.STATUS) == 0  # reset: the dead job's result was dropped
    fd = memfd("lockstep-after-outstanding", 0x1000)
    try:
        ok(c2, Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, 0x1000).encode(), fds=[fd])
        enable_device(c2)
        assert run_job(c2, Op.FILL, dst=GUEST, length=4, pattern=0x01010101) == St.DONE
        assert os.pread(fd, 4, 0) == b"\1\1\1\1"
    finally:
        os.close(fd)


@pytest.mark.python_only("libvfio-user resets the context inside the failing vfu_sgl_read: "
                         "the device reset drops the job's fault")
def test_engine_survives_client_vanishing_mid_dma(server: RunningServer) -> None:
    """The server's DMA_READ send fails (EPIPE) because the client went away before the
    connection thread noticed: the job must fault, not kill the DMA engine thread."""
    c1 = server.client()
    c1.map_local(GUEST, 0x2000)
    enable_device(c1)
    for reg, value in ((R.DMA_SRC_LO, GUEST), (R.DMA_DST_LO, GUEST + 0x1000), (R.DMA_LEN, 64)):
        c1.write32(BAR0, reg, value)
    # Stop receiving: from now on every send from the server fails with EPIPE, while
    # the connection thread still reads what we send.  Start the job with a posted
    # write so that the connection thread itself never has to send.
    c1.sock.shutdown(socket.SHUT_RD)
    send(c1, Command.REGION_WRITE,
         region_write_payload(BAR0, R.DMA_CMD, (CMD_GO | Op.COPY).to_bytes(4, "little")),
         flags=Flags.NO_REPLY)
    dev = server.device
    wait_until(lambda: dev.r[R.STATUS] & (St.DONE | St.ERROR) or not dev.engine.thread.is_alive(),
               "the job to end (or the engine to die)")
    assert dev.engine.thread.is_alive(), "the DMA engine thread died"
    st = dev.r[R.STATUS]
    assert st & St.ERROR and error_code(st) == DmaError.FAULT
    c1.close()

    c2 = server.client()
    fd = memfd("lockstep-engine-alive", 0x1000)
    try:
        ok(c2, Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, 0x1000).encode(), fds=[fd])
        enable_device(c2)
        assert run_job(c2, Op.FILL, dst=GUEST, length=4, pattern=0x02020202) == St.DONE
        assert os.pread(fd, 4, 0) == b"\2\2\2\2"
    finally:
        os.close(fd)


@pytest.mark.python_only("client commands while a DMA request is outstanding: libvfio-user "
                         "reads the reply off the command socket")
def test_busy_go_reports_busy_error_and_job_still_completes(server: RunningServer) -> None:
    c = server.client()
    c.map_local(GUEST, 0x2000)
    enable_device(c)
    held: list[tuple[Header, bytes]] = []
    c.on_server_request = lambda h, b: held.append((h, b)) is None
    start_job(c, Op.COPY, src=GUEST, dst=GUEST + 0x1000, length=16)
    if not held:
        held.append(recv(c))
    c.write32(BAR0, R.DMA_CMD, CMD_GO | Op.FILL)  # second GO while busy
    st = c.read32(BAR0, R.STATUS)
    assert st & St.BUSY and st & St.ERROR and error_code(st) == DmaError.BUSY
    c.on_server_request = None
    c._serve(*held[0])
    st = wait_until(lambda: (s := c.read32(BAR0, R.STATUS)) & St.DONE and s, "the COPY")
    assert st == St.DONE
    assert c.read32(BAR0, R.DMA_JOBS) == 1


def test_reset_drops_pending_msix_and_intx_state(server: RunningServer) -> None:
    c = server.client()
    mem = memfd("lockstep-reset-irq", 0x1000)
    ok(c, Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, 0x1000).encode(), fds=[mem])
    os.close(mem)
    efd = os.eventfd(0)
    try:
        c.set_irqs(PciIrq.INTX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 0, 1,
                   [efd])
        c.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE)
        c.region_write(CONFIG, Reg.COMMAND, int(MEM_BM).to_bytes(2, "little"))
        assert run_job(c, Op.FILL, dst=GUEST, length=4, pattern=1) == St.DONE
        assert event_fired(efd, 2.0) == 1
        c.reset()
        status = int.from_bytes(c.region_read(CONFIG, Reg.STATUS, 2), "little")
        assert not status & 0x8  # Interrupt Status cleared with the line
        assert not server.device.irq.intx_asserted
    finally:
        os.close(efd)
