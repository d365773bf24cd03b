"""The DMA engine (vfio_user_dev/dma_engine.py) on a platform without a socket: which jobs
run at once on the thread that writes GO and which on the engine thread, the listeners'
thread and order, and the FILL pattern."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from teeio.device_regs import (
    CMD_GO,
    DESCRIPTOR,
    DESCRIPTOR_SIZE,
    MAX_BATCH,
    MAX_DMA_LEN,
    DmaError,
    Irq,
    Op,
    R,
    St,
    descriptor,
)
from teeio.pcie.config import Command, Reg
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.dma_engine import INLINE_MAX, fill_pattern
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import DmaFlags, PciRegion

GUEST = 0x1_0000_0000
SIZE = 4 << 20
RW = DmaFlags.READ | DmaFlags.WRITE


@pytest.fixture
def plat() -> Iterator[Platform]:
    p = Platform()
    yield p
    p.close()


@pytest.fixture
def guest(plat: Platform) -> Iterator[int]:
    """A sealed memfd mapped at GUEST (as QEMU passes guest RAM); a dup to look at it."""
    fd = os.memfd_create("dma-engine-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    view = os.dup(fd)
    plat.dma.map(GUEST, SIZE, RW, 0, fd)
    bus_master(plat, True)
    yield view
    plat.dma.clear()
    os.close(view)


def bus_master(plat: Platform, on: bool) -> None:
    value = int(Command.MEMORY_SPACE) | (int(Command.BUS_MASTER) if on else 0)
    plat.region_write(PciRegion.CONFIG, Reg.COMMAND, value.to_bytes(2, "little"))


def bar0_write(plat: Platform, reg: R, value: int) -> None:
    plat.region_write(PciRegion.BAR0, reg, value.to_bytes(4, "little"))


def status(plat: Platform) -> int:
    return int.from_bytes(plat.region_read(PciRegion.BAR0, R.STATUS, 4), "little")


def go(plat: Platform, op: Op, src: int, dst: int, length: int, pattern: int = 0) -> int:
    """Program and start a job; STATUS as the GO write left it."""
    for reg, value in ((R.DMA_SRC_LO, src & 0xFFFF_FFFF), (R.DMA_SRC_HI, src >> 32),
                       (R.DMA_DST_LO, dst & 0xFFFF_FFFF), (R.DMA_DST_HI, dst >> 32),
                       (R.DMA_LEN, length), (R.DMA_PATTERN, pattern)):
        bar0_write(plat, reg, value)
    bar0_write(plat, R.DMA_CMD, CMD_GO | op)
    return status(plat)


def wait_idle(plat: Platform, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (st := status(plat)) & St.BUSY:
        assert time.monotonic() < deadline, "job still BUSY"
        time.sleep(0.001)
    return st


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_short_job_into_mapped_memory_runs_before_the_go_write_returns(
        plat: Platform, guest: int) -> None:
    data = os.urandom(4096)
    os.pwrite(guest, data, 0)
    assert go(plat, Op.COPY, GUEST, GUEST + 0x10000, 4096) == St.DONE
    assert os.pread(guest, 4096, 0x10000) == data
    assert plat.device.engine.runs == {"inline": 1, "engine_thread": 0}
    assert plat.device.stats()["dma_jobs"] == 1
    assert plat.device.stats()["dma_bytes"] == 2 * 4096


def test_every_kind_of_job_inline_has_the_same_result(plat: Platform, guest: int) -> None:
    src = os.urandom(INLINE_MAX[Op.SHA256])
    os.pwrite(guest, src, 0)
    assert go(plat, Op.FILL, 0, GUEST + 0x100000, 4099, pattern=0x11223344) == St.DONE
    assert os.pread(guest, 4099, 0x100000) == (b"\x44\x33\x22\x11" * 1025)[:4099]
    assert go(plat, Op.SHA256, GUEST, GUEST + 0x200000, len(src)) == St.DONE
    assert os.pread(guest, 32, 0x200000) == hashlib.sha256(src).digest()
    assert plat.device.engine.runs["inline"] == 2


def test_long_hash_runs_on_the_engine_thread(plat: Platform, guest: int) -> None:
    n = INLINE_MAX[Op.SHA256] + 1
    src = os.urandom(n)
    os.pwrite(guest, src, 0)
    go(plat, Op.SHA256, GUEST, GUEST + 0x200000, n)
    assert wait_idle(plat) == St.DONE
    assert os.pread(guest, 32, 0x200000) == hashlib.sha256(src).digest()
    assert plat.device.engine.runs == {"inline": 0, "engine_thread": 1}


def test_memory_reached_over_the_socket_is_never_touched_inline(plat: Platform) -> None:
    # Without an fd the memory is reached with DMA_READ/DMA_WRITE, whose replies the thread
    # that wrote GO may have to serve: such a job waits for the engine thread.
    mem = bytearray(os.urandom(0x2000))
    threads: set[str] = set()

    def remote_read(address: int, n: int) -> bytes:
        threads.add(threading.current_thread().name)
        return bytes(mem[address - GUEST:address - GUEST + n])

    def remote_write(address: int, data: bytes) -> None:
        threads.add(threading.current_thread().name)
        mem[address - GUEST:address - GUEST + len(data)] = data

    plat.dma.remote_read, plat.dma.remote_write = remote_read, remote_write
    plat.dma.map(GUEST, len(mem), RW, 0, None)
    bus_master(plat, True)
    go(plat, Op.COPY, GUEST, GUEST + 0x1000, 256)
    assert wait_idle(plat) == St.DONE
    assert mem[0x1000:0x1100] == mem[:256]
    assert threads == {"dma-engine"}
    assert plat.device.engine.runs == {"inline": 0, "engine_thread": 1}


def test_job_on_a_watched_link_runs_on_the_engine_thread(plat: Platform, guest: int) -> None:
    armed = plat.link.inject(Fault(FaultKind.DROP, nth=1_000_000))   # never fires
    go(plat, Op.FILL, 0, GUEST, 64, pattern=7)
    assert wait_idle(plat) == St.DONE
    assert plat.device.engine.runs == {"inline": 0, "engine_thread": 1}
    assert not armed.done and armed.seen > 0           # its TLPs crossed the taps


def test_jobs_that_touch_no_memory_end_at_once(plat: Platform, guest: int) -> None:
    bus_master(plat, False)
    st = go(plat, Op.COPY, GUEST, GUEST + 0x1000, 16)
    assert st & St.ERROR and st >> 8 == DmaError.BUS_MASTER_OFF
    bus_master(plat, True)
    st = go(plat, Op.COPY, GUEST, GUEST + 0x1000, 0)
    assert st & St.ERROR and st >> 8 == DmaError.BAD_LENGTH
    st = go(plat, 0xE, GUEST, GUEST + 0x1000, 16)  # type: ignore[arg-type]
    assert st & St.ERROR and st >> 8 == DmaError.BAD_OPCODE
    st = go(plat, Op.COPY, 0x10, GUEST, 16)        # unmapped source: a fault, nothing sent
    assert st & St.ERROR and st >> 8 == DmaError.FAULT
    assert plat.device.engine.runs == {"inline": 4, "engine_thread": 0}


def test_listeners_run_on_the_engine_thread_and_the_next_job_waits_for_them(
        plat: Platform, guest: int) -> None:
    release = threading.Event()
    calls: list[tuple[str, int]] = []

    def listener(dev: object) -> None:
        calls.append((threading.current_thread().name, plat.device.total["jobs"]))
        if len(calls) == 1:
            release.wait(5)

    plat.device.listeners.append(listener)
    assert go(plat, Op.FILL, 0, GUEST, 64, pattern=1) == St.DONE      # inline
    wait_for(lambda: len(calls) == 1)
    # The listener of the first job still runs: the second job is queued behind it.
    assert go(plat, Op.FILL, 0, GUEST + 64, 64, pattern=2) == St.BUSY
    release.set()
    assert wait_idle(plat) == St.DONE
    wait_for(lambda: len(calls) == 2)
    assert calls == [("dma-engine", 1), ("dma-engine", 2)]
    assert plat.device.engine.runs == {"inline": 1, "engine_thread": 1}
    # Nothing outstanding any more: the next one runs at once again.
    assert go(plat, Op.FILL, 0, GUEST + 128, 64, pattern=3) == St.DONE
    assert plat.device.engine.runs["inline"] == 2


def test_a_device_without_a_platform_runs_memory_jobs_on_the_engine_thread(
        plat: Platform) -> None:
    assert plat.device.engine.direct_memory(GUEST, 16) is True      # unmapped: faults at once
    dev = TeeIoDevice()
    try:
        assert dev.engine.direct_memory(GUEST, 16) is False
    finally:
        dev.close()


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 8, 9, 4096, 4097])
def test_fill_pattern(length: int) -> None:
    pattern = 0xA5C3_0F5A
    want = (pattern.to_bytes(4, "little") * (length // 4 + 1))[:length]
    assert fill_pattern(pattern, length) == want


def test_clear_copy_is_one_memmove_on_the_go_writers_thread(plat: Platform, guest: int) -> None:
    """A T=0 COPY between two mapped ranges: done before the GO write returns, counted on
    the link as its read and write, the same bytes as any other way."""
    data = os.urandom(1 << 20)
    os.pwrite(guest, data, 0)
    link = dict(plat.link.counters)
    st = go(plat, Op.COPY, GUEST, GUEST + (2 << 20), 1 << 20)
    assert st == St.DONE
    assert os.pread(guest, 1 << 20, 2 << 20) == data
    assert plat.device.engine.runs == {"inline": 1, "engine_thread": 0}
    after = plat.link.counters
    assert after["clear_transfers"] - link["clear_transfers"] == 2
    assert after["bytes_upstream"] - link["bytes_upstream"] == 1 << 20
    assert after["bytes_downstream"] - link["bytes_downstream"] == 1 << 20
    assert after["tlps_upstream"] > link["tlps_upstream"]
    assert int.from_bytes(plat.region_read(PciRegion.BAR0, R.DMA_BYTES_LO, 4), "little") \
        == 2 << 20



# -- BATCH: a list of descriptors, one GO, one completion ----------------------------------------
LIST = 0x300000          # where the tests put the descriptor list (offset in the memfd)


def batch(plat: Platform, guest: int, *descs: bytes, length: int | None = None) -> int:
    """Write *descs* at LIST, start a BATCH of them and wait: STATUS after it."""
    table = b"".join(descs)
    os.pwrite(guest, table, LIST)
    go(plat, Op.BATCH, GUEST + LIST, 0, len(table) if length is None else length)
    return wait_idle(plat)


def reg(plat: Platform, r: R) -> int:
    return int.from_bytes(plat.region_read(PciRegion.BAR0, r, 4), "little")


def test_batch_runs_every_kind_of_descriptor_with_one_completion(
        plat: Platform, guest: int) -> None:
    src = os.urandom(0x3000)
    os.pwrite(guest, src, 0)
    descs = (descriptor(Op.COPY, GUEST, GUEST + 0x10000, 0x3000),
             descriptor(Op.FILL, 0, GUEST + 0x20000, 4099, 0x11223344),
             descriptor(Op.SHA256, GUEST, GUEST + 0x30000, 0x3000))
    assert batch(plat, guest, *descs) == St.DONE
    assert os.pread(guest, 0x3000, 0x10000) == src
    assert os.pread(guest, 4099, 0x20000) == (b"\x44\x33\x22\x11" * 1025)[:4099]
    assert os.pread(guest, 32, 0x30000) == hashlib.sha256(src).digest()
    assert reg(plat, R.BATCH_DONE) == 3
    assert reg(plat, R.DMA_JOBS) == 1                  # the batch is one job
    assert reg(plat, R.DMA_BYTES_LO) == 96 + 2 * 0x3000 + 4099 + 0x3000 + 32
    assert reg(plat, R.INT_STATUS) == Irq.DMA_DONE
    assert plat.device.engine.runs == {"inline": 0, "engine_thread": 1}


def test_batch_stops_at_the_first_descriptor_that_fails(plat: Platform, guest: int) -> None:
    os.pwrite(guest, b"first!!!", 0)
    st = batch(plat, guest,
               descriptor(Op.COPY, GUEST, GUEST + 0x10000, 8),
               descriptor(Op.COPY, 0x10, GUEST + 0x20000, 8),      # unmapped source
               descriptor(Op.FILL, 0, GUEST + 0x30000, 8, 0x55555555))
    assert st & St.ERROR and st >> 8 == DmaError.FAULT
    assert reg(plat, R.BATCH_DONE) == 1
    assert os.pread(guest, 8, 0x10000) == b"first!!!"              # took effect
    assert os.pread(guest, 8, 0x30000) == bytes(8)                 # never ran
    assert reg(plat, R.DMA_JOBS) == 0
    assert reg(plat, R.DMA_BYTES_LO) == 3 * 32 + 16    # the list and the first COPY


@pytest.mark.parametrize(("bad", "code"), [
    (descriptor(Op.BATCH, GUEST, 0, 32), DmaError.BAD_OPCODE),         # no batch in a batch
    (descriptor(0xE, GUEST, GUEST, 8), DmaError.BAD_OPCODE),
    (DESCRIPTOR.pack(Op.FILL, 8, 0, GUEST, 1, 1), DmaError.BAD_OPCODE),  # reserved set
    (descriptor(Op.FILL, 0, GUEST, 0), DmaError.BAD_LENGTH),
    (descriptor(Op.COPY, GUEST, GUEST + 0x10000, MAX_DMA_LEN + 1), DmaError.BAD_LENGTH),
])
def test_bad_descriptor_is_refused_with_its_index(plat: Platform, guest: int, bad: bytes,
                                                  code: DmaError) -> None:
    good = descriptor(Op.FILL, 0, GUEST + 0x20000, 4, 0x01020304)
    st = batch(plat, guest, good, good, bad, good)
    assert st & St.ERROR and st >> 8 == code
    assert reg(plat, R.BATCH_DONE) == 2


@pytest.mark.parametrize("length", [0, 31, 33, DESCRIPTOR_SIZE * MAX_BATCH + DESCRIPTOR_SIZE])
def test_batch_list_length_is_whole_descriptors_up_to_the_limit(
        plat: Platform, guest: int, length: int) -> None:
    st = batch(plat, guest, descriptor(Op.FILL, 0, GUEST, 4, 1), length=length)
    assert st & St.ERROR and st >> 8 == DmaError.BAD_LENGTH
    assert reg(plat, R.BATCH_DONE) == 0
    assert plat.device.engine.runs == {"inline": 1, "engine_thread": 0}   # nothing read


def test_longest_batch_runs_whole(plat: Platform, guest: int) -> None:
    descs = [descriptor(Op.FILL, 0, GUEST + 0x10000 + 4 * i, 4, i) for i in range(MAX_BATCH)]
    assert batch(plat, guest, *descs) == St.DONE
    assert reg(plat, R.BATCH_DONE) == MAX_BATCH
    got = os.pread(guest, 4 * MAX_BATCH, 0x10000)
    assert got == b"".join(i.to_bytes(4, "little") for i in range(MAX_BATCH))


def test_batch_list_outside_every_map_faults_before_any_descriptor(
        plat: Platform, guest: int) -> None:
    go(plat, Op.BATCH, GUEST + SIZE, 0, 64)
    st = wait_idle(plat)
    assert st & St.ERROR and st >> 8 == DmaError.FAULT
    assert reg(plat, R.BATCH_DONE) == 0


def test_bus_master_cleared_mid_batch_stops_the_rest(plat: Platform, guest: int) -> None:
    """Each descriptor is gated as a job of its own: Bus Master cleared after the first
    one ran (here, from its own write's hook) stops the second."""
    link_end = plat.device.link_end
    real_write = link_end.write
    calls = 0

    def write_then_clear(address: int, data: bytes, **kw: object) -> None:
        nonlocal calls
        calls += 1
        real_write(address, data, **kw)  # type: ignore[arg-type]
        plat.device.config.data[Reg.COMMAND] &= ~int(Command.BUS_MASTER)

    link_end.write = write_then_clear  # type: ignore[method-assign]
    st = batch(plat, guest, descriptor(Op.FILL, 0, GUEST + 0x10000, 4, 7),
               descriptor(Op.FILL, 0, GUEST + 0x20000, 4, 8))
    assert st & St.ERROR and st >> 8 == DmaError.BUS_MASTER_OFF
    assert reg(plat, R.BATCH_DONE) == 1 and calls == 1
    assert os.pread(guest, 4, 0x20000) == bytes(4)


def test_batch_of_copies_counts_as_the_same_jobs_one_by_one(plat: Platform, guest: int) -> None:
    os.pwrite(guest, os.urandom(0x6000), 0)
    copies = [(GUEST + 3, GUEST + 0x10005, 0x2000), (GUEST, GUEST + 0x20000, 0x6000)]

    def link_delta(run: Callable[[], None]) -> dict[str, int]:
        before = dict(plat.link.counters)
        run()
        return {k: v - before[k] for k, v in plat.link.counters.items()}

    def one_by_one() -> None:
        for src, dst, n in copies:
            assert go(plat, Op.COPY, src, dst, n) == St.DONE

    def batched() -> None:
        assert batch(plat, guest, *(descriptor(Op.COPY, s, d, n) for s, d, n in copies)) \
            == St.DONE
    single = link_delta(one_by_one)
    os.pwrite(guest, bytes(0x8000), 0x10000)
    os.pwrite(guest, bytes(0x8000), 0x20000)
    many = link_delta(batched)
    assert os.pread(guest, 0x2000, 0x10005) == os.pread(guest, 0x2000, 3)
    assert os.pread(guest, 0x6000, 0x20000) == os.pread(guest, 0x6000, 0)
    # the same TLPs counted; the batch adds its list's read (one clear transfer, 64 B)
    assert many["clear_transfers"] == single["clear_transfers"] + 1
    assert many["bytes_upstream"] == single["bytes_upstream"]
    assert many["bytes_downstream"] == single["bytes_downstream"] + 64
    assert many["tlps_upstream"] == single["tlps_upstream"] + 1


def test_bus_master_cleared_between_batched_copies_stops_the_rest(
        plat: Platform, guest: int) -> None:
    """The run of COPYs asks the job's gates before each memmove."""
    real = plat.dma.copy_direct_many
    asked = 0

    def clear_before_second(copies: object, proceed: Callable[[], bool]) -> int:
        def gate() -> bool:
            nonlocal asked
            asked += 1
            if asked == 2:
                bus_master(plat, False)
            return proceed()
        return real(copies, gate)  # type: ignore[arg-type]

    plat.dma.copy_direct_many = clear_before_second  # type: ignore[method-assign]
    os.pwrite(guest, b"12345678", 0)
    st = batch(plat, guest, descriptor(Op.COPY, GUEST, GUEST + 0x10000, 8),
               descriptor(Op.COPY, GUEST, GUEST + 0x20000, 8))
    assert st & St.ERROR and st >> 8 == DmaError.BUS_MASTER_OFF
    # asked before the second copy (no), and again when the run is tried from there
    assert reg(plat, R.BATCH_DONE) == 1 and asked == 3
    assert os.pread(guest, 8, 0x10000) == b"12345678"
    assert os.pread(guest, 8, 0x20000) == bytes(8)
