"""Personalities (teeio/personality.py): namespace sizes, the configuration measurement,
and the verifier's side kept in step -- teeio-refvalues and teeio-guest-policy
--personality give reference values a device of that personality matches and the other
does not; the device's config-space identity per personality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu_configs.guest_policy import main as guest_policy
from teeio import pki
from teeio.measurements import DmtfValueType, MeasurementBlock
from teeio.pcie.config import Reg
from teeio.personality import (
    ACCELERATOR,
    CONFIG_MEASUREMENT_INDEX,
    NVME,
    configuration_measurements,
    configuration_text,
    namespace_size,
    personality,
)
from teeio.refcheck import compare_measurements, parse_reference_values
from teeio.tdi_verify import load_policy
from tsm.refvalues import main as refvalues
from vfio_user_dev.config_space import ACCELERATOR_LAYOUT, bar_address, build_config
from vfio_user_dev.personality.nvme import NVME_LAYOUT


@pytest.mark.parametrize(("text", "size"), [("64M", 64 << 20), ("1G", 1 << 30),
                                            ("512", 512), ("4k", 4096), ("2MiB", 2 << 20),
                                            ("1T", 1 << 40)])
def test_namespace_sizes(text: str, size: int) -> None:
    assert namespace_size(text) == size


@pytest.mark.parametrize(("text", "why"), [("100", "multiple of 512"), ("0", "multiple"),
                                           ("-1", "not a size"), ("1.5G", "not a size"),
                                           ("", "not a size"), ("64X", "not a size"),
                                           ("²", "not a size")])
def test_bad_namespace_sizes(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as exc:
        namespace_size(text)
    assert "\n" not in str(exc.value)


def test_configuration_measurement_names_the_personality() -> None:
    assert configuration_measurements("accelerator") == ()
    (m,) = configuration_measurements("nvme")
    assert (m.index, m.value_type, m.as_digest) == (CONFIG_MEASUREMENT_INDEX,
                                                    DmtfValueType.HARDWARE_CONFIG, False)
    assert m.data == configuration_text(NVME) and b"personality=nvme" in m.data
    assert b"class=010802" in m.data and b"1234:7e11" in m.data
    with pytest.raises(ValueError, match="unknown personality 'disk'"):
        personality("disk")


def test_config_space_identity_per_personality() -> None:
    acc, nvme = build_config(1), build_config(1, layout=NVME_LAYOUT)
    assert acc.get(Reg.DEVICE_ID, 2) == ACCELERATOR.device_id == 0x7E10
    assert acc.get(Reg.CLASS_CODE, 3) == 0x120000 and acc.get(Reg.BAR0, 4) == 0
    assert nvme.get(Reg.DEVICE_ID, 2) == NVME.device_id
    assert nvme.get(Reg.CLASS_CODE, 3) == 0x010802
    assert nvme.get(Reg.SUBSYSTEM_ID, 2) == NVME.subsystem_id
    assert nvme.get(Reg.BAR0, 4) == 0b100                    # 64-bit memory BAR
    assert (ACCELERATOR_LAYOUT.msix_bar, NVME_LAYOUT.msix_bar) == (1, 2)
    nvme.write(Reg.BAR0, (0xFFFF_FFFF).to_bytes(4, "little"))
    nvme.write(Reg.BAR0 + 4, (0x12).to_bytes(4, "little"))
    assert nvme.get(Reg.BAR0, 4) == 0xFFFF_C004               # 16 KiB
    assert bar_address(nvme, 0) == 0x12_FFFF_C000
    assert NVME_LAYOUT.doe_vector == NVME_LAYOUT.msix_vectors - 1 == 9


def _refs(firmware: Path, tmp: Path, name: str) -> dict[int, dict[str, object]]:
    out = tmp / f"{name}.json"
    assert refvalues(["--elf", str(firmware), "--personality", name, "--out", str(out)]) == 0
    return parse_reference_values(json.loads(out.read_text()))


def test_refvalues_per_personality(firmware: Path, tmp_path: Path) -> None:
    acc, nvme = _refs(firmware, tmp_path, "accelerator"), _refs(firmware, tmp_path, "nvme")
    assert sorted(acc) == [1, 2, 3, 4, 5] and sorted(nvme) == [1, 2, 3, 4, 5, 6]
    assert nvme[6]["raw"] == configuration_text(NVME).hex()
    # What an NVMe device reports (synthetic firmware blocks taken from the references).
    blocks = [MeasurementBlock(i, int(e["value_type"]), "raw" in e,  # type: ignore[arg-type]
                               bytes.fromhex(str(e.get("raw") or e["sha384"])))
              for i, e in nvme.items()]
    assert all(c.ok for c in compare_measurements(blocks, nvme, "sha384"))
    against_acc = [c for c in compare_measurements(blocks, acc, "sha384") if not c.ok]
    assert [(c.index, c.status) for c in against_acc] == [(6, "NO REFERENCE")]
    against_nvme = [c for c in compare_measurements(blocks[:5], nvme, "sha384") if not c.ok]
    assert [(c.index, c.status) for c in against_nvme] == [(6, "MISSING")]


def test_guest_policy_per_personality(firmware: Path, tmp_path: Path) -> None:
    ident = pki.provision(tmp_path / "id")
    out = tmp_path / "policy.json"
    assert guest_policy(["--trust-anchor", str(ident["trust_anchor"]), "--firmware",
                         str(firmware), "--personality", "nvme", "--out", str(out)]) == 0
    pol = load_policy(out)
    assert (pol.vendor_id, pol.device_id) == (0x1234, 0x7E11)
    assert sorted(pol.references) == [1, 2, 3, 4, 5, 6]


def test_source_round_trip() -> None:
    """The configuration block is what the responder reports, in any hash."""
    (m,) = configuration_measurements("nvme")
    blk = MeasurementBlock.from_source(m, "sha256")
    assert blk.raw and blk.value == m.data
