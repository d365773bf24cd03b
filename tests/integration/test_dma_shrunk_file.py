"""A client that shrinks its guest-memory file after DMA_MAP cannot kill the device server.

A shared mapping of a file beyond its (new) end raises SIGBUS on access.  The server maps
only files that cannot shrink (a memfd sealed with F_SEAL_SHRINK, as QEMU passes) and
reaches any other through the fd, so a shrunken file is a DMA fault the job reports.
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from teeio.device_regs import DmaError, Op, R, St
from tests.integration.device_process import ServerProcess
from tests.support.lockstep import BAR0, enable_device, error_code, ok, run_job
from vfio_user_dev import protocol as p
from vfio_user_dev.client import Client
from vfio_user_dev.dma import DmaFault, DmaMapSet
from vfio_user_dev.dma_file import FileMemory

pytestmark = [pytest.mark.timeout(60)]

GUEST = 0x1_0000_0000
SIZE = 0x10000
RW = p.DmaFlags.READ | p.DmaFlags.WRITE


def memfd(sealed: bool) -> int:
    fd = os.memfd_create("teeio-shrink", os.MFD_ALLOW_SEALING if sealed else 0)
    os.ftruncate(fd, SIZE)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.fixture
def bare_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    sock = tmp_path / "vfio-user.sock"
    dev = ServerProcess(tmp_path / "device.log", ["--socket", str(sock)], [sock])
    yield dev, sock
    dev.stop()


def test_shrinking_the_mapped_file_faults_the_job_and_the_server_lives(
        bare_server: tuple[ServerProcess, Path]) -> None:
    dev, sock = bare_server
    fd = memfd(sealed=False)
    c = Client.connect(str(sock))
    try:
        c.version()
        ok(c, p.Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, SIZE).encode(), fds=[fd])
        enable_device(c)
        assert run_job(c, Op.FILL, dst=GUEST, length=64, pattern=0x11223344) == St.DONE
        assert os.pread(fd, 4, 0) == bytes.fromhex("44332211")

        os.ftruncate(fd, 0)                      # the attack: the file under the map shrinks
        st = run_job(c, Op.FILL, dst=GUEST + 0x8000, length=64, pattern=1)
        assert st & St.ERROR and error_code(st) == DmaError.FAULT
        st = run_job(c, Op.COPY, src=GUEST, dst=GUEST + 0x100, length=64)
        assert st & St.ERROR and error_code(st) == DmaError.FAULT
        assert os.fstat(fd).st_size == 0         # a refused write did not regrow the file
        assert c.read32(BAR0, R.DMA_JOBS) >= 1   # the same connection is still served
    finally:
        c.close()
        os.close(fd)
    assert dev.proc.poll() is None, dev.log_text()
    assert dev.stop() != -signal.SIGBUS


@pytest.mark.parametrize("sealed", [True, False])
def test_only_files_that_cannot_shrink_are_mapped(sealed: bool) -> None:
    fd = memfd(sealed)
    dma = DmaMapSet()
    dma.map(GUEST, SIZE, RW, 0, os.dup(fd))
    try:
        region = dma._find(GUEST, 0)
        assert isinstance(region.mem, FileMemory) is not sealed
        dma.write(GUEST + 8, b"abcd")
        assert os.pread(fd, 4, 8) == b"abcd" and dma.read(GUEST + 8, 4) == b"abcd"
        if not sealed:
            os.ftruncate(fd, 4)
            with pytest.raises(DmaFault, match="shrunk"):
                dma.read(GUEST + 8, 4)
            with pytest.raises(DmaFault, match="shrunk"):
                dma.write(GUEST + 8, b"x")
    finally:
        dma.clear()
        os.close(fd)


def test_unmap_closes_the_fd_of_an_unmapped_file() -> None:
    fd = memfd(sealed=False)
    dma = DmaMapSet()
    dma.map(GUEST, SIZE, RW, 0, os.dup(fd))
    held = dma._find(GUEST, 0).mem
    assert isinstance(held, FileMemory) and os.fstat(held.fd)
    dma.unmap(GUEST, SIZE)
    assert held.fd == -1
    with pytest.raises(DmaFault):
        dma.read(GUEST, 1)
    os.close(fd)
