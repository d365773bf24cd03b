"""tsm.daemon in-process without a device: recovery that goes on past a device's failure,
the daemon's one-line start failures, and the control operations' argument checks.
(The daemon against a real device server: tests/integration/test_tsm_daemon.py.)"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tsm import daemon as daemon_mod
from tsm.daemon import Daemon, write_secret
from tsm.device import DeviceConfig, DeviceLink
from tsm.journal import Journal
from tsm.tdisp import TdispClientError

pytestmark = pytest.mark.timeout(30)


def journal_two_devices(state: Path, tmp: Path) -> None:
    """dev0 and dev1 known to the journal, VM vm1 bound to dev1."""
    state.mkdir(mode=0o700)
    journal, _ = Journal.open(state)
    for name in ("dev0", "dev1"):
        cfg = DeviceConfig(name=name, trust_anchor=str(tmp / "anchor.pem"),
                           platform_socket=str(tmp / f"{name}-plat.sock"),
                           platform_credential=str(tmp / "cred"),
                           doe_socket=str(tmp / f"{name}-doe.sock"))
        journal.append("device", **cfg.as_record())
    secret = state / "vms" / "vm1.secret"
    write_secret(secret)
    journal.append("vm", vm="vm1", device="dev1", ghcx_socket=str(tmp / "vm1.sock"),
                   secret_file=str(secret), mmio_reporting_offset=0)
    journal.close()


class FailingTdisp:
    def get_state(self) -> Any:
        raise TdispClientError("GET_DEVICE_INTERFACE_STATE: a malformed response")


def test_recover_goes_on_past_a_tdisp_failure(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: _recover caught only DeviceError, but the state check after the reconnect
    raises TDISP client errors: one device's failure stopped the whole start."""
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    connects: list[str] = []
    monkeypatch.setattr(DeviceLink, "connect", lambda self: connects.append(self.config.name))
    monkeypatch.setattr(DeviceLink, "tdisp_client", lambda self: FailingTdisp())
    d = Daemon(state, reconnect_delays=())
    try:
        d.start()
        assert connects == ["dev0", "dev1"]
        for name in ("dev0", "dev1"):
            assert "malformed response" in (d.devices[name].last_error or "")
        assert d.counters["reconnect_failures"] == 2
        server = d.vms["vm1"].server
        assert server is not None and (tmp_path / "vm1.sock").exists()
        assert d.op_status({})["devices"][1]["last_error"].startswith("GET_DEVICE_INTERFACE")
    finally:
        d.close()


def test_daemon_start_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def boom(self: Daemon) -> None:
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(Daemon, "start", boom)
    monkeypatch.setattr(signal, "signal", lambda *_a: None)
    ns = argparse.Namespace(state_dir=tmp_path / "tsm", ctl_socket=None, heartbeat=None)
    assert daemon_mod.run_command(ns) == 1
    assert capsys.readouterr().err == "daemon FAILED: something unexpected\n"


def test_status_answers_while_the_daemon_lock_is_held(tmp_path: Path) -> None:
    """A connect attesting (or a stalled device) holds the daemon lock: status answers."""
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    d = Daemon(state, reconnect_delays=())
    held, release = threading.Event(), threading.Event()

    def busy() -> None:
        with d.lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=busy)
    holder.start()
    try:
        assert held.wait(5)
        result: dict[str, Any] = {}
        asker = threading.Thread(target=lambda: result.update(d.ctl_request("status", {})),
                                 daemon=True)
        asker.start()
        asker.join(2)
        assert [dev["name"] for dev in result["devices"]] == ["dev0", "dev1"]
        assert result["vms"][0]["vm"] == "vm1"
    finally:
        release.set()
        holder.join()
        d.close()
