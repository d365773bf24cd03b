"""The in-process link test rig (not a test module): a memfd-backed guest, its root port
and a device link endpoint joined by a Link, with helpers to key an IDE stream at both
ends (PCIe 6.x §6.33.3: Rx GO at both partners first, then Tx, then Enable)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from vfio_user_dev.dma import DmaMapSet
from vfio_user_dev.link.capture import CaptureWriter, read_capture
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.interfaces import DEFAULT_REQUESTER_ID
from vfio_user_dev.link.streams import IdeStreamEnd
from vfio_user_dev.link.wire import Link
from vfio_user_dev.protocol import DmaFlags
from vfio_user_dev.root_port import RootPort

GUEST = 0x1_0000_0000
SIZE = 0x10000
RID = DEFAULT_REQUESTER_ID
SID = 3
PATTERN = b"TEE-IO-SECRET-PATTERN!"     # a known plaintext to look for on the wire


def payload(n: int) -> bytes:
    """*n* bytes of :data:`PATTERN`, repeated."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


class Rig:
    """A memfd-backed guest, its root port and a device link endpoint joined by a Link."""

    def __init__(self, tmp: Path | None = None, *, mps: int = 256, mrrs: int = 512,
                 capture: bool = False, sealed: bool = False) -> None:
        """*sealed*: the memfd cannot shrink (as QEMU passes guest RAM), so the map set
        maps it; else it is reached through its fd."""
        self.fd = os.memfd_create("link-test", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, SIZE)
        if sealed:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        self.dma = DmaMapSet()
        self.dma.map(GUEST, SIZE, DmaFlags.READ | DmaFlags.WRITE, 0, os.dup(self.fd))
        self.rp = RootPort(self.dma)
        self.ep = LinkEndpoint(RID)
        self.capture_path = (tmp / "link.pcap") if capture and tmp else None
        cap = CaptureWriter(self.capture_path) if self.capture_path else None
        self.link = Link(self.ep, self.rp, mps=mps, mrrs=mrrs, capture=cap)
        self.dev_stream: IdeStreamEnd | None = None

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def mem(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def poke(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def records(self) -> list[bytes]:
        assert self.capture_path is not None and self.link.capture is not None
        self.link.capture.flush()
        return [r.data for r in read_capture(self.capture_path)]

    def secure(self, sid: int = SID, key_set: KeySet = KeySet.K0,
               aggregation: int = 1) -> IdeStreamEnd:
        """Key a stream at both ends (as the TSM would, via IDE_KM and platform control):
        Rx GO at both partners first, then Tx (§6.33.3), then Enable.  *aggregation* > 1:
        both ends aggregate up to that many TLPs per MAC on every sub-stream (§6.33.6)."""
        dev = IdeStreamEnd(sid, aggregation=aggregation > 1)
        if not self.rp.has_stream(sid):
            self.rp.setup_stream(sid, RID, RID)
        program_pair(self.rp, dev, sid, key_set)
        if aggregation > 1:
            modes = dict.fromkeys(SubStream, aggregation)
            dev.set_aggregation(modes)
            self.rp.set_aggregation(sid, modes)
        dev.enabled = True
        assert self.rp.enable_stream(sid) == "secure"
        assert dev.is_secure()
        self.ep.attach_stream(dev)
        self.dev_stream = dev
        return dev

    def close(self) -> None:
        self.link.close()
        self.dma.clear()
        os.close(self.fd)


def program_pair(rp: RootPort, dev: IdeStreamEnd, sid: int, key_set: KeySet) -> None:
    """Program fresh keys for *key_set* in every sub-stream at both ends and GO them:
    Rx at both partners first, then Tx."""
    for s in SubStream:
        up, down = IdeKey.generate(), IdeKey.generate()
        dev.tx.program(key_set, s, up)
        rp.program_key(sid, key_set, Direction.RX, s, up)
        dev.rx.program(key_set, s, down)
        rp.program_key(sid, key_set, Direction.TX, s, down)
    dev.rx.go(key_set)
    rp.key_set_go(sid, key_set, Direction.RX)
    dev.tx.go(key_set)
    rp.key_set_go(sid, key_set, Direction.TX)
