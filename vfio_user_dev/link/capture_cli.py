"""``python -m vfio_user_dev.link FILE``: list a TLP capture (:mod:`.capture`), one line
per TLP (PCIe 6.x §2.2 header fields, §6.33.4 IDE prefix fields), optionally with its
bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teeio.tlp import peek
from vfio_user_dev.link.capture import CaptureFlags, CaptureRecord, read_capture

_M_BIT = 0x01        # IDE prefix byte 1, bit 0: the MAC follows this TLP


def _describe(rec: CaptureRecord) -> str:
    tlp = peek(rec.data)
    what = "malformed"
    if tlp is not None:
        what = f"{tlp.type.name} rid={tlp.requester_id:04x} tag={tlp.tag}"
        if tlp.type.is_request:
            what += f" addr={tlp.address:#x} len={tlp.length_dw}DW"
        if tlp.stream_id is not None:
            what += f" ide stream={tlp.stream_id} K{tlp.key_set} T={int(tlp.t_bit)}"
            if not rec.data[1] & _M_BIT:
                # §6.33.6: a TLP of an aggregated unit before its last carries no MAC
                what += " aggregated (MAC later)"
    flags = ",".join((f.name or "?").lower() for f in CaptureFlags if rec.flags & f) or "-"
    return (f"{rec.timestamp_ns / 1e9:.6f} {'up  ' if rec.direction == 0 else 'down'} "
            f"{flags:8} {len(rec.data):5} {what}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vfio_user_dev.link",
                                 description="List a TLP capture file (--link-capture): "
                                             "pcapng, or the older pcap form.")
    ap.add_argument("capture", type=Path,
                    help="a --link-capture file (pcapng, or the older nanosecond pcap)")
    ap.add_argument("--hex", action="store_true", help="also print the TLP bytes")
    ns = ap.parse_args(argv)
    try:
        records = read_capture(ns.capture)
    except OSError as exc:
        print(f"error: {ns.capture}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for rec in records:
        print(_describe(rec))
        if ns.hex:
            print("    " + rec.data.hex())
    return 0
