"""The NVMe controller driven by a minimal host over a fake bus (no VM, no socket)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nvme_host import DATA, FakeBus, Host, make_controller, prp_list
from vfio_user_dev.nvme.controller import NvmeController
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.spec import CAP_VALUE, PAGE, Reg, Status

pytestmark = [pytest.mark.timeout(30)]

Rig = tuple[Host, NvmeController, FakeBus, Namespace]


@pytest.fixture
def controller_rig(tmp_path: Path) -> Iterator[Rig]:
    ctl, bus, ns = make_controller(tmp_path)
    host = Host(ctl, bus)
    yield host, ctl, bus, ns
    ctl.close()
    ns.close()


def test_registers_after_reset(controller_rig: Rig) -> None:
    host, ctl, _, _ = controller_rig
    assert int.from_bytes(ctl.read(Reg.CAP, 8), "little") == CAP_VALUE
    assert host.r32(Reg.VS) == 0x00010400
    assert host.r32(Reg.CSTS) == 0 and host.r32(Reg.CC) == 0
    host.enable()
    assert host.r32(Reg.CSTS) & 1


def test_identify_controller_namespace_and_lists(
        controller_rig: Rig) -> None:
    host, _, bus, ns = controller_rig
    host.enable()
    assert host.call(host.admin, 0x06, prp1=DATA, cdw=(1,)) == (0, 0)
    idc = bus.mem[DATA:DATA + 4096]
    assert idc[24:40] == b"TEEIO TDISP NVMe" and idc[512] == 0x66 and idc[513] == 0x44
    assert struct.unpack_from("<HH", idc, 0) == (0x1234, 0x1234)           # VID = PCI's
    assert struct.unpack_from("<I", idc, 516)[0] == 1                      # NN
    assert host.call(host.admin, 0x06, nsid=1, prp1=DATA, cdw=(0,)) == (0, 0)
    assert struct.unpack_from("<Q", bus.mem, DATA)[0] == ns.blocks         # NSZE
    assert host.call(host.admin, 0x06, nsid=0, prp1=DATA, cdw=(2,)) == (0, 0)
    assert struct.unpack_from("<II", bus.mem, DATA) == (1, 0)
    assert host.call(host.admin, 0x06, nsid=1, prp1=DATA, cdw=(3,)) == (0, 0)
    assert bus.mem[DATA:DATA + 2] == bytes([2, 16])                         # NGUID
    assert host.call(host.admin, 0x06, nsid=2, prp1=DATA, cdw=(0,))[0] == \
        Status.INVALID_NAMESPACE
    assert host.call(host.admin, 0x06, prp1=DATA, cdw=(0x1F,))[0] == Status.INVALID_FIELD


def test_bad_admin_opcode_and_features(
        controller_rig: Rig) -> None:
    host, _, _, _ = controller_rig
    host.enable()
    assert host.call(host.admin, 0x7F)[0] == Status.INVALID_OPCODE
    st, dw0 = host.call(host.admin, 0x09, cdw=(0x07, 63 << 16 | 63))     # Number of Queues
    assert st == 0 and dw0 == (7 << 16 | 7)
    assert host.call(host.admin, 0x0A, cdw=(0x07,)) == (0, 7 << 16 | 7)
    assert host.call(host.admin, 0x09, cdw=(1 << 31 | 0x06, 1))[0] == \
        Status.FEATURE_NOT_SAVEABLE
    assert host.call(host.admin, 0x09, cdw=(0x07, 0xFFFF))[0] == Status.INVALID_FIELD


def test_log_pages(controller_rig: Rig) -> None:
    host, _, bus, _ = controller_rig
    host.enable()
    assert host.call(host.admin, 0x02, prp1=DATA, cdw=(127 << 16 | 0x02,)) == (0, 0)
    assert bus.mem[DATA + 3] == 100                                       # available spare
    assert host.call(host.admin, 0x02, prp1=DATA, cdw=(127 << 16 | 0x03,)) == (0, 0)
    assert bus.mem[DATA] == 1 and bus.mem[DATA + 8:DATA + 16] == b"teeio1.0"
    assert host.call(host.admin, 0x02, prp1=DATA, cdw=(15 << 16 | 0x01,)) == (0, 0)
    assert host.call(host.admin, 0x02, prp1=DATA, cdw=(0x42,))[0] == Status.INVALID_LOG_PAGE


def test_queue_creation_errors(controller_rig: Rig) -> None:
    host, _, _, _ = controller_rig
    host.enable()
    a = host.admin
    assert host.call(a, 0x01, prp1=0x40000, cdw=(15 << 16 | 1, 1 << 16 | 1))[0] == \
        Status.COMPLETION_QUEUE_INVALID
    assert host.call(a, 0x05, prp1=0x48000, cdw=(15 << 16 | 99, 3))[0] == \
        Status.INVALID_QUEUE_IDENTIFIER
    assert host.call(a, 0x05, prp1=0x48000, cdw=(0xFFFF << 16 | 1, 3))[0] == \
        Status.INVALID_QUEUE_SIZE
    assert host.call(a, 0x05, prp1=0x48000, cdw=(15 << 16 | 1, 99 << 16 | 3))[0] == \
        Status.INVALID_INTERRUPT_VECTOR
    assert host.call(a, 0x05, prp1=0x48010, cdw=(15 << 16 | 1, 3))[0] == Status.INVALID_FIELD
    host.create_io_queue(1, 16)
    assert host.call(a, 0x04, cdw=(1,))[0] == Status.INVALID_QUEUE_DELETION
    assert host.call(a, 0x00, cdw=(1,)) == (0, 0)
    assert host.call(a, 0x04, cdw=(1,)) == (0, 0)
    assert host.call(a, 0x00, cdw=(1,))[0] == Status.INVALID_QUEUE_IDENTIFIER


def test_write_read_round_trip_with_prp_lists_across_pages(
        controller_rig: Rig) -> None:
    host, _, bus, ns = controller_rig
    host.enable()
    q = host.create_io_queue(1, 16)
    data = os.urandom(7 * PAGE)
    pages = [DATA + 0x10000 + 2 * PAGE * i for i in range(7)]        # scattered pages
    for i, p in enumerate(pages):
        bus.mem[p:p + PAGE] = data[PAGE * i:PAGE * (i + 1)]
    prp_list(bus, DATA, pages[1:])
    nlb = len(data) // 512
    assert host.call(q, 0x01, nsid=1, prp1=pages[0], prp2=DATA, cdw=(10, 0, nlb - 1)) == (0, 0)
    assert os.pread(ns.fd, len(data), 10 * 512) == data       # in the file before the CQE
    out = DATA + 0x80000
    prp_list(bus, DATA + 0x100, [out + PAGE * i for i in range(1, 7)])
    assert host.call(q, 0x02, nsid=1, prp1=out, prp2=DATA + 0x100,
                     cdw=(10, 0, nlb - 1)) == (0, 0)
    assert bytes(bus.mem[out:out + len(data)]) == data


def test_prp_list_chained_across_list_pages(
        controller_rig: Rig) -> None:
    host, _, bus, ns = controller_rig
    host.enable()
    q = host.create_io_queue(1, 16)
    n_pages = 32                                 # MDTS: 128 KiB
    data = os.urandom(n_pages * PAGE)
    buf = DATA + 0x100000
    bus.mem[buf:buf + len(data)] = data
    list1 = DATA + PAGE - 16                     # a list that starts 2 entries before its end
    list2 = DATA + 4 * PAGE
    prp_list(bus, list1, [buf + PAGE, list2])
    prp_list(bus, list2, [buf + PAGE * i for i in range(2, n_pages)])
    assert host.call(q, 0x01, nsid=1, prp1=buf, prp2=list1,
                     cdw=(0, 0, len(data) // 512 - 1)) == (0, 0)
    assert os.pread(ns.fd, len(data), 0) == data


@pytest.mark.parametrize("prp1, prp2, why", [
    (DATA + 2, 0, "PRP1 not dword aligned"),
    (DATA, DATA + 0x10, "PRP2 page with an offset"),
])
def test_bad_prps_are_prp_offset_invalid(controller_rig: Rig,
                                         prp1: int, prp2: int, why: str) -> None:
    host, _, _, _ = controller_rig
    host.enable()
    q = host.create_io_queue(1, 16)
    assert host.call(q, 0x02, nsid=1, prp1=prp1, prp2=prp2, cdw=(0, 0, 15))[0] == \
        Status.PRP_OFFSET_INVALID, why


def test_io_errors(controller_rig: Rig) -> None:
    host, _, bus, ns = controller_rig
    host.enable()
    q = host.create_io_queue(1, 16)
    assert host.call(q, 0x02, nsid=1, prp1=DATA, cdw=(ns.blocks - 1, 0, 1))[0] == \
        Status.LBA_OUT_OF_RANGE
    assert host.call(q, 0x02, nsid=2, prp1=DATA, cdw=(0, 0, 0))[0] == Status.INVALID_NAMESPACE
    assert host.call(q, 0x55, nsid=1)[0] == Status.INVALID_OPCODE
    assert host.call(q, 0x02, nsid=1, prp1=DATA, flags=0x40, cdw=(0, 0, 0))[0] == \
        Status.INVALID_FIELD
    assert host.call(q, 0x02, nsid=1, prp1=len(bus.mem), cdw=(0, 0, 0))[0] == \
        Status.DATA_TRANSFER_ERROR
    assert host.call(q, 0x01, nsid=1, prp1=DATA, cdw=(0, 0, 0xFFFF))[0] == \
        Status.LBA_OUT_OF_RANGE


def test_flush_write_zeroes_and_dsm(controller_rig: Rig) -> None:
    host, _, bus, ns = controller_rig
    host.enable()
    q = host.create_io_queue(1, 16)
    os.pwrite(ns.fd, b"\xff" * 4096, 0)
    assert host.call(q, 0x08, nsid=1, cdw=(0, 0, 7)) == (0, 0)             # Write Zeroes
    assert os.pread(ns.fd, 4096, 0) == bytes(4096)
    assert host.call(q, 0x00, nsid=1) == (0, 0)                            # Flush
    assert ns.counters["flushes"] == 1
    bus.mem[DATA:DATA + 16] = struct.pack("<IIQ", 0, 8, 0)
    assert host.call(q, 0x09, nsid=1, prp1=DATA, cdw=(0, 4)) == (0, 0)
    bus.mem[DATA:DATA + 16] = struct.pack("<IIQ", 0, 8, ns.blocks)
    assert host.call(q, 0x09, nsid=1, prp1=DATA, cdw=(0, 4))[0] == Status.LBA_OUT_OF_RANGE


def test_queue_wraparound_and_phase(controller_rig: Rig) -> None:
    host, _, bus, _ = controller_rig
    host.enable()
    q = host.create_io_queue(1, 4)
    for round_ in range(10):                    # 10 x 3 commands through a 4-entry ring
        cids = [host.submit(q, 0x00, nsid=1, ring=False) for _ in range(3)]
        host.ring(q)
        for cid in cids:
            assert host.wait(q, cid) == (0, 0), round_
    assert bus.vectors.count(1) >= 30


def test_aer_held_and_limit(controller_rig: Rig) -> None:
    host, _, _, _ = controller_rig
    host.enable()
    cids = [host.submit(host.admin, 0x0C) for _ in range(4)]
    assert host.call(host.admin, 0x0C)[0] == Status.AER_LIMIT_EXCEEDED
    host.reap(host.admin)
    assert not any(c in host.admin.done for c in cids)      # held until an event


def test_controller_reset_mid_io_completes_nothing_after(
        controller_rig: Rig) -> None:
    host, ctl, bus, _ = controller_rig
    host.enable()
    q = host.create_io_queue(1, 16)
    bus.refuse = False
    host.w32(Reg.CC, 0)                                      # controller reset
    assert host.r32(Reg.CSTS) & 1 == 0
    host.submit(q, 0x00, nsid=1)                             # doorbell of a deleted queue
    assert ctl.stats["bad_doorbells"] >= 1
    host.queues = {0: host.admin}
    host.admin.sq_tail = host.admin.cq_head = 0
    host.admin.phase = 1
    bus.mem[0x20000:0x20000 + 16 * 8] = bytes(16 * 8)
    host.enable()                                            # comes back clean
    assert host.call(host.admin, 0x06, prp1=DATA, cdw=(1,))[0] == 0


def test_refused_dma_on_sq_fetch_is_controller_fatal(
        controller_rig: Rig) -> None:
    host, ctl, bus, _ = controller_rig
    host.enable()
    bus.refuse = True
    host.submit(host.admin, 0x06, prp1=DATA, cdw=(1,))
    import time
    deadline = time.monotonic() + 5
    while not host.r32(Reg.CSTS) & 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert ctl.stats["commands"] == 0


def test_intx_when_msix_is_off(controller_rig: Rig) -> None:
    host, _, bus, _ = controller_rig
    bus.msix = False
    host.enable()
    cid = host.submit(host.admin, 0x06, prp1=DATA, cdw=(1,))
    import time
    deadline = time.monotonic() + 5
    while not bus.intx:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    host.w32(Reg.INTMS, 1)
    assert not bus.intx                                      # masked
    host.w32(Reg.INTMC, 1)
    assert bus.intx
    assert host.wait(host.admin, cid) == (0, 0)              # reap + CQ head doorbell
    assert not bus.intx
    assert bus.vectors == []


def test_shutdown_notification_flushes(controller_rig: Rig) -> None:
    host, _, _, ns = controller_rig
    host.enable()
    host.w32(Reg.CC, host.r32(Reg.CC) | 1 << 14)
    assert host.r32(Reg.CSTS) & 0xC == 0x8 and ns.counters["flushes"] == 1
