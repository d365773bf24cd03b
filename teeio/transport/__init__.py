"""Blocking UNIX-socket transport shared by the roles -- the one place in :mod:`teeio`
with socket code.

Everything else in :mod:`teeio` is sans-IO: protocol cores that take bytes and return
bytes, driven by whoever owns the socket.  The roles (the device server
``vfio_user_dev``, the host TSM ``tsm``, the ``guest_agent``) import only :mod:`teeio` and
the standard library, never each other, so socket plumbing that more than one role needs
cannot live in any one of them: it lives here, one concern per module.

* :mod:`teeio.transport.unix` -- socket paths: replace a stale socket (never any other
  file), listen on a 0600 socket;
* :mod:`teeio.transport.line_server` -- :class:`LineServer`, the JSON-lines server (a
  thread per connection) of the platform control, host access and TSM control sockets;
* :mod:`teeio.transport.line_client` -- :class:`LineConnection` and :class:`LineClient`,
  its client side.

The platform control channel's client (:class:`teeio.platform_channel.PlatformClient`)
sends and receives through a :class:`LineConnection`.
"""

from teeio.transport.line_client import LineClient, LineConnection
from teeio.transport.line_server import LineServer
from teeio.transport.unix import listen_private, remove_stale_socket

__all__ = ["LineClient", "LineConnection", "LineServer", "listen_private",
           "remove_stale_socket"]
