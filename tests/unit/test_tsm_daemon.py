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
from tsm.__main__ import main
from tsm.ctl import CtlError
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


def test_bind_secret_file_checks(tmp_path: Path) -> None:
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    d = Daemon(state, reconnect_delays=())
    important = tmp_path / "important.txt"
    important.write_text("keep me")
    bind = {"vm": "vm0", "device": "dev0", "ghcx_socket": str(tmp_path / "vm0.sock")}
    try:
        for path, error in ((state / "journal.jsonl", "inside the state directory"),
                            (state / "ctl.sock", "inside the state directory"),
                            (state / "vms" / ".." / "x.secret", "inside the state directory"),
                            (state / "vms" / "sub" / "x.secret", "inside the state directory"),
                            (important, "exists and is not a GHCx secret"),
                            (tmp_path, "exists and is not a GHCx secret"),
                            (state / "vms" / "vm1.secret", "is VM vm1's")):
            with pytest.raises(CtlError, match=error):
                d.ctl_request("bind", bind | {"secret_file": str(path)})
        assert important.read_text() == "keep me"
        assert (state / "journal.jsonl").stat().st_size > 0
        old = tmp_path / "old.secret"              # an earlier secret of ours: replaced
        write_secret(old)
        before = old.read_bytes()
        assert d.ctl_request("bind", bind | {"secret_file": str(old)})["secret_file"] == \
            str(old)
        assert old.read_bytes() != before and old.stat().st_mode & 0o777 == 0o600
        d.ctl_request("unbind", {"vm": "vm0"})
        custom = state / "vms" / "custom.secret"   # inside the state dir: only under vms/
        d.ctl_request("bind", bind | {"secret_file": str(custom)})
        assert len(custom.read_bytes()) == 32
    finally:
        d.close()


def test_unbind_is_best_effort(tmp_path: Path) -> None:
    """The device and its platform are unreachable: unbind still forgets the VM (and
    deletes its secret), and says what it could not do."""
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    journal, _ = Journal.open(state)
    journal.append("tdi", device="dev1", state="RUN", lock_epoch=1, vm="vm1", reason=None,
                   source="tsm")
    journal.append("window", window_id=7, vm="vm1", device="dev1", base=0x1000,
                   size=0x1000, access="rw")
    journal.close()
    d = Daemon(state, reconnect_delays=())
    try:
        result = d.ctl_request("unbind", {"vm": "vm1"})
        assert result["unbound"] and "vm1" not in d.vms
        assert [f.split(":")[0] for f in result["failed"]] == [
            "STOP", "windows not revoked at the platform"]
        assert "no SPDM session" in result["failed"][0]
        assert not (state / "vms" / "vm1.secret").exists()
        assert d.devices["dev1"].tdi.vm is None
        assert d.devices["dev1"].tdi.state.name == "ERROR"      # STOP did not happen
    finally:
        d.close()
    d = Daemon(state, reconnect_delays=())                       # the journal agrees
    try:
        assert d.vms == {} and d.devices["dev1"].tdi.vm is None
    finally:
        d.close()


def test_mmio_reporting_offset_parse_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["ctl", "--ctl-socket", str(tmp_path / "c.sock"), "bind", "--vm", "vm0",
              "--device", "dev0", "--ghcx-socket", "g.sock", "--mmio-reporting-offset",
              "0x1zz"])
    assert exit_.value.code == 2
    assert ("argument --mmio-reporting-offset: '0x1zz' must be an integer (0x... allowed)"
            in capsys.readouterr().err)
