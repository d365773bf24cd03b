"""Shared fixtures for protocol tests: a negotiated client of the ``server`` fixture, and
a DSM-attached device driven the way the TSM does, in-process (tests/support/tee_rig.py):
an SPDM secured session over the device's DOE dispatcher, a Selective IDE stream set up by
``tsm.ide.SelectiveStream``, TDISP through ``tsm.tdisp.TdispClient``, trusted-DMA windows
and private MMIO on the platform socket -- and a memfd-backed guest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from teeio import pki
from tests.support.servers import RunningServer
from tests.support.tee_rig import TeeRig
from vfio_user_dev.client import Client


@pytest.fixture
def c(server: RunningServer) -> Iterator[Client]:
    """A negotiated vfio-user client of ``server``."""
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def tee_rig(tmp_path: Path, identity: pki.Identity) -> Iterator[TeeRig]:
    rig = TeeRig(tmp_path, identity)
    yield rig
    rig.close()


@pytest.fixture
def tee_rig_captured(tmp_path: Path, identity: pki.Identity) -> Iterator[TeeRig]:
    rig = TeeRig(tmp_path, identity, capture=True)
    yield rig
    rig.close()
