"""DMA buffers in hugetlbfs 2 MiB pages with physical addresses from pagemap (decision 9).

A 2 MiB huge page is physically contiguous and never migrated, so one
physical base address covers the whole buffer; DMA jobs stay inside one page.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

from guest_agent.pci import AgentError

HUGE = 2 << 20
PAGE = 4096
PFN_MASK = (1 << 55) - 1


def virt_to_phys(vaddr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((vaddr // PAGE) * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    if not entry >> 63 & 1:
        raise AgentError(f"page at {vaddr:#x} is not present")
    pfn = int(entry) & PFN_MASK
    if pfn == 0:
        raise AgentError("pagemap hides PFNs (needs CAP_SYS_ADMIN)")
    return pfn * PAGE + vaddr % PAGE


class HugeBuffer:
    def __init__(self, mount: Path = Path("/dev/hugepages"), name: str = "teeio-dma") -> None:
        path = mount / f"{name}-{os.getpid()}"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, HUGE)
            try:
                self.mm = mmap.mmap(fd, HUGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise AgentError(f"cannot map a 2 MiB huge page from {mount}: {exc} "
                                 "(is nr_hugepages > 0?)") from None
        finally:
            os.close(fd)
            path.unlink()
        self.mm[0:1] = b"\0"  # fault the page in
        self.vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlock(ctypes.c_void_p(self.vaddr), ctypes.c_size_t(HUGE)) != 0:
            raise AgentError(f"mlock failed: {os.strerror(ctypes.get_errno())}")
        self.phys = virt_to_phys(self.vaddr)
        if virt_to_phys(self.vaddr + HUGE - PAGE) != self.phys + HUGE - PAGE:
            raise AgentError("huge page is not physically contiguous")

    def write(self, off: int, data: bytes) -> None:
        self.mm[off:off + len(data)] = data

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.mm[off:off + n])
