"""A user-space DOE requester on any PCI function's config space, and the doe-discovery mode.

The mailbox is driven as PCIe 6.3 §6.30.2 ("Exchange of Data Objects") describes it
and as Linux's ``drivers/pci/doe.c`` does it: check Busy and Error, write the object
DW by DW into the Write Data Mailbox, set Go, poll for Data Object Ready (or Error)
for up to 1 s, then read each DW and acknowledge it with a write to the Read Data
Mailbox.  Any failure aborts the mailbox.  All accesses are aligned dwords, as
§6.30.2 requires for the mailbox registers.

In the guest the accesses go through sysfs ``config`` (root).  Linux has its own
mailbox state for the same capability; it only uses it at enumeration (discovery)
and for in-kernel users, none of which run here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from guest_agent.pci import AgentError, find_device
from guest_agent.selftest import DEVICE, VENDOR, Checks
from teeio.doe import (
    DOE_EXT_CAP_ID,
    DOE_TIMEOUT,
    HEADER_BYTES,
    MAX_OBJECT_DW,
    DoeControl,
    DoeError,
    DoeObject,
    DoeReg,
    DoeStatus,
    discover,
    protocol_name,
)

POLL_INTERVAL = 0.001


class DoeMailboxError(AgentError):
    pass


class ConfigAccess(Protocol):
    def read32(self, off: int) -> int: ...
    def write32(self, off: int, value: int) -> None: ...


class SysfsConfig:
    """Aligned dword accesses to a function's config space through sysfs ``config``."""

    def __init__(self, dev: Path) -> None:
        self.fd = os.open(dev / "config", os.O_RDWR)

    def read32(self, off: int) -> int:
        data = os.pread(self.fd, 4, off)
        if len(data) != 4:
            raise AgentError(f"config read at {off:#x} returned {len(data)} bytes")
        return int.from_bytes(data, "little")

    def write32(self, off: int, value: int) -> None:
        if os.pwrite(self.fd, (value & 0xFFFFFFFF).to_bytes(4, "little"), off) != 4:
            raise AgentError(f"config write at {off:#x} was short")

    def close(self) -> None:
        os.close(self.fd)


def find_ext_capabilities(cfg: ConfigAccess, cap_id: int) -> list[int]:
    """Offsets of every extended capability *cap_id* (PCIe 6.x §7.6.3), list order."""
    found, off, seen = [], 0x100, set()
    while off and off not in seen:
        seen.add(off)
        hdr = cfg.read32(off)
        if hdr in (0, 0xFFFFFFFF):
            break
        if hdr & 0xFFFF == cap_id:
            found.append(off)
        off = (hdr >> 20) & 0xFFC
    return found


class DoeMailboxClient:
    """A DOE requester on the capability at *cap* of *cfg*."""

    def __init__(self, cfg: ConfigAccess, cap: int, timeout: float = DOE_TIMEOUT) -> None:
        self.cfg = cfg
        self.cap = cap
        self.timeout = timeout
        self.version = (cfg.read32(cap) >> 16) & 0xF

    @classmethod
    def find(cls, cfg: ConfigAccess) -> DoeMailboxClient:
        caps = find_ext_capabilities(cfg, DOE_EXT_CAP_ID)
        if not caps:
            raise DoeMailboxError("no DOE extended capability")
        return cls(cfg, caps[0])

    def _rd(self, reg: DoeReg) -> int:
        return self.cfg.read32(self.cap + reg)

    def _wr(self, reg: DoeReg, value: int) -> None:
        self.cfg.write32(self.cap + reg, value)

    def status(self) -> int:
        return self._rd(DoeReg.STATUS)

    def abort(self) -> None:
        """Abort; Error and Busy must clear within 1 s (§6.30.2) or the mailbox is dead."""
        self._wr(DoeReg.CONTROL, DoeControl.ABORT)
        deadline = time.monotonic() + self.timeout
        while self.status() & (DoeStatus.ERROR | DoeStatus.BUSY):
            if time.monotonic() > deadline:
                raise DoeMailboxError("DOE Abort did not clear Busy/Error within 1 s")
            time.sleep(POLL_INTERVAL)

    def exchange(self, obj: bytes) -> bytes | None:
        """Send one whole object; the whole response, or None if none came within 1 s."""
        if len(obj) % 4 or not HEADER_BYTES <= len(obj) <= 4 * MAX_OBJECT_DW:
            raise ValueError(f"a DOE object of {len(obj)} bytes cannot be sent")
        try:
            return self._exchange(obj)
        except DoeMailboxError:
            self.abort()
            raise

    def _exchange(self, obj: bytes) -> bytes | None:
        deadline = time.monotonic() + self.timeout
        while (st := self.status()) & DoeStatus.BUSY:
            if time.monotonic() > deadline:
                raise DoeMailboxError("DOE Busy did not clear within 1 s")
            time.sleep(POLL_INTERVAL)
        if st & DoeStatus.ERROR:
            raise DoeMailboxError("DOE Error set before sending")
        for i in range(0, len(obj), 4):
            self._wr(DoeReg.WRITE_MAILBOX, int.from_bytes(obj[i:i + 4], "little"))
        self._wr(DoeReg.CONTROL, DoeControl.GO)
        deadline = time.monotonic() + self.timeout
        while not (st := self.status()) & DoeStatus.DATA_OBJECT_READY:
            if st & DoeStatus.ERROR:
                raise DoeMailboxError("DOE Error after Go")
            if time.monotonic() > deadline:
                self.abort()
                return None
            time.sleep(POLL_INTERVAL)
        return self._receive()

    def _receive(self) -> bytes:
        words = [self._read_ack(), self._read_ack()]
        length = words[1] & (MAX_OBJECT_DW - 1) or MAX_OBJECT_DW
        if length < 2:
            raise DoeMailboxError(f"response header says {length} DW")
        for i in range(2, length):
            if i == length - 1 and not self.status() & DoeStatus.DATA_OBJECT_READY:
                raise DoeMailboxError("Data Object Ready cleared before the last DW")
            words.append(self._read_ack())
        st = self.status()
        if st & DoeStatus.ERROR:
            raise DoeMailboxError("DOE Error after the response")
        if st & DoeStatus.DATA_OBJECT_READY:
            raise DoeMailboxError("Data Object Ready still set after the last DW")
        return b"".join(w.to_bytes(4, "little") for w in words)

    def _read_ack(self) -> int:
        value = self._rd(DoeReg.READ_MAILBOX)
        self._wr(DoeReg.READ_MAILBOX, 0)
        return value

    def exchange_object(self, obj: DoeObject) -> DoeObject | None:
        rsp = self.exchange(obj.encode())
        return None if rsp is None else DoeObject.decode(rsp)

    def discover(self) -> list[tuple[int, int]]:
        """DOE Discovery walk, with discovery version 2 for a version >= 2 capability."""
        return discover(self.exchange_object, 2 if self.version >= 2 else 0)


# -- the doe-discovery mode ---------------------------------------------------------------------

def kernel_doe_features(dev: Path) -> dict[str, str]:
    """``doe_features``: file name -> content (``doe_discovery`` holds ``0001:00``)."""
    folder = dev / "doe_features"
    if not folder.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in sorted(folder.iterdir())}


def discovery(dev: Path, mb: DoeMailboxClient, checks: Checks) -> dict[str, Any]:
    """Linux's discovery (``doe_features``) and our own walk of *mb*, checked against each
    other; returns the report fields."""
    features = kernel_doe_features(dev)
    kernel = sorted(features.values())
    checks.add("kernel_doe_features", features.get("doe_discovery") == "0001:00",
               files=sorted(features))
    mb.abort()   # start from a known state, as Linux does before its discovery walk
    try:
        user = [protocol_name(*p) for p in mb.discover()]
    except (DoeError, DoeMailboxError) as exc:
        user = []
        checks.add("user_discovery", False, error=str(exc))
    checks.add("user_discovery_first_entry", user[:1] == ["0001:00"], user=user)
    checks.add("user_matches_kernel", sorted(user) == kernel, user=user, kernel=kernel)
    return {"bdf": dev.name, "kernel_doe_features": features, "kernel_protocols": kernel,
            "doe_cap": hex(mb.cap), "doe_cap_version": mb.version, "user_protocols": user}


def check_idle(mb: DoeMailboxClient, checks: Checks) -> None:
    st = mb.status()
    checks.add("mailbox_idle_after", st & (DoeStatus.BUSY | DoeStatus.ERROR
                                           | DoeStatus.DATA_OBJECT_READY) == 0,
               status=hex(st))


def run() -> dict[str, Any]:
    checks = Checks()
    dev = find_device(VENDOR, DEVICE)
    report: dict[str, Any] = {"mode": "doe-discovery"}
    cfg = SysfsConfig(dev)
    try:
        mb = DoeMailboxClient.find(cfg)
        report |= discovery(dev, mb, checks)
        check_idle(mb, checks)
    finally:
        cfg.close()
    report |= {"checks": checks.items, "ok": checks.ok}
    return report
