"""The libvfio-user backend's own server state with a stand-in library: socket DMA
opt-in, the connection's dup and wake pipe, queued interrupts, the socket path."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vfio_user_dev import libvfio_user as lvu
from vfio_user_dev.__main__ import main as device_main
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import DmaFlags, PciIrq
from vfio_user_dev.server import Server

ROOT = Path(__file__).resolve().parents[2]


# -- the server's own state, with a stand-in library -----------------------------------------------

class StubLib:
    """Every library function the server calls, succeeding; vfu_get_poll_fd returns
    ``poll_fd``, vfu_sgl_read/write fail with ``sgl_errno`` if set."""

    _name = "stub"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.poll_fd = -1
        self.sgl_errno = 0

    def __getattr__(self, name: str) -> Any:
        if not name.startswith(("vfu_", "dma_")):
            raise AttributeError(name)

        def fn(*args: Any) -> Any:
            self.calls.append((name, args))
            if name == "dma_sg_size":
                return 32
            if name == "vfu_create_ctx":
                return 0x1000
            if name == "vfu_get_poll_fd":
                return self.poll_fd
            if name == "vfu_addr_to_sgl":
                return 1
            if name in ("vfu_sgl_read", "vfu_sgl_write") and self.sgl_errno:
                ctypes.set_errno(self.sgl_errno)
                return -1
            return 0
        return fn

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


@pytest.fixture
def conn() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the library's end of the client connection, the client's end)."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def stub_server(tmp_path: Path, machine: Platform, conn: tuple[socket.socket, socket.socket],
                **kw: Any) -> tuple[lvu.LibVfioUserServer, StubLib]:
    lib = StubLib()
    lib.poll_fd = conn[0].fileno()
    server = lvu.LibVfioUserServer(str(tmp_path / "s.sock"), machine, lib, **kw)
    server._attach()
    assert server._attached
    return server, lib


def test_socket_dma_refused_by_default(tmp_path: Path, machine: Platform,
                                       conn: tuple[socket.socket, socket.socket],
                                       caplog: pytest.LogCaptureFixture) -> None:
    server, lib = stub_server(tmp_path, machine, conn)
    try:
        machine.dma.map_view(0x20_0000, 0x2000, DmaFlags.READ | DmaFlags.WRITE, None)
        for _ in range(2):
            with pytest.raises(DmaFault, match="--libvfio-user-socket-dma"):
                machine.dma.read(0x20_0000, 64)
            with pytest.raises(DmaFault, match="socket DMA refused"):
                machine.dma.write(0x20_0000, b"x" * 64)
        assert lib.called("vfu_sgl_read") == [] and lib.called("vfu_sgl_write") == []
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1                                  # once per server
        assert "issue 279" in errors[0] and "--libvfio-user-socket-dma" in errors[0]
    finally:
        server.close()


def test_socket_dma_opt_in_passes_direct_access(tmp_path: Path, machine: Platform,
                                                conn: tuple[socket.socket, socket.socket]
                                                ) -> None:
    assert lvu.VFU_SGL_DIRECT_ACCESS == 1      # include/libvfio-user.h
    server, lib = stub_server(tmp_path, machine, conn, socket_dma=True)
    try:
        machine.dma.map_view(0x20_0000, 0x2000, DmaFlags.READ | DmaFlags.WRITE, None)
        assert machine.dma.read(0x20_0000, 64) == bytes(64)
        machine.dma.write(0x20_0000, b"y" * 8)
        (read,) = lib.called("vfu_sgl_read")
        (write,) = lib.called("vfu_sgl_write")
        assert read[4] == write[4] == lvu.VFU_SGL_DIRECT_ACCESS
    finally:
        server.close()


@pytest.mark.parametrize("err,shut", [(errno.EPROTO, True), (errno.EINVAL, True),
                                      (errno.EIO, False)])
def test_sgl_out_of_step_shuts_the_connection_down(
        tmp_path: Path, machine: Platform, conn: tuple[socket.socket, socket.socket],
        err: int, shut: bool) -> None:
    server, lib = stub_server(tmp_path, machine, conn, socket_dma=True)
    try:
        lib.sgl_errno = err
        with pytest.raises(DmaFault, match=os.strerror(err)):
            server._remote_read(0x20_0000, 16)
        client = conn[1]
        client.setblocking(False)
        if shut:
            assert client.recv(1) == b""       # EOF: the library will see it and reset
        else:
            with pytest.raises(BlockingIOError):
                client.recv(1)
    finally:
        server.close()


def test_close_shuts_down_our_dup_without_asking_the_library(
        tmp_path: Path, machine: Platform, conn: tuple[socket.socket, socket.socket],
        caplog: pytest.LogCaptureFixture) -> None:
    server, lib = stub_server(tmp_path, machine, conn)
    assert server._conn is not None and server._conn.fileno() != conn[0].fileno()
    polls = len(lib.called("vfu_get_poll_fd"))
    joins: list[float | None] = []
    # a run thread stuck in the library: it never ends
    server._thread = SimpleNamespace(join=joins.append, is_alive=lambda: True)  # type: ignore[assignment]
    server.close()
    assert joins == [2, 5]
    assert len(lib.called("vfu_get_poll_fd")) == polls     # the library was not asked
    conn[1].settimeout(1)
    assert conn[1].recv(1) == b""                             # shut down under it
    assert any(r.levelno == logging.ERROR and "did not stop" in r.getMessage()
               for r in caplog.records)
    with server._lock:
        server._destroy()
    assert server._conn is None


def test_lost_client_closes_the_dup(tmp_path: Path, machine: Platform,
                                    conn: tuple[socket.socket, socket.socket]) -> None:
    server, _lib = stub_server(tmp_path, machine, conn)
    try:
        dup = server._conn
        assert dup is not None
        server._lost_client()
        assert server._conn is None and dup.fileno() == -1
        conn[0].close()                      # the library's fd: with ours gone, EOF
        conn[1].settimeout(1)
        assert conn[1].recv(1) == b""
    finally:
        server.close()


class _Holder:
    """Holds the server's context lock on another thread (as the run thread does while
    the library handles a request)."""

    def __init__(self, server: lvu.LibVfioUserServer) -> None:
        self.held, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, args=(server,))
        self.thread.start()
        assert self.held.wait(5)

    def _hold(self, server: lvu.LibVfioUserServer) -> None:
        with server._lock:
            self.held.set()
            self.release.wait(5)

    def done(self) -> None:
        self.release.set()
        self.thread.join()


def _drain(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def test_wake_pipe_written_once_per_queue_fill(tmp_path: Path, machine: Platform,
                                               conn: tuple[socket.socket, socket.socket]
                                               ) -> None:
    server, lib = stub_server(tmp_path, machine, conn)
    try:
        assert not os.get_blocking(server._wake_w) and not os.get_blocking(server._wake_r)
        assert not os.get_inheritable(server._wake_w)
        _drain(server._wake_r)
        holder = _Holder(server)
        try:
            for vector in range(3):
                server.trigger(PciIrq.MSIX, vector)
        finally:
            holder.done()
        assert len(server._pending_irqs) == 3
        assert _drain(server._wake_r) == b"!"                  # empty -> non-empty only
        with server._lock:
            server._flush_irqs()
        assert [args[1] for args in lib.called("vfu_irq_trigger")] == [0, 1, 2]
    finally:
        server.close()
    # closed and forgotten: a wake after close writes to no fd (not a reused number)
    assert server._wake_r == server._wake_w == -1
    r, w = os.pipe()
    try:
        server._wake()
        os.set_blocking(r, False)
        assert _drain(r) == b""
    finally:
        os.close(r)
        os.close(w)


def test_queued_msix_after_lost_client_sets_no_stale_pba_bit(
        tmp_path: Path, machine: Platform, conn: tuple[socket.socket, socket.socket]) -> None:
    server, lib = stub_server(tmp_path, machine, conn)
    try:
        holder = _Holder(server)
        try:
            server.trigger(PciIrq.MSIX, 0)       # queued: the run thread has the lock
        finally:
            holder.done()
        server._lost_client()                    # the reset (from the library) ...
        with server._lock:
            server._flush_irqs()                 # ... then the run thread's flush
        assert not machine.device.irq.pending[PciIrq.MSIX][0]
        assert lib.called("vfu_irq_trigger") == []
    finally:
        server.close()


def test_queued_interrupt_from_before_a_reset_is_dropped(
        tmp_path: Path, machine: Platform, conn: tuple[socket.socket, socket.socket]) -> None:
    server, lib = stub_server(tmp_path, machine, conn)
    try:
        holder = _Holder(server)
        try:
            server.trigger(PciIrq.MSIX, 1)
        finally:
            holder.done()
        machine.device.reset()                           # an FLR between queueing and flushing
        server.trigger(PciIrq.MSIX, 2)           # after it: kept
        with server._lock:
            server._flush_irqs()
        assert [args[1] for args in lib.called("vfu_irq_trigger")] == [2]
        assert not machine.device.irq.pending[PciIrq.MSIX][1]
    finally:
        server.close()


# -- a non-socket file at the socket path is never deleted -----------------------------------------

def test_a_regular_file_at_the_socket_path_is_refused(tmp_path: Path, machine: Platform,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(OSError, match="exists and is not a socket") as exc:
        Server(str(path), machine)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(OSError, match="exists and is not a socket"):
        lvu.LibVfioUserServer(str(path), machine, StubLib())
    assert device_main(["--socket", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: --socket {path}: {path} exists and is not a socket"
    assert path.read_text() == "precious"


def test_a_stale_socket_is_replaced(tmp_path: Path, machine: Platform) -> None:
    path = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(path))
    old.close()
    server = Server(str(path), machine)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        with socket.socket(socket.AF_UNIX) as probe:
            assert probe.connect_ex(str(path)) == 0         # the new server listens there
    finally:
        server.close()


def test_socket_dma_option_needs_the_libvfio_user_backend(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        device_main(["--socket", str(tmp_path / "s.sock"), "--libvfio-user-socket-dma"])
    assert exc.value.code == 2
    assert "goes with --backend libvfio-user" in capsys.readouterr().err
