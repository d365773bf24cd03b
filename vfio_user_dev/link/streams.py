"""The IDE stream at each end of the link as the link uses it (PCIe 6.x §6.33): Tx and Rx
key state per sub-stream (§6.33.4), Enable and the Secure / Insecure state (§7.9.26.4),
failures (§6.33.6).  Either an :class:`IdeStreamEnd` of its own or a stream block of the
device's IDE extended capability (:class:`CapStreamPort`).
"""

from __future__ import annotations

from typing import Protocol

from teeio.ide import IdeRx, IdeTx
from teeio.pcie.ide_cap import IdeCapability, StreamKind
from teeio.pcie.ide_cap import IdeStream as CapIdeStream
from teeio.platform_channel import StreamState
from teeio.tlp import SubStream


class StreamPort(Protocol):
    """One side's IDE stream as the link uses it (:class:`IdeStreamEnd`, or a stream block of
    the device's IDE capability through :class:`CapStreamPort`)."""

    @property
    def stream_id(self) -> int: ...

    @property
    def tx(self) -> IdeTx: ...

    @property
    def rx(self) -> IdeRx: ...

    def is_secure(self) -> bool: ...

    def mark_insecure(self, reason: str) -> None:
        """An IDE check failed here: the stream goes Insecure (§6.33.6)."""

    def fail_message(self, reason: str) -> None:
        """The partner's IDE Fail Message arrived for this stream."""


class CapStreamPort:
    """A stream block of the device's IDE extended capability (:mod:`teeio.pcie.ide_cap`)
    as a :class:`StreamPort`: its Secure state, its engines (which the capability replaces
    when the Stream ID changes, so they are looked up every time), failures reported to
    the capability (Status: Insecure; b31 for a received IDE Fail Message)."""

    def __init__(self, block: CapIdeStream) -> None:
        self.block = block

    @property
    def stream_id(self) -> int:
        return self.block.stream_id

    @property
    def tx(self) -> IdeTx:
        return self.block.tx

    @property
    def rx(self) -> IdeRx:
        return self.block.rx

    def is_secure(self) -> bool:
        return self.block.secure

    def mark_insecure(self, reason: str) -> None:
        self.block.cap.report_failure(self.block, reason)

    def fail_message(self, reason: str) -> None:
        self.block.cap.report_fail_message(self.block.stream_id)
        self.mark_insecure(reason)


def capability_streams(cap: IdeCapability) -> list[StreamPort]:
    """The device's streams in the order its DMA prefers them: Selective IDE streams (a
    Default Stream first), then the Link IDE stream."""
    blocks = sorted(cap.streams, key=lambda b: (b.kind != StreamKind.SELECTIVE,
                                                not b.default_stream, b.index))
    return [CapStreamPort(b) for b in blocks]


class IdeStreamEnd:
    """One Partner Port's end of a Selective IDE Stream (§6.33; the root port's streams
    extend it): Tx and Rx key state, Enable, and the Secure / Insecure state (§6.33.4,
    §7.9.26: Secure once enabled with a GO key set in every sub-stream and direction; any
    failure makes it Insecure until it is reset and keyed again).  *aggregation*: the port
    supports IDE aggregation (§6.33.6): its Rx takes aggregated units, and its Tx
    aggregates as :meth:`set_aggregation` (the Tx Aggregation Mode fields) says."""

    def __init__(self, stream_id: int, rid_base: int = 0, rid_limit: int = 0xFFFF,
                 aggregation: bool = False) -> None:
        self.stream_id = stream_id
        self.rid_base = rid_base
        self.rid_limit = rid_limit
        self.aggregation_supported = aggregation
        self.tx = IdeTx(stream_id)
        self.rx = IdeRx(stream_id, aggregation)
        self.enabled = False
        self.insecure_reason: str | None = None

    def keys_ready(self) -> bool:
        return self.tx.all_active() and self.rx.all_active()

    def set_aggregation(self, unit_tlps: dict[SubStream, int]) -> None:
        """Tx Aggregation Mode per sub-stream, as TLPs per unit (1: none; 2, 4, 8).
        ValueError if the port does not support aggregation and a value is not 1."""
        if not self.aggregation_supported and any(n != 1 for n in unit_tlps.values()):
            raise ValueError(f"stream {self.stream_id}: aggregation is not supported here")
        for sub, n in unit_tlps.items():
            self.tx.set_aggregation(sub, n)

    def is_secure(self) -> bool:
        return (self.enabled and self.insecure_reason is None
                and self.rx.insecure_reason is None and self.keys_ready())

    def mark_insecure(self, reason: str) -> None:
        if self.insecure_reason is None:
            self.insecure_reason = reason

    def fail_message(self, reason: str) -> None:
        self.mark_insecure(reason)

    def reset(self) -> None:
        """Keys invalidated, Enable clear, Insecure reason forgotten (re-establishment)."""
        self.tx.reset()
        self.rx.reset()
        self.enabled = False
        self.insecure_reason = None

    def state(self) -> StreamState:
        return StreamState.SECURE if self.is_secure() else StreamState.INSECURE

