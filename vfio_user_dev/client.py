"""A small synchronous vfio-user client, for tests, benchmarks and scripting.

It plays QEMU's part: negotiates VERSION, maps memory (with an fd, or without
one, then answering the server's DMA_READ / DMA_WRITE from a local buffer),
accesses regions and sets IRQ eventfds.  Server-initiated DMA requests that
arrive while the client waits for a reply are served on the spot, as the
protocol requires.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from vfio_user_dev import protocol as p
from vfio_user_dev.protocol import Command, Header
from vfio_user_dev.server import recv_exact, send_all


class VfioUserError(Exception):
    def __init__(self, header: Header) -> None:
        super().__init__(f"{header.command_name()} failed: errno {header.error} "
                         f"({errno.errorcode.get(header.error, '?')})")
        self.errno = header.error


@dataclass
class LocalMemory:
    """Guest memory the client serves through DMA_READ / DMA_WRITE (no fd)."""

    base: int
    data: bytearray
    reads: int = 0
    writes: int = 0

    def contains(self, addr: int, n: int) -> bool:
        return self.base <= addr and addr + n <= self.base + len(self.data)


@dataclass
class Client:
    sock: socket.socket
    memories: list[LocalMemory] = field(default_factory=list)
    on_server_request: Callable[[Header, bytes], bool] | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def connect(cls, path: str) -> Client:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return cls(s)

    def close(self) -> None:
        self.sock.close()

    # -- raw messaging ------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        send_all(self.sock, data, fds)

    def recv_message(self) -> tuple[Header, bytes]:
        fds: list[int] = []
        hdr = Header.decode(recv_exact(self.sock, p.HEADER_SIZE, fds))
        payload = recv_exact(self.sock, hdr.size - p.HEADER_SIZE, fds) \
            if hdr.size > p.HEADER_SIZE else b""
        for fd in fds:
            os.close(fd)
        return hdr, payload

    def call(self, command: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = 0, check: bool = True) -> tuple[Header, bytes]:
        msg_id = next(self._ids) & 0xFFFF
        self.send_raw(p.message(msg_id, command, payload, flags), fds)
        if flags & p.Flags.NO_REPLY:
            return Header(msg_id, command, 0, flags), b""
        while True:
            hdr, body = self.recv_message()
            if not hdr.is_reply:
                self._serve(hdr, body)
                continue
            if hdr.msg_id != msg_id:
                raise AssertionError(f"reply id {hdr.msg_id} to request {msg_id}")
            if check and hdr.is_error:
                raise VfioUserError(hdr)
            return hdr, body

    def _serve(self, hdr: Header, body: bytes) -> None:
        if self.on_server_request is not None and self.on_server_request(hdr, body):
            return
        if hdr.command not in (Command.DMA_READ, Command.DMA_WRITE):
            self.send_raw(p.error_reply(hdr, errno.ENOSYS))
            return
        is_write = hdr.command == Command.DMA_WRITE
        addr, count, data = p.decode_dma_rw(body, with_data=is_write)
        mem = next((m for m in self.memories if m.contains(addr, count)), None)
        if mem is None:
            self.send_raw(p.error_reply(hdr, errno.EFAULT))
            return
        off = addr - mem.base
        if is_write:
            mem.writes += 1
            mem.data[off:off + count] = data
            # The reply carries the address and count (libvfio-user checks them).
            self.send_raw(p.reply(hdr, p.encode_dma_rw(addr, count)))
        else:
            mem.reads += 1
            chunk = bytes(mem.data[off:off + count])
            self.send_raw(p.reply(hdr, p.encode_dma_rw(addr, count, chunk)))

    def serve_pending(self, timeout: float) -> int:
        """Serve server requests arriving within *timeout* seconds; returns how many."""
        served = 0
        self.sock.settimeout(timeout)
        try:
            while True:
                hdr, body = self.recv_message()
                self._serve(hdr, body)
                served += 1
        except TimeoutError:
            return served
        finally:
            self.sock.settimeout(None)

    # -- commands -----------------------------------------------------------------------
    def version(self, caps: dict[str, object] | None = None) -> p.Version:
        caps = caps if caps is not None else {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20,
                                              "pgsizes": 4096, "max_dma_maps": 65535}
        _, body = self.call(Command.VERSION, p.Version(0, 0, caps).encode())
        return p.Version.decode(body)

    def dma_map(self, address: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = p.DmaFlags.READ | p.DmaFlags.WRITE) -> None:
        self.call(Command.DMA_MAP, p.DmaMap(flags, offset, address, size).encode(),
                  [fd] if fd is not None else None)

    def map_local(self, address: int, size: int) -> LocalMemory:
        mem = LocalMemory(address, bytearray(size))
        self.memories.append(mem)
        self.dma_map(address, size)
        return mem

    def dma_unmap(self, address: int, size: int) -> None:
        self.call(Command.DMA_UNMAP, p.DmaUnmap(p.DMA_UNMAP.size, 0, address, size).encode())

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        _, body = self.call(Command.REGION_READ, p.RegionAccess(offset, region, count).encode())
        return p.RegionAccess.decode(body, with_data=True).data

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        self.call(Command.REGION_WRITE, p.RegionAccess(offset, region, len(data), data).encode(),
                  flags=p.Flags.NO_REPLY if posted else 0)

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.region_read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(region, offset, value.to_bytes(4, "little"), posted)

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 fds: list[int] | None = None, data: bytes = b"") -> None:
        self.call(Command.DEVICE_SET_IRQS, p.IrqSet(flags, index, start, count, data).encode(),
                  fds)

    def reset(self) -> None:
        self.call(Command.DEVICE_RESET)
