"""The NVMe personality through a real vfio-user socket, driven as QEMU and a guest's
driver would: config space and regions as a VMM sees them, guest RAM a sealed memfd
DMA_MAP'd with its fd, the controller enabled through BAR0 REGION_WRITEs, Identify, I/O
queues with MSI-X vectors (their eventfds fire), blocks written, read back and found in
the namespace file, Flush; INTx with MSI-X off; FLR and DEVICE_RESET reset the
controller."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from teeio.pcie.config import Reg, Status
from tests.support.lockstep import (
    BAR0,
    CONFIG,
    enable_device,
    event_fired,
    memfd,
    msix_enable,
    ok,
    wait_until,
)
from tests.support.nvme_host import Host, MemfdMemory
from tests.support.servers import RunningServer
from vfio_user_dev import protocol as p
from vfio_user_dev.client import Client, VfioUserError
from vfio_user_dev.config_space import DEVCTL, DOE_CAP, MSIX_CAP
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.spec import CSTS_RDY, IO_QUEUES
from vfio_user_dev.nvme.spec import Reg as NvmeReg
from vfio_user_dev.personality.nvme import nvme_personality
from vfio_user_dev.protocol import Command, IrqSetFlags, PciIrq, PciRegion

pytestmark = [pytest.mark.timeout(30)]

GUEST = 0x1_0000_0000
GUEST_SIZE = 4 << 20
BAR0_ADDR = 0x2_0000_0000          # above 4 GiB: both halves of the 64-bit BAR
BAR2_ADDR = 0xFE00_0000
BLOCKS = 2048                       # a 1 MiB namespace
VECTORS = IO_QUEUES + 2             # completion queues, then DOE
EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
WRITE, READ, FLUSH = 0x01, 0x02, 0x00


class ClientBar0:
    """BAR0 as QEMU reaches it: REGION_READ / REGION_WRITE on the socket."""

    def __init__(self, c: Client) -> None:
        self.c = c

    def read(self, offset: int, size: int) -> bytes:
        return self.c.region_read(BAR0, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.c.region_write(BAR0, offset, data)


@dataclass
class Rig:
    server: RunningServer
    client: Client
    host: Host
    namespace: Path


@pytest.fixture
def nvme_rig(tmp_path: Path) -> Iterator[Rig]:
    path = tmp_path / "ns.img"
    srv = RunningServer(tmp_path / "vfio-user.sock",
                        personality=nvme_personality(Namespace(path, BLOCKS * 512)))
    c = srv.client()
    fd = memfd("nvme-guest", GUEST_SIZE)
    c.dma_map(GUEST, GUEST_SIZE, fd)
    mem = MemfdMemory(fd, GUEST)
    # The VMM assigns the BARs and enables the function.
    for off, value in ((Reg.BAR0, BAR0_ADDR & 0xFFFFFFFF), (Reg.BAR0 + 4, BAR0_ADDR >> 32),
                       (Reg.BAR0 + 8, BAR2_ADDR)):
        c.region_write(CONFIG, off, value.to_bytes(4, "little"))
    enable_device(c)
    yield Rig(srv, c, Host(ClientBar0(c), mem, base=GUEST), path)
    c.close()
    srv.stop()
    os.close(fd)


def cfg(c: Client, off: int, size: int = 4) -> int:
    return int.from_bytes(c.region_read(CONFIG, off, size), "little")


def region_size(c: Client, index: int) -> int:
    body = ok(c, Command.DEVICE_GET_REGION_INFO,
              p.REGION_INFO.pack(p.REGION_INFO.size, 0, index, 0, 0, 0))
    return int(p.REGION_INFO.unpack(body)[4])


# -- what the VMM sees ------------------------------------------------------------------------

def test_config_space_and_regions(nvme_rig: Rig) -> None:
    c = nvme_rig.client
    assert cfg(c, Reg.VENDOR_ID) == 0x7E11_1234
    assert cfg(c, Reg.CLASS_CODE, 3) == 0x010802            # mass storage, NVM, NVMe
    assert cfg(c, Reg.BAR0) == BAR0_ADDR & 0xFFFFFFFF | 0b100    # 64-bit memory BAR
    assert cfg(c, Reg.BAR0 + 4) == BAR0_ADDR >> 32
    assert cfg(c, Reg.BAR0 + 8) == BAR2_ADDR
    # BAR sizing: 16 KiB, 64-bit
    c.region_write(CONFIG, Reg.BAR0, b"\xff" * 4)
    c.region_write(CONFIG, Reg.BAR0 + 4, b"\xff" * 4)
    assert (cfg(c, Reg.BAR0), cfg(c, Reg.BAR0 + 4)) == (0xFFFF_C004, 0xFFFF_FFFF)
    # MSI-X: a vector per completion queue and DOE's above them, table and PBA in BAR2
    assert cfg(c, MSIX_CAP + 2, 2) & 0x7FF == VECTORS - 1
    assert cfg(c, MSIX_CAP + 4) & 7 == 2 and cfg(c, MSIX_CAP + 8) & 7 == 2
    assert cfg(c, DOE_CAP + 4) >> 1 & 0x7FF == IO_QUEUES + 1
    assert [region_size(c, i) for i in range(6)] == [0x4000, 0, 0x1000, 0, 0, 0]
    body = ok(c, Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(p.IRQ_INFO.size, 0,
                                                              PciIrq.MSIX, 0))
    assert p.IRQ_INFO.unpack(body)[3] == VECTORS


# -- a driver's life ----------------------------------------------------------------------------

def test_identify_io_queues_msix_and_flush(nvme_rig: Rig) -> None:
    c, host, srv = nvme_rig.client, nvme_rig.host, nvme_rig.server
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(VECTORS)]
    try:
        for start in range(0, VECTORS, 8):       # at most max_msg_fds a message, as QEMU
            batch = fds[start:start + 8]
            c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, start, len(batch), batch)
        msix_enable(c)
        host.enable()
        assert host.r32(NvmeReg.CSTS) & CSTS_RDY
        data = host.data
        assert host.call(host.admin, 0x06, prp1=data, cdw=(1,)) == (0, 0)     # controller
        ident = host.bus.read(data, 4096)
        assert ident[24:40] == b"TEEIO TDISP NVMe"
        assert ident[4:20] == f"{srv.device.serial:016X}".encode()
        assert host.call(host.admin, 0x06, nsid=1, prp1=data, cdw=(0,)) == (0, 0)
        assert struct.unpack_from("<Q", host.bus.read(data, 8))[0] == BLOCKS     # NSZE
        assert event_fired(fds[0], 1.0) > 0                                    # admin CQ
        q = host.create_io_queue(1, 16, vector=3)
        pattern = bytes(range(256)) * 16
        host.bus.write(data, pattern)
        assert host.call(q, WRITE, nsid=1, prp1=data, cdw=(10, 0, 7)) == (0, 0)
        assert event_fired(fds[3], 1.0) > 0                                    # its vector
        out = data + 0x10000
        assert host.call(q, READ, nsid=1, prp1=out, cdw=(10, 0, 7)) == (0, 0)
        assert host.bus.read(out, 4096) == pattern
        with open(nvme_rig.namespace, "rb") as f:
            f.seek(10 * 512)
            assert f.read(4096) == pattern                                     # on the media
        assert host.call(q, FLUSH, nsid=1) == (0, 0)
        stats = srv.machine.stats()
        nvme = stats["nvme"]
        assert isinstance(nvme, dict)
        assert stats["personality"] == "nvme"
        assert nvme["namespace"]["flushes"] == 1 and nvme["io_sqs"] == [1]
        assert nvme["dma_writes"] > 0 and nvme["dma_refused"] == 0
        assert stats["irq_signalled_msix"] >= 5 and stats["irq_signalled_intx"] == 0
        assert event_fired(fds[1], 0.05) == 0                                  # unused vector
    finally:
        for fd in fds:
            os.close(fd)


def test_intx_when_msix_is_off(nvme_rig: Rig) -> None:
    c, host = nvme_rig.client, nvme_rig.host
    intx = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        c.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [intx])
        host.enable()
        cid = host.submit(host.admin, 0x06, prp1=host.data, cdw=(1,))
        assert event_fired(intx, 2.0) > 0
        wait_until(lambda: cfg(c, Reg.STATUS, 2) & Status.INTERRUPT_STATUS,
                   "Interrupt Status while the admin CQ holds an entry")
        assert host.wait(host.admin, cid) == (0, 0)          # the host consumed it
        assert not cfg(c, Reg.STATUS, 2) & Status.INTERRUPT_STATUS
    finally:
        os.close(intx)


def test_a_dma_outside_guest_memory_fails_the_command(nvme_rig: Rig) -> None:
    host = nvme_rig.host
    host.enable()
    status, _ = host.call(host.admin, 0x06, prp1=0x7000_0000, cdw=(1,))  # nothing mapped
    assert status == 0x04                                      # Data Transfer Error
    nvme = nvme_rig.server.machine.stats()["nvme"]
    assert isinstance(nvme, dict) and nvme["dma_faults"] == 1


@pytest.mark.parametrize("how", ["initiate_flr", "device_reset"])
def test_reset_resets_the_controller(nvme_rig: Rig, how: str) -> None:
    c, host = nvme_rig.client, nvme_rig.host
    host.enable()
    host.create_io_queue(1, 4)
    assert host.r32(NvmeReg.CSTS) & CSTS_RDY
    if how == "initiate_flr":
        devctl = cfg(c, DEVCTL, 2)
        c.region_write(CONFIG, DEVCTL, (devctl | 1 << 15).to_bytes(2, "little"))
    else:
        c.reset()
    # BARs and Command are back to their defaults: the VMM restores them, the controller
    # is not ready and has forgotten its queues and registers.
    for off, value in ((Reg.BAR0, BAR0_ADDR & 0xFFFFFFFF), (Reg.BAR0 + 4, BAR0_ADDR >> 32)):
        c.region_write(CONFIG, off, value.to_bytes(4, "little"))
    enable_device(c)
    assert host.r32(NvmeReg.CSTS) == 0 and host.r32(NvmeReg.CC) == 0
    assert host.r32(NvmeReg.AQA) == 0
    ctl = nvme_rig.server.device.personality.controller  # type: ignore[attr-defined]
    assert ctl.status()["io_sqs"] == []
    # and it comes back with a fresh admin queue pair
    fresh = Host(ClientBar0(c), host.bus, base=GUEST)
    fresh.enable()
    assert fresh.call(fresh.admin, 0x06, prp1=fresh.data, cdw=(1,)) == (0, 0)


def test_msix_table_is_region_bar2(nvme_rig: Rig) -> None:
    """The MSI-X table is served as region BAR2 (BAR1 is BAR0's upper half)."""
    c = nvme_rig.client
    c.region_write(PciRegion.BAR2, 0, b"\x11\x22\x33\x44")
    assert c.region_read(PciRegion.BAR2, 0, 4) == b"\x11\x22\x33\x44"
    with pytest.raises(VfioUserError):
        c.region_read(PciRegion.BAR1, 0, 4)
