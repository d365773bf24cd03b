"""The DOE dispatcher (device side) and the Discovery walk (requester side), PCIe 6.3
§6.30.1.1: whole objects in, whole objects out, whichever transport carried them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from teeio.doe_pcap import DoeDirection

from .codec import (
    DISCOVERY_VERSION,
    INVALID_VENDOR_ID,
    PCI_SIG_VENDOR_ID,
    DataObjectType,
    DiscoveryRequest,
    DiscoveryResponse,
    DoeError,
    DoeObject,
    DoeUnsupportedError,
    pad_dw,
    protocol_name,
)

__all__ = ["DoeDispatcher", "Handler", "discover"]

log = logging.getLogger(__package__)


def discover(exchange: Callable[[DoeObject], DoeObject | None],
             version: int = DISCOVERY_VERSION) -> list[tuple[int, int]]:
    """Walk DOE Discovery from index 0 through *exchange*; returns (vendor, type) in order.

    Raises :class:`DoeError` on a missing, mismatched or inconsistent answer.
    """
    found: list[tuple[int, int]] = []
    index = 0
    while True:
        req = DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY,
                        DiscoveryRequest(index, version).encode())
        rsp = exchange(req)
        if rsp is None:
            raise DoeError(f"no response to DOE Discovery index {index}")
        if rsp.protocol != req.protocol:
            raise DoeError(f"DOE Discovery index {index} answered by "
                           f"{protocol_name(*rsp.protocol)}", rsp.encode())
        # §6.30.1: an object longer than expected is processed up to the expected length.
        entry = DiscoveryResponse.decode(rsp.payload[:4])
        if not entry.valid:
            raise DoeError(f"DOE Discovery index {index} reported invalid", rsp.encode())
        if index == 0 and (entry.vendor_id, entry.data_object_type) != req.protocol:
            raise DoeError("DOE Discovery index 0 is not DOE Discovery itself", rsp.encode())
        found.append((entry.vendor_id, entry.data_object_type))
        if entry.next_index == 0:
            return found
        if entry.next_index != index + 1:  # Table 6-31: "increment the queried index by 1"
            raise DoeError(f"DOE Discovery index {index} says next {entry.next_index}",
                           rsp.encode())
        index = entry.next_index


Handler = Callable[[bytes], bytes | None]


class DoeDispatcher:
    """Routes whole DOE objects to per-protocol handlers and answers DOE Discovery.

    A handler gets the object's (DW-padded) payload and returns the response payload
    (padded here) or ``None`` for "no response" (the object is dropped, as SPDM and
    IDE_KM do with some requests).  The response carries the request's protocol.

    One lock serialises every object, whichever transport it came from (mailbox or
    host socket).  A device passes its own re-entrant lock so that handlers may touch
    device state without any lock-order question.

    :attr:`tap`, when set, sees every whole object under that lock, in order: the
    request as it arrived, then the response if there is one --
    whichever transport carried them (a DOE capture, :mod:`teeio.doe_pcap`).
    """

    def __init__(self, lock: contextlib.AbstractContextManager[Any] | None = None,
                 name: str = "doe") -> None:
        self._lock = lock if lock is not None else threading.RLock()
        self._handlers: dict[tuple[int, int], Handler] = {}
        self.log = log.getChild(name)
        self.objects = 0      # objects handed to handle_object
        self.responses = 0    # response objects produced
        self.tap: Callable[[DoeDirection, bytes], None] | None = None

    def register(self, vendor_id: int, data_object_type: int, handler: Handler) -> None:
        key = (vendor_id, data_object_type)
        if not 0 <= vendor_id < INVALID_VENDOR_ID or not 0 <= data_object_type <= 0xFF:
            raise ValueError(f"bad DOE protocol {vendor_id:#x}:{data_object_type:#x}")
        with self._lock:
            if key == (PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY) or key in self._handlers:
                raise ValueError(f"DOE protocol {protocol_name(*key)} is already registered")
            if len(self._handlers) + 1 >= 256:   # Discovery indices are 8 bits
                raise ValueError("a DOE instance lists at most 256 protocols")
            self._handlers[key] = handler

    def protocols(self) -> list[tuple[int, int]]:
        """What DOE Discovery reports, in index order: 0001:00 first, then registration order."""
        with self._lock:
            return [(PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY), *self._handlers]

    def handle_object(self, obj: bytes) -> bytes | None:
        """Process one whole DOE object; the whole response object, or None (no response).

        Raises :class:`DoeDecodeError` for a malformed object and
        :class:`DoeUnsupportedError` for a protocol nobody registered.  Anything a
        handler raises propagates: the transport decides (mailbox: DOE Error).
        """
        with self._lock:
            self.objects += 1
            if self.tap is not None:
                self.tap(DoeDirection.REQUEST, bytes(obj))
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("--> %d bytes: %s", len(obj), bytes(obj).hex())
            req = DoeObject.decode(obj)
            if req.protocol == (PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY):
                payload = self._discovery(req.payload)
            else:
                handler = self._handlers.get(req.protocol)
                if handler is None:
                    raise DoeUnsupportedError(
                        f"no DOE handler for {protocol_name(*req.protocol)}", bytes(obj), 0)
                payload = handler(req.payload)
            if payload is None:
                self.log.debug("<-- no response to %s", protocol_name(*req.protocol))
                return None
            rsp = DoeObject(req.vendor_id, req.data_object_type, pad_dw(payload),
                            req.connection_id).encode()
            self.responses += 1
            if self.tap is not None:
                self.tap(DoeDirection.RESPONSE, rsp)
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("<-- %d bytes: %s", len(rsp), rsp.hex())
            return rsp

    def _discovery(self, payload: bytes) -> bytes | None:
        if len(payload) < 4:
            return None   # §6.30.1: shorter than expected -> silently discarded
        # Longer than expected: the first DW is processed, the rest discarded (§6.30.1).
        # Any Discovery Version is answered: the response layout is the same.
        req = DiscoveryRequest.decode(payload[:4])
        table = self.protocols()
        if req.index >= len(table):
            return DiscoveryResponse(INVALID_VENDOR_ID, 0xFF, 0).encode()
        nxt = req.index + 1 if req.index + 1 < len(table) else 0
        return DiscoveryResponse(*table[req.index], nxt).encode()
