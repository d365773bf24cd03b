"""The DOE socket server (``vfio_user_dev.doe_socket.DoeSocketServer``, real UNIX socket,
the DSM's dispatcher behind it) driven by mutated message sequences: command, transport,
declared size and payload (DOE objects from templates).  Every message gets exactly one
reply; only CONTINUE, SHUTDOWN and a foreign transport end the connection (anything else
that does is a handler's exception); a TEST is answered after each input."""

from __future__ import annotations

import socket
import tempfile
import time
from functools import lru_cache

from fuzz import templates as T
from fuzz.harnesses.vfio_server import FD_SLACK, RSS_SLACK_KB, fd_count, rss_kb
from fuzz.runner import Bytes, check, chunks, frames
from teeio.doe import (
    CLIENT_HELLO,
    PCI_SIG_VENDOR_ID,
    SERVER_HELLO,
    SOCKET_HEADER,
    SOCKET_MAX_PAYLOAD,
    DataObjectType,
    DiscoveryRequest,
    DoeObject,
    SocketCommand,
    SocketHeader,
    SocketTransport,
    pad_dw,
)
from vfio_user_dev.doe_socket import DoeSocketServer

KIND = "stateful"
TIMEOUT = 5.0
DOE = SocketTransport.PCI_DOE


class World:
    def __init__(self) -> None:
        self.rig = T.rig()
        self.path = tempfile.mkdtemp(prefix="fuzz-doe-") + "/doe.sock"
        self.server = DoeSocketServer(self.rig.machine.device.doe, path=self.path).start()
        self.baseline_fds = 0
        self.baseline_rss = 0


_WORLD: list[World] = []


def world() -> World:
    if not _WORLD:
        w = World()
        _WORLD.append(w)
        one_input(b"")
        w.baseline_fds, w.baseline_rss = fd_count(), rss_kb()
    return _WORLD[0]


@lru_cache(maxsize=1)
def payloads() -> tuple[tuple[int, bytes], ...]:
    objs = [DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY,
                      DiscoveryRequest(i).encode()).encode() for i in range(3)]
    objs += [DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM, pad_dw(q)).encode()
             for q, _ in T.spdm_transcript()]
    return ((SocketCommand.TEST, CLIENT_HELLO), *((SocketCommand.NORMAL, o) for o in objs),
            (SocketCommand.CONTINUE, b""), (SocketCommand.SHUTDOWN, b""), (0x77, b""))


def seeds() -> list[bytes]:
    world()
    n = len(payloads())
    return [frames([bytes((i, 0))]) for i in range(n)] + [
        frames([bytes((i, 0)) for i in range(1, n - 3)])]


def connect(w: World) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(w.path)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError("closed")
        buf += got
    return buf


def reply(s: socket.socket) -> tuple[SocketHeader, bytes]:
    h = SocketHeader.decode(recv_exact(s, SOCKET_HEADER.size))
    return h, recv_exact(s, h.size)


def one_input(data: bytes) -> None:
    w = world()
    s = connect(w)
    try:
        for chunk in chunks(data, 32):
            b = Bytes(chunk)
            tpl = payloads()
            command, payload = tpl[b.u8() % len(tpl)]
            mut = b.u8()
            transport = b.u32() if mut & 1 else DOE
            if mut & 2:
                command = b.u32()
            if mut & 4:
                payload = b.patch(payload)
            if mut & 8:
                payload = b.chunk()
            size = len(payload)
            if mut & 16:
                size = b.u32()
                if size > SOCKET_MAX_PAYLOAD:
                    size = SOCKET_MAX_PAYLOAD + 1 + size % 64
                payload = payload[:size] + bytes(max(0, size - len(payload)))
            s.sendall(SocketHeader(command, transport, size).encode() + payload)
            h, _ = reply(s)
            ends = (transport != DOE or command in (SocketCommand.CONTINUE,
                                                    SocketCommand.SHUTDOWN))
            if ends:
                check(s.recv(1) == b"", "connection kept after a closing reply")
                s.close()
                s = connect(w)
                continue
        s.sendall(SocketHeader(SocketCommand.TEST, DOE, len(CLIENT_HELLO)).encode()
                  + CLIENT_HELLO)
        try:
            h, answer = reply(s)
        except ConnectionError:
            raise AssertionError("the server dropped the connection (a handler raised?)") \
                from None
        check(h.command == SocketCommand.TEST and answer == SERVER_HELLO, f"TEST -> {h}")
    finally:
        s.close()
    deadline = time.monotonic() + TIMEOUT
    while (w.baseline_fds and time.monotonic() < deadline
           and fd_count() > w.baseline_fds + FD_SLACK):
        time.sleep(0.001)          # the server closes its end in its own time
    if w.baseline_fds:
        check(fd_count() <= w.baseline_fds + FD_SLACK, f"fd count {fd_count()}")
        check(rss_kb() <= w.baseline_rss + RSS_SLACK_KB, f"RSS {rss_kb()} kB")
