"""vfio-user message decoders (``vfio_user_dev/protocol.py``): ProtocolError or a value;
what has an encoder re-encodes stably."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from fuzz.runner import check
from vfio_user_dev import protocol as p

KIND = "decoder"


def _version(b: bytes) -> None:
    v = p.Version.decode(b)
    once = v.encode()
    check(p.Version.decode(once).encode() == once, "VERSION re-encodes differently")


def _header(b: bytes) -> None:
    h = p.Header.decode(b)
    check(h.encode() == b[:p.HEADER_SIZE], "header does not re-encode")
    h.command_name()


def _dma_map(b: bytes) -> None:
    m = p.DmaMap.decode(b)
    check(p.DmaMap.decode(m.encode()) == m, "DMA_MAP round trip")


def _dma_unmap(b: bytes) -> None:
    m = p.DmaUnmap.decode(b)
    check(m.encode() == b, "DMA_UNMAP round trip")


def _irq_set(b: bytes) -> None:
    s = p.IrqSet.decode(b)
    check(s.encode() == b, "DEVICE_SET_IRQS round trip")


def _region(with_data: bool) -> Callable[[bytes], None]:
    def run(b: bytes) -> None:
        a = p.RegionAccess.decode(b, with_data)
        check(a.encode() == b, "REGION access round trip")
    return run


def _dma_rw(with_data: bool) -> Callable[[bytes], None]:
    def run(b: bytes) -> None:
        address, count, data = p.decode_dma_rw(b, with_data)
        check(p.encode_dma_rw(address, count, data) == b, "DMA access round trip")
    return run


DECODERS: tuple[Callable[[bytes], None], ...] = (
    _header, _version, _dma_map, _dma_unmap,
    lambda b: None if p.RegionInfoRequest.decode(b) else None,
    lambda b: None if p.IrqInfoRequest.decode(b) else None,
    _irq_set, _region(False), _region(True), _dma_rw(False), _dma_rw(True),
    lambda b: None if p.decode_argsz(b, 16, "fuzz") else None,
)


def seeds() -> list[bytes]:
    out = [bytes((0,)) + p.message(1, p.Command.VERSION, b"")]
    out.append(bytes((1,)) + p.Version(0, 0, {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20,
                                              "migration": {"pgsize": 4096}}).encode())
    out.append(bytes((2,)) + p.DmaMap(3, 0, 0x1000, 0x2000).encode())
    out.append(bytes((3,)) + p.DmaUnmap(24, 0, 0x1000, 0x2000).encode())
    out.append(bytes((4,)) + p.REGION_INFO.pack(32, 0, 7, 0, 0, 0))
    out.append(bytes((5,)) + p.IRQ_INFO.pack(16, 0, 2, 0))
    out.append(bytes((6,)) + p.IrqSet(int(p.IrqSetFlags.DATA_BOOL | p.IrqSetFlags.ACTION_TRIGGER),
                                      2, 0, 2, b"\1\0").encode())
    out.append(bytes((7,)) + p.RegionAccess(0x10, 0, 4).encode())
    out.append(bytes((8,)) + p.RegionAccess(0x10, 7, 4, b"abcd").encode())
    out.append(bytes((9,)) + p.encode_dma_rw(0x1000, 8))
    out.append(bytes((10,)) + p.encode_dma_rw(0x1000, 4, b"wxyz"))
    out.append(bytes((11,)) + (32).to_bytes(4, "little"))
    return out


def one_input(data: bytes) -> None:
    if not data:
        return
    with contextlib.suppress(p.ProtocolError):
        DECODERS[data[0] % len(DECODERS)](data[1:])
