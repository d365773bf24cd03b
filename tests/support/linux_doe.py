"""DOE mailbox drivers over a vfio-user client's config-space accesses (PCIe 6.x §6.30,
§7.9.24): Linux's drivers/pci/doe.c step by step, and the guest agent's config accessor."""

from __future__ import annotations

import struct
import time

from teeio.doe import DoeControl, DoeReg, DoeStatus
from vfio_user_dev.client import Client
from vfio_user_dev.device import DOE_CAP
from vfio_user_dev.protocol import PciRegion

CONFIG = PciRegion.CONFIG
CTRL, STATUS = DOE_CAP + DoeReg.CONTROL, DOE_CAP + DoeReg.STATUS
WMB, RMB = DOE_CAP + DoeReg.WRITE_MAILBOX, DOE_CAP + DoeReg.READ_MAILBOX


class VfioConfig:
    """guest_agent.doe's config accessor on top of vfio-user REGION_READ/WRITE."""

    def __init__(self, c: Client) -> None:
        self.c = c

    def read32(self, off: int) -> int:
        return self.c.read32(CONFIG, off)

    def write32(self, off: int, value: int) -> None:
        self.c.write32(CONFIG, off, value)


class LinuxDoe:
    """Linux's drivers/pci/doe.c, step by step (pci_doe_abort, _send_req, _recv_resp)."""

    TIMEOUT = 1.0
    POLL = 1.0 / 128

    def __init__(self, c: Client, cap: int) -> None:
        self.c, self.cap = c, cap

    def rd(self, reg: int) -> int:
        return self.c.read32(CONFIG, self.cap + reg)

    def wr(self, reg: int, value: int) -> None:
        self.c.write32(CONFIG, self.cap + reg, value)

    def abort(self) -> None:
        self.wr(DoeReg.CONTROL, DoeControl.ABORT)
        deadline = time.monotonic() + self.TIMEOUT
        while self.rd(DoeReg.STATUS) & (DoeStatus.ERROR | DoeStatus.BUSY):
            assert time.monotonic() < deadline, "ABORT timed out: Linux marks the mailbox dead"
            time.sleep(self.POLL)

    def doe(self, vid: int, dtype: int, request: bytes, response_size: int) -> bytes:
        st = self.rd(DoeReg.STATUS)
        assert not st & (DoeStatus.BUSY | DoeStatus.ERROR)
        length = 2 + (len(request) + 3) // 4
        self.wr(DoeReg.WRITE_MAILBOX, vid | dtype << 16)
        self.wr(DoeReg.WRITE_MAILBOX, length)
        padded = request + bytes(-len(request) % 4)
        for i in range(0, len(padded), 4):
            self.wr(DoeReg.WRITE_MAILBOX, int.from_bytes(padded[i:i + 4], "little"))
        self.wr(DoeReg.CONTROL, DoeControl.GO)
        deadline = time.monotonic() + self.TIMEOUT
        while not (st := self.rd(DoeReg.STATUS)) & DoeStatus.DATA_OBJECT_READY:
            assert not st & DoeStatus.ERROR, "DOE Error: Linux aborts"
            assert time.monotonic() < deadline, "no response within 1 s"
            time.sleep(self.POLL)
        val = self.rd(DoeReg.READ_MAILBOX)
        assert (val & 0xFFFF, (val >> 16) & 0xFF) == (vid, dtype)
        self.wr(DoeReg.READ_MAILBOX, 0)
        length = self.rd(DoeReg.READ_MAILBOX) & 0x3FFFF or 1 << 18
        self.wr(DoeReg.READ_MAILBOX, 0)
        assert length >= 2
        length -= 2
        payload_len = min(length, (response_size + 3) // 4)
        out = b""
        for i in range(payload_len):
            out += self.rd(DoeReg.READ_MAILBOX).to_bytes(4, "little")
            if i == payload_len - 1:   # prior to the last ack, ensure Data Object Ready
                assert self.rd(DoeReg.STATUS) & DoeStatus.DATA_OBJECT_READY
            self.wr(DoeReg.READ_MAILBOX, 0)
        for _ in range(payload_len, length):   # flush excess length
            self.rd(DoeReg.READ_MAILBOX)
            self.wr(DoeReg.READ_MAILBOX, 0)
        assert not self.rd(DoeReg.STATUS) & DoeStatus.ERROR
        return out[:response_size]

    def cache_features(self) -> list[tuple[int, int]]:
        """pci_doe_cache_features(): discovery version 2 when the capability version >= 2."""
        capver = (self.c.read32(CONFIG, self.cap) >> 16) & 0xF
        index, found = 0, []
        while True:
            req = struct.pack("<I", index | (2 if capver >= 2 else 0) << 8)
            rsp = int.from_bytes(self.doe(1, 0, req, 4), "little")
            found.append((rsp & 0xFFFF, (rsp >> 16) & 0xFF))
            index = rsp >> 24
            if not index:
                return found
