"""Blocking UNIX-socket transport shared by the roles -- the one place in :mod:`teeio` with
socket code (docs/design.md decision 17).

* :mod:`teeio.transport.unix` -- socket paths: replace a stale socket (never any other
  file), listen on a 0600 socket;
* :mod:`teeio.transport.line_server` -- :class:`LineServer`, the JSON-lines server of the
  platform control, host access and TSM control sockets;
* :mod:`teeio.transport.line_client` -- :class:`LineConnection` and :class:`LineClient`.
"""

from teeio.transport.line_client import LineClient, LineConnection
from teeio.transport.line_server import LineServer
from teeio.transport.unix import listen_private, remove_stale_socket

__all__ = ["LineClient", "LineConnection", "LineServer", "listen_private",
           "remove_stale_socket"]
