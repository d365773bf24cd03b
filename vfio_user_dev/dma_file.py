"""Guest memory reached through its file descriptor (pread/pwrite), not a mapping.

A shared mapping of a file that its owner later shrinks raises SIGBUS at the first access
beyond the new end, which would kill the server.  A client's memfd that is sealed against
shrinking (``F_SEAL_SHRINK``, as QEMU's ``memory-backend-memfd`` seals by default) cannot
do that and is mapped; any other file is accessed with ``pread``/``pwrite`` at its offset,
where a shrunken file is a short read or write: a :class:`MemoryGone` (which the map
set reports as a DMA fault), not a signal.
"""

from __future__ import annotations

import fcntl
import os
import stat


class MemoryGone(Exception):
    """The client's file no longer holds the mapped range (or cannot be accessed)."""


class FileMemory:
    """*size* bytes of an open file from *offset*, sliced like a mapping."""

    __slots__ = ("fd", "offset", "size")

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd = os.dup(fd)
        self.offset = offset
        self.size = size

    def _range(self, key: slice) -> tuple[int, int]:
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("guest memory is sliced with step 1")
        return start, max(0, stop - start)

    def __getitem__(self, key: slice) -> bytes:
        start, n = self._range(key)
        try:
            out = os.pread(self.fd, n, self.offset + start)
        except OSError as exc:
            raise MemoryGone(f"guest memory read at +{start:#x}: {exc.strerror}") from None
        if len(out) != n:
            raise MemoryGone(f"guest memory read at +{start:#x}: the client's file ends "
                           f"{len(out)} bytes in (shrunk after DMA_MAP)")
        return out

    def __setitem__(self, key: slice, value: bytes | bytearray | memoryview) -> None:
        start, n = self._range(key)
        if len(value) != n:
            raise ValueError(f"slice of {n} bytes assigned {len(value)}")
        # pwrite beyond the end of a shrunken file would silently grow it again: refuse.
        if os.fstat(self.fd).st_size < self.offset + start + n:
            raise MemoryGone(f"guest memory write at +{start:#x}: the client's file was "
                             "shrunk after DMA_MAP")
        view = memoryview(value)
        done = 0
        try:
            while done < n:
                wrote = os.pwrite(self.fd, view[done:], self.offset + start + done)
                if wrote <= 0:
                    break
                done += wrote
        except OSError as exc:
            raise MemoryGone(f"guest memory write at +{start + done:#x}: "
                           f"{exc.strerror}") from None
        if done != n:
            raise MemoryGone(f"guest memory write at +{start + done:#x}: short write")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def cannot_shrink(fd: int, st: os.stat_result) -> bool:
    """True when mapping *fd* is safe from SIGBUS: not a regular file (whose size cannot
    change under us), or a memfd sealed against shrinking."""
    if not stat.S_ISREG(st.st_mode):
        return True
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return bool(seals & fcntl.F_SEAL_SHRINK)
