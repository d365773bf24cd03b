"""Integration fixtures: device-server processes on temporary sockets
(tests/integration/device_process.py), each stopped at teardown with its log printed, so a
failing test shows it."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.device_process import DeviceProcess, StartDevice, started


@pytest.fixture
def start_device(tmp_path: Path) -> Iterator[StartDevice]:
    """``start_device(*options, **features)``: a :class:`DeviceProcess` in tmp_path."""
    yield from started(functools.partial(DeviceProcess, tmp_path))


@pytest.fixture
def ide_device(start_device: StartDevice, firmware: Path) -> DeviceProcess:
    """The device the TSM drives: identity, firmware, DOE and platform sockets."""
    return start_device(identity=True, firmware=firmware, platform=True)
