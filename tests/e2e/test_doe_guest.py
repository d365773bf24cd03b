"""Boot the guest and check DOE from inside it: Linux's own discovery at enumeration
(``/sys/bus/pci/devices/<bdf>/doe_features``) and the guest agent's user-space mailbox
client (``guest_agent/doe.py``), both against what the device server says it registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qemu_configs import image
from qemu_configs.launcher import RunResult, VmOptions, cleanup, run_vm

pytestmark = pytest.mark.e2e


def _explain(res: RunResult) -> str:
    tail = res.console_log.read_text(errors="replace")[-3000:] if res.console_log.exists() else ""
    return (f"reason={res.reason!r} workdir={res.workdir}\nreport={res.report}\n"
            f"--- console tail ---\n{tail}")


def _boot(tmp_path: Path, **kw: Any) -> tuple[RunResult, dict[str, Any], dict[str, Any]]:
    res = run_vm(VmOptions(mode="doe-discovery", workdir=tmp_path / "vm", **kw))
    assert res.ok, _explain(res)
    assert res.report is not None and res.device_stats is not None, _explain(res)
    failed = [c for c in res.report["checks"] if not c["ok"]]
    assert not failed, f"failed guest checks: {failed}\n{_explain(res)}"
    return res, res.report, res.device_stats


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


def test_guest_mailbox_with_the_test_echo_protocol(guest_image: image.GuestImage,
                                                   tmp_path: Path) -> None:
    res, rep, stats = _boot(tmp_path, params={"echo": "1"}, device_args=["--doe-test-echo"])
    assert stats["doe_protocols"] == ["0001:00", "0001:01"]
    assert rep["kernel_doe_features"] == {"doe_discovery": "0001:00", "0001:01": "0001:01"}
    assert rep["kernel_protocols"] == ["0001:00", "0001:01"]
    assert rep["user_protocols"] == ["0001:00", "0001:01"]
    echoes = {c["name"]: c for c in rep["checks"] if c["name"].startswith("echo[")}
    assert sorted(echoes) == ["echo[1024]", "echo[4]", "echo[64]"]
    assert all(c["ok"] and c["got"] == c["bytes"] for c in echoes.values())
    assert stats["doe_objects"] == stats["doe_responses"] == 2 * 2 + 3
    cleanup(res)
