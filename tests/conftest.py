"""Fixtures every test folder may use: a device server on a temporary UNIX socket (served
in a thread), the run's P-384 device identity, the project's firmware image and an
in-process device under test with its DSM.

The server tests run against both vfio-user transports over the same device model:
``both_backends`` (tests/support/servers.py) parametrises a module's ``backend`` (default
"python").  A test marked ``python_only(reason)`` checks behaviour that belongs to the
pure-Python transport; its libvfio-user leg skips with that reason.  A test marked
``socket_dma`` reaches memory without an fd: its libvfio-user server opts in to socket DMA
(refused by default on that backend).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from teeio import pki
from tests.support.dut import Dut, attach
from tests.support.pki import shared_identity
from tests.support.servers import RunningServer, skip_unless_libvfio_user
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.firmware_build import build


@pytest.fixture
def backend() -> str:
    """The vfio-user transport of the ``server`` fixture (``both_backends`` varies it)."""
    return "python"


@pytest.fixture
def server(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    skip_unless_libvfio_user(backend)
    marker = request.node.get_closest_marker("python_only")
    if backend != "python" and marker is not None:
        pytest.skip(f"pure-Python transport only: {marker.args[0]}")
    socket_dma = request.node.get_closest_marker("socket_dma") is not None
    srv = RunningServer(tmp_path / "vfio-user.sock", backend, socket_dma=socket_dma)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def identity() -> pki.Identity:
    """The run's P-384 device certificate chain (root, intermediate, leaf) and leaf key."""
    return shared_identity("P-384")


@pytest.fixture(scope="session")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's firmware image, built once per run (vfio_user_dev.firmware_build)."""
    return build(tmp_path_factory.mktemp("firmware") / "teeio-fw.elf")


@pytest.fixture
def dut(identity: pki.Identity) -> Iterator[Dut]:
    """A device whose DSM answers SPDM, IDE_KM and TDISP for its TDI, in-process."""
    device = TeeIoDevice()
    yield attach(device, identity, tdi=True)
    device.close()
