"""Lock-step helpers for the vfio-user server tests (libvfio-user ``test/py`` style).

Each helper sends one message and reads the very next message off the socket,
so a test sees exactly what the server answered and in which order.  Every wait
is a poll with a deadline: nothing sleeps and hopes.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from teeio.device_regs import CMD_GO, DEVICE_ID_REG_VALUE, R, St
from teeio.pcie.config import Command as PciCommand
from teeio.pcie.config import Reg
from vfio_user_dev import protocol as p
from vfio_user_dev.client import Client
from vfio_user_dev.config_space import MSIX_CAP, MSIX_ENABLE
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.protocol import Command, Flags, Header, PciRegion

BAR0 = PciRegion.BAR0
BAR1 = PciRegion.BAR1
CONFIG = PciRegion.CONFIG
TIMEOUT = 3.0
MEM_BM = PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER

T = TypeVar("T")


def wait_until(pred: Callable[[], T], what: str, timeout: float = TIMEOUT,
               interval: float = 0.005) -> T:
    """Poll *pred* until it returns something truthy (returned) or fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- raw lock-step messaging ------------------------------------------------------------------

def next_id(c: Client) -> int:
    return next(c._ids) & 0xFFFF


def recv(c: Client, timeout: float = TIMEOUT) -> tuple[Header, bytes]:
    """The next message from the server, whatever it is (fails if none within *timeout*)."""
    r, _, _ = select.select([c.sock], [], [], timeout)
    assert r, f"no message from the server within {timeout}s"
    c.sock.settimeout(timeout)
    try:
        return c.recv_message()
    finally:
        c.sock.settimeout(None)


def nothing_pending(c: Client, timeout: float = 0.05) -> bool:
    r, _, _ = select.select([c.sock], [], [], timeout)
    return not r


def send(c: Client, command: int, payload: bytes = b"", flags: int = 0,
         fds: list[int] | None = None, msg_id: int | None = None) -> int:
    msg_id = next_id(c) if msg_id is None else msg_id
    c.send_raw(p.message(msg_id, command, payload, flags), fds)
    return msg_id


def xact(c: Client, command: int, payload: bytes = b"", flags: int = 0,
         fds: list[int] | None = None) -> tuple[Header, bytes]:
    """Send one command; the very next message must be its reply (same id and command)."""
    msg_id = send(c, command, payload, flags, fds)
    hdr, body = recv(c)
    assert hdr.is_reply, f"expected a reply to {command}, got command {hdr.command_name()}"
    assert hdr.msg_id == msg_id, f"reply id {hdr.msg_id} != request id {msg_id}"
    assert hdr.command == command, f"reply command {hdr.command} != {command}"
    assert hdr.size == p.HEADER_SIZE + len(body)
    return hdr, body


def ok(c: Client, command: int, payload: bytes = b"",
       fds: list[int] | None = None) -> bytes:
    hdr, body = xact(c, command, payload, fds=fds)
    assert not hdr.is_error, f"{hdr.command_name()} failed with errno {hdr.error}"
    assert hdr.error == 0
    return body


def expect_error(c: Client, command: int, payload: bytes, err: int, flags: int = 0,
                 fds: list[int] | None = None) -> Header:
    hdr, body = xact(c, command, payload, flags, fds)
    assert hdr.is_error, f"{hdr.command_name()} succeeded, expected errno {err}"
    assert hdr.error == err, f"errno {hdr.error}, expected {err}"
    assert hdr.flags == Flags.REPLY | Flags.ERROR
    assert body == b""
    return hdr


def region_read_payload(region: int, offset: int, count: int) -> bytes:
    return p.RegionAccess(offset, region, count).encode()


def region_write_payload(region: int, offset: int, data: bytes) -> bytes:
    return p.RegionAccess(offset, region, len(data), data).encode()


def read_id(c: Client) -> int:
    """Lock-step REGION_READ of BAR0 ID: proves the server is alive and in sync."""
    body = ok(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4))
    acc = p.RegionAccess.decode(body, with_data=True)
    assert (acc.offset, acc.region, acc.count) == (R.ID, BAR0, 4)
    value = int.from_bytes(acc.data, "little")
    assert value == DEVICE_ID_REG_VALUE
    return value


# -- device programming (through Client, which also serves DMA requests) ------------------------

def enable_device(c: Client, extra: int = 0) -> None:
    c.region_write(CONFIG, Reg.COMMAND, (MEM_BM | extra).to_bytes(2, "little"))


def msix_enable(c: Client, on: bool = True) -> None:
    """MSI-X Enable in Message Control, as the guest sets it before QEMU hands over the
    vectors' eventfds.  The pure-Python transport signals MSI-X once it has eventfds;
    with libvfio-user (which keeps them) the device follows this bit."""
    c.region_write(CONFIG, MSIX_CAP + 2, (MSIX_ENABLE if on else 0).to_bytes(2, "little"))


def start_job(c: Client, op: int, *, src: int = 0, dst: int = 0, length: int = 0,
              pattern: int = 0) -> None:
    for reg, value in ((R.DMA_SRC_LO, src & 0xFFFFFFFF), (R.DMA_SRC_HI, src >> 32),
                       (R.DMA_DST_LO, dst & 0xFFFFFFFF), (R.DMA_DST_HI, dst >> 32),
                       (R.DMA_LEN, length), (R.DMA_PATTERN, pattern)):
        c.write32(BAR0, reg, value)
    c.write32(BAR0, R.DMA_CMD, CMD_GO | op)


def wait_idle(c: Client, timeout: float = TIMEOUT) -> int:
    """Poll STATUS (serving any DMA requests meanwhile) until BUSY clears; returns STATUS."""
    deadline = time.monotonic() + timeout
    while True:
        st = c.read32(BAR0, R.STATUS)
        if not st & St.BUSY:
            return st
        assert time.monotonic() < deadline, f"job still busy after {timeout}s"
        time.sleep(0.002)


def run_job(c: Client, op: int, **kw: int) -> int:
    start_job(c, op, **kw)
    return wait_idle(c)


def run_job_quiet(c: Client, device: TeeIoDevice, op: int, timeout: float = TIMEOUT,
                  **kw: int) -> int:
    """Like :func:`run_job`, but while the job runs the client sends nothing: it only
    answers the server's DMA_READ/DMA_WRITE, until the engine is idle (watched in-process);
    then STATUS.  libvfio-user waits for a DMA reply on the command socket (no twin socket
    here), so a client command in flight at that moment would be taken for the reply."""
    start_job(c, op, **kw)
    deadline = time.monotonic() + timeout
    while device.r[R.STATUS] & St.BUSY:
        assert time.monotonic() < deadline, f"job still busy after {timeout}s"
        c.serve_pending(0.005)
    return c.read32(BAR0, R.STATUS)


def error_code(status: int) -> int:
    return (status >> 8) & 0xFF


# -- host resources -----------------------------------------------------------------------------

GUEST = 0x1_0000_0000  # above 4 GiB: exercises the *_HI address registers
SIZE = 0x10000
RW = p.DmaFlags.READ | p.DmaFlags.WRITE


def memfd(name: str, size: int) -> int:
    """Guest RAM as QEMU's memory-backend-memfd passes it: sealed against resizing."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    return fd


def map_memfd(c: Client, name: str, address: int = GUEST, size: int = SIZE,
              flags: int = RW) -> int:
    """Map a fresh memfd at *address*; returns our fd (the server got its own copy)."""
    fd = memfd(name, size)
    ok(c, Command.DMA_MAP, p.DmaMap(flags, 0, address, size).encode(), fds=[fd])
    return fd


def fds_named(substr: str) -> int:
    """How many fds of this process point at something whose link contains *substr*."""
    n = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            if substr in os.readlink(f"/proc/self/fd/{entry}"):
                n += 1
        except OSError:
            pass
    return n


def mapped(substr: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(substr in line for line in f)


def event_fired(fd: int, timeout: float) -> int:
    """Counter of eventfd *fd* if it becomes readable within *timeout* (consumed), else 0."""
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return 0
    return int(struct.unpack("<Q", os.read(fd, 8))[0])
