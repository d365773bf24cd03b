"""tsm.daemon in-process without a device: recovery that goes on past a device's failure,
the daemon's one-line start failures, and the control operations' argument checks.
(The daemon against a real device server: tests/integration/test_tsm_daemon.py.)"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from teeio.tdisp.defs import TdiState
from tsm import daemon as daemon_mod
from tsm.__main__ import main
from tsm.ctl import CtlError
from tsm.daemon import Daemon, write_secret
from tsm.device import DeviceConfig, DeviceError, DeviceLink
from tsm.ghcx_server import GhcxFailure
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
        assert d.ctl_status({})["devices"][1]["last_error"].startswith("GET_DEVICE_INTERFACE")
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


# -- one device stalled, the others served (per-device locking) ---------------------------

class StallingTdisp:
    def __init__(self, link: StallingLink) -> None:
        self.link = link

    def get_state(self) -> TdiState:
        self.link.entered.set()
        assert self.link.gate.wait(20), "the test never released the stalled device"
        return TdiState.CONFIG_UNLOCKED


class StallingLink(DeviceLink):
    """A connected device whose TDISP requests (and connect) wait for *gate*."""

    def __init__(self, config: DeviceConfig, gate: threading.Event, up: bool = True) -> None:
        super().__init__(config)
        self.gate, self.entered, self.up = gate, threading.Event(), up

    @property
    def session_up(self) -> bool:
        return self.up

    def connect(self) -> None:
        self.entered.set()
        assert self.gate.wait(20), "the test never released the stalled device"
        self.up = True

    def tdisp_client(self) -> Any:
        return StallingTdisp(self)

    def stream_state(self) -> str:
        return "secure"


def two_vms(tmp: Path) -> Daemon:
    """dev0 ← vm0 and dev1 ← vm1, both devices "connected" with :class:`StallingLink`:
    dev0's gate closed, dev1's open."""
    state = tmp / "tsm"
    journal_two_devices(state, tmp)
    journal, _ = Journal.open(state)
    secret = state / "vms" / "vm0.secret"
    write_secret(secret)
    journal.append("vm", vm="vm0", device="dev0", ghcx_socket=str(tmp / "vm0.sock"),
                   secret_file=str(secret), mmio_reporting_offset=0)
    journal.close()
    d = Daemon(state, reconnect_delays=())
    d.devices["dev0"].link = StallingLink(d.devices["dev0"].config, threading.Event())
    opened = threading.Event()
    opened.set()
    d.devices["dev1"].link = StallingLink(d.devices["dev1"].config, opened)
    return d


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - t0


def test_a_stalled_device_does_not_delay_another_vm(tmp_path: Path) -> None:
    """vm0's TDI_INFO stalls in dev0's I/O (its device lock held): vm1's TDI_INFO and
    STATUS on dev1, both VMs' STATUS and ``ctl status`` answer at once; a second request
    for dev0 waits at most op_wait and is answered busy; then the stalled one completes."""
    d = two_vms(tmp_path)
    stalled = d.devices["dev0"].link
    assert isinstance(stalled, StallingLink)
    try:
        t, out = in_thread(d.ghcx_request, "vm0", "TDI_INFO", {})
        assert stalled.entered.wait(5)
        info, took = timed(d.ghcx_request, "vm1", "TDI_INFO", {})
        assert info["state"] == "CONFIG_UNLOCKED" and took < 1.0
        status, took = timed(d.ghcx_request, "vm1", "STATUS", {})
        assert status["tdi"] == "dev1" and took < 1.0
        assert d.ghcx_request("vm0", "STATUS", {})["tdi"] == "dev0"   # its own: no I/O
        doc, took = timed(d.ctl_request, "status", {})
        assert [v["vm"] for v in doc["vms"]] == ["vm1", "vm0"] and took < 1.0
        d.op_wait = 0.2
        with pytest.raises(CtlError, match="another operation on it") as err:
            d.ctl_request("stop", {"vm": "vm0"})
        assert err.value.code == "busy"
        with pytest.raises(GhcxFailure, match="dev0 is busy") as gerr:
            d.ghcx_request("vm0", "TDI_INFO", {})
        assert gerr.value.code == "state"
        assert t.is_alive()
        stalled.gate.set()
        t.join(5)
        assert out["result"]["state"] == "CONFIG_UNLOCKED"
    finally:
        stalled.gate.set()
        d.close()


def test_a_payload_that_is_not_the_typed_body_is_bad_request_before_any_io(
        tmp_path: Path) -> None:
    """docs/ghcx.md "Messages": types, ranges, unknown and missing fields are checked by
    the typed body's decode; the answer is ``bad_request`` (counted), with dev0 stalled:
    no request got as far as the device."""
    d = two_vms(tmp_path)
    stalled = d.devices["dev0"].link
    assert isinstance(stalled, StallingLink)
    cases = [("GET_EVIDENCE", {"nonce": "00"}, "nonce: 1 bytes"),
             ("GET_EVIDENCE", {"nonce": "AB" * 32}, "nonce: must be a string of lowercase"),
             ("TDI_ACCEPT", {"digests": {}, "lock_epoch": 1}, "digests.cert_chain: missing"),
             ("TDI_ACCEPT", {"digests": dict.fromkeys(("cert_chain", "transcript", "report"),
                                                      "00" * 48), "lock_epoch": -1},
              "lock_epoch: -1 is outside"),
             ("DMA_ACCEPT", {"base": -1, "size": 4096}, "base: -1 is outside"),
             ("DMA_ACCEPT", {"base": 0, "size": 4096, "access": "x"}, "access: 'x' is not"),
             ("DMA_ACCEPT", {"base": 2**64 - 4096, "size": 8192}, "beyond the 64-bit"),
             ("DMA_RELEASE", {"window_id": True}, "window_id: must be an integer, not bool"),
             ("TDI_LOCK", {"extra": 1}, "unknown field.s. extra"),
             ("STATUS", {"x": 1}, "unknown field.s. x")]
    try:
        for op, payload, why in cases:
            with pytest.raises(GhcxFailure, match=why) as err:
                timed(d.ghcx_request, "vm0", op, payload)
            assert err.value.code == "bad_request", (op, payload)
        with pytest.raises(GhcxFailure) as err:
            d.ghcx_request("vm0", "NO_SUCH_REQUEST", {})
        assert err.value.code == "unknown_request"
        assert not stalled.entered.is_set()
        assert d.ctl_request("status", {})["counters"]["ghcx_bad_request"] == len(cases) - 1
    finally:
        stalled.gate.set()
        d.close()


def test_a_device_being_reconnected_is_busy(tmp_path: Path) -> None:
    """``ctl reconnect`` of dev0 stalls: vm0's requests are answered ``state`` (busy) at
    once, status says what dev0 is doing, dev1 is served; then the reconnect completes."""
    d = two_vms(tmp_path)
    link = d.devices["dev0"].link
    assert isinstance(link, StallingLink)
    link.up = False
    try:
        t, out = in_thread(d.ctl_request, "reconnect", {"device": "dev0"})
        assert link.entered.wait(5)
        with pytest.raises(GhcxFailure, match="being reconnected") as gerr:
            timed(d.ghcx_request, "vm0", "TDI_INFO", {})
        assert gerr.value.code == "state"
        with pytest.raises(CtlError, match="being reconnected") as err:
            d.ctl_request("lock", {"vm": "vm0"})
        assert err.value.code == "busy"
        doc = d.ctl_request("status", {})
        assert [dev["busy"] for dev in doc["devices"]] == ["being reconnected", None]
        assert d.ghcx_request("vm1", "TDI_INFO", {})["state"] == "CONFIG_UNLOCKED"
        link.gate.set()
        t.join(5)
        assert out["result"]["name"] == "dev0" and out["result"]["busy"] is None
        assert out["result"]["connected"]
        assert d.ghcx_request("vm0", "TDI_INFO", {})["state"] == "CONFIG_UNLOCKED"
    finally:
        link.gate.set()
        d.close()


def test_connect_of_a_name_being_connected_is_busy(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    d = Daemon(state, reconnect_delays=())
    gate, entered = threading.Event(), threading.Event()

    def connect(self: DeviceLink) -> None:
        entered.set()
        gate.wait(20)
        raise DeviceError(f"connect {self.config.name}: unreachable")

    monkeypatch.setattr(DeviceLink, "connect", connect)
    args = {"device": "dev9", "doe_socket": str(tmp_path / "d.sock"),
            "trust_anchor": str(tmp_path / "a.pem"), "platform_credential": "c",
            "platform_socket": str(tmp_path / "p.sock")}
    try:
        t, out = in_thread(d.ctl_request, "connect", args)
        assert entered.wait(5)
        with pytest.raises(CtlError, match="dev9 is busy: being connected") as err:
            d.ctl_request("connect", args)
        assert err.value.code == "busy"
        with pytest.raises(CtlError, match="being connected"):
            d.ctl_request("disconnect", {"device": "dev9"})
        gate.set()
        t.join(5)
        assert isinstance(out["error"], CtlError) and "unreachable" in str(out["error"])
        with pytest.raises(CtlError, match="unreachable"):   # the name is free again
            d.ctl_request("connect", args)
        assert "dev9" not in d.devices
    finally:
        gate.set()
        d.close()


def test_session_lost_waits_for_the_operation_in_progress(tmp_path: Path) -> None:
    """The heartbeat thread reports a lost session while a request holds the device: it
    waits for it (no deadlock), then fails safe; a stale report after a reconnect is
    ignored."""
    d = two_vms(tmp_path)
    link = d.devices["dev0"].link
    assert isinstance(link, StallingLink)
    try:
        t, out = in_thread(d.ghcx_request, "vm0", "TDI_INFO", {})
        assert link.entered.wait(5)
        link.up = False
        lost, _ = in_thread(d._session_lost, link, "SPDM heartbeat failed: test")
        lost.join(0.3)
        assert lost.is_alive() and d.counters["sessions_lost"] == 0
        link.gate.set()
        t.join(5)
        lost.join(5)
        assert not lost.is_alive() and d.counters["sessions_lost"] == 1
        assert d.devices["dev0"].stream_state == "insecure"
        link.up = True                      # reconnected meanwhile: a late report ignored
        d._session_lost(link, "late")
        assert d.counters["sessions_lost"] == 1
        assert "result" in out or "error" in out
    finally:
        link.gate.set()
        d.close()


def _swap_for_symlink(folder: Path, target: Path) -> None:
    """The attacker's move: *folder* renamed away and replaced by a symlink to *target*."""
    folder.rename(folder.with_name(folder.name + ".moved"))
    folder.symlink_to(target, target_is_directory=True)


def test_unbind_does_not_follow_a_swapped_secret_folder(tmp_path: Path) -> None:
    """Finding: unbind deleted the secret by path again; with its folder swapped for a
    symlink, the daemon deleted a file of the same name elsewhere."""
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    owned, victims = tmp_path / "owned", tmp_path / "victims"
    owned.mkdir()
    victims.mkdir()
    victim = victims / "vm0.secret"
    victim.write_bytes(b"precious")
    d = Daemon(state, reconnect_delays=())
    try:
        d.ctl_request("bind", {"vm": "vm0", "device": "dev0",
                               "ghcx_socket": str(tmp_path / "vm0.sock"),
                               "secret_file": str(owned / "vm0.secret")})
        _swap_for_symlink(owned, victims)
        assert d.ctl_request("unbind", {"vm": "vm0"})["unbound"]
        assert victim.read_bytes() == b"precious"
        assert not (tmp_path / "owned.moved" / "vm0.secret").exists()   # its own is gone
    finally:
        d.close()


def test_failing_bind_does_not_follow_a_swapped_secret_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: a bind whose GHCx socket fails unlinked the secret by path; the folder
    swapped in between made it delete (or a rewrite overwrite) another file."""
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    owned, victims = tmp_path / "owned", tmp_path / "victims"
    owned.mkdir()
    victims.mkdir()
    victim = victims / "vm0.secret"
    victim.write_bytes(b"precious")
    d = Daemon(state, reconnect_delays=())

    def serve_after_the_swap(vm: Any) -> None:
        _swap_for_symlink(owned, victims)
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(d, "_serve_vm", serve_after_the_swap)
    try:
        with pytest.raises(CtlError, match="GHCx socket"):
            d.ctl_request("bind", {"vm": "vm0", "device": "dev0",
                                   "ghcx_socket": str(tmp_path / "vm0.sock"),
                                   "secret_file": str(owned / "vm0.secret")})
        assert victim.read_bytes() == b"precious"
        assert not (tmp_path / "owned.moved" / "vm0.secret").exists()
        assert "vm0" not in d.vms
    finally:
        d.close()


def test_bind_refuses_a_secret_folder_swapped_before_it_is_opened(tmp_path: Path) -> None:
    """A symlink in the folder's place when bind opens it is resolved once: the secret goes
    where it points, and unbind deletes that very file, not a later swap's."""
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    d = Daemon(state, reconnect_delays=())
    try:
        d.ctl_request("bind", {"vm": "vm0", "device": "dev0",
                               "ghcx_socket": str(tmp_path / "vm0.sock"),
                               "secret_file": str(link / "vm0.secret")})
        assert len((real / "vm0.secret").read_bytes()) == 32
        d.ctl_request("unbind", {"vm": "vm0"})
        assert not (real / "vm0.secret").exists()
    finally:
        d.close()


def test_connect_refuses_a_ghcx_socket_the_daemon_serves(tmp_path: Path) -> None:
    """Finding: ``ctl connect --doe-socket`` at a VM's GHCx socket connected to it, which
    replaced that VM's connection.  Refused, by path, through a symlink too."""
    state = tmp_path / "tsm"
    journal_two_devices(state, tmp_path)
    d = Daemon(state, reconnect_delays=())
    sock = tmp_path / "vm0.sock"
    alias = tmp_path / "alias.sock"
    alias.symlink_to(sock)
    try:
        d.ctl_request("bind", {"vm": "vm0", "device": "dev0", "ghcx_socket": str(sock)})
        server = d.vms["vm0"].server
        assert server is not None
        for path in (sock, alias):
            with pytest.raises(CtlError, match="GHCx socket this TSM serves for VM vm0"):
                d.ctl_request("connect", {
                    "device": "dev9", "doe_socket": str(path),
                    "trust_anchor": str(tmp_path / "a.pem"),
                    "platform_socket": str(tmp_path / "p.sock"),
                    "platform_credential": str(tmp_path / "cred")})
        assert server.counters["connections"] == 0
        d.ctl_request("unbind", {"vm": "vm1"})
        with pytest.raises(CtlError, match="is device dev0's socket"):
            d.ctl_request("bind", {"vm": "vmx", "device": "dev1",
                                   "ghcx_socket": str(tmp_path / "dev0-doe.sock")})
    finally:
        d.close()


@pytest.mark.parametrize("answer", [b"", b"GHCX" + bytes(40)], ids=["silent", "other"])
def test_doe_hello_checks_the_peer_speaks_doe(tmp_path: Path, answer: bytes) -> None:
    """A peer that does not answer the spdm-emu TEST hello (e.g. a GHCx socket) is refused
    before anything else is sent, with a message that says why."""
    import socket as socket_mod

    from tsm.doe_client import DoeClient, DoeTransportError

    path = str(tmp_path / "peer.sock")
    listener = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    got: list[bytes] = []

    def peer() -> None:
        conn, _ = listener.accept()
        got.append(conn.recv(4096))
        if answer:
            conn.sendall(answer)
        time.sleep(1.0)
        conn.close()

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    client = DoeClient.connect_unix(path)
    try:
        with pytest.raises(DoeTransportError, match="does not speak the spdm-emu DOE"):
            client.hello(timeout=0.3)
    finally:
        client.close()
        t.join(3)
        listener.close()
    assert len(got) == 1 and len(got[0]) == 12 + 14      # the TEST hello, nothing more
