"""Unit-test fixtures: a platform (device, root port, link, DMA) in-process, the link test
rig (tests/support/link_rig.py) without and with a capture tap, and an fd-leak check for
modules that opt in (``pytestmark = pytest.mark.usefixtures("no_fd_leak")``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.link_rig import Rig
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.platform import Platform


@pytest.fixture
def machine() -> Iterator[Platform]:
    """A platform with the default device, closed at teardown."""
    m = Platform()
    yield m
    m.close()


@pytest.fixture
def device(machine: Platform) -> TeeIoDevice:
    """``machine``'s device."""
    return machine.device


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fails the test if it leaves an fd of this process open."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    assert set(os.listdir("/proc/self/fd")) - before == set()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A guest, its root port and a device endpoint joined by a link."""
    with Rig(tmp_path) as r:
        yield r


@pytest.fixture
def cap(tmp_path: Path) -> Iterator[Rig]:
    """:func:`rig` with a capture tap on the link (every TLP recorded)."""
    with Rig(tmp_path, capture=True) as r:
        yield r
