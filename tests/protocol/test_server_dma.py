"""Lock-step DMA tests: DMA_MAP with an fd (direct access), DMA_UNMAP, and the
DMA_READ / DMA_WRITE socket fallback for memory mapped without an fd."""

from __future__ import annotations

import errno
import hashlib
import logging
import os

import pytest

from teeio.device_regs import DmaError, Irq, Op, R, St
from tests.support.lockstep import (
    BAR0,
    GUEST,
    SIZE,
    enable_device,
    error_code,
    expect_error,
    fds_named,
    map_memfd,
    mapped,
    memfd,
    ok,
    read_id,
    recv,
    region_read_payload,
    run_job,
    run_job_quiet,
    send,
    start_job,
    wait_idle,
    wait_until,
)
from tests.support.servers import RunningServer, both_backends
from vfio_user_dev import protocol as p
from vfio_user_dev.protocol import Command, DmaFlags, Header

pytestmark = [pytest.mark.timeout(10), both_backends]

RW = DmaFlags.READ | DmaFlags.WRITE
# Why some tests are python-only: libvfio-user (without the twin socket, which our client
# and QEMU do not offer) waits for a DMA reply on the command socket, so a client command
# sent while a DMA_READ/DMA_WRITE is outstanding is taken for the reply.
OUTSTANDING = ("client commands while a DMA request is outstanding: libvfio-user reads the "
               "reply off the command socket")


# -- DMA_MAP with an fd ----------------------------------------------------------------------

def test_dma_map_fd_copy_fill_sha256(server: RunningServer) -> None:
    c = server.client()
    fd = map_memfd(c, "lockstep-jobs")
    try:
        assert server.machine.dma.snapshot() == [(GUEST, SIZE, RW, True)]
        enable_device(c)
        src = os.urandom(5000)
        os.pwrite(fd, src, 0x100)

        st = run_job(c, Op.COPY, src=GUEST + 0x100, dst=GUEST + 0x8000, length=len(src))
        assert st == St.DONE
        assert os.pread(fd, len(src), 0x8000) == src
        assert os.pread(fd, 16, 0x8000 + len(src)) == bytes(16)  # nothing beyond LEN

        st = run_job(c, Op.FILL, dst=GUEST + 0x3001, length=7, pattern=0xDDCCBBAA)
        assert st == St.DONE
        assert os.pread(fd, 9, 0x3000) == b"\0\xAA\xBB\xCC\xDD\xAA\xBB\xCC\0"

        st = run_job(c, Op.SHA256, src=GUEST + 0x100, dst=GUEST + 0xF000, length=len(src))
        assert st == St.DONE
        assert os.pread(fd, 32, 0xF000) == hashlib.sha256(src).digest()

        assert c.read32(BAR0, R.DMA_JOBS) == 3
        assert c.read32(BAR0, R.DMA_BYTES_LO) == 2 * len(src) + 7 + len(src) + 32
        assert c.read32(BAR0, R.INT_STATUS) == Irq.DMA_DONE
    finally:
        os.close(fd)


def test_dma_job_needs_bus_master(server: RunningServer) -> None:
    c = server.client()
    fd = map_memfd(c, "lockstep-nobm")
    try:
        st = run_job(c, Op.FILL, dst=GUEST, length=16, pattern=0x11111111)
        assert st & St.ERROR and error_code(st) == DmaError.BUS_MASTER_OFF
        assert os.pread(fd, 16, 0) == bytes(16)
    finally:
        os.close(fd)


def test_dma_to_unmapped_address_faults(server: RunningServer) -> None:
    c = server.client()
    fd = map_memfd(c, "lockstep-fault")
    os.close(fd)
    enable_device(c)
    # runs off the end of the map
    st = run_job(c, Op.FILL, dst=GUEST + SIZE - 8, length=16, pattern=1)
    assert st & St.ERROR and error_code(st) == DmaError.FAULT
    assert c.read32(BAR0, R.INT_STATUS) & Irq.DMA_ERROR


def test_dma_map_read_only_refuses_device_writes(server: RunningServer) -> None:
    c = server.client()
    fd = map_memfd(c, "lockstep-ro", flags=DmaFlags.READ)
    try:
        enable_device(c)
        st = run_job(c, Op.FILL, dst=GUEST, length=16, pattern=0x22222222)
        assert error_code(st) == DmaError.FAULT
        assert os.pread(fd, 16, 0) == bytes(16)
    finally:
        os.close(fd)


@pytest.mark.python_only("libvfio-user refuses an overlapping DMA_MAP with EINVAL")
def test_dma_map_overlap_is_eexist(server: RunningServer) -> None:
    c = server.client()
    fd = map_memfd(c, "lockstep-first")
    name = "lockstep-overlap"
    fd2 = memfd(name, SIZE)
    try:
        for addr in (GUEST + 0x8000, GUEST - 0x8000, GUEST):
            expect_error(c, Command.DMA_MAP, p.DmaMap(RW, 0, addr, SIZE).encode(),
                         errno.EEXIST, fds=[fd2])
    finally:
        os.close(fd2)
        os.close(fd)
    wait_until(lambda: fds_named(name) == 0, "the refused fds to be closed")
    assert not mapped(name)
    assert server.machine.dma.snapshot() == [(GUEST, SIZE, RW, True)]
    # Adjacent (not overlapping) maps are fine.
    fd3 = map_memfd(c, "lockstep-adjacent", address=GUEST + SIZE)
    os.close(fd3)
    assert len(server.machine.dma.snapshot()) == 2


def test_dma_unmap_echoes_payload_and_releases_the_mapping(server: RunningServer) -> None:
    c = server.client()
    name = "lockstep-unmap"
    fd = map_memfd(c, name)
    os.close(fd)
    assert mapped(name)
    assert fds_named(name) <= 1  # at most CPython mmap's private dup() of the fd
    req = p.DmaUnmap(p.DMA_UNMAP.size, 0, GUEST, SIZE).encode()
    body = ok(c, Command.DMA_UNMAP, req)
    assert body == req
    assert server.machine.dma.snapshot() == []
    assert not mapped(name)
    assert fds_named(name) == 0
    enable_device(c)
    st = run_job(c, Op.FILL, dst=GUEST, length=4, pattern=1)
    assert error_code(st) == DmaError.FAULT


def test_dma_unmap_unknown_is_enoent(server: RunningServer) -> None:
    c = server.client()
    fd = map_memfd(c, "lockstep-enoent")
    os.close(fd)
    for addr, size in ((0x5000, 0x1000), (GUEST, SIZE // 2), (GUEST + 0x1000, SIZE)):
        expect_error(c, Command.DMA_UNMAP, p.DmaUnmap(24, 0, addr, size).encode(),
                     errno.ENOENT)
    assert server.machine.dma.snapshot() == [(GUEST, SIZE, RW, True)]
    read_id(c)


def test_dma_unmap_with_flags_is_einval(server: RunningServer) -> None:
    c = server.client()
    fd = map_memfd(c, "lockstep-unmap-flags")
    os.close(fd)
    expect_error(c, Command.DMA_UNMAP, p.DmaUnmap(24, 1, GUEST, SIZE).encode(), errno.EINVAL)
    assert len(server.machine.dma.snapshot()) == 1


@pytest.mark.python_only("libvfio-user maps the first of several fds and closes the others")
def test_dma_map_with_two_fds_is_einval_without_fd_leak(server: RunningServer) -> None:
    c = server.client()
    name = "lockstep-twofds"
    fds = [memfd(name, SIZE), memfd(name, SIZE)]
    try:
        expect_error(c, Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, SIZE).encode(), errno.EINVAL,
                     fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    wait_until(lambda: fds_named(name) == 0, "the server to close both fds")
    assert not mapped(name)
    assert server.machine.dma.snapshot() == []
    read_id(c)


@pytest.mark.python_only("libvfio-user rounds the fd offset down to a page and maps it")
def test_dma_map_bad_fd_offset_is_einval(server: RunningServer) -> None:
    c = server.client()
    name = "lockstep-badoff"
    fd = memfd(name, SIZE)
    try:
        expect_error(c, Command.DMA_MAP, p.DmaMap(RW, 123, GUEST, 0x1000).encode(),
                     errno.EINVAL, fds=[fd])
    finally:
        os.close(fd)
    wait_until(lambda: fds_named(name) == 0, "the server to close the fd")
    assert server.machine.dma.snapshot() == []


# -- DMA_READ / DMA_WRITE fallback (no fd) -------------------------------------------------------
# On the libvfio-user leg these opt in to socket DMA (``socket_dma``); by default that
# backend refuses it (the first test below).

LOCAL = 0x20_0000


def test_socket_dma_refused_by_default_on_libvfio_user(server: RunningServer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    c = server.client()
    mem = c.map_local(LOCAL, 0x2000)
    enable_device(c)
    mem.data[0:64] = bytes(range(64))
    for _ in range(2):
        st = run_job_quiet(c, server.device, Op.COPY, src=LOCAL, dst=LOCAL + 0x1000,
                           length=64)
        if server.backend == "python":
            assert st == St.DONE
        else:   # refused: no DMA_READ ever sent, the job faults, one ERROR says why
            assert st & St.ERROR and error_code(st) == DmaError.FAULT
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if server.backend == "python":
        assert (mem.reads, mem.writes) == (2, 2) and errors == []
    else:
        assert (mem.reads, mem.writes) == (0, 0)
        assert len(errors) == 1
        assert "issue 279" in errors[0] and "--libvfio-user-socket-dma" in errors[0]
        assert read_id(c)      # the connection is fine


@pytest.mark.socket_dma
def test_out_of_step_dma_reply_shuts_the_connection_down(server: RunningServer) -> None:
    if server.backend == "python":
        pytest.skip("the pure-Python transport routes the reply by its id "
                    "(test_no_deadlock_while_dma_read_outstanding)")
    # libvfio-user (opted in) takes a client command sent while its DMA_READ is
    # outstanding for the reply (EPROTO/EINVAL): the connection is shut down, so the
    # library resets instead of reading on from a stream that is out of step.
    c = server.client()
    c.map_local(LOCAL, 0x2000)
    enable_device(c)
    held: list[tuple[Header, bytes]] = []
    c.on_server_request = lambda h, b: held.append((h, b)) is None
    start_job(c, Op.COPY, src=LOCAL, dst=LOCAL + 0x1000, length=64)
    if not held:
        held.append(recv(c))
    assert held[0][0].command == Command.DMA_READ
    send(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4))
    c.sock.settimeout(5)
    while True:     # anything the library still sends, then EOF
        try:
            data = c.sock.recv(4096)
        except ConnectionResetError:
            break
        if not data:
            break
    c.close()
    wait_until(lambda: not server.server._attached, "the library to drop the client")
    c2 = server.client()
    assert read_id(c2)
    assert server.device.r[R.STATUS] == 0       # reset: the broken job's result dropped


@pytest.mark.python_only(OUTSTANDING)
@pytest.mark.socket_dma
def test_fallback_copy_and_sha256_served_by_subsequent_calls(server: RunningServer) -> None:
    c = server.client()
    mem = c.map_local(LOCAL, 0x4000)
    assert server.machine.dma.snapshot() == [(LOCAL, 0x4000, RW, False)]
    enable_device(c)
    src = os.urandom(3000)
    mem.data[0:len(src)] = src
    # wait_idle() polls STATUS with REGION_READs; the client serves the server's
    # DMA_READ / DMA_WRITE that arrive while it waits for those replies.
    st = run_job(c, Op.COPY, src=LOCAL, dst=LOCAL + 0x2000, length=len(src))
    assert st == St.DONE
    assert bytes(mem.data[0x2000:0x2000 + len(src)]) == src
    assert (mem.reads, mem.writes) == (1, 1)

    st = run_job(c, Op.SHA256, src=LOCAL, dst=LOCAL + 0x3F00, length=len(src))
    assert st == St.DONE
    assert bytes(mem.data[0x3F00:0x3F20]) == hashlib.sha256(src).digest()
    assert (mem.reads, mem.writes) == (2, 2)


@pytest.mark.socket_dma
def test_fallback_served_by_serve_pending(server: RunningServer) -> None:
    c = server.client()
    mem = c.map_local(LOCAL, 0x2000)
    enable_device(c)
    mem.data[0:64] = bytes(range(64))
    start_job(c, Op.COPY, src=LOCAL, dst=LOCAL + 0x1000, length=64)
    c.serve_pending(0.3)
    assert (mem.reads, mem.writes) == (1, 1)
    # finished without another client call
    wait_until(lambda: server.device.r[R.STATUS] == St.DONE, "the job to finish")
    assert bytes(mem.data[0x1000:0x1040]) == bytes(range(64))


@pytest.mark.socket_dma
def test_fallback_respects_client_max_data_xfer_size(server: RunningServer) -> None:
    c = server.client(negotiate=False)
    c.version({"max_msg_fds": 8, "max_data_xfer_size": 512})
    mem = c.map_local(LOCAL, 0x2000)
    enable_device(c)
    src = os.urandom(2000)
    mem.data[0:2000] = src
    sizes: list[tuple[int, int]] = []

    def spy(hdr: Header, body: bytes) -> bool:
        addr, count = p.DMA_RW.unpack_from(body)
        sizes.append((hdr.command, count))
        return False  # let the client serve it

    c.on_server_request = spy
    st = run_job_quiet(c, server.device, Op.COPY, src=LOCAL, dst=LOCAL + 0x1000, length=2000)
    assert st == St.DONE
    assert bytes(mem.data[0x1000:0x1000 + 2000]) == src
    assert sizes == [(Command.DMA_READ, n) for n in (512, 512, 512, 464)] + \
        [(Command.DMA_WRITE, n) for n in (512, 512, 512, 464)]
    assert (mem.reads, mem.writes) == (4, 4)


@pytest.mark.socket_dma
def test_fallback_mixed_with_fd_map(server: RunningServer) -> None:
    c = server.client()
    mem = c.map_local(LOCAL, 0x1000)
    fd = map_memfd(c, "lockstep-mixed", address=LOCAL + 0x1000, size=0x1000)
    try:
        enable_device(c)
        mem.data[0x800:0x1000] = b"\x5A" * 0x800
        os.pwrite(fd, b"\xA5" * 0x800, 0)
        # one COPY whose source straddles the local and the memfd maps
        st = run_job_quiet(c, server.device, Op.COPY, src=LOCAL + 0x800, dst=LOCAL,
                           length=0x1000)
        assert st == St.DONE
        assert bytes(mem.data[0:0x1000]) == b"\x5A" * 0x800 + b"\xA5" * 0x800
        assert (mem.reads, mem.writes) == (1, 1)
    finally:
        os.close(fd)


@pytest.mark.socket_dma
@pytest.mark.parametrize("command", [Command.DMA_READ, Command.DMA_WRITE])
def test_fallback_error_reply_faults_the_job(server: RunningServer, command: Command) -> None:
    c = server.client()
    mem = c.map_local(LOCAL, 0x2000)
    enable_device(c)
    c.write32(BAR0, R.INT_ENABLE, Irq.DMA_DONE | Irq.DMA_ERROR)
    refused: list[int] = []

    def refuse(hdr: Header, body: bytes) -> bool:
        if hdr.command != command:
            return False
        refused.append(hdr.msg_id)
        c.send_raw(p.error_reply(hdr, errno.EIO))
        return True

    c.on_server_request = refuse
    st = run_job_quiet(c, server.device, Op.COPY, src=LOCAL, dst=LOCAL + 0x1000, length=128)
    assert len(refused) == 1
    assert st & St.ERROR and not st & St.DONE
    assert error_code(st) == DmaError.FAULT
    assert c.read32(BAR0, R.INT_STATUS) == Irq.DMA_ERROR
    assert c.read32(BAR0, R.DMA_JOBS) == 0
    assert mem.writes == 0
    read_id(c)
    # The engine is fine afterwards.
    c.on_server_request = None
    st = run_job_quiet(c, server.device, Op.FILL, dst=LOCAL, length=4, pattern=0x04030201)
    assert st == St.DONE
    assert bytes(mem.data[0:4]) == b"\1\2\3\4"


@pytest.mark.python_only("libvfio-user takes a short DMA_READ reply for a broken connection")
@pytest.mark.socket_dma
def test_fallback_short_dma_read_reply_faults_the_job(server: RunningServer) -> None:
    c = server.client()
    c.map_local(LOCAL, 0x2000)
    enable_device(c)

    def short(hdr: Header, body: bytes) -> bool:
        addr, count = p.DMA_RW.unpack_from(body)
        c.send_raw(p.reply(hdr, p.encode_dma_rw(addr, count - 1, b"\0" * (count - 1))))
        return True

    c.on_server_request = short
    st = run_job(c, Op.SHA256, src=LOCAL, dst=LOCAL + 0x1000, length=64)
    assert error_code(st) == DmaError.FAULT


@pytest.mark.python_only(OUTSTANDING)
@pytest.mark.socket_dma
def test_no_deadlock_while_dma_read_outstanding(server: RunningServer) -> None:
    c = server.client()
    mem = c.map_local(LOCAL, 0x2000)
    enable_device(c)
    mem.data[0:256] = os.urandom(256)
    held: list[tuple[Header, bytes]] = []

    def hold(hdr: Header, body: bytes) -> bool:
        held.append((hdr, body))
        return True  # not answered (yet)

    c.on_server_request = hold
    start_job(c, Op.COPY, src=LOCAL, dst=LOCAL + 0x1000, length=256)
    if not held:  # the request may not have overtaken the GO write's reply
        held.append(recv(c))
    hdr, body = held[0]
    assert not hdr.is_reply and hdr.command == Command.DMA_READ
    assert p.decode_dma_rw(body, with_data=False)[:2] == (LOCAL, 256)

    # The DMA_READ is outstanding; the server must still answer us.
    msg_id = send(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4))
    rh, rbody = recv(c)
    assert rh.is_reply and rh.msg_id == msg_id and not rh.is_error
    assert p.RegionAccess.decode(rbody, with_data=True).data == (0x7E101234).to_bytes(4, "little")
    # ... including a STATUS read that shows the job still running.
    msg_id = send(c, Command.REGION_READ, region_read_payload(BAR0, R.STATUS, 4))
    rh, rbody = recv(c)
    assert rh.msg_id == msg_id
    assert int.from_bytes(rbody[16:], "little") == St.BUSY
    assert len(held) == 1 and mem.reads == 0

    # Now answer; the job finishes (its DMA_WRITE is served while we poll STATUS).
    c.on_server_request = None
    c._serve(hdr, body)
    assert wait_idle(c) == St.DONE
    assert bytes(mem.data[0x1000:0x1100]) == bytes(mem.data[0:256])
    assert (mem.reads, mem.writes) == (1, 1)


@pytest.mark.python_only(OUTSTANDING)
@pytest.mark.socket_dma
def test_unmap_of_local_map_while_dma_read_outstanding(server: RunningServer) -> None:
    # Socket DMA holds no reference on its map, so an UNMAP does not wait for the
    # outstanding DMA_READ reply (which the connection thread itself must route).
    c = server.client()
    c.map_local(LOCAL, 0x2000)
    enable_device(c)
    held: list[tuple[Header, bytes]] = []
    c.on_server_request = lambda h, b: held.append((h, b)) is None
    start_job(c, Op.SHA256, src=LOCAL, dst=LOCAL + 0x1000, length=64)
    if not held:
        held.append(recv(c))
    ok(c, Command.DMA_UNMAP, p.DmaUnmap(24, 0, LOCAL, 0x2000).encode())
    assert server.machine.dma.snapshot() == []
    c.on_server_request = None
    c._serve(*held[0])  # late answer: the read succeeds, the digest write then faults
    st = wait_idle(c)
    assert error_code(st) == DmaError.FAULT
