"""Found by fuzz/harnesses/link_capture.py: ``read_capture`` on a pcapng whose Interface
Description or Enhanced Packet block had a body shorter than its fixed fields raised
``struct.error`` from ``_read_pcapng``; its contract is ValueError for anything that is not
a TLP capture."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vfio_user_dev.link.capture import read_capture

SHB = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)
IDB, EPB = 1, 6


def block(btype: int, body: bytes = b"") -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


@pytest.mark.parametrize("data", [
    SHB + block(EPB),                                     # EPB with an empty body
    SHB + block(IDB, struct.pack("<HHI", 147, 0, 0)) + block(EPB, bytes(8)),
    SHB + block(IDB),                                     # IDB with an empty body
    SHB + block(IDB, struct.pack("<HHI", 147, 0, 0))
    + block(EPB, struct.pack("<IIIII", 0, 0, 0, 64, 64)),  # captured length past the block
], ids=["epb-empty", "epb-short", "idb-empty", "epb-caplen"])
def test_short_block_body_is_a_value_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "short.pcapng"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        read_capture(path)
