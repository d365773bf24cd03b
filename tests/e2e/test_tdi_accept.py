"""Trusted device assignment in a real QEMU guest (TCG): lock -> attest -> accept -> RUN.

One boot per scenario (each bounded by the launcher's timeout table), all through the
whole stack (qemu_configs/tee_stack.py): TSM daemon, device server, QEMU with the GHCx
virtio-serial port and the launch secret in fw_cfg, the guest agent's ``accept``.

* (the happy path is ``make demo``'s test, tests/e2e/test_demo.py)
* tampered firmware: the guest refuses (measurements), even though the TSM let it through;
* rogue trust anchor configured in the TSM: the guest still refuses (its own anchor);
* STOP and re-LOCK behind the guest's back between TDI_INFO and ACCEPT: ACCEPT refused;
* a host write to a locked BAR during RUN, with a man-in-the-middle relay on GHCx that
  replays, alters and injects garbage all along: every relay attack rejected and the
  channel survives (the guest still completes its flow); the BAR write means ERROR, seen
  by the guest, and DMA stops;
* link tamper during RUN: MAC failure, ERROR, DMA stops;
* the TSM killed and restarted during RUN: fail-safe, and the guest is told.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu_configs import image
from qemu_configs.demo import judge
from qemu_configs.launcher import RunResult
from qemu_configs.tee_stack import StackOptions, TeeStack
from tests.e2e.ghcx_relay import GhcxRelay

pytestmark = pytest.mark.timeout(300)


def run_stack(tmp_path: Path, **kw: Any) -> tuple[TeeStack, RunResult, dict[str, Any]]:
    stack = TeeStack(StackOptions(tmp_path / "run", seed=secrets.randbits(32), **kw))
    res = stack.run()
    rep = res.report or {}
    return stack, res, rep


def diagnose(stack: TeeStack, res: RunResult) -> str:
    parts = [f"reason: {res.reason}"]
    for name in ("results/agent.log", "tsm.log", "ctl.log", "device.log"):
        p = stack.wd / name
        if p.exists():
            parts.append(f"--- {name} (tail)\n" + "\n".join(p.read_text(
                errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def in_run(action: Callable[[TeeStack], None]) -> Callable[[TeeStack], None]:
    """on_running hook: wait for the guest's in-run pause, act, let it go on."""
    def hook(stack: TeeStack) -> None:
        stack.wait_for("paused-in-run")
        action(stack)
        stack.resume("in-run")
    return hook


def test_tampered_firmware_is_refused_by_the_guest(guest_image: image.GuestImage,
                                                   tmp_path: Path) -> None:
    patched = tmp_path / "patched-fw.elf"
    from vfio_user_dev.firmware_build import build
    build(patched, {"TEEIO_FW_PATCH": "1"})
    stack, res, rep = run_stack(tmp_path, firmware=patched, expect="refuse",
                                tsm_checks_measurements=False)
    assert res.ok, diagnose(stack, res)
    assert not rep["accepted"]
    assert rep["refusal"].startswith("measurements"), rep["refusal"]


def test_rogue_anchor_in_the_tsm_does_not_sway_the_guest(guest_image: image.GuestImage,
                                                         tmp_path: Path) -> None:
    from teeio import pki
    rogue = tmp_path / "rogue-identity"
    pki.provision(rogue)
    stack, res, rep = run_stack(tmp_path, device_identity=rogue,
                                tsm_anchor=rogue / "trust-anchor.pem", expect="refuse")
    assert res.ok, diagnose(stack, res)
    assert not rep["accepted"]
    assert rep["refusal"].startswith("chain"), rep["refusal"]


def test_stop_and_relock_before_accept_is_refused(guest_image: image.GuestImage,
                                                  tmp_path: Path) -> None:
    def relock(stack: TeeStack) -> None:
        stack.wait_for("paused-before-accept")
        stack.ctl("stop", "--vm", stack.opts.vm_id)
        stack.ctl("lock", "--vm", stack.opts.vm_id)
        stack.resume("before-accept")

    stack, res, rep = run_stack(tmp_path, pause_at="before-accept", expect="refuse",
                                on_running=relock)
    assert res.ok, diagnose(stack, res)
    assert not rep["accepted"]
    assert "mismatch" in rep["refusal"], rep["refusal"]


def test_host_bar_write_during_run_means_error_through_a_ghcx_mitm(
        guest_image: image.GuestImage, tmp_path: Path) -> None:
    relays: list[GhcxRelay] = []

    def relay(qemu_side: Path, tsm_side: Path) -> GhcxRelay:
        relays.append(GhcxRelay(qemu_side, tsm_side))
        return relays[-1]

    launch_secret: list[bytes] = []

    def write_bar(stack: TeeStack) -> None:
        launch_secret.append(stack.secret_file.read_bytes())   # unbind removes it later
        r = stack.host("config_write", offset=0x10, size=4, value=0xFEB00000)
        assert r["ok"], r

    stack, res, rep = run_stack(tmp_path, pause_at="in-run", on_running=in_run(write_bar),
                                ghcx_relay=relay)
    assert res.ok, diagnose(stack, res)
    # Before the pause the whole flow ran through the relay: accepted, DMA validated.
    assert rep["accepted"], rep.get("refusal")
    failed = [c for c in judge(stack, res.report, stack.opts.seed) if not c.ok]
    assert not failed, failed
    acts = relays[0].actions
    assert acts["replayed"] == 1 and acts["altered"] == 1 and acts["garbage"] >= 1, acts
    assert rep["ghcx"].get("forged", 0) >= 1, rep["ghcx"]
    tsm_view = json.dumps(json.loads((stack.wd / "tsm-status.json").read_text()))
    assert '"replay"' in tsm_view, tsm_view
    (secret,) = launch_secret
    assert len(secret) == 32 and not stack.secret_file.exists()     # forgotten at unbind
    journal = (stack.tsm_dir / "journal.jsonl").read_bytes()
    assert secret not in journal and secret.hex().encode() not in journal
    # The host's BAR write during RUN: ERROR, and the device's DMA stopped.
    after = rep["after_pause"]
    assert not after["dma_job"]["done"] and not after["dma_job"]["landed"], after
    assert after["info"]["state"] == "ERROR", after
    assert after["mmio_id"] == "0xffffffff", after


def test_link_tamper_during_run_means_error(guest_image: image.GuestImage,
                                            tmp_path: Path) -> None:
    def tamper(stack: TeeStack) -> None:
        r = stack.host("link_inject", kind="FLIP_PAYLOAD", count=1)
        assert r["ok"], r

    stack, res, rep = run_stack(tmp_path, pause_at="in-run", on_running=in_run(tamper))
    assert res.ok, diagnose(stack, res)
    after = rep["after_pause"]
    assert not after["dma_job"]["done"], after
    assert after["info"]["state"] == "ERROR", after
    assert after["info"]["stream"]["state"] == "insecure", after


def test_tsm_restart_during_run_fails_safe(guest_image: image.GuestImage,
                                           tmp_path: Path) -> None:
    def restart(stack: TeeStack) -> None:
        stack.stop_tsm(kill=True)
        stack.start_tsm()

    stack, res, rep = run_stack(tmp_path, pause_at="in-run", on_running=in_run(restart))
    assert res.ok, diagnose(stack, res)
    after = rep["after_pause"]
    assert after["tsm_restarted"], after
    assert after["info"]["state"] == "ERROR", after
    assert "restart" in (after["info"].get("reason") or ""), after
    assert not after["dma_job"]["done"], after
