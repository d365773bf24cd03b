"""The link's IDE receivers fed hostile TLPs (PCIe 6.x §6.33.4-§6.33.6): a malicious
device's bursts at the root port (``RootPort.receive``) and a malicious host's completions
and MMIO requests at the device's end (completions in place of the root port's to a 1 KiB
read the device makes; ``receive_requests``), aggregation off or on (up to 2, 4 or 8 TLPs
per MAC), through the C accelerator's batches or the Python reference.

Every input gets a freshly keyed stream with fixed keys, so the seeds' units verify and
their mutations reach decryption, the unit logic and the memory writes.  The contract: no
exception (a refusal is a count, an IDE Check Failed makes the stream Insecure; a read
the device's end gives up on is a LinkFault, else it returns every byte it asked for); no
open aggregated unit of 8 TLPs or more; the status still reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

from fuzz.runner import Bytes, check, frames
from teeio import ide_accel
from teeio.ide import Direction, IdeKey, KeySet, SubStream
from vfio_user_dev.dma import DmaMapSet
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.interfaces import (
    DEFAULT_REQUESTER_ID,
    LinkDirection,
    LinkFault,
    MmioRequest,
    RootPortReply,
)
from vfio_user_dev.link.streams import IdeStreamEnd
from vfio_user_dev.link.wire import Link
from vfio_user_dev.protocol import DmaFlags
from vfio_user_dev.root_port import RootPort

KIND = "responder"
RID, SID = DEFAULT_REQUESTER_ID, 3
GUEST, SIZE = 0x1_0000_0000, 64 * 1024
UNITS = (1, 2, 4, 8)            # TLPs per aggregated unit (1: aggregation off)
MAX_UNIT = 8                    # §6.33.6
MAX_TLPS = 64                   # TLPs per input
MMIO = 0xFE00_0000              # the device's registers, as the root port addresses them


class Registers:
    """4 KiB of device registers at :data:`MMIO` (the endpoint's MMIO completer)."""

    def __init__(self) -> None:
        self.mem = bytearray(4096)

    def mmio_request(self, req: MmioRequest) -> bytes | None:
        off = req.address - MMIO
        if not 0 <= off <= len(self.mem) - req.length:
            return None                                     # Unsupported Request
        if req.write:
            self.mem[off:off + req.length] = req.data
            return b""
        return bytes(self.mem[off:off + req.length])


class World:
    """Guest memory (a memfd behind one map), the root port and the device's end, joined
    by a link, with stream SID Secure at both ends."""

    def __init__(self, unit: int) -> None:
        self.fd = os.memfd_create("fuzz-link")
        os.ftruncate(self.fd, SIZE)
        self.dma = DmaMapSet()
        self.dma.map(GUEST, SIZE, DmaFlags.READ | DmaFlags.WRITE, 0, os.dup(self.fd))
        self.rp = RootPort(self.dma)
        self.ep = LinkEndpoint(RID)
        self.ep.mmio_completer = Registers()
        self.link = Link(self.ep, self.rp)
        self.rp.setup_stream(SID, RID, RID)
        self.dev = IdeStreamEnd(SID, aggregation=unit > 1)
        for s in SubStream:
            up = IdeKey(bytes([s, 1]) * 16, ifv=1)
            down = IdeKey(bytes([s, 0]) * 16, ifv=1)
            self.dev.tx.program(KeySet.K0, s, up)
            self.rp.program_key(SID, KeySet.K0, Direction.RX, s, up)
            self.dev.rx.program(KeySet.K0, s, down)
            self.rp.program_key(SID, KeySet.K0, Direction.TX, s, down)
        self.dev.rx.go(KeySet.K0)
        self.rp.key_set_go(SID, KeySet.K0, Direction.RX)
        self.dev.tx.go(KeySet.K0)
        self.rp.key_set_go(SID, KeySet.K0, Direction.TX)
        if unit > 1:
            modes = dict.fromkeys(SubStream, unit)
            self.dev.set_aggregation(modes)
            self.rp.set_aggregation(SID, modes)
        self.dev.enabled = True
        self.rp.enable_stream(SID)
        self.ep.attach_stream(self.dev)

    def close(self) -> None:
        self.link.close()
        self.dma.clear()
        os.close(self.fd)


def open_units(world: World) -> list[int]:
    """How many TLPs each receiver holds in an open aggregated unit, per sub-stream."""
    out: list[int] = []
    for rx in (world.dev.rx, *(s.rx for s in world.rp.streams.values())):
        out.extend(len(st.pending) for st in rx._subs.values())
    return out


def traffic(unit: int) -> tuple[list[list[bytes]], list[list[bytes]], list[list[bytes]]]:
    """The bursts a 1 KiB DMA write and read and an MMIO write and read put on the link
    with *unit* TLPs per aggregated unit: upstream (the device's MWrs, then its MRd),
    downstream completions (the root port's CplDs) and downstream requests (MMIO)."""
    w = World(unit)
    up: list[list[bytes]] = []
    down: list[list[bytes]] = []
    mmio: list[list[bytes]] = []
    receive, deliver, requests = w.rp.receive, w.ep.receive, w.ep.receive_requests

    def recv_up(wires: Sequence[bytes]) -> RootPortReply:
        up.append(list(wires))
        return receive(wires)

    def recv_down(wires: Sequence[bytes]) -> None:
        down.append(list(wires))
        deliver(wires)

    def recv_requests(wires: Sequence[bytes]) -> list[bytes]:
        mmio.append(list(wires))
        return requests(wires)

    w.rp.receive = recv_up                                  # type: ignore[method-assign]
    w.ep.receive = recv_down                                # type: ignore[method-assign]
    w.ep.receive_requests = recv_requests                   # type: ignore[method-assign]
    try:
        w.ep.write(GUEST + 0x1000, bytes(range(256)) * 4)   # MWr: one unit of 4
        w.ep.read(GUEST + 0x1000, 1024)                     # MRd, then CplDs
        w.rp.mmio_write(RID, MMIO + 0x10, b"abcdefgh")
        assert w.rp.mmio_read(RID, MMIO + 0x10, 8) == b"abcdefgh"
    finally:
        w.close()
    return up, down, mmio


@lru_cache(maxsize=1)
def _seeds() -> list[bytes]:
    out = []
    for k, unit in enumerate(UNITS):
        for where, bursts in enumerate(traffic(unit)):
            out += [bytes([k << 3 | where]) + frames(wires) for wires in bursts if wires]
            out += [bytes([k << 3 | 4 | where]) + frames(wires)     # the same, in Python
                    for wires in bursts[:1] if wires]
    return out


def read_with(w: World, completions: list[bytes]) -> None:
    """The device reads 1 KiB of guest memory and gets *completions* instead of the root
    port's (the link's tap swapped): all 1024 bytes come back, or a LinkFault says why."""
    def tap(direction: LinkDirection, wires: Sequence[bytes]) -> list[bytes]:
        return list(completions if direction is LinkDirection.DOWNSTREAM else wires)

    w.link._tap = tap                                       # type: ignore[method-assign]
    got = w.ep.read(GUEST + 0x1000, 1024)
    check(len(got) == 1024, f"a 1 KiB read returned {len(got)} bytes")


def seeds() -> list[bytes]:
    return list(_seeds())


def one_input(data: bytes) -> None:
    if not data:
        return
    sel = data[0]
    b = Bytes(data[1:])
    wires = [b.chunk() for _ in range(MAX_TLPS) if b.left]
    unit = UNITS[(sel >> 3) & 3]
    before = ide_accel.set_enabled(not sel & 4)
    w = World(unit)
    try:
        try:
            if sel & 3 == 1:
                read_with(w, wires)
            elif sel & 3 == 2:
                w.ep.receive_requests(wires)
            else:
                w.rp.receive(wires)
        except LinkFault:
            pass        # a read the device's end gave up on (timeout, UR, IDE failure)
        check(all(n < MAX_UNIT for n in open_units(w)),
              f"an open aggregated unit holds {max(open_units(w))} TLPs")
        w.rp.status()
        w.link.status()
    finally:
        w.close()
        ide_accel.set_enabled(before)
