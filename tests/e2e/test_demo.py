"""`make demo` end to end: host attestation over DOE beside the guest's self-test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu_configs import demo, image

pytestmark = pytest.mark.e2e


def test_demo_attests_and_self_tests(guest_image: image.GuestImage, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = demo.main(["--workdir", str(tmp_path), "--rounds", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[PASS] host_tsm_attestation" in out
    assert "reference values: all 4 measurements match" in out
    assert "FAIL" not in out
    evidence = json.loads((tmp_path / "evidence.json").read_text())
    assert evidence["verified"] is True
    assert (tmp_path / "identity" / "device.key").stat().st_mode & 0o777 == 0o600
