"""DOE pcap files (``teeio.doe_pcap.decode``): PcapFormatError or every record, each no
longer than the file."""

from __future__ import annotations

from fuzz.runner import check
from teeio import doe_pcap

KIND = "decoder"


def seeds() -> list[bytes]:
    head = doe_pcap.global_header()
    return [head, head + doe_pcap.record(1_000_000_123, bytes(12))
            + doe_pcap.record(2_000_000_000, bytes.fromhex("0100010003000000") + bytes(4))]


def one_input(data: bytes) -> None:
    try:
        pcap = doe_pcap.decode(data)
    except doe_pcap.PcapFormatError:
        return
    check(sum(len(r.data) for r in pcap.records) <= len(data), "records longer than the file")
