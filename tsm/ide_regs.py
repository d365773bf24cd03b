"""The IDE extended capability's registers as the TSM reads them (PCIe 6.x §7.9.26), sans-IO.

:class:`IdeRegisters` decodes the capability contents minus its header -- what IDE_KM's
QUERY_RESP carries (§6.33.3), or the host's register read -- into its stream blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from teeio.platform_channel import StreamState

__all__ = ["STATE_NAMES", "IdeError", "IdeRegisters", "StreamBlock"]

#: Stream Status [3:0] (PCIe 6.x §7.9.26.4.2) as the platform channel names a state.
STATE_NAMES = {0: StreamState.INSECURE, 2: StreamState.SECURE}


class IdeError(Exception):
    """An IDE operation failed; the message is the one-line reason."""



@dataclass(frozen=True)
class StreamBlock:
    """One stream register block of an IDE capability (PCIe 6.x §7.9.26), as read."""

    kind: str                 # "link" or "selective"
    index: int
    offset: int               # bytes from the start of the capability
    control: int
    status: int
    rid1: int = 0
    rid2: int = 0
    addr: tuple[tuple[int, int, int], ...] = ()

    @property
    def control_offset(self) -> int:
        return self.offset + (0 if self.kind == "link" else 4)

    @property
    def stream_id(self) -> int:
        return self.control >> 24

    @property
    def enabled(self) -> bool:
        return bool(self.control & 1)

    @property
    def state(self) -> str:
        """A :class:`StreamState`, or ``"state N"`` for a reserved encoding."""
        return STATE_NAMES.get(self.status & 0xF, f"state {self.status & 0xF}")

    @property
    def rid_range(self) -> tuple[int, int] | None:
        if self.kind == "link" or not self.rid2 & 1:
            return None
        return self.rid2 >> 8 & 0xFFFF, self.rid1 >> 8 & 0xFFFF

    def as_dict(self) -> dict[str, Any]:
        rid = self.rid_range
        return {"kind": self.kind, "index": self.index, "stream_id": self.stream_id,
                "enabled": self.enabled, "state": self.state,
                "fail_message_received": bool(self.status >> 31),
                "rid_range": None if rid is None else [f"{rid[0]:#06x}", f"{rid[1]:#06x}"]}


@dataclass(frozen=True)
class IdeRegisters:
    """The IDE capability contents minus its header (what QUERY_RESP carries)."""

    capability: int
    control: int
    blocks: tuple[StreamBlock, ...]

    @classmethod
    def decode(cls, regs: tuple[int, ...] | list[int]) -> IdeRegisters:
        regs = tuple(regs)
        if len(regs) < 2:
            raise IdeError("IDE registers: fewer than the capability and control DWs")
        cap = regs[0]
        blocks: list[StreamBlock] = []
        i = 2

        def take(n: int) -> tuple[int, ...]:
            nonlocal i
            if i + n > len(regs):
                raise IdeError(f"IDE registers end at DW {len(regs)}, inside a stream block")
            out = regs[i:i + n]
            i += n
            return out

        if cap & 1:
            for tc in range((cap >> 13 & 7) + 1):
                off = 4 + 4 * i
                ctl, sts = take(2)
                blocks.append(StreamBlock("link", tc, off, ctl, sts))
        if cap & 2:
            for n in range((cap >> 16 & 0xFF) + 1):
                off = 4 + 4 * i
                sel_cap, ctl, sts, rid1, rid2 = take(5)
                addr = take(3 * (sel_cap & 0xF))
                blocks.append(StreamBlock("selective", n, off, ctl, sts, rid1, rid2,
                                          tuple(zip(addr[0::3], addr[1::3], addr[2::3],
                                                    strict=True))))
        return cls(cap, regs[1], tuple(blocks))

    def selective(self, index: int) -> StreamBlock:
        for b in self.blocks:
            if b.kind == "selective" and b.index == index:
                return b
        n = sum(b.kind == "selective" for b in self.blocks)
        raise IdeError(f"the device has no Selective IDE stream block {index} ({n} blocks)")

