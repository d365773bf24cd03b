"""`make demo` end to end: the whole story (lock, attest, accept, RUN, encrypted DMA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu_configs import demo, image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_demo_locks_attests_accepts_and_validates_dma(
        guest_image: image.GuestImage, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    rc = demo.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out
    for name in ("verify:chain", "verify:signature", "verify:nonce", "verify:measurements",
                 "verify:report_ranges", "accepted", "guest:private_sha256",
                 "guest:unaccepted_buffer_refused", "guest:released_buffer_refused",
                 "host_recomputes_sha256", "link_ciphertext_only"):
        assert f"[PASS] {name}:" in out, name
    summary = json.loads((tmp_path / "demo-summary.json").read_text())
    steps = [s["step"] for s in summary["guest_steps"]]
    assert steps[:6] == ["enumerate", "ghcx_handshake", "tdi_lock", "get_evidence",
                         "tdi_info", "verify"], steps
    assert "tdi_accept" in steps and steps[-1] == "tdi_stop"
    # the TSM's view at the end: the TDI went back to CONFIG_UNLOCKED after the guest's STOP
    status = json.loads((tmp_path / "tsm-status.json").read_text())
    (tdi,) = status["tdis"]
    assert tdi["state"] == "CONFIG_UNLOCKED" and tdi["mmio_private"] is False, tdi
    assert status["vms"][0]["windows"] == [], status["vms"]
    assert (tmp_path / "identity" / "device.key").stat().st_mode & 0o777 == 0o600
