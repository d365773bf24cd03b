"""PCI Data Object Exchange (DOE), PCIe 6.3 §6.30 and §7.9.24, sans-IO.

* :mod:`.codec`      — data objects and DOE Discovery (declared on :mod:`teeio.codec`);
* :mod:`.dispatcher` — routing whole objects to protocol handlers, answering Discovery;
  the requester's Discovery walk;
* :mod:`.mailbox`    — the DOE capability's registers and mailbox state machine;
* :mod:`.emu_socket` — the spdm-emu platform socket framing that carries whole objects.

Used by the device (mailbox registers and host socket), the TSM (requester over the
socket) and the guest agent (requester over config space).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .codec import (
    DISCOVERY_VERSION,
    HEADER_BYTES,
    INVALID_VENDOR_ID,
    MAX_OBJECT_BYTES,
    MAX_OBJECT_DW,
    PCI_SIG_VENDOR_ID,
    DataObjectType,
    DiscoveryRequest,
    DiscoveryResponse,
    DoeDecodeError,
    DoeError,
    DoeObject,
    DoeUnsupportedError,
    pad_dw,
    protocol_name,
)
from .dispatcher import DoeDispatcher, Handler, discover
from .emu_socket import (
    CLIENT_HELLO,
    SERVER_HELLO,
    SOCKET_DEFAULT_PORT,
    SOCKET_HEADER,
    SOCKET_MAX_PAYLOAD,
    SocketCommand,
    SocketHeader,
    SocketTransport,
)

if TYPE_CHECKING:
    from .mailbox import (
        DOE_CAP_SIZE,
        DOE_CAP_VERSION,
        DOE_EXT_CAP_ID,
        DOE_TIMEOUT,
        MAILBOX_TRANSITIONS,
        STATE_STATUS,
        DoeCapabilities,
        DoeControl,
        DoeMailbox,
        DoeReg,
        DoeStatus,
        MailboxEvent,
        MailboxState,
        interrupt_condition,
    )

#: The mailbox (the device's registers) is imported on first use: a requester over the
#: socket never loads it.
_MAILBOX = frozenset({
    "DOE_CAP_SIZE", "DOE_CAP_VERSION", "DOE_EXT_CAP_ID", "DOE_TIMEOUT", "MAILBOX_TRANSITIONS",
    "STATE_STATUS", "DoeCapabilities", "DoeControl", "DoeMailbox", "DoeReg", "DoeStatus",
    "MailboxEvent", "MailboxState", "interrupt_condition"})


def __getattr__(name: str) -> object:
    if name not in _MAILBOX:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import mailbox
    value = getattr(mailbox, name)
    globals()[name] = value
    return value


__all__ = [
    "CLIENT_HELLO", "DISCOVERY_VERSION", "DOE_CAP_SIZE", "DOE_CAP_VERSION", "DOE_EXT_CAP_ID",
    "DOE_TIMEOUT", "HEADER_BYTES", "INVALID_VENDOR_ID", "MAILBOX_TRANSITIONS",
    "MAX_OBJECT_BYTES", "MAX_OBJECT_DW", "PCI_SIG_VENDOR_ID", "SERVER_HELLO",
    "SOCKET_DEFAULT_PORT", "SOCKET_HEADER", "SOCKET_MAX_PAYLOAD", "STATE_STATUS",
    "DataObjectType", "DiscoveryRequest", "DiscoveryResponse", "DoeCapabilities",
    "DoeControl", "DoeDecodeError", "DoeDispatcher", "DoeError", "DoeMailbox", "DoeObject",
    "DoeReg", "DoeStatus", "DoeUnsupportedError", "Handler", "MailboxEvent", "MailboxState",
    "SocketCommand", "SocketHeader", "SocketTransport", "discover", "interrupt_condition",
    "pad_dw", "protocol_name",
]
