"""A memory request from the device as the root port's checks see it, and runs of
admitted ones that become one guest-memory access (PCIe 6.x §2.2.7, §6.33)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vfio_user_dev.root_port.streams import RootPortStream


@dataclass
class Request:
    """One memory request as the checks see it (from a TLP, or a clear-path piece); or a
    run of contiguous admitted requests of one kind gathered by the fast path, whose TLPs'
    byte ranges and tags are in *pieces*."""

    write: bool
    requester_id: int
    address: int            # of the first enabled byte
    length: int             # bytes covered
    t_bit: bool = False
    stream: RootPortStream | None = None
    tag: int = 0
    tc: int = 0
    attr: int = 0
    data: bytes = b""
    pieces: list[tuple[int, int, int]] | None = None    # (address, length, tag)

    @property
    def tlps(self) -> int:
        return 1 if self.pieces is None else len(self.pieces)

    def each(self) -> Iterator[Request]:
        """The request of each TLP (this one unless it is a gathered run)."""
        if self.pieces is None:
            yield self
            return
        off = 0
        for a, n, tag in self.pieces:
            yield Request(self.write, self.requester_id, a, n, self.t_bit, self.stream,
                          tag=tag, tc=self.tc, attr=self.attr,
                          data=self.data[off:off + n] if self.write else b"")
            off += n


@dataclass
class Admitted:
    req: Request
    pin: frozenset[int] | None
    refused: bool = False       # a refused MRd, answered with UR


def runs(admitted: list[Admitted]) -> Iterator[list[Admitted]]:
    """Consecutive admitted requests of one kind, contiguous, with the same pin, grouped so
    that each group is one memory access."""
    run: list[Admitted] = []
    for adm in admitted:
        if run:
            last = run[-1]
            same = (adm.req.write == last.req.write and adm.pin == last.pin
                    and adm.refused == last.refused
                    and (adm.refused or last.req.address + last.req.length == adm.req.address))
            if not same:
                yield run
                run = []
        run.append(adm)
    if run:
        yield run
