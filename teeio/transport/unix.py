"""UNIX-domain socket paths: replace a socket an earlier run left behind (never any other
file) and listen on a socket only its owner can connect to."""

from __future__ import annotations

import errno
import os
import socket
import stat

__all__ = ["listen_private", "remove_stale_socket"]


def remove_stale_socket(path: str) -> None:
    """Remove a socket left at *path* by an earlier run; anything else there is refused
    (OSError EEXIST, one line), never deleted."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        os.unlink(path)


def listen_private(path: str, backlog: int) -> socket.socket:
    """A listening stream socket at *path*, mode 0600 from the moment it exists (the
    umask is narrowed around ``bind``), after :func:`remove_stale_socket`."""
    remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(backlog)
    except OSError:
        listener.close()
        raise
    return listener
