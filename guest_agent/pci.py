"""Guest-side access to the device: sysfs lookup, BAR0 MMIO, config space, uio INTx.

Stdlib only.  Every register access is one 32-bit load or store through ``resource0``.
uio is for CONFIG_UNLOCKED only: closing it clears Bus Master Enable, a TDISP security event
(PCIe 6.x §11.2.6); docs/tdisp-and-tsm.md, "How the guest drives the device".
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
import time
from pathlib import Path

SYSFS_PCI = Path("/sys/bus/pci/devices")
UIO_DRIVER = Path("/sys/bus/pci/drivers/uio_pci_generic")
COMMAND = 0x04
COMMAND_MEMORY_SPACE = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
IORESOURCE_MEM = 0x200


class AgentError(RuntimeError):
    pass


def find_device(vendor: int, device: int) -> Path:
    for dev in sorted(SYSFS_PCI.iterdir()):
        try:
            v = int((dev / "vendor").read_text(), 16)
            d = int((dev / "device").read_text(), 16)
        except OSError:
            continue
        if (v, d) == (vendor, device):
            return dev
    raise AgentError(f"no PCI device {vendor:04x}:{device:04x} in {SYSFS_PCI}")


BAR0 = 0x10          # Base Address Register 0 (PCI 3.0 §6.2.5)
BAR_MEM_64 = 0x4     # memory BAR type 10b: 64-bit, the next BAR is its upper half
CAP_POINTER = 0x34
STATUS_CAP_LIST = 1 << 4
CAP_ID_MSIX = 0x11   # MSI-X capability (PCIe 6.x §7.7.2)
BIR_MASK = 0x7


class Config:
    """Config space through sysfs ``config`` (root may write the whole 4 KiB)."""

    def __init__(self, dev: Path) -> None:
        self.path = dev / "config"

    def read(self, off: int, size: int) -> int:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return int.from_bytes(os.pread(fd, size, off), "little")
        finally:
            os.close(fd)

    def write(self, off: int, size: int, value: int) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, value.to_bytes(size, "little"), off)
        finally:
            os.close(fd)


def enable_device(cfg: Config) -> tuple[int, int]:
    """Set Memory Space and Bus Master Enable (Command register, PCI 3.0 §6.2.2) by one
    config write, keeping every other bit; nothing is written when both are already set.
    Setting them is never a TDISP security event (clearing them is, §11.2.6).  Returns the
    Command register (before, after)."""
    before = cfg.read(COMMAND, 2)
    want = before | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER
    if want != before:
        cfg.write(COMMAND, 2, want)
    return before, cfg.read(COMMAND, 2)


def rewrite_bars(cfg: Config, bars: list[tuple[int, int, int]]) -> list[str]:
    """Write each memory BAR back as the OS assigned it (what config space shows the
    OS), so the function decodes -- and its interface report names -- the addresses the
    OS uses.  An FLR behind the OS's back (the host's) leaves the function's BARs at
    their reset value (PCIe 6.x §6.6.2) while the OS still shows its own.  Only before
    LOCK: a BAR write in CONFIG_LOCKED or RUN is a TDISP security event (§11.2.6).
    Returns the values written, hex."""
    out = []
    for index, _base, _size in bars:
        off = BAR0 + 4 * index
        value = cfg.read(off, 4)
        cfg.write(off, 4, value)
        out.append(f"BAR{index}={value:#010x}")
        if value & 0x7 == BAR_MEM_64 and index < 5:      # and its upper half
            upper = cfg.read(off + 4, 4)
            cfg.write(off + 4, 4, upper)
            out.append(f"BAR{index + 1}={upper:#010x}")
    return out


def class_code(dev: Path) -> int:
    """Base class << 16 | sub-class << 8 | programming interface (sysfs ``class``)."""
    return int((dev / "class").read_text(), 16)


def find_by_class(vendor: int, device: int, klass: int) -> Path:
    """The function *vendor*:*device* with class code *klass*."""
    dev = find_device(vendor, device)
    if class_code(dev) != klass:
        raise AgentError(f"{dev.name} ({vendor:04x}:{device:04x}) has class code "
                         f"{class_code(dev):06x}, not {klass:06x}")
    return dev


def msix_bars(cfg: Config) -> frozenset[int]:
    """The BARs the MSI-X capability puts the table and the PBA in (Table BIR, PBA BIR;
    PCIe 6.x §7.7.2.2, §7.7.2.3); empty without the capability."""
    if not cfg.read(0x06, 2) & STATUS_CAP_LIST:
        return frozenset()
    ptr, seen = cfg.read(CAP_POINTER, 1) & 0xFC, set()
    while ptr and ptr not in seen:
        seen.add(ptr)
        if cfg.read(ptr, 1) == CAP_ID_MSIX:
            return frozenset({cfg.read(ptr + 4, 4) & BIR_MASK, cfg.read(ptr + 8, 4) & BIR_MASK})
        ptr = cfg.read(ptr + 1, 1) & 0xFC
    return frozenset()


def bars_of(dev: Path) -> list[tuple[int, int, int]]:
    """(index, base, size) of the memory BARs, from sysfs ``resource``."""
    out = []
    for index, line in enumerate((dev / "resource").read_text().splitlines()[:6]):
        start, end, flags = (int(x, 16) for x in line.split())
        if end > start and flags & IORESOURCE_MEM:
            out.append((index, start, end - start + 1))
    return out


def driver_of(dev: Path) -> str | None:
    """The name of the kernel driver bound to *dev*, or None."""
    link = dev / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


class Mmio:
    def __init__(self, dev: Path, bar: int = 0) -> None:
        path = dev / f"resource{bar}"
        self.size = path.stat().st_size
        fd = os.open(path, os.O_RDWR | os.O_SYNC)
        try:
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def read32(self, off: int) -> int:
        return int(ctypes.c_uint32.from_address(self.base + off).value)

    def write32(self, off: int, value: int) -> None:
        ctypes.c_uint32.from_address(self.base + off).value = value & 0xFFFFFFFF


class UioIrq:
    """INTx delivered to user space by uio_pci_generic (docs/design.md decision 8)."""

    def __init__(self, dev: Path, vendor: int, device: int) -> None:
        if not (dev / "driver").exists():
            if not UIO_DRIVER.exists():
                raise AgentError("uio_pci_generic is not loaded")
            try:
                (UIO_DRIVER / "new_id").write_text(f"{vendor:04x} {device:04x}")
            except OSError:
                (UIO_DRIVER / "bind").write_text(dev.name)
        deadline = time.monotonic() + 5
        while not (dev / "uio").is_dir():
            if time.monotonic() > deadline:
                raise AgentError(f"uio_pci_generic did not bind {dev.name}")
            time.sleep(0.05)
        name = sorted(p.name for p in (dev / "uio").iterdir())[0]
        self.fd = os.open(f"/dev/{name}", os.O_RDWR)
        self.received = 0
        self.last_count: int | None = None

    def wait(self, timeout: float) -> bool:
        """Wait for one interrupt; True if one arrived."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        (count,) = struct.unpack("<I", os.read(self.fd, 4))
        self.received += 1 if self.last_count is None else count - self.last_count
        self.last_count = count
        return True

    def reenable(self, config: Config) -> None:
        """Clear Command.Interrupt Disable again, which the kernel's handler set.

        uio's irqcontrol write does it where the driver implements it; uio_pci_generic
        on current kernels does not (ENOSYS), so the config register is written directly.
        """
        try:
            os.write(self.fd, struct.pack("<I", 1))
            return
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
        cmd = config.read(0x04, 2)
        if cmd & COMMAND_INTX_DISABLE:
            config.write(0x04, 2, cmd & ~COMMAND_INTX_DISABLE)

    def close(self) -> None:
        os.close(self.fd)
