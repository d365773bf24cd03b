"""Shared fixtures: a device server on a temporary UNIX socket, served in a thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfio_user_dev.client import Client
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.server import Server


class RunningServer:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.device = TeeIoDevice()
        self.server = Server(self.path, self.device)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self, negotiate: bool = True) -> Client:
        c = Client.connect(self.path)
        if negotiate:
            c.version()
        return c

    def stop(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)
        self.device.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    srv = RunningServer(tmp_path / "vfio-user.sock")
    yield srv
    srv.stop()
