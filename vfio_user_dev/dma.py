"""The live set of client DMA regions (vfio-user DMA_MAP / DMA_UNMAP).

fd-backed regions are mmap()ed when the file cannot shrink (a sealed memfd, as QEMU passes)
and reached through the fd otherwise (``dma_file``: a shrunken file is a DMA fault, not
SIGBUS); others are reached by DMA_READ / DMA_WRITE; overlapping maps
are refused, the count is bounded, lookups bisect, and every map keeps a never-reused id and
its file's identity so the root port can pin trusted windows to it (docs/design.md,
"Architecture overview").
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from vfio_user_dev.dma_file import FileMemory, MemoryGone, cannot_shrink
from vfio_user_dev.protocol import MAX_DMA_MAPS, DmaFlags, ProtocolError

log = logging.getLogger(__name__)

RemoteRead = Callable[[int, int], bytes]
RemoteWrite = Callable[[int, bytes], None]
Inode = tuple[int, int]      # (st_dev, st_ino) of the file a map came from


_READ, _WRITE = int(DmaFlags.READ), int(DmaFlags.WRITE)     # plain ints: cheaper to test


class DmaFault(Exception):
    """A device access to guest memory that no live map allows."""


#: one copy between two guest ranges: (source, destination, length)
Copy = tuple[int, int, int]

@dataclass
class DmaRegion:
    address: int
    size: int
    flags: int
    fd_offset: int
    mem: mmap.mmap | memoryview | FileMemory | None = field(default=None, repr=False)
    users: int = 0
    map_id: int = 0
    inode: Inode | None = None
    end: int = field(init=False)
    #: the memory as a memoryview when this process maps it (a memmove reaches it)
    view: memoryview | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.end = self.address + self.size
        if isinstance(self.mem, memoryview):
            self.view = self.mem
        elif isinstance(self.mem, mmap.mmap):
            self.view = memoryview(self.mem)


@dataclass(frozen=True)
class Backing:
    """What backs one piece of guest memory: which map (never-reused id), the map's guest
    range, its file (device, inode; None for memory reached over the socket) and the
    file offset of the map's start."""

    map_id: int
    address: int
    size: int
    fd_offset: int
    inode: Inode | None

    def as_dict(self) -> dict[str, object]:
        return {"map_id": self.map_id, "address": self.address, "size": self.size,
                "fd_offset": self.fd_offset,
                "inode": None if self.inode is None else list(self.inode)}


@dataclass(frozen=True)
class MapEvent:
    """A change of the map set: ``kind`` is "map" or "unmap" (also for ``clear``)."""

    kind: str
    backing: Backing


class DmaMapSet:
    def __init__(self) -> None:
        self._regions: list[DmaRegion] = []   # sorted by address, never overlapping
        self._starts: list[int] = []          # their addresses, for bisect
        self.max_maps = MAX_DMA_MAPS
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0                     # unmaps and clears waiting for users to go
        self.remote_read: RemoteRead | None = None
        self.remote_write: RemoteWrite | None = None
        self.maps_total = 0
        self.unmaps_total = 0
        self._next_id = 1
        # Called after every map and unmap, on the thread that made it, with no lock held.
        self.listeners: list[Callable[[MapEvent], None]] = []

    # -- client side: DMA_MAP / DMA_UNMAP -------------------------------------------------
    def map(self, address: int, size: int, flags: int, fd_offset: int, fd: int | None) -> None:
        mem: mmap.mmap | FileMemory | None = None
        inode: Inode | None = None
        try:
            with self._cond:
                self._check_free(address, size)
            if fd is not None:
                st = os.fstat(fd)
                _check_mappable(st, address, size, fd_offset)
                inode = (st.st_dev, st.st_ino)
            if fd is not None and not cannot_shrink(fd, st):
                mem = FileMemory(fd, fd_offset, size)      # SIGBUS-proof: see dma_file
            elif fd is not None:
                prot = 0
                if flags & DmaFlags.READ:
                    prot |= mmap.PROT_READ
                if flags & DmaFlags.WRITE:
                    prot |= mmap.PROT_WRITE
                try:
                    mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot or mmap.PROT_READ,
                                    offset=fd_offset)
                except (OSError, ValueError, OverflowError) as exc:
                    raise ProtocolError(errno.EINVAL,
                                        f"DMA_MAP: cannot mmap fd at {fd_offset:#x}: {exc}") \
                        from None
            with self._cond:
                # Checked again under the same lock as the insert: no racing map slips in.
                try:
                    self._check_free(address, size)
                except ProtocolError:
                    if mem is not None:
                        mem.close()
                    raise
                region = DmaRegion(address, size, int(flags), fd_offset, mem, map_id=self._next_id,
                                   inode=inode)
                self._insert(region)
        finally:
            if fd is not None:
                os.close(fd)
        self._notify([MapEvent("map", _backing(region))])

    def map_view(self, address: int, size: int, flags: int, view: memoryview | None, *,
                  fd_offset: int = 0, inode: Inode | None = None) -> None:
        """A map whose memory someone else mapped (*view*, unsigned bytes of *size*), or
        None: reached through the remote callbacks.  The view is released at unmap; the
        memory behind it stays its owner's to unmap, after :meth:`unmap` returned."""
        if view is not None and (view.nbytes != size or view.format != "B"):
            raise ValueError(f"DMA map view: {view.nbytes} bytes of {view.format!r}, "
                             f"expected {size} of 'B'")
        with self._cond:
            self._check_free(address, size)
            region = DmaRegion(address, size, int(flags), fd_offset, view, map_id=self._next_id,
                               inode=inode)
            self._insert(region)
        self._notify([MapEvent("map", _backing(region))])

    def _check_free(self, address: int, size: int) -> None:
        """Room for one more map, and *address*+*size* overlaps none (called with the lock
        held).  The maps never overlap, so only the last one starting at or before
        *address* and the first one after it can."""
        if len(self._regions) >= self.max_maps:
            raise ProtocolError(errno.ENOSPC, f"DMA_MAP {address:#x}+{size:#x}: already "
                                              f"{len(self._regions)} maps (max_dma_maps)")
        i = bisect.bisect_right(self._starts, address)
        for r in self._regions[max(i - 1, 0):i + 1]:
            if address < r.end and r.address < address + size:
                raise ProtocolError(errno.EEXIST, f"DMA_MAP {address:#x}+{size:#x} overlaps "
                                                  f"{r.address:#x}+{r.size:#x}")

    def _insert(self, region: DmaRegion) -> None:
        i = bisect.bisect_right(self._starts, region.address)
        self._regions.insert(i, region)
        self._starts.insert(i, region.address)
        self._next_id += 1
        self.maps_total += 1

    def has(self, address: int, size: int, flags: int, mapped: bool) -> bool:
        """Whether exactly this map (range, flags, with or without memory) is live."""
        with self._cond:
            i = bisect.bisect_left(self._starts, address)
            if i == len(self._regions):
                return False
            r = self._regions[i]
            return (r.address, r.size, r.flags, r.mem is not None) == (address, size, flags,
                                                                       mapped)

    def unmap(self, address: int, size: int) -> None:
        with self._cond:
            i = bisect.bisect_left(self._starts, address)
            r = self._regions[i] if i < len(self._regions) else None
            if r is None or r.address != address or r.size != size:
                raise ProtocolError(errno.ENOENT,
                                    f"DMA_UNMAP {address:#x}+{size:#x}: no such map")
            # Release every reference before replying (spec: in-flight DMA too).
            self._wait_while(lambda: r.users > 0)
            # Waiting let other threads in: look the map up again (it may have moved in
            # the list, or been removed by a concurrent unmap or clear).
            i = bisect.bisect_left(self._starts, address)
            if i == len(self._regions) or self._regions[i] is not r:
                raise ProtocolError(errno.ENOENT,
                                    f"DMA_UNMAP {address:#x}+{size:#x}: unmapped meanwhile")
            del self._regions[i]
            del self._starts[i]
            self.unmaps_total += 1
            _drop_memory(r)
        self._notify([MapEvent("unmap", _backing(r))])

    def clear(self) -> None:
        with self._cond:
            self._wait_while(lambda: any(r.users for r in self._regions))
            for r in self._regions:
                _drop_memory(r)
            gone = [MapEvent("unmap", _backing(r)) for r in self._regions]
            self._regions.clear()
            self._starts.clear()
        self._notify(gone)

    def _wait_while(self, busy: Callable[[], bool]) -> None:
        """Wait (the lock held) until *busy* is false: accesses release their maps."""
        self._waiters += 1
        try:
            while busy():
                self._cond.wait()
        finally:
            self._waiters -= 1

    def _notify(self, events: list[MapEvent]) -> None:
        for ev in events:
            for fn in list(self.listeners):
                try:
                    fn(ev)
                except Exception:
                    log.exception("DMA map listener failed on %s", ev)

    def backing(self, address: int, size: int) -> tuple[Backing, ...]:
        """The maps that back guest range *address*+*size* now, in address order; DmaFault
        if any byte of it is unmapped."""
        with self._cond:
            return tuple(_backing(r) for r, _, _ in self._pieces(address, size, 0))

    def direct(self, address: int, length: int) -> bool:
        """Whether a device access to guest range *address*+*length* never waits for the
        client: every byte of it is mapped or reached through its fd, none only through
        DMA_READ/DMA_WRITE messages.  A range not wholly mapped counts too: an access to
        it faults before it touches anything."""
        with self._lock:
            try:
                pieces = self._pieces(address, length, 0)
            except DmaFault:
                return True
        return all(r.mem is not None for r, _, _ in pieces)

    def snapshot(self) -> list[tuple[int, int, int, bool]]:
        with self._cond:
            return [(r.address, r.size, r.flags, r.mem is not None) for r in self._regions]

    # -- device side: DMA accesses ----------------------------------------------------------
    def _find(self, address: int, need: int) -> DmaRegion:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._regions[i].end:
            r = self._regions[i]
            if need and not r.flags & need:
                kind = "read" if need == _READ else "write"
                raise DmaFault(f"DMA {kind} at {address:#x}: map is not {kind}able")
            return r
        raise DmaFault(f"DMA to unmapped address {address:#x}")

    def _pieces(self, address: int, length: int, need: int,
                pinned: Collection[int] | None = None) -> list[tuple[DmaRegion, int, int]]:
        if length < 0 or address < 0 or address + length > 1 << 64:
            raise DmaFault(f"bad DMA range {address:#x}+{length:#x}")
        out = []
        pos = address
        end = address + length
        while pos < end:
            r = self._find(pos, need)
            if pinned is not None and r.map_id not in pinned:
                raise DmaFault(f"DMA at {pos:#x}: map {r.map_id} is not one the access was "
                               "pinned to (remapped since it was authorised)")
            n = min(end, r.end) - pos
            out.append((r, pos, n))
            pos += n
        return out

    def read(self, address: int, length: int, pinned: Collection[int] | None = None) -> bytes:
        """*length* bytes at guest *address*; with *pinned*, only from maps with those ids.
        Mapped pieces are copied first, under references; pieces reached over the socket
        come after those are released (see :meth:`_acquire`)."""
        with self._lock:
            pieces = self._pieces(address, length, _READ, pinned)
            held = self._acquire(pieces)
        chunks: list[bytes | None] = []
        try:
            for r, pos, n in pieces:
                off = pos - r.address
                chunks.append(bytes(r.mem[off:off + n]) if r.mem is not None else None)
        except MemoryGone as exc:
            raise DmaFault(f"DMA read at {address:#x}: {exc}") from None
        finally:
            self._release(held)
        return b"".join(c if c is not None else self._remote_read(pos, n)
                        for c, (_, pos, n) in zip(chunks, pieces, strict=True))

    def write(self, address: int, data: bytes, pinned: Collection[int] | None = None) -> None:
        """*data* to guest *address*; with *pinned*, only into maps with those ids (mapped
        pieces first, as for :meth:`read`)."""
        with self._lock:
            pieces = self._pieces(address, len(data), _WRITE, pinned)
            held = self._acquire(pieces)
        remote: list[tuple[int, int, int]] = []
        try:
            done = 0
            for r, pos, n in pieces:
                if r.mem is not None:
                    off = pos - r.address
                    r.mem[off:off + n] = data[done:done + n]
                else:
                    remote.append((pos, done, n))
                done += n
        except MemoryGone as exc:
            raise DmaFault(f"DMA write at {address:#x}: {exc}") from None
        finally:
            self._release(held)
        for pos, done, n in remote:
            self._remote_write(pos, data[done:done + n])

    def copy_direct(self, src: int, dst: int, length: int) -> bool:
        """*length* bytes from guest *src* to guest *dst* in one memmove, when each range
        lies in one map this process maps and that allows the access; the result is that
        of reading the source and then writing it (overlap included).  False, and
        nothing touched, otherwise: the caller reads and writes (which says why)."""
        return self.copy_direct_many(((src, dst, length),)) == 1

    def copy_direct_many(self, copies: Sequence[Copy],
                         proceed: Callable[[], bool] | None = None) -> int:
        """Each of *copies* (source, destination, length) as :meth:`copy_direct` does it,
        in order, the maps looked up and held once for all of them; it stops before the
        first it cannot do so, or before the first for which *proceed* (asked before
        each) says no.  How many it did."""
        starts, regions = self._starts, self._regions
        todo: list[tuple[memoryview, int, memoryview, int, int]] = []
        held: list[DmaRegion] = []
        with self._lock:
            for src, dst, length in copies:
                i = bisect.bisect_right(starts, src) - 1
                j = bisect.bisect_right(starts, dst) - 1
                if i < 0 or j < 0 or length <= 0:
                    break
                rs, rd = regions[i], regions[j]
                vs, vd = rs.view, rd.view
                if (vs is None or vd is None or src + length > rs.end or dst + length > rd.end
                        or not rs.flags & _READ or not rd.flags & _WRITE):
                    break
                rs.users += 1
                rd.users += 1
                held += (rs, rd)
                todo.append((vs, src - rs.address, vd, dst - rd.address, length))
        done = 0
        try:
            # Held maps are not unmapped (nor their views released) until let go.
            for vs, so, vd, do, length in todo:
                if proceed is not None and not proceed():
                    break
                vd[do:do + length] = vs[so:so + length]
                done += 1
        finally:
            if held:
                with self._lock:
                    for r in held:
                        r.users -= 1
                    if self._waiters:
                        self._cond.notify_all()
        return done

    @staticmethod
    def _acquire(pieces: list[tuple[DmaRegion, int, int]]) -> list[DmaRegion]:
        # Only mapped regions hold references, and only while their bytes are copied: no
        # reference is held across a socket round trip, so an unmap never waits on a DMA
        # reply that the thread busy unmapping must route -- nor, with libvfio-user, on
        # an access whose own message exchange made the library reset the context.
        held = [r for r, _, _ in pieces if r.mem is not None]
        for r in held:
            r.users += 1
        return held

    def _release(self, held: list[DmaRegion]) -> None:
        if not held:
            return
        with self._lock:
            for r in held:
                r.users -= 1
            if self._waiters:
                self._cond.notify_all()

    def _remote_read(self, address: int, n: int) -> bytes:
        if self.remote_read is None:
            raise DmaFault(f"DMA read at {address:#x}: memory not mappable and no client")
        return self.remote_read(address, n)

    def _remote_write(self, address: int, data: bytes) -> None:
        if self.remote_write is None:
            raise DmaFault(f"DMA write at {address:#x}: memory not mappable and no client")
        self.remote_write(address, data)


def _check_mappable(st: os.stat_result, address: int, size: int, fd_offset: int) -> None:
    """Spec "DMA_MAP": *size* bytes of the file from *offset* are mapped.  mmap() takes
    both as an off_t: each of them, and their sum, must be below 2**63 (larger values
    would not even reach the kernel).  The range of a regular file (a memfd, a file on
    hugetlbfs or tmpfs) must lie within the file: a page of a shared mapping beyond the
    end of its file raises SIGBUS at the first device access, killing the server."""
    if fd_offset < 0 or size > _OFF_MAX or fd_offset > _OFF_MAX - size:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP {address:#x}+{size:#x}: file range "
                                          f"{fd_offset:#x}+{size:#x} is not mappable")
    if fd_offset % mmap.ALLOCATIONGRANULARITY:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP {address:#x}+{size:#x}: file offset "
                                          f"{fd_offset:#x} is not page aligned")
    if stat.S_ISREG(st.st_mode) and fd_offset + size > st.st_size:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP {address:#x}+{size:#x}: file range "
                                          f"{fd_offset:#x}+{size:#x} beyond the end of the "
                                          f"file ({st.st_size:#x} bytes)")


_OFF_MAX = (1 << 63) - 1


def _drop_memory(r: DmaRegion) -> None:
    if r.view is not None:
        r.view.release()        # before the mmap closes: it refuses while exported
        r.view = None
    if isinstance(r.mem, memoryview):
        r.mem.release()
    elif r.mem is not None:
        r.mem.close()
    r.mem = None


def _backing(r: DmaRegion) -> Backing:
    return Backing(r.map_id, r.address, r.size, r.fd_offset, r.inode)
