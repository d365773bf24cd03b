"""DOE over the DMTF spdm-emu platform socket (``spdm_emu_common/command.h``, QEMU
``backends/spdm-socket.c``): the framing that carries whole DOE objects between host-side
tools.  A big-endian 12-byte header (command, transport type, payload size), then the payload.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from teeio.codec import Struct, u32
from teeio.lite_dataclass import dataclass

from .codec import MAX_OBJECT_BYTES

__all__ = ["CLIENT_HELLO", "SERVER_HELLO", "SOCKET_DEFAULT_PORT", "SOCKET_HEADER",
           "SOCKET_MAX_PAYLOAD", "SocketCommand", "SocketHeader", "SocketTransport"]


class SocketCommand(IntEnum):
    NORMAL = 0x0001
    OOB_ENCAP_KEY_UPDATE = 0x8001
    OOB_ENCAP_ENDPOINT_INFO = 0x8002
    CONTINUE = 0xFFFD
    SHUTDOWN = 0xFFFE
    UNKNOWN = 0xFFFF
    TEST = 0xDEAD


class SocketTransport(IntEnum):
    NONE = 0
    MCTP = 1
    PCI_DOE = 2
    TCP = 3


SOCKET_HEADER = struct.Struct(">III")     # command, transport type, payload size (big-endian)
SOCKET_DEFAULT_PORT = 2323
CLIENT_HELLO = b"Client Hello!\0"
SERVER_HELLO = b"Server Hello!\0"
# The largest payload taken: a whole DOE object of 2^18 DW.  (QEMU's own client buffer,
# SPDM_SOCKET_MAX_MESSAGE_BUFFER_SIZE, is only 0x1200 bytes; that limits QEMU, not us.)
SOCKET_MAX_PAYLOAD = MAX_OBJECT_BYTES


@dataclass(frozen=True)
class SocketHeader(Struct):
    """The 12-byte header (big-endian, unlike DOE itself); values not checked against the
    enums, so an unknown command can be answered."""

    command: int = u32(big=True)
    transport: int = u32(big=True)
    size: int = u32(big=True)

    def command_name(self) -> str:
        try:
            return SocketCommand(self.command).name
        except ValueError:
            return f"{self.command:#06x}"
