"""Interop tests against DMTF spdm-emu binaries built outside this project.

The binaries (and libspdm's sample keys next to them) are never part of the project:
set ``TEEIO_SPDM_EMU_BIN`` to the directory holding ``spdm_responder_emu`` and
``spdm_requester_emu`` to run these tests; otherwise they skip, saying why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_VAR = "TEEIO_SPDM_EMU_BIN"
BINARIES = ("spdm_responder_emu", "spdm_requester_emu")
# libspdm sample trust anchors the tests rely on (files are read relative to the cwd).
SAMPLE_KEYS = ("ecp384/ca.cert.der", "ecp256/ca.cert.der")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"interop: runs DMTF spdm-emu binaries (skipped unless {ENV_VAR} names their directory)")


def spdm_emu_dir() -> tuple[Path | None, str]:
    """The spdm-emu bin directory, or None and the reason the tests cannot use it."""
    value = os.environ.get(ENV_VAR, "")
    if not value:
        return None, (f"{ENV_VAR} is not set: point it at a directory holding DMTF spdm-emu's "
                      f"{' and '.join(BINARIES)} (with libspdm's sample keys next to them)")
    path = Path(value).expanduser()
    if not path.is_dir():
        return None, f"{ENV_VAR}={value} is not a directory"
    missing = [b for b in BINARIES
               if not (path / b).is_file() or not os.access(path / b, os.X_OK)]
    if missing:
        return None, f"{ENV_VAR}={value} has no executable {', '.join(missing)}"
    keys = [k for k in SAMPLE_KEYS if not (path / k).is_file()]
    if keys:
        return None, (f"{ENV_VAR}={value} lacks libspdm sample keys {', '.join(keys)} "
                      "(libspdm's unit_test/sample_key files belong next to the binaries)")
    return path, ""


@pytest.fixture(scope="session")
def spdm_emu_bin() -> Path:
    """The directory of the spdm-emu binaries; skips the test when it is not usable."""
    path, reason = spdm_emu_dir()
    if path is None:
        pytest.skip(reason)
    return path
