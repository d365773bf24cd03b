"""teeio-guest-policy writes a policy the guest agent loads; bad input is one line, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_configs.guest_policy import main
from teeio import pki
from teeio.tdi_verify import load_policy
from vfio_user_dev.firmware_build import build


def test_policy_round_trip(tmp_path: Path) -> None:
    ident = pki.provision(tmp_path / "id")
    fw = build(tmp_path / "fw.elf")
    out = tmp_path / "policy.json"
    assert main(["--trust-anchor", str(ident["trust_anchor"]), "--firmware", str(fw),
                 "--identity", str(tmp_path / "id"), "--out", str(out)]) == 0
    pol = load_policy(out)
    assert [a.subject for a in pol.anchors] == [pki.load_identity(tmp_path / "id").root.subject]
    assert sorted(pol.references) == [1, 2, 3, 4, 5]
    assert pol.leaf_subject and "teeio" in pol.leaf_subject
    assert (pol.vendor_id, pol.device_id) == (0x1234, 0x7E10)


def test_bad_anchor_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "anchor.pem"
    bad.write_text("not a certificate")
    fw = build(tmp_path / "fw.elf")
    assert main(["--trust-anchor", str(bad), "--firmware", str(fw),
                 "--out", str(tmp_path / "p.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("teeio-guest-policy: ") and err.count("\n") == 1
