"""TLP capture files (``vfio_user_dev.link.read_capture``): pcapng or the older pcap with
the pseudo-header; ValueError or the records."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from fuzz.runner import check
from teeio.tlp import Tlp
from vfio_user_dev.link.capture import CaptureWriter, read_capture
from vfio_user_dev.link.interfaces import LinkDirection

KIND = "decoder"


@lru_cache(maxsize=1)
def path() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-capture-")) / "link.pcap"


def seeds() -> list[bytes]:
    p = path()
    w = CaptureWriter(p)
    tlps = [Tlp.memory_write(0x100, 1, 0x1000, b"abcd"), Tlp.memory_read(0x100, 2, 0x2000, 8)]
    for i, t in enumerate(tlps):
        w.write(list(LinkDirection)[i % len(LinkDirection)], t.encode())
    w.close()
    return [p.read_bytes()]


def one_input(data: bytes) -> None:
    p = path()
    p.write_bytes(data)
    try:
        records = read_capture(p)
    except ValueError:
        return
    for r in records:
        check(isinstance(r.data, bytes), "record data")
