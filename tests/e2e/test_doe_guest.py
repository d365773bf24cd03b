"""Boot the guest and check DOE and SPDM from inside it.

* Linux's own DOE discovery at enumeration (``/sys/bus/pci/devices/<bdf>/doe_features``)
  and the guest agent's user-space mailbox client (``guest_agent/doe.py``), both against
  what the device server says it registered;
* SPDM GET_VERSION / GET_CAPABILITIES from the guest (``spdm-probe`` mode) answered by
  our device security manager: through our device's own DOE mailbox, and through QEMU's
  emulated NVMe controller, whose ``spdm_port`` forwards its DOE objects to our device
  server's ``--doe-tcp-port`` (the spdm-emu socket).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qemu_configs import image
from qemu_configs.launcher import RunResult, VmOptions, cleanup, run_vm
from teeio.spdm.responder import DEFAULT_FLAGS, ResponderConfig

pytestmark = pytest.mark.e2e

ALL_SPDM = {"doe_discovery": "0001:00", "0001:01": "0001:01", "0001:02": "0001:02"}


def _explain(res: RunResult) -> str:
    tail = res.console_log.read_text(errors="replace")[-3000:] if res.console_log.exists() else ""
    dev = res.workdir / "device.log"
    dev_tail = dev.read_text(errors="replace")[-3000:] if dev.exists() else ""
    return (f"reason={res.reason!r} workdir={res.workdir}\nreport={res.report}\n"
            f"--- console tail ---\n{tail}\n--- device log tail ---\n{dev_tail}")


def _boot(tmp_path: Path, mode: str = "doe-discovery",
          **kw: Any) -> tuple[RunResult, dict[str, Any], dict[str, Any]]:
    res = run_vm(VmOptions(mode=mode, workdir=tmp_path / "vm", **kw))
    assert res.ok, _explain(res)
    assert res.report is not None and res.device_stats is not None, _explain(res)
    failed = [c for c in res.report["checks"] if not c["ok"]]
    assert not failed, f"failed guest checks: {failed}\n{_explain(res)}"
    return res, res.report, res.device_stats


def _spdm_device(tmp_path: Path, firmware: Path) -> list[str]:
    return ["--identity", str(tmp_path / "identity"), "--firmware", str(firmware)]


def _check_spdm_answers(rep: dict[str, Any]) -> None:
    """VERSION and CAPABILITIES as our responder gives them (not some other SPDM stack)."""
    spdm = rep["spdm"]
    assert {"1.2", "1.3"} <= set(spdm["version"]["entries"])
    caps = spdm["capabilities"]
    cfg = ResponderConfig()
    assert caps["version"] == "1.3"
    assert int(caps["flags"], 16) == DEFAULT_FLAGS
    assert (caps["ct_exponent"], caps["data_transfer_size"], caps["max_spdm_msg_size"]) == (
        cfg.ct_exponent, cfg.data_transfer_size, cfg.max_spdm_msg_size)


def test_product_device_discovery_in_the_guest(guest_image: image.GuestImage,
                                               tmp_path: Path) -> None:
    res, rep, stats = _boot(tmp_path)
    registered = stats["doe_protocols"]          # the device server's own view
    assert registered[0] == "0001:00"
    # Linux walked DOE Discovery at enumeration: doe_discovery plus one file per protocol.
    features = rep["kernel_doe_features"]
    assert features["doe_discovery"] == "0001:00"
    assert sorted(features) == sorted(["doe_discovery", *registered[1:]])
    assert rep["kernel_protocols"] == sorted(registered)
    assert rep["user_protocols"] == registered   # the guest agent's walk, in index order
    assert rep["doe_cap"] == "0x110" and rep["doe_cap_version"] == 2
    assert "Data Object Exchange" in res.text("lspci.txt")
    # kernel walk + user walk, one object per entry each, all answered
    assert stats["doe_objects"] == stats["doe_responses"] == 2 * len(registered)
    cleanup(res)


def test_spdm_through_our_device_mailbox(guest_image: image.GuestImage, tmp_path: Path,
                                         firmware: Path) -> None:
    res, rep, stats = _boot(tmp_path, "spdm-probe", params={"target": "teeio"},
                            device_args=_spdm_device(tmp_path, firmware))
    assert stats["doe_protocols"] == ["0001:00", "0001:01", "0001:02"]
    assert rep["kernel_doe_features"] == ALL_SPDM
    assert rep["user_protocols"] == ["0001:00", "0001:01", "0001:02"]
    assert rep["doe_cap"] == "0x110"
    _check_spdm_answers(rep)
    # kernel walk (3) + user walk (3) + GET_VERSION + GET_CAPABILITIES, all answered
    assert stats["doe_objects"] == stats["doe_responses"] == 8
    assert "SPDM responder on DOE 0001:01 and 0001:02" in (res.workdir / "device.log").read_text()
    cleanup(res)


def _nvme_spdm_port_missing() -> str | None:
    """Why QEMU's NVMe cannot forward SPDM, or None if its spdm_port property exists."""
    if not image.is_built():
        return None   # guest_image decides (builds or skips)
    proc = subprocess.run([*image.paths().qemu_argv0(), "-device", "nvme,help"],
                          capture_output=True, text=True, timeout=60, check=False)
    if "spdm_port=" not in proc.stdout:
        return f"this QEMU's nvme device has no spdm_port property ({proc.stdout[:200]!r})"
    return None


def test_spdm_through_qemu_nvme_spdm_port(guest_image: image.GuestImage, tmp_path: Path,
                                          firmware: Path) -> None:
    missing = _nvme_spdm_port_missing()
    if missing:
        if os.environ.get("TEEIO_REQUIRE_E2E"):   # under `make test` e2e never skips
            pytest.fail(missing)
        pytest.skip(missing)
    with socket.socket() as probe:      # a free loopback port (the listener sets SO_REUSEADDR)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    res, rep, stats = _boot(
        tmp_path, "spdm-probe", params={"target": "nvme"},
        device_args=[*_spdm_device(tmp_path, firmware), "--doe-tcp-port", str(port)],
        extra_qemu_args=["-device", f"nvme,id=nvme0,serial=teeio-spdm,spdm_port={port}"])
    # QEMU answers DOE Discovery for its NVMe itself and forwards 0001:01/0001:02 objects.
    assert rep["doe_cap"] == "0x100" and rep["doe_cap_version"] == 1   # QEMU's pcie_doe
    assert rep["kernel_doe_features"] == ALL_SPDM
    assert rep["user_protocols"] == ["0001:00", "0001:01", "0001:02"]
    _check_spdm_answers(rep)
    # Our device server saw: Linux's discovery walk of its own mailbox (3) and the two
    # SPDM requests QEMU forwarded over the socket.
    assert stats["doe_objects"] == stats["doe_responses"] == 5
    assert "DOE socket: client connected" in (res.workdir / "device.log").read_text()
    cleanup(res)
