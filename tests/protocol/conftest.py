"""Shared fixtures for protocol tests: a negotiated client of the ``server`` fixture, and
a DSM-attached device driven the way the TSM does, in-process (tests/support/tee_rig.py):
an SPDM secured session over the device's DOE dispatcher, a Selective IDE stream set up by
``tsm.ide.SelectiveStream``, TDISP through ``tsm.tdisp.TdispClient``, trusted-DMA windows
and private MMIO on the platform socket -- and a memfd-backed guest; two firmware
images that differ, for firmware updates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from teeio import pki
from tests.support.servers import RunningServer
from tests.support.tee_rig import TeeRig
from vfio_user_dev import firmware_build
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


@pytest.fixture(scope="module")
def fw_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two firmware images that measure differently (the second one patched)."""
    d = tmp_path_factory.mktemp("fw")
    try:
        return (firmware_build.build(d / "fw.elf"),
                firmware_build.build(d / "fw2.elf", {"TEEIO_FW_PATCH": "1"}))
    except firmware_build.FirmwareBuildError as exc:    # gcc is a declared dependency
        pytest.fail(f"the firmware images do not build: {exc}")
