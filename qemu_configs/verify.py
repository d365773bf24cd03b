"""Judge a self-test run: the guest's report against the host's own view.

The host recomputes the SHA-256 results from the seed it chose, reads the
device server's counters, QEMU's PCI view (QMP ``query-pci``) and the guest's
``lspci -vvv``; every comparison is one named check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guest_agent import testdata
from qemu_configs.launcher import RunResult, find_qdev

LSPCI_MUST_SHOW = {
    "lspci_device": "[1234:7e10]",
    "lspci_pcie_endpoint": "Express (v2) Endpoint",
    "lspci_tee_io_bit": "TEE-IO+",
    "lspci_msix": "MSI-X: Enable",
    "lspci_power_management": "Power Management version 3",
    "lspci_extended_config_dsn": "Device Serial Number",
    "lspci_doe": "Data Object Exchange",
    "lspci_ide": "Integrity & Data Encryption",
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _qmp_has_device(pci: list[dict[str, Any]] | None) -> bool:
    dev = find_qdev(pci or [], "teeio0")
    ids = (dev or {}).get("id", {})
    return bool(ids.get("vendor") == 0x1234 and ids.get("device") == 0x7E10)


def check_selftest(res: RunResult, seed: int, rounds: int) -> list[Check]:
    rep = res.report or {}
    stats = res.device_stats or {}
    checks = [Check("guest_status_ok", res.status == "ok", f"status={res.status!r}"),
              Check("guest_report_ok", rep.get("ok") is True,
                    ", ".join(c["name"] for c in rep.get("checks", []) if not c["ok"])
                    or f"{len(rep.get('checks', []))} guest checks passed")]
    lspci = res.text("lspci.txt")
    for name, needle in LSPCI_MUST_SHOW.items():
        checks.append(Check(name, needle in lspci, f"lspci shows {needle!r}"))
    want = testdata.expected_sha256(seed, rounds)
    checks.append(Check("sha256_equals_host", rep.get("sha256") == want,
                        f"{len(want)} digests recomputed from seed {seed:#x}"))
    for name, dev_key, guest_key in (("dma_jobs_match", "dma_jobs", "device_jobs"),
                                     ("dma_bytes_match", "dma_bytes", "device_bytes"),
                                     ("interrupts_match", "irq_signalled",
                                      "interrupts_received")):
        checks.append(Check(name, stats.get(dev_key) is not None
                            and stats.get(dev_key) == rep.get(guest_key),
                            f"device {dev_key}={stats.get(dev_key)} guest "
                            f"{guest_key}={rep.get(guest_key)}"))
    checks.append(Check("qmp_sees_device", _qmp_has_device(res.qmp_pci),
                        "QEMU's query-pci lists 1234:7e10"))
    return checks
