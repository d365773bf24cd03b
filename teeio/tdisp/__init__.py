"""TDISP: the TEE Device Interface Security Protocol (PCIe 6.x ch. 11), sans-IO.

* :mod:`.defs`   — codes, flags and states named as in the spec / libspdm ``pci_tdisp.h``;
* :mod:`.codec`  — the 16-byte common header and every 1.0 message (frozen dataclasses);
* :mod:`.report` — the DEVICE_INTERFACE_REPORT structure and its chunked transfer;
* :mod:`.state`  — the TDI state machine (one transition table);
* :mod:`.responder` — the device side, over the device's hardware hooks;
* :mod:`.requester` — the TSM side, over an exchange callable.
"""

from __future__ import annotations

from .codec import TdispDecodeError, TdispError, decode_message
from .defs import ErrorCode, LockInterfaceFlags, MessageType, TdiState
from .state import Tdi, TdiAction, TdiEvent

__all__ = [
    "ErrorCode", "LockInterfaceFlags", "MessageType", "TdiState", "TdispDecodeError",
    "TdispError", "decode_message", "Tdi", "TdiAction", "TdiEvent",
]
