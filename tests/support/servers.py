"""A vfio-user device server on a temporary UNIX socket, served in a thread, and the two
transports it runs over (the pure-Python ``Server`` and libvfio-user).

``both_backends`` parametrises a module's ``backend``; the libvfio-user leg skips, saying
why, unless ``$TEEIO_LIBVFIO_USER`` points to a loadable libvfio-user.so.0.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import pytest

from vfio_user_dev import libvfio_user
from vfio_user_dev.client import Client
from vfio_user_dev.libvfio_user import LibVfioUserServer
from vfio_user_dev.personality import PersonalityFactory
from vfio_user_dev.personality.accelerator import AcceleratorPersonality
from vfio_user_dev.platform import Platform
from vfio_user_dev.server import Server

BACKENDS = ("python", "libvfio-user")
both_backends = pytest.mark.parametrize("backend", BACKENDS)


@functools.cache
def libvfio_user_missing() -> str | None:
    """Why the libvfio-user leg cannot run here, or None."""
    path = os.environ.get(libvfio_user.ENV_VAR)
    if not path:
        return (f"{libvfio_user.ENV_VAR} is not set (point it to a libvfio-user.so.0 built "
                "from nutanix/libvfio-user to run it)")
    try:
        libvfio_user.load(path)
    except libvfio_user.LibraryMissing as exc:
        return str(exc)
    return None


def backend_params() -> list[object]:
    """``backend`` values for a parametrize whose libvfio-user leg skips at collection
    (before any fixture runs: an e2e boot needs the guest image)."""
    why = libvfio_user_missing()
    return ["python", pytest.param("libvfio-user", marks=pytest.mark.skipif(
        why is not None, reason=f"libvfio-user leg: {why}"))]


def skip_unless_libvfio_user(backend: str) -> None:
    if backend == "libvfio-user" and (why := libvfio_user_missing()) is not None:
        pytest.skip(f"libvfio-user leg: {why}")


class RunningServer:
    def __init__(self, path: Path, backend: str = "python", socket_dma: bool = False,
                 personality: PersonalityFactory = AcceleratorPersonality) -> None:
        self.path = str(path)
        self.backend = backend
        self.machine = Platform(personality=personality)
        self.device = self.machine.device
        self.server: Server | LibVfioUserServer
        self.thread: threading.Thread | None = None
        if backend == "libvfio-user":
            self.server = LibVfioUserServer(self.path, self.machine, socket_dma=socket_dma)
            self.server.start()
        else:
            self.server = Server(self.path, self.machine)
            self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self.thread.start()

    def client(self, negotiate: bool = True) -> Client:
        c = Client.connect(self.path)
        if negotiate:
            c.version()
        return c

    def stop(self) -> None:
        self.server.close()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.machine.close()
