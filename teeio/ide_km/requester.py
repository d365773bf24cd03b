"""IDE_KM requester (PCIe 6.x §6.33.3): the TSM's side.

:class:`IdeKmClient` builds each request and checks its response against it; it does no
I/O: *exchange* carries one IDE_KM payload inside the secured session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..ide import Direction, IdeKey, KeySet, SubStream
from .codec import IdeKmDecodeError, KeyProg, KGoStopAck, KpAck, KSetGo, KSetStop, Query, QueryResp
from .defs import IdeKmError, KeyProgError, KpStatus

__all__ = ["IdeKmClient", "IdeKmResponseError", "KpAckError"]

_T = TypeVar("_T")


class IdeKmResponseError(IdeKmError):
    """Requester side: the response is not the one the request calls for, or KP_ACK
    reports a failure (:class:`KpAckError`, ``status`` set)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self._status = status

    @property
    def status(self) -> int | None:
        return self._status


class KpAckError(KeyProgError, IdeKmResponseError):
    """KP_ACK answered KEY_PROG with a failure Status (``status``, the wire ``code``)."""

    def __init__(self, message: str, status: int) -> None:
        KeyProgError.__init__(self, status, message)
        self._status = status


def _expect(data: bytes, decoder: Callable[[bytes], _T], what: str) -> _T:
    try:
        return decoder(data)
    except IdeKmDecodeError as e:
        raise IdeKmResponseError(f"{what}: {e}") from None


class IdeKmClient:
    """Requester side (the TSM): builds requests, checks each response against its request.

    *exchange* sends one IDE_KM payload inside the secured session and returns the response
    payload — e.g. ``lambda p: requester.vendor_request(PCI_SIG_STANDARD_ID,
    PCI_SIG_VENDOR_ID, p, session_id)``; a silent drop surfaces as the transport's timeout."""

    def __init__(self, exchange: Callable[[bytes], bytes], port_index: int = 0) -> None:
        self.exchange = exchange
        self.port_index = port_index

    def query(self) -> QueryResp:
        rsp = _expect(self.exchange(Query(self.port_index).encode()), QueryResp.decode,
                      "QUERY")
        if rsp.port_index != self.port_index:
            raise IdeKmResponseError(f"QUERY_RESP for PortIndex {rsp.port_index}, asked "
                                     f"{self.port_index}")
        return rsp

    def key_prog(self, stream_id: int, key_set: KeySet, direction: Direction,
                 substream: SubStream, key: IdeKey) -> None:
        req = KeyProg.for_key(stream_id, key_set, direction, substream, key, self.port_index)
        rsp = _expect(self.exchange(req.encode()), KpAck.decode, "KEY_PROG")
        if not (rsp.stream_id, rsp.key_set, rsp.direction, rsp.substream, rsp.port_index) == (
                req.stream_id, req.key_set, req.direction, req.substream, req.port_index):
            raise IdeKmResponseError(f"KP_ACK {rsp} does not answer KEY_PROG {req}")
        if rsp.status != KpStatus.SUCCESS:
            raise KpAckError(f"KEY_PROG {req}: KP_ACK status {rsp.status_code.name}",
                             rsp.status)

    def _go_stop(self, req: KSetGo | KSetStop) -> None:
        rsp = _expect(self.exchange(req.encode()), KGoStopAck.decode, req.OBJECT_ID.name)
        if not rsp.same_target(req):
            raise IdeKmResponseError(f"K_GOSTOP_ACK {rsp} does not answer {req}")

    def k_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                 substream: SubStream) -> None:
        self._go_stop(KSetGo(stream_id, key_set, direction, substream, self.port_index))

    def k_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream) -> None:
        self._go_stop(KSetStop(stream_id, key_set, direction, substream, self.port_index))

    def program_keys(self, stream_id: int, key_set: KeySet,
                     keys: dict[tuple[Direction, SubStream], IdeKey]) -> None:
        """KEY_PROG for each (direction, sub-stream) key of *key_set*."""
        for (d, s), k in keys.items():
            self.key_prog(stream_id, key_set, d, s, k)

    def go_all(self, stream_id: int, key_set: KeySet, direction: Direction) -> None:
        """K_SET_GO for the three sub-streams of one direction.  §6.33.3 order: Rx at
        both partners first, then Tx at both."""
        for s in SubStream:
            self.k_set_go(stream_id, key_set, direction, s)

    def stop_all(self, stream_id: int, key_set: KeySet) -> None:
        """K_SET_STOP for every sub-stream and direction of *key_set*."""
        for d in Direction:
            for s in SubStream:
                self.k_set_stop(stream_id, key_set, d, s)
