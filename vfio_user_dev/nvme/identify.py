"""Identify data structures (NVMe 1.4 §5.15.2) and log pages (§5.14.1) of the controller."""

from __future__ import annotations

import hashlib
import struct
import time

from teeio import personality as personalities
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.spec import (
    AERL,
    IDENTIFY_SIZE,
    IO_QUEUES,
    MAX_QUEUE_ENTRIES,
    MDTS,
    VERSION,
    LogPage,
)

VENDOR_ID = personalities.VENDOR_ID     # VID and SSVID: the function's PCI vendor ID
SUBNQN = "nqn.2026-12.io.teeio:emulated-tdisp-nvme"
MODEL = "TEEIO TDISP NVMe"
FIRMWARE = "teeio1.0"
NSID = 1


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii")[:size].ljust(size, b" ")


def controller(serial: str, max_queues: int = IO_QUEUES) -> bytes:
    """Identify Controller (Figure 247)."""
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", d, 0, VENDOR_ID, VENDOR_ID)                  # VID, SSVID
    d[4:24] = _ascii(serial, 20)                                          # SN
    d[24:64] = _ascii(MODEL, 40)                                          # MN
    d[64:72] = _ascii(FIRMWARE, 8)                                        # FR
    d[72] = 6                                                             # RAB
    d[77] = MDTS
    struct.pack_into("<HI", d, 78, 1, VERSION)                            # CNTLID, VER
    d[111] = 1                                                            # CNTRLTYPE: I/O
    d[258] = 3                                                            # ACL
    d[259] = AERL
    d[260] = 1 << 1 | 1                                                   # FRMW: 1 slot, RO
    d[261] = 0                                                            # LPA
    d[262] = 0                                                            # ELPE: 1 entry
    struct.pack_into("<HH", d, 266, 0x157, 0x175)                         # WCTEMP, CCTEMP
    d[512] = 0x66                                                         # SQES
    d[513] = 0x44                                                         # CQES
    struct.pack_into("<HI", d, 514, MAX_QUEUE_ENTRIES, 1)                 # MAXCMD, NN
    struct.pack_into("<H", d, 520, 1 << 2 | 1 << 3)                       # ONCS: DSM, WZ
    d[525] = 1                                                            # VWC present
    d[768:768 + len(SUBNQN)] = SUBNQN.encode()
    struct.pack_into("<H", d, 2048, 2500)                                 # PSD0 MP: 25 W
    return bytes(d)


def namespace(ns: Namespace) -> bytes:
    """Identify Namespace (Figure 245) for the one namespace: one LBA format."""
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", d, 0, ns.blocks, ns.blocks, ns.blocks)       # NSZE NCAP NUSE
    d[104:120] = _nguid(ns)                                               # NGUID
    d[120:128] = _nguid(ns)[:8]                                           # EUI64
    struct.pack_into("<I", d, 128, ns.lba_shift << 16)                    # LBAF0: LBADS
    return bytes(d)


def active_namespaces(after: int) -> bytes:
    """Active Namespace ID list (CNS 02h): NSIDs greater than *after*."""
    d = bytearray(IDENTIFY_SIZE)
    if after < NSID:
        struct.pack_into("<I", d, 0, NSID)
    return bytes(d)


def namespace_descriptors(ns: Namespace) -> bytes:
    """Namespace Identification Descriptor list (CNS 03h, Figure 249): the NGUID."""
    d = bytearray(IDENTIFY_SIZE)
    d[0:4] = bytes([2, 16, 0, 0])                                         # NIDT NGUID
    d[4:20] = _nguid(ns)
    return bytes(d)


def _nguid(ns: Namespace) -> bytes:
    return hashlib.sha256(str(ns.path.resolve()).encode()).digest()[:16]


def log_page(lid: int, ns: Namespace, errors: int, started: float) -> bytes | None:
    """The log page *lid*, or None when not supported."""
    if lid == LogPage.ERROR:
        return bytes(64)                     # one entry, zero: no error information kept
    if lid == LogPage.SMART:                 # Figure 194
        d = bytearray(512)
        d[0] = 0                             # critical warning
        struct.pack_into("<H", d, 1, 273 + 40)               # composite temperature, K
        d[3], d[4], d[5] = 100, 10, 0        # available spare, threshold, percentage used
        c = ns.counters
        # data units: thousands of 512-byte units, rounded up (Figure 194)
        read_units = -(-(c["blocks_read"] << ns.lba_shift) // 512_000)
        written_units = -(-(c["blocks_written"] << ns.lba_shift) // 512_000)
        struct.pack_into("<QQQQQQ", d, 32, read_units, 0, written_units, 0,
                         c["read_commands"], 0)
        struct.pack_into("<Q", d, 80, c["write_commands"])
        struct.pack_into("<Q", d, 128, int((time.monotonic() - started) // 3600))
        struct.pack_into("<Q", d, 176, errors)           # number of error log entries
        return bytes(d)
    if lid == LogPage.FIRMWARE_SLOT:         # Figure 197
        d = bytearray(512)
        d[0] = 1                             # active slot 1
        d[8:16] = _ascii(FIRMWARE, 8)
        return bytes(d)
    return None


__all__ = ["NSID", "active_namespaces", "controller", "log_page", "namespace",
           "namespace_descriptors", "IO_QUEUES"]
