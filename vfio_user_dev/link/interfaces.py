"""What the emulated PCIe link's two ends and its users share: the direction of a TLP,
the default sizes and Requester IDs, the link's errors (PCIe 6.x §2.3.1 Unsupported
Request, §6.33.6 IDE check failures and IDE Fail Messages), the root port's side of the
link and the device's MMIO completer (§11.2.1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vfio_user_dev.dma import Copy, DmaFault

DEFAULT_MPS = 256
DEFAULT_MRRS = 512
DEFAULT_REQUESTER_ID = 0x0100   # 01:00.0, the function behind the root port
ROOT_PORT_ID = 0x0008           # 00:01.0, the completer of every DMA read


class Generation:
    """A counter bumped after every change of the state it stands for (the link's taps,
    the root port's MMIO routing): whoever caches a decision drawn from that state keeps
    the value it read *before* deciding, and decides again once the value differs."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


class LinkDirection(enum.IntEnum):
    UPSTREAM = 0      # device -> root port
    DOWNSTREAM = 1    # root port -> device


class LinkFault(DmaFault):
    """A DMA transfer over the link failed (refused, Unsupported Request, completion
    timeout, IDE failure); the data did not (all) land."""


class LinkError(enum.Enum):
    """An error the device's end of the link detected (reported to ``on_error``)."""

    IDE_CHECK_FAILED = "ide_check_failed"        # §6.33.6: the TLP was discarded
    UNSUPPORTED_REQUEST = "unsupported_request"  # §2.3.1: the request was refused (UR)


@dataclass(frozen=True)
class IdeFailEvent:
    """An IDE failure as one side saw it: ``detected`` by its own check, or ``message``:
    the partner's IDE Fail Message."""

    side: str            # "device" or "root_port"
    stream_id: int
    reason: str
    how: str             # "detected" or "message"
    time: float


@dataclass
class RootPortReply:
    """What the root port sends back for a burst: completions (wire bytes) and the
    posted requests it refused: real hardware only logs those in the root port; here they
    are reported back so the device's DMA engine can flag the job."""

    completions: list[bytes] = field(default_factory=list)
    refused_posted: list[str] = field(default_factory=list)


class RootPortPort(Protocol):
    """The upstream end of the link (``root_port.RootPort``)."""

    def receive(self, wires: Sequence[bytes]) -> RootPortReply: ...

    def clear_write(self, requester_id: int, address: int, data: bytes, mps: int) -> None: ...

    def clear_read(self, requester_id: int, address: int, length: int, mrrs: int) -> bytes: ...

    def copy_direct_many(self, requester_id: int, copies: Sequence[Copy],
                         proceed: Callable[[], bool] | None = None) -> int: ...

    def ide_fail_message(self, stream_id: int, reason: str) -> None: ...

    def attach_link(self, mps: int, ide_fail_sink: Callable[[int, str], None],
                    downstream: Callable[[Sequence[bytes]], list[bytes]] | None = None,
                    mrrs: int = DEFAULT_MRRS) -> None: ...



class UpstreamPort(Protocol):
    """What a device's link endpoint sends upstream through (the :class:`Link`)."""

    mps: int
    mrrs: int

    @property
    def tapped(self) -> bool: ...

    def set_payload_sizes(self, mps: int, mrrs: int) -> None: ...

    def send_upstream(self, wires: Sequence[bytes]) -> RootPortReply: ...

    def clear_write(self, requester_id: int, address: int, data: bytes) -> None: ...

    def clear_read(self, requester_id: int, address: int, length: int) -> bytes: ...

    def clear_copy(self, requester_id: int, src: int, dst: int, length: int, *,
                   direct_only: bool = False) -> bool: ...

    def clear_copy_many(self, requester_id: int, copies: Sequence[Copy],
                        proceed: Callable[[], bool] | None = None) -> int: ...

    def ide_fail_message_upstream(self, stream_id: int, reason: str) -> None: ...

@dataclass(frozen=True)
class MmioRequest:
    """A memory request to the device as its completer sees it (PCIe 6.x §11.2.1)."""

    write: bool
    requester_id: int
    address: int                    # byte address of the first enabled byte
    length: int
    data: bytes = field(default=b"", repr=False)    # MWr: the bytes to write
    t_bit: bool = False
    stream_id: int | None = None    # the IDE stream it arrived on; None: in the clear


class MmioCompleter(Protocol):
    """The device's side of MMIO: serve one request."""

    def mmio_request(self, req: MmioRequest) -> bytes | None:
        """The bytes read (MRd) or ``b""`` (MWr done); None: Unsupported Request."""
        ...

