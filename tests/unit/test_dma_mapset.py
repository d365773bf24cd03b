"""The DMA map set (vfio_user_dev/dma.py) with real memfds."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator

import pytest

from vfio_user_dev.dma import DmaFault, DmaMapSet
from vfio_user_dev.protocol import DmaFlags, ProtocolError

PAGE = os.sysconf("SC_PAGE_SIZE")
RW = DmaFlags.READ | DmaFlags.WRITE

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def memfd(size: int, name: str = "dma-test") -> int:
    """Sealed against resizing, as QEMU passes guest RAM (so the set maps it)."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    return fd


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def maps_of(name: str) -> int:
    """Number of mappings of memfd *name* in this process."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


@pytest.fixture
def ms() -> Iterator[DmaMapSet]:
    s = DmaMapSet()
    yield s
    s.clear()


def map_memfd(ms: DmaMapSet, address: int, size: int, flags: int = RW, fd_offset: int = 0,
              name: str = "dma-test") -> int:
    """Map a new memfd; returns a dup of it so the test can look at the memory."""
    fd = memfd(fd_offset + size, name)
    view = os.dup(fd)
    ms.map(address, size, flags, fd_offset, fd)
    return view


# --- mapping ----------------------------------------------------------------------------


def test_map_read_write_visible_in_memfd(ms: DmaMapSet) -> None:
    view = map_memfd(ms, 0x10000, 2 * PAGE)
    try:
        ms.write(0x10000 + 5, b"hello")
        assert os.pread(view, 5, 5) == b"hello"
        os.pwrite(view, b"from-memfd", PAGE + 1)
        assert ms.read(0x10000 + PAGE + 1, 10) == b"from-memfd"
        assert ms.read(0x10000, 4) == b"\0\0\0\0"
        assert ms.snapshot() == [(0x10000, 2 * PAGE, RW, True)]
        assert ms.maps_total == 1
    finally:
        os.close(view)


def test_map_with_fd_offset(ms: DmaMapSet) -> None:
    view = map_memfd(ms, 0x40000, PAGE, fd_offset=2 * PAGE)
    try:
        ms.write(0x40000, b"ABC")
        assert os.pread(view, 3, 2 * PAGE) == b"ABC"
        assert os.pread(view, 3, 0) == b"\0\0\0"
    finally:
        os.close(view)


def test_map_closes_the_fd(ms: DmaMapSet) -> None:
    fd = memfd(PAGE)
    ms.map(0x1000, PAGE, RW, 0, fd)
    assert_closed(fd)
    ms.write(0x1000, b"still mapped")                  # the mmap outlives the fd
    assert ms.read(0x1000, 12) == b"still mapped"


def test_map_closes_the_fd_on_refusal(ms: DmaMapSet) -> None:
    ms.map(0x1000, PAGE, RW, 0, memfd(PAGE))
    fd = memfd(PAGE)
    with pytest.raises(ProtocolError):
        ms.map(0x1000, PAGE, RW, 0, fd)
    assert_closed(fd)


def test_map_bad_offset_is_einval_and_closes_fd(ms: DmaMapSet) -> None:
    fd = memfd(2 * PAGE)
    with pytest.raises(ProtocolError) as info:
        ms.map(0x1000, PAGE, RW, 1, fd)                # not page aligned
    assert info.value.errno == errno.EINVAL
    assert_closed(fd)
    assert ms.snapshot() == []


@pytest.mark.parametrize(("address", "size"), [
    (0x10000, PAGE),                 # identical
    (0x10000 - PAGE, 2 * PAGE),      # overlaps the start
    (0x10000 + PAGE, PAGE),          # inside
    (0x10000 + 3 * PAGE, 2 * PAGE),  # overlaps the end
    (0x0, 0x100000),                 # covers it
])
def test_overlapping_map_is_eexist(ms: DmaMapSet, address: int, size: int) -> None:
    ms.map(0x10000, 4 * PAGE, RW, 0, None)
    with pytest.raises(ProtocolError) as info:
        ms.map(address, size, RW, 0, None)
    assert info.value.errno == errno.EEXIST
    assert ms.snapshot() == [(0x10000, 4 * PAGE, RW, False)]
    assert ms.maps_total == 1


def test_adjacent_maps_are_allowed_and_sorted(ms: DmaMapSet) -> None:
    ms.map(0x3000, 0x1000, RW, 0, None)
    ms.map(0x1000, 0x1000, RW, 0, None)
    ms.map(0x2000, 0x1000, DmaFlags.READ, 0, None)
    assert [a for a, *_ in ms.snapshot()] == [0x1000, 0x2000, 0x3000]
    assert ms.maps_total == 3


# --- unmapping --------------------------------------------------------------------------


def test_unmap(ms: DmaMapSet) -> None:
    name = "dma-unmap-test"
    ms.map(0x1000, PAGE, RW, 0, memfd(PAGE, name))
    assert maps_of(name) == 1
    ms.unmap(0x1000, PAGE)
    assert ms.snapshot() == []
    assert ms.unmaps_total == 1
    assert maps_of(name) == 0                          # munmap()ed
    with pytest.raises(DmaFault):
        ms.read(0x1000, 1)


@pytest.mark.parametrize(("address", "size"), [
    (0x2000, PAGE),          # nothing there
    (0x1000, 2 * PAGE),      # size mismatch
    (0x1000, PAGE // 2),     # size mismatch
    (0x1000 + 0x800, 0x800),  # inside but not a map
])
def test_unmap_unknown_is_enoent(ms: DmaMapSet, address: int, size: int) -> None:
    ms.map(0x1000, PAGE, RW, 0, None)
    with pytest.raises(ProtocolError) as info:
        ms.unmap(address, size)
    assert info.value.errno == errno.ENOENT
    assert len(ms.snapshot()) == 1
    assert ms.unmaps_total == 0


def test_remap_after_unmap(ms: DmaMapSet) -> None:
    ms.map(0x1000, PAGE, RW, 0, None)
    ms.unmap(0x1000, PAGE)
    ms.map(0x1000, PAGE, DmaFlags.READ, 0, None)
    assert ms.snapshot() == [(0x1000, PAGE, DmaFlags.READ, False)]


def test_unmap_waits_for_in_flight_dma(ms: DmaMapSet) -> None:
    # An access holds a reference on each mmap()ed piece while it copies its bytes: take
    # the references the way read() and write() do.
    ms.map(0x1000, PAGE, RW, 0, memfd(PAGE))
    with ms._cond:
        held = ms._acquire(ms._pieces(0x1000, 16, 0))
    unmapper = threading.Thread(target=ms.unmap, args=(0x1000, PAGE))
    unmapper.start()
    unmapper.join(0.2)
    assert unmapper.is_alive()                          # blocked by the reference
    assert len(ms.snapshot()) == 1
    ms._release(held)
    unmapper.join(5)
    assert not unmapper.is_alive()
    assert ms.snapshot() == []


def test_socket_round_trip_holds_no_reference_on_mapped_pieces(ms: DmaMapSet) -> None:
    # The mapped piece of a mixed access is copied and released before the socket part,
    # so an unmap of it is not held up by a DMA reply (that the unmapping thread may have
    # to route; with libvfio-user the library may even unmap from inside that very call).
    ms.map(0x1000, PAGE, RW, 0, memfd(PAGE))
    ms.map(0x1000 + PAGE, PAGE, RW, 0, None)
    entered, release = threading.Event(), threading.Event()

    def slow_remote_read(address: int, n: int) -> bytes:
        entered.set()
        assert release.wait(5)
        return b"\x22" * n

    ms.remote_read = slow_remote_read
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(ms.read(0x1000 + PAGE - 2, 4)))
    reader.start()
    assert entered.wait(5)
    ms.unmap(0x1000, PAGE)                              # does not wait for the reader
    assert ms.snapshot() == [(0x1000 + PAGE, PAGE, RW, False)]
    release.set()
    reader.join(5)
    assert result == [b"\0\0\x22\x22"]


# --- access rules -----------------------------------------------------------------------


def test_access_spanning_two_adjacent_regions(ms: DmaMapSet) -> None:
    a = map_memfd(ms, 0x100000, PAGE, name="dma-a")
    b = map_memfd(ms, 0x100000 + PAGE, PAGE, name="dma-b")
    try:
        ms.write(0x100000 + PAGE - 3, b"ABCDEF")
        assert os.pread(a, 3, PAGE - 3) == b"ABC"
        assert os.pread(b, 3, 0) == b"DEF"
        assert ms.read(0x100000 + PAGE - 4, 8) == b"\0ABCDEF\0"
        whole = ms.read(0x100000, 2 * PAGE)
        assert len(whole) == 2 * PAGE
        assert whole[PAGE - 3:PAGE + 3] == b"ABCDEF"
    finally:
        os.close(a)
        os.close(b)


def test_access_spanning_mmap_and_remote_regions(ms: DmaMapSet) -> None:
    view = map_memfd(ms, 0x1000, PAGE)
    ms.map(0x1000 + PAGE, PAGE, RW, 0, None)
    writes: list[tuple[int, bytes]] = []
    reads: list[tuple[int, int]] = []
    ms.remote_write = lambda address, data: writes.append((address, bytes(data)))

    def remote_read(address: int, n: int) -> bytes:
        reads.append((address, n))
        return b"R" * n

    ms.remote_read = remote_read
    try:
        ms.write(0x1000 + PAGE - 2, b"wxyz")
        assert os.pread(view, 2, PAGE - 2) == b"wx"
        assert writes == [(0x1000 + PAGE, b"yz")]
        assert ms.read(0x1000 + PAGE - 2, 5) == b"wxRRR"
        assert reads == [(0x1000 + PAGE, 3)]
    finally:
        os.close(view)


@pytest.mark.parametrize(("address", "length"), [
    (0x0, 1),                       # below every map
    (0x3000, 1),                    # in the gap
    (0x2000 - 1, 2),                # runs from a map into the gap
    (0x4000 + PAGE, 1),             # past the end
    (0x4000 + PAGE - 1, 2),         # runs off the end
])
def test_unmapped_address_faults(ms: DmaMapSet, address: int, length: int) -> None:
    ms.map(0x1000, 0x1000, RW, 0, memfd(0x1000))
    ms.map(0x4000, PAGE, RW, 0, memfd(PAGE))
    with pytest.raises(DmaFault):
        ms.read(address, length)
    with pytest.raises(DmaFault):
        ms.write(address, b"\xEE" * length)


def test_partial_fault_writes_nothing(ms: DmaMapSet) -> None:
    view = map_memfd(ms, 0x1000, PAGE)
    try:
        with pytest.raises(DmaFault):
            ms.write(0x1000 + PAGE - 2, b"abcd")
        assert os.pread(view, 2, PAGE - 2) == b"\0\0"
    finally:
        os.close(view)


@pytest.mark.parametrize(("address", "length"), [(-1, 1), (0, -1), ((1 << 64) - 1, 2)])
def test_bad_range_faults(ms: DmaMapSet, address: int, length: int) -> None:
    with pytest.raises(DmaFault):
        ms.read(address, length)


def test_write_to_read_only_map_faults(ms: DmaMapSet) -> None:
    view = map_memfd(ms, 0x1000, PAGE, flags=DmaFlags.READ)
    try:
        os.pwrite(view, b"guest data", 0)
        assert ms.read(0x1000, 10) == b"guest data"
        with pytest.raises(DmaFault, match="not writ"):
            ms.write(0x1000, b"x")
        assert os.pread(view, 10, 0) == b"guest data"
    finally:
        os.close(view)


def test_read_from_write_only_map_faults(ms: DmaMapSet) -> None:
    ms.map(0x1000, PAGE, DmaFlags.WRITE, 0, None)
    ms.remote_read = lambda address, n: pytest.fail("must not be called")
    got: list[tuple[int, bytes]] = []
    ms.remote_write = lambda address, data: got.append((address, data))
    with pytest.raises(DmaFault, match="not read"):
        ms.read(0x1000, 4)
    ms.write(0x1000, b"ok")
    assert got == [(0x1000, b"ok")]


def test_read_only_span_into_writable_faults_before_writing(ms: DmaMapSet) -> None:
    rw_view = map_memfd(ms, 0x1000, PAGE)
    ro_view = map_memfd(ms, 0x1000 + PAGE, PAGE, flags=DmaFlags.READ)
    try:
        with pytest.raises(DmaFault):
            ms.write(0x1000 + PAGE - 1, b"ab")
        assert os.pread(rw_view, 1, PAGE - 1) == b"\0"
        assert os.pread(ro_view, 1, 0) == b"\0"
    finally:
        os.close(rw_view)
        os.close(ro_view)


# --- regions without an fd --------------------------------------------------------------


def test_no_fd_region_uses_remote_callbacks(ms: DmaMapSet) -> None:
    ms.map(0x8000_0000, 0x10000, RW, 0, None)
    assert ms.snapshot() == [(0x8000_0000, 0x10000, RW, False)]
    memory = bytearray(0x10000)
    calls: list[tuple[str, int, int]] = []

    def remote_read(address: int, n: int) -> bytes:
        calls.append(("r", address, n))
        off = address - 0x8000_0000
        return bytes(memory[off:off + n])

    def remote_write(address: int, data: bytes) -> None:
        calls.append(("w", address, len(data)))
        off = address - 0x8000_0000
        memory[off:off + len(data)] = data

    ms.remote_read = remote_read
    ms.remote_write = remote_write
    ms.write(0x8000_0100, b"remote!")
    assert memory[0x100:0x107] == b"remote!"
    assert ms.read(0x8000_0100, 7) == b"remote!"
    assert calls == [("w", 0x8000_0100, 7), ("r", 0x8000_0100, 7)]


def test_no_fd_region_without_client_faults(ms: DmaMapSet) -> None:
    ms.map(0x1000, PAGE, RW, 0, None)
    assert ms.remote_read is None and ms.remote_write is None
    with pytest.raises(DmaFault):
        ms.read(0x1000, 1)
    with pytest.raises(DmaFault):
        ms.write(0x1000, b"x")


def test_zero_length_access(ms: DmaMapSet) -> None:
    assert ms.read(0x1234, 0) == b""
    ms.write(0x1234, b"")                     # nothing mapped, nothing touched


# --- clear ------------------------------------------------------------------------------


def test_clear_closes_everything(ms: DmaMapSet) -> None:
    name = "dma-clear-test"
    ms.map(0x1000, PAGE, RW, 0, memfd(PAGE, name))
    ms.map(0x1000 + PAGE, PAGE, DmaFlags.READ, 0, memfd(PAGE, name))
    ms.map(0x10000, PAGE, RW, 0, None)
    mems = [r.mem for r in ms._regions if r.mem is not None]
    assert len(mems) == 2
    assert maps_of(name) == 2
    ms.clear()
    assert ms.snapshot() == []
    assert all(m.closed for m in mems)
    assert maps_of(name) == 0
    with pytest.raises(DmaFault):
        ms.read(0x1000, 1)
    # The address space is free again.
    ms.map(0x1000, 2 * PAGE, RW, 0, None)
    assert len(ms.snapshot()) == 1


# --- many maps: a cap, and binary searches ----------------------------------------------


def test_map_count_is_capped_with_enospc(ms: DmaMapSet) -> None:
    ms.max_maps = 8
    for i in range(8):
        ms.map(i * 2 * PAGE, PAGE, RW, 0, None)
    fd = memfd(PAGE)
    with pytest.raises(ProtocolError) as exc:
        ms.map(100 * PAGE, PAGE, RW, 0, fd)        # the fd is closed all the same
    assert exc.value.errno == errno.ENOSPC
    with pytest.raises(ProtocolError) as exc:
        ms.map_view(100 * PAGE, PAGE, RW, None)
    assert exc.value.errno == errno.ENOSPC
    ms.unmap(2 * PAGE, PAGE)
    ms.map(2 * PAGE, PAGE, RW, 0, None)
    assert len(ms.snapshot()) == 8


def test_lookups_and_overlaps_among_many_maps(ms: DmaMapSet) -> None:
    # Maps at every other page, in shuffled order: every lookup and overlap check must
    # find the right neighbour, at both ends of each map and of each gap.
    n = 512
    order = list(range(n))
    order = order[::2] + order[1::2][::-1]
    for i in order:
        ms.map(i * 2 * PAGE, PAGE, RW if i % 3 else DmaFlags.READ, 0, None)
    assert [a for a, *_ in ms.snapshot()] == [i * 2 * PAGE for i in range(n)]
    for i in (0, 1, n // 2, n - 1):
        start = i * 2 * PAGE
        for addr, size in ((start, 1), (start + PAGE - 1, 1), (start - 1, 2),
                           (start + PAGE - 1, PAGE + 2), (start - PAGE, 3 * PAGE)):
            if addr < 0:
                continue
            with pytest.raises(ProtocolError) as exc:
                ms.map(addr, size, RW, 0, None)
            assert exc.value.errno == errno.EEXIST
        ms.map(start + PAGE, PAGE, RW, 0, None)      # the gap after it is free
        ms.unmap(start + PAGE, PAGE)
        assert ms.backing(start, PAGE)[0].address == start
        with pytest.raises(DmaFault, match="unmapped"):
            ms.backing(start + PAGE, 1)
        with pytest.raises(DmaFault, match="unmapped"):
            ms.backing(start + PAGE - 1, 2)             # crosses into the gap
        if i % 3 == 0:
            with pytest.raises(DmaFault, match="not writeable"):
                ms.write(start, b"x")
        assert ms.has(start, PAGE, RW if i % 3 else DmaFlags.READ, False)
        assert not ms.has(start, PAGE, RW if i % 3 else DmaFlags.READ, True)
        assert not ms.has(start + 1, PAGE, RW, False)
    with pytest.raises(ProtocolError) as exc:
        ms.unmap(2 * PAGE, 2 * PAGE)                  # right start, wrong size
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(ProtocolError) as exc:
        ms.unmap(2 * PAGE + 1, PAGE)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(DmaFault, match="unmapped"):
        ms.backing(n * 2 * PAGE, 1)                   # past the last map


@pytest.mark.parametrize("offset,size", [(0, 1 << 63), (1 << 63, PAGE),
                                         ((1 << 63) - PAGE, 2 * PAGE), (0, 4 * PAGE),
                                         (PAGE, 2 * PAGE)])
def test_unmappable_file_range_is_einval(ms: DmaMapSet, offset: int, size: int) -> None:
    fd = memfd(2 * PAGE)
    with pytest.raises(ProtocolError) as exc:
        ms.map(0x1000_0000, size, RW, offset, fd)
    assert exc.value.errno == errno.EINVAL
    assert ms.snapshot() == []
    assert_closed(fd)


def test_direct_says_whether_an_access_can_wait_for_the_client(ms: DmaMapSet) -> None:
    view = map_memfd(ms, 0x10000, 2 * PAGE)
    os.close(view)
    ms.map(0x10000 + 2 * PAGE, PAGE, RW, 0, None)          # reached over the socket only
    assert ms.direct(0x10000, 2 * PAGE)
    assert ms.direct(0x10000 + PAGE, 16)
    assert not ms.direct(0x10000 + 2 * PAGE - 8, 16)        # spans into the socket map
    assert not ms.direct(0x10000 + 2 * PAGE, 4)
    assert ms.direct(0x90000, 16)                           # unmapped: faults at once
    assert ms.direct(0x10000 + 3 * PAGE - 4, 8)             # runs off the end: faults too


# --- one memmove between two mappings ---------------------------------------------------------

def test_copy_direct_between_mappings(ms: DmaMapSet) -> None:
    a = map_memfd(ms, 0x10000, 2 * PAGE, name="copy-a")
    b = map_memfd(ms, 0x20000, 2 * PAGE, name="copy-b")
    os.pwrite(a, b"0123456789" * 100, 5)
    assert ms.copy_direct(0x10005, 0x20007, 1000) is True
    assert os.pread(b, 1000, 7) == b"0123456789" * 100
    assert ms.copy_direct(0x10005, 0x10006, 1000) is True       # overlap: read, then write
    assert os.pread(a, 1000, 6) == b"0123456789" * 100
    for fd in (a, b):
        os.close(fd)


@pytest.mark.timeout(30)
def test_copy_direct_refuses_what_it_cannot_do_in_one_memmove(ms: DmaMapSet) -> None:
    a = map_memfd(ms, 0x10000, PAGE, name="copy-a")
    b = map_memfd(ms, 0x10000 + PAGE, PAGE, name="copy-b")       # adjacent: a span of two
    ro = map_memfd(ms, 0x30000, PAGE, flags=DmaFlags.READ, name="copy-ro")
    plain = os.memfd_create("copy-plain")                        # can shrink: fd access
    os.ftruncate(plain, PAGE)
    ms.map(0x40000, PAGE, RW, 0, os.dup(plain))
    ms.map(0x50000, PAGE, RW, 0, None)                           # over the socket
    os.pwrite(a, b"A" * PAGE, 0)
    cases = [(0x10000 + PAGE - 8, 0x30000, 16),     # source spans two maps
             (0x10000, 0x30000, 16),                # read-only destination
             (0x10000, 0x40000, 16),                # destination reached through its fd
             (0x40000, 0x10000, 16),                # source reached through its fd
             (0x10000, 0x50000, 16),                # destination over the socket
             (0x10000, 0x60000, 16),                # unmapped destination
             (0x10000, 0x10000 + 2 * PAGE - 8, 16),  # destination runs past its map
             (0x10000, 0x10000 + PAGE, 0)]          # nothing to copy
    for src, dst, n in cases:
        assert ms.copy_direct(src, dst, n) is False, (hex(src), hex(dst), n)
    assert os.pread(ro, PAGE, 0) == bytes(PAGE) and os.pread(plain, PAGE, 0) == bytes(PAGE)
    assert os.pread(b, PAGE, 0) == bytes(PAGE)
    ms.unmap(0x10000, PAGE)           # no reference left behind: it does not wait
    ms.unmap(0x10000 + PAGE, PAGE)
    for fd in (a, b, ro, plain):
        os.close(fd)


def test_copy_direct_many_stops_at_the_first_it_cannot_do_and_lets_go(ms: DmaMapSet) -> None:
    a = map_memfd(ms, 0x10000, PAGE, name="many-a")
    ms.map(0x50000, PAGE, RW, 0, None)                           # over the socket
    os.pwrite(a, b"abcdefgh", 0)
    copies = [(0x10000, 0x10100, 8), (0x10000, 0x10200, 8), (0x10000, 0x50000, 8),
              (0x10000, 0x10300, 8)]
    assert ms.copy_direct_many(copies) == 2
    assert os.pread(a, 8, 0x100) == os.pread(a, 8, 0x200) == b"abcdefgh"
    assert os.pread(a, 8, 0x300) == bytes(8)
    told = iter([True, False])
    assert ms.copy_direct_many(copies[3:] * 2, lambda: next(told)) == 1
    assert os.pread(a, 8, 0x300) == b"abcdefgh"
    assert ms.copy_direct_many([]) == 0
    ms.unmap(0x10000, PAGE)           # no reference left behind: it does not wait
    os.close(a)
