"""A hostile vfio-user client against the pure-Python server, over a real UNIX socket.

Each test sends what an attacker would (a message built to crash, hang, exhaust or flood
the server) and then checks that the server answered as the spec implies and serves on:
the same connection keeps working (``read_id``), or, if the connection itself failed,
the next client is accepted.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
import time
import tracemalloc

import pytest

from teeio.device_regs import R
from tests.support.lockstep import (
    BAR0,
    expect_error,
    fds_named,
    memfd,
    ok,
    read_id,
    recv,
    region_read_payload,
    region_write_payload,
    send,
    wait_until,
)
from tests.support.servers import RunningServer
from vfio_user_dev import protocol as p
from vfio_user_dev import server as server_mod
from vfio_user_dev.client import Client
from vfio_user_dev.enforcement import LOG_FIRST
from vfio_user_dev.loglimit import LOG_INTERVAL
from vfio_user_dev.protocol import Command, Flags, IrqSetFlags, PciIrq

pytestmark = [pytest.mark.timeout(30)]

RW = p.DmaFlags.READ | p.DmaFlags.WRITE
EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
EVENTFD_UNMASK = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE     # an eventfd counter cannot go higher
SERVER_LOG = "vfio_user_dev.server"


def version_payload(json_text: bytes) -> bytes:
    return struct.pack("<HH", 0, 0) + json_text + b"\0"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- A single message must not kill the server -------------------------------------------------

@pytest.mark.parametrize("json_text", [
    b'{"capabilities":' + b"[" * 400_000 + b"]" * 400_000 + b"}",     # RecursionError
    b'{"capabilities":{"x":' + b"{\"a\":" * 100 + b"1" + b"}" * 100 + b"}}",
    b'{"capabilities":{"max_data_xfer_size":1' + b"0" * 5000 + b"}}",  # int too long
    b'{"capabilities":{"max_data_xfer_size":true}}',
], ids=["deep-array", "deep-object", "huge-int", "bool"])
def test_hostile_version_json_is_einval_and_the_server_serves_on(
        server: RunningServer, json_text: bytes) -> None:
    c = server.client(negotiate=False)
    expect_error(c, Command.VERSION, version_payload(json_text), errno.EINVAL)
    c.version()
    read_id(c)


def test_version_json_depth_within_the_bound_is_accepted(server: RunningServer) -> None:
    c = server.client(negotiate=False)
    caps = b'{"capabilities":{"migration":{"pgsize":4096,"x":[[1]]},"max_msg_fds":8}}'
    ok(c, Command.VERSION, version_payload(caps))
    read_id(c)


def test_version_reply_announces_max_dma_maps(server: RunningServer) -> None:
    v = server.client(negotiate=False).version()
    assert v.capabilities["max_dma_maps"] == p.MAX_DMA_MAPS


@pytest.mark.parametrize("offset,size", [
    (0, 1 << 63),                 # OverflowError in mmap
    (0, (1 << 64) - 0x10000),     # address + size still within 2**64
    (1 << 63, 0x1000),            # off_t overflow
    ((1 << 64) - 0x1000, 0x1000),
    (0, 0x4000),                  # beyond the end of the 0x2000-byte file: SIGBUS later
    (0x1000, 0x2000),
], ids=["size-2^63", "size-near-2^64", "offset-2^63", "offset-near-2^64", "past-eof",
        "offset-past-eof"])
def test_dma_map_with_unmappable_file_range_is_einval(server: RunningServer, offset: int,
                                                      size: int) -> None:
    c = server.client()
    name = "hostile-dma-map"
    fd = memfd(name, 0x2000)
    try:
        expect_error(c, Command.DMA_MAP, p.DmaMap(RW, offset, 0, size).encode(),
                     errno.EINVAL, fds=[fd])
    finally:
        os.close(fd)
    wait_until(lambda: fds_named(name) == 0, "the server to close the refused fd")
    assert server.machine.dma.snapshot() == []
    read_id(c)


def test_unforeseen_handler_exception_is_eio_logged_once_and_serving_goes_on(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    c = server.client()

    def broken(*_args: object, **_kw: object) -> bytes:
        raise RuntimeError("a bug no check foresaw")

    monkeypatch.setattr(server.machine, "region_read", broken)
    monkeypatch.setattr(server.machine, "region_write", broken)
    with caplog.at_level(logging.ERROR, logger=SERVER_LOG):
        for _ in range(5):
            expect_error(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4),
                         errno.EIO)
        # posted: never answered, not even with EIO
        send(c, Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\1\2\3\4"),
             flags=Flags.NO_REPLY)
        expect_error(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4), errno.EIO)
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 2, "one traceback per kind, then rate-limited"
    assert [t.split()[0] for t in tracebacks] == ["REGION_READ", "REGION_WRITE"]
    assert "a bug no check foresaw" in caplog.text
    conn = server.server.connection
    assert conn is not None and conn.counters["internal_errors"] == 7
    monkeypatch.undo()
    read_id(c)


def test_connection_failure_closes_it_and_the_next_client_is_served(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    c = server.client()
    real = server_mod.Connection._dispatch
    poison = 0x4444

    def failing(self: server_mod.Connection, hdr: p.Header, payload: bytes,
                fds: list[int]) -> None:
        # A failure of the receive loop itself (not of one message's handler).
        if hdr.command == poison:
            raise RuntimeError("the connection loop broke")
        real(self, hdr, payload, fds)

    monkeypatch.setattr(server_mod.Connection, "_dispatch", failing)
    read_id(c)
    send(c, poison)
    c.sock.settimeout(5)
    assert c.sock.recv(1) == b"", "the broken connection is closed"
    c.close()
    monkeypatch.undo()
    c2 = server.client()
    read_id(c2)
    assert server.server.clients == 2


# -- Bounded input: sizes and fds --------------------------------------------------------------

def test_huge_claimed_size_is_drained_without_buffering_it(server: RunningServer) -> None:
    c = server.client()
    size = 64 << 20
    chunk = b"\xAB" * (1 << 20)
    tracemalloc.start()
    try:
        c.send_raw(p.Header(0x77, Command.REGION_WRITE, size, 0).encode())
        for _ in range((size - p.HEADER_SIZE) // len(chunk)):
            c.send_raw(chunk)
        c.send_raw(chunk[:(size - p.HEADER_SIZE) % len(chunk)])
        rh, _ = recv(c, timeout=20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (rh.msg_id, rh.error) == (0x77, errno.E2BIG)
    assert peak < 16 << 20, f"the server buffered {peak} bytes of a refused message"
    read_id(c)


def test_fds_with_a_message_that_takes_none_are_closed(server: RunningServer) -> None:
    c = server.client()
    name = "hostile-stray-fd"
    fds = [memfd(name, 4096) for _ in range(3)]
    try:
        ok(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4), fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    wait_until(lambda: fds_named(name) == 0, "the server to close the stray fds")
    read_id(c)


def test_more_fds_than_max_msg_fds_is_einval_and_all_are_closed(server: RunningServer) -> None:
    c = server.client()
    name = "hostile-many-fds"
    fds = [memfd(name, 4096) for _ in range(3 * p.MAX_MSG_FDS)]
    msg = p.message(0x55, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4))
    try:
        # One byte per write, each with a full set of fds: 3 * 8 fds for one message.
        for i, part in enumerate((msg[:1], msg[1:2], msg[2:])):
            group = fds[i * p.MAX_MSG_FDS:(i + 1) * p.MAX_MSG_FDS]
            c.sock.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", group).tobytes())])
        rh, _ = recv(c)
        assert (rh.msg_id, rh.is_error, rh.error) == (0x55, True, errno.EINVAL)
    finally:
        for fd in fds:
            os.close(fd)
    wait_until(lambda: fds_named(name) == 0, "the server to close every fd")
    read_id(c)


# -- Trigger fds must be eventfds, and a full one never blocks the server ----------------------

def test_set_irqs_refuses_a_pipe_as_trigger_fd(server: RunningServer) -> None:
    c = server.client()
    pipes = fds_named("pipe:")
    r, w = os.pipe()
    try:
        for index in (PciIrq.MSIX, PciIrq.INTX):
            expect_error(c, Command.DEVICE_SET_IRQS,
                         p.IrqSet(EVENTFD_TRIGGER, index, 0, 1).encode(), errno.EINVAL, fds=[w])
        assert server.device.irq.trigger[PciIrq.MSIX][0] is None
        # An eventfd alongside a pipe: the whole request is refused, nothing installed.
        efd = os.eventfd(0)
        try:
            expect_error(c, Command.DEVICE_SET_IRQS,
                         p.IrqSet(EVENTFD_TRIGGER, PciIrq.MSIX, 0, 2).encode(), errno.EINVAL,
                         fds=[efd, w])
        finally:
            os.close(efd)
        assert server.device.irq.trigger[PciIrq.MSIX][:2] == [None, None]
    finally:
        os.close(r)
        os.close(w)
    wait_until(lambda: fds_named("pipe:") == pipes, "the server to close the pipe")
    read_id(c)


def test_full_trigger_eventfd_drops_the_interrupt_instead_of_hanging(
        server: RunningServer) -> None:
    c = server.client()
    efd = os.eventfd(0)            # blocking, as the client made it
    try:
        ok(c, Command.DEVICE_SET_IRQS, p.IrqSet(EVENTFD_TRIGGER, PciIrq.MSIX, 0, 1).encode(),
           fds=[efd])
        os.write(efd, EVENTFD_MAX.to_bytes(8, "little"))
        # A client-triggered interrupt: the server's eventfd write cannot go through.
        trigger = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
        ok(c, Command.DEVICE_SET_IRQS, p.IrqSet(trigger, PciIrq.MSIX, 0, 1).encode())
        read_id(c)
        assert server.device.irq.dropped == 1
        assert int.from_bytes(os.read(efd, 8), "little") == EVENTFD_MAX
    finally:
        os.close(efd)


# -- The INTx unmask fd must be an eventfd -----------------------------------------------------

def test_set_irqs_refuses_a_pipe_at_eof_as_intx_unmask_fd(server: RunningServer) -> None:
    c = server.client()
    r, w = os.pipe()
    os.close(w)                     # at end of file: readable forever
    try:
        expect_error(c, Command.DEVICE_SET_IRQS,
                     p.IrqSet(EVENTFD_UNMASK, PciIrq.INTX, 0, 1).encode(), errno.EINVAL,
                     fds=[r])
    finally:
        os.close(r)
    assert server.device.irq.unmask_fd is None
    assert server.device.irq._watcher is None
    read_id(c)


# -- The number of DMA maps is capped ----------------------------------------------------------

def _map_many(c: Client, addresses: list[int], size: int) -> list[int]:
    """DMA_MAP (no fd) at each address, pipelined in batches; the errnos (0: mapped)."""
    out: list[int] = []
    batch = 256
    for i in range(0, len(addresses), batch):
        part = addresses[i:i + batch]
        msgs = b"".join(p.message(n & 0xFFFF, Command.DMA_MAP,
                                  p.DmaMap(RW, 0, a, size).encode())
                        for n, a in enumerate(part, start=i + 1))
        c.send_raw(msgs)
        for _ in part:
            rh, _ = recv(c)
            out.append(rh.error if rh.is_error else 0)
    return out


def test_dma_map_count_is_capped_with_enospc(server: RunningServer) -> None:
    c = server.client()
    page = 0x1000
    start = time.monotonic()
    errs = _map_many(c, [0x1_0000_0000 + 2 * page * i for i in range(p.MAX_DMA_MAPS + 3)],
                     page)
    assert errs[:p.MAX_DMA_MAPS] == [0] * p.MAX_DMA_MAPS
    assert errs[p.MAX_DMA_MAPS:] == [errno.ENOSPC] * 3
    assert len(server.machine.dma.snapshot()) == p.MAX_DMA_MAPS
    # One slot free: overlaps with either neighbour of the gap are still found ...
    base = 0x1_0000_0000 + 2 * page * 100
    c.dma_unmap(base, page)
    # (the neighbours: base - 2 * page .. base - page and base + 2 * page .. + page)
    for address, size in ((base - page - 1, 2), (base + page, page + 1),
                          (base - page - 1, 3 * page + 2)):
        expect_error(c, Command.DMA_MAP, p.DmaMap(RW, 0, address, size).encode(),
                     errno.EEXIST)
    # ... the freed slot can be used again, and then the set is full once more.
    c.dma_map(base + 1, page - 1)
    expect_error(c, Command.DMA_MAP, p.DmaMap(RW, 0, 0x10_0000_0000, page).encode(),
                 errno.ENOSPC)
    assert time.monotonic() - start < 20
    read_id(c)


# -- Refusals are counted, and logged without flooding -----------------------------------------

def test_rejections_are_rate_limited_and_counted(server: RunningServer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    c = server.client()
    clock = FakeClock()
    server.server.refusals.clock = clock
    garbage = b"".join(p.message(i & 0xFFFF, 0x4242, b"junk", Flags.NO_REPLY)
                       for i in range(500))
    with caplog.at_level(logging.WARNING, logger=SERVER_LOG):
        c.send_raw(garbage)
        read_id(c)                      # all 500 were handled before this reply
        lines = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert len(lines) == LOG_FIRST
        assert server.server.refusals.counts["UNKNOWN:ENOSYS"] == 500
        clock.now += LOG_INTERVAL + 1
        expect_error(c, 0x4242, b"junk", errno.ENOSYS)
        lines = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert len(lines) == LOG_FIRST + 1
        assert f"{500 - LOG_FIRST} more suppressed" in lines[-1].getMessage()
    conn = server.server.connection
    assert conn is not None and conn.counters["errors"] == 501


def test_rate_limit_survives_reconnecting(server: RunningServer,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=SERVER_LOG):
        for _ in range(3):
            c = server.client()
            c.send_raw(b"".join(p.message(i, 0x4343, b"", Flags.NO_REPLY)
                                for i in range(LOG_FIRST)))
            read_id(c)
            c.close()
    lines = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == LOG_FIRST
