"""The vfio-user server (``vfio_user_dev.server.Server``, in-process thread, real UNIX
socket) driven by mutated message sequences built from valid templates: header fields,
declared sizes, payload bytes, fds attached or absent.  After each input the server must
answer a VERSION on a fresh connection (liveness), and once the client is gone the
process's fd count and RSS must be back within bounds."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import threading
import time

from fuzz.runner import Bytes, check, chunks, frames
from vfio_user_dev import protocol as p
from vfio_user_dev.platform import Platform
from vfio_user_dev.server import Server, send_all

KIND = "stateful"
PING_ID = 0xFFFF
TIMEOUT = 5.0
MAX_SIZE = p.MAX_MESSAGE + 64
FD_SLACK = 4
RSS_SLACK_KB = 256 * 1024
GUEST = 0x1_0000_0000
C = p.Command


class World:
    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fuzz-vfio-")
        self.path = f"{self.tmp}/vfio.sock"
        self.platform = Platform()
        self.server = Server(self.path, self.platform)
        threading.Thread(target=self.server.serve_forever, daemon=True,
                         name="fuzz-vfio-server").start()
        self.memfd = os.memfd_create("fuzz-guest")
        os.ftruncate(self.memfd, 0x10000)
        self.baseline_fds = 0
        self.baseline_rss = 0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def templates() -> list[tuple[int, bytes, int]]:
    """(command, payload, fds to attach) of valid requests."""
    flags = int(p.IrqSetFlags.DATA_EVENTFD | p.IrqSetFlags.ACTION_TRIGGER)
    return [
        (C.VERSION, p.Version(0, 0, {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}).encode()
         + b"\0", 0),
        (C.DMA_MAP, p.DmaMap(3, 0, GUEST, 0x10000).encode(), 1),
        (C.DMA_UNMAP, p.DmaUnmap(24, 0, GUEST, 0x10000).encode(), 0),
        (C.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0), 0),
        (C.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 0, 0, 0, 0), 0),
        (C.DEVICE_GET_REGION_IO_FDS, p.REGION_INFO.pack(32, 0, 0, 0, 0, 0), 0),
        (C.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, 2, 0), 0),
        (C.DEVICE_SET_IRQS, p.IrqSet(flags, 2, 0, 1).encode(), 1),
        (C.REGION_READ, p.RegionAccess(0, p.PciRegion.CONFIG, 4).encode(), 0),
        (C.REGION_WRITE, p.RegionAccess(4, p.PciRegion.CONFIG, 2, b"\6\0").encode(), 0),
        (C.REGION_READ, p.RegionAccess(0, p.PciRegion.BAR0, 4).encode(), 0),
        (C.REGION_WRITE, p.RegionAccess(0x10, p.PciRegion.BAR0, 4, b"\1\0\0\0").encode(), 0),
        (C.DEVICE_RESET, b"", 0),
        (C.DIRTY_PAGES, b"", 0),
    ]


_WORLD: list[World] = []


def world() -> World:
    if not _WORLD:
        w = World()
        _WORLD.append(w)
        one_input(b"")                    # warm up: imports, first connection
        w.baseline_fds, w.baseline_rss = fd_count(), rss_kb()
    return _WORLD[0]


def seeds() -> list[bytes]:
    world()
    out = []
    for i in range(len(templates())):
        out.append(frames([bytes((i, 0))]))
    out.append(frames([bytes((i, 0)) for i in range(len(templates()))]))
    out.append(frames([bytes((1, 4)), bytes((7, 4)), bytes((2, 0))]))
    return out


class Client:
    def __init__(self, w: World) -> None:
        self.w = w
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(w.path)

    def send(self, data: bytes, nfds: int) -> None:
        fds = [os.dup(self.w.memfd) if i == 0 else os.eventfd(0) for i in range(nfds)]
        try:
            send_all(self.sock, data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise ConnectionError("server closed the connection")
            buf += got
        return buf

    def ping(self) -> None:
        """VERSION answered, answering the server's own requests (DMA) meanwhile."""
        self.sock.sendall(p.message(PING_ID, C.VERSION, p.Version(0, 0).encode()))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            hdr = p.Header.decode(self.recv_exact(p.HEADER_SIZE))
            self.recv_exact(max(0, hdr.size - p.HEADER_SIZE))
            if not hdr.is_reply:
                self.sock.sendall(p.error_reply(hdr, errno.EFAULT))
            elif hdr.msg_id == PING_ID and hdr.command == C.VERSION:
                check(not hdr.is_error, f"VERSION refused: errno {hdr.error}")
                return
        raise AssertionError("no answer to VERSION")

    def close(self) -> None:
        self.sock.close()


def build(b: Bytes, msg_id: int) -> tuple[bytes, int]:
    tpl = templates()
    command, payload, nfds = tpl[b.u8() % len(tpl)]
    mut = b.u8()
    flags = 0
    if mut & 1:
        flags = b.u8() | b.u8() << 8
    if mut & 2:
        command = b.u16()
    if mut & 4:
        nfds = b.u8() % 3
    if mut & 8:
        payload = b.patch(payload)
    if mut & 16:
        payload = b.chunk()
    size = p.HEADER_SIZE + len(payload)
    if mut & 32:
        size = b.u32()
        if size > p.MAX_MESSAGE:
            size = p.MAX_MESSAGE + 1 + size % 64
    payload = payload[:max(0, size - p.HEADER_SIZE)]
    payload += bytes(max(0, size - p.HEADER_SIZE - len(payload)))
    return p.Header(msg_id, command, size, flags).encode() + payload, nfds


def one_input(data: bytes) -> None:
    w = world()
    c = Client(w)
    try:
        c.sock.sendall(p.message(1, C.VERSION, p.Version(0, 0).encode()))
        for i, chunk in enumerate(chunks(data, 32)):
            msg, nfds = build(Bytes(chunk), 2 + i)
            try:
                c.send(msg, nfds)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            c.ping()
        except (ConnectionError, TimeoutError, OSError):
            c.close()
            c = Client(w)                          # the server may close; never go deaf
            c.ping()
    finally:
        c.close()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and (w.server.connection is not None
                                           or w.platform.dma.snapshot()):
        time.sleep(0.001)
    check(w.server.connection is None, "server still holds the closed connection")
    if w.baseline_fds:
        check(fd_count() <= w.baseline_fds + FD_SLACK,
              f"fd count {fd_count()} > baseline {w.baseline_fds} + {FD_SLACK}")
        check(rss_kb() <= w.baseline_rss + RSS_SLACK_KB, f"RSS {rss_kb()} kB")

