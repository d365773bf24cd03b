"""``teeio-tsm daemon`` against the real device server process, the guest played by the test
with :class:`teeio.ghcx.GuestChannel` over the VM's GHCx UNIX socket (as QEMU's
virtio-serial chardev would relay it).

* the whole guest flow through a daemon subprocess driven by ``teeio-tsm ctl``: connect,
  bind, TDI_LOCK, GET_EVIDENCE (signature and nonce re-checked, TDI_INFO digests = SHA-384
  of the blobs), TDI_ACCEPT (RUN), DMA_ACCEPT/RELEASE, a stale-epoch ACCEPT refused after
  ``ctl stop`` + ``ctl lock``, TDI_STOP; then RUN again with a window, SIGKILL, restart:
  the status shows the TDI ERROR with the reason, the device really is in ERROR, the
  window and private MMIO are revoked, and the guest gets REHELLO then TDI_INFO ERROR;
* in-process: no launch secret and no IDE key in the journal or the logs (DEBUG).

Device and daemon logs are printed at teardown."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from teeio.ghcx import MsgType
from teeio.ghcx import keys as ghcx_keys
from teeio.ide import IdeKey
from teeio.platform_channel import read_credential
from teeio.spdm import RequesterError
from tests.integration.device_process import PROJECT, DeviceProcess
from tests.support.ghcx_guest import Guest, check_evidence, lock_verify_accept
from tests.support.lockstep import GUEST, SIZE, map_memfd
from tsm import guest_api
from tsm import ide as tsm_ide
from tsm.ctl import CtlError
from tsm.daemon import Daemon
from tsm.device import DeviceError, DeviceLink
from tsm.journal import JOURNAL_NAME
from tsm.tdi import REASON_RESTART
from tsm.tdisp import TdispClient, TdispClientError
from vfio_user_dev.client import Client

pytestmark = pytest.mark.timeout(120)

STARTUP = 30.0


class DaemonProcess:
    def __init__(self, state: Path, log: Path, *extra: str | Path) -> None:
        self.state = state
        self.ctl_sock = state / "ctl.sock"
        self.log = log
        self.ctl_sock.unlink(missing_ok=True)     # a SIGKILLed daemon leaves it behind
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tsm", "daemon", "--state-dir", str(state),
                 *map(str, extra)],
                stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT,
                env=dict(os.environ, PYTHONPATH=str(PROJECT)))
        deadline = time.monotonic() + STARTUP
        while not self.ctl_sock.exists():     # it listens once recovery is done
            assert self.proc.poll() is None, f"daemon exited:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"no control socket:\n{self.log_text()}"
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def ctl(self, *args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "tsm", "ctl", "--state-dir",
                               str(self.state), *map(str, args)], cwd=PROJECT,
                              capture_output=True, text=True, timeout=90, check=False)
        print(f"$ tsm ctl {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}")
        assert "Traceback" not in proc.stderr
        assert (proc.returncode == 0) == ok, proc.stderr
        return proc

    def status(self) -> dict[str, Any]:
        doc = json.loads(self.ctl("status", "--json").stdout)
        assert isinstance(doc, dict)
        return doc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    procs: list[DaemonProcess] = []
    yield procs
    for d in procs:
        d.stop()
    if procs:
        print(f"--- daemon log ---\n{procs[0].log_text()}")


def connect_args(dev: DeviceProcess) -> list[str | Path]:
    return ["connect", "--device", "dev0", "--doe-socket", dev.doe, "--trust-anchor",
            dev.identity / "trust-anchor.pem", "--platform-socket", dev.plat,
            "--platform-credential", dev.cred, "--stream-id", "3"]


def test_guest_flow_stale_epoch_and_restart(tmp_path: Path, ide_device: DeviceProcess,
                                            daemons: list[DaemonProcess]) -> None:
    anchor = ide_device.identity / "trust-anchor.pem"
    vfio = Client.connect(str(ide_device.sock))         # QEMU's part: guest RAM mapped for DMA
    vfio.version()
    memfd = map_memfd(vfio, "tsm-daemon")
    state = tmp_path / "tsm"
    d = DaemonProcess(state, tmp_path / "daemon.log")
    daemons.append(d)
    assert (state / "ctl.sock").stat().st_mode & 0o777 == 0o600

    out = d.ctl(*connect_args(ide_device)).stdout
    assert out.startswith("connect dev0: session 0x") and "stream 3 secure" in out
    ghcx = tmp_path / "ghcx.sock"
    d.ctl("bind", "--vm", "vm0", "--device", "dev0", "--ghcx-socket", ghcx)
    secret_file = state / "vms" / "vm0.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_bytes()
    assert d.ctl("bind", "--vm", "vm1", "--device", "dev0", "--ghcx-socket", ghcx,
                 ok=False).stderr == "ctl bind FAILED: TDI dev0 is already bound to VM vm0\n"

    guest = Guest(ghcx, secret, "vm0")
    boot_id = guest.hello()
    info = guest.call(MsgType.TDI_INFO)
    assert (info["state"], info["digests"], info["tsm_boot_id"]) == (
        "CONFIG_UNLOCKED", None, boot_id.hex())
    unverified = dict.fromkeys(("cert_chain", "transcript", "report"), "00" * 48)
    guest.call(MsgType.TDI_ACCEPT, {"digests": unverified, "lock_epoch": 0}, error="state")
    guest.call(MsgType.TDI_ACCEPT, {"digests": {}, "lock_epoch": 0}, error="bad_request")
    guest.call(MsgType.GET_EVIDENCE, {"nonce": "00"}, error="bad_request")
    accepted = lock_verify_accept(guest, anchor)
    assert accepted["lock_epoch"] == 1
    assert guest.call(MsgType.TDI_INFO)["state"] == "RUN"
    guest.call(MsgType.TDI_LOCK, error="state")

    # DMA windows only for memory the VMM mapped; released ones are gone
    win = guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000, "access": "rw"})
    assert [w["id"] for w in ide_device.root_port()["windows"]] == [win["window_id"]]
    assert guest.call(MsgType.STATUS)["windows"] == [
        {"window_id": win["window_id"], "base": GUEST, "size": 0x1000, "access": "rw"}]
    guest.call(MsgType.DMA_ACCEPT, {"base": GUEST + SIZE, "size": 0x1000}, error="refused")
    assert guest.call(MsgType.DMA_RELEASE, {"window_id": win["window_id"]}) == {}
    guest.call(MsgType.DMA_RELEASE, {"window_id": win["window_id"]}, error="refused")
    assert ide_device.root_port()["windows"] == []

    # behind the guest's back: STOP and LOCK again -> the old epoch is refused, not started
    assert d.ctl("stop", "--vm", "vm0").stdout == "stop dev0: CONFIG_UNLOCKED\n"
    assert d.ctl("lock", "--vm", "vm0").stdout == "lock dev0: CONFIG_LOCKED, lock epoch 2\n"
    refused = guest.call(MsgType.TDI_ACCEPT, accepted, error="mismatch")
    assert "lock epoch 1" in refused["message"]
    info = guest.call(MsgType.TDI_INFO)
    assert (info["state"], info["lock_epoch"], info["digests"]["transcript"]) == (
        "CONFIG_LOCKED", 2, None)
    guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000}, error="state")
    assert guest.call(MsgType.TDI_STOP) == {"state": "CONFIG_UNLOCKED"}

    # RUN again with a window, then the TSM dies
    assert lock_verify_accept(guest, anchor)["lock_epoch"] == 3
    win = guest.call(MsgType.DMA_ACCEPT, {"base": GUEST + 0x2000, "size": 0x2000})
    st = d.status()
    assert st["tdis"][0] | {"digests": None, "age_s": None} == {
        "name": "dev0", "state": "RUN", "lock_epoch": 3, "vm": "vm0", "reason": None,
        "mmio_private": st["tdis"][0]["mmio_private"], "digests": None, "age_s": None,
        "source": st["tdis"][0]["source"]}
    assert st["tdis"][0]["source"] in ("tsm", "device")     # its own START, or asked since
    assert st["vms"][0]["windows"][0]["window_id"] == win["window_id"]
    assert st["vms"][0]["ghcx"]["counters"]["requests"] >= 20
    assert st["devices"][0]["session"]["heartbeat_period"] > 0
    table = d.ctl("status").stdout
    assert "dev0" in table and "RUN" in table and "vm0" in table
    d.kill()

    d2 = DaemonProcess(state, tmp_path / "daemon.log")
    daemons.append(d2)
    st = d2.status()
    assert st["boot_id"] != boot_id.hex()
    tdi = st["tdis"][0]
    assert (tdi["state"], tdi["reason"], tdi["lock_epoch"]) == ("ERROR", REASON_RESTART, 3)
    assert st["devices"][0]["connected"] and st["vms"][0]["windows"] == []
    assert "ERROR" in d2.ctl("status").stdout
    assert "TDI RUN -> ERROR" in ide_device.log_text()          # the device ended the session
    assert ide_device.root_port()["windows"] == []
    records = [json.loads(line) for line in (state / JOURNAL_NAME).read_text().splitlines()]
    restart = max(i for i, r in enumerate(records) if r["type"] == "daemon_start")
    after = records[restart:]
    assert {"type": "stream", "state": "insecure", "reason": REASON_RESTART}.items() <= \
        next(r for r in after if r["type"] == "stream").items()
    assert any(r["type"] == "window_revoked" and r["window_id"] == win["window_id"]
               for r in after)
    verified = [r for r in after if r["type"] == "tdi" and r["source"] == "device"]
    assert [r["state"] for r in verified] == ["ERROR"]     # what the new session saw

    # the guest's next call: REHELLO (its session is unknown), a new boot id, ERROR
    guest.close()
    guest.connect()
    assert guest.raw_call(MsgType.TDI_INFO, {}) is MsgType.REHELLO
    assert guest.hello() != boot_id
    info = guest.call(MsgType.TDI_INFO)
    assert (info["state"], info["reason"]) == ("ERROR", REASON_RESTART)
    # and it can start over: STOP, then LOCK in the new session (the stream was re-keyed)
    assert guest.call(MsgType.TDI_STOP) == {"state": "CONFIG_UNLOCKED"}
    assert guest.call(MsgType.TDI_LOCK) == {"state": "CONFIG_LOCKED", "lock_epoch": 4}
    guest.close()
    os.close(memfd)
    vfio.close()


def test_no_secret_or_key_in_the_journal_or_logs(tmp_path: Path, ide_device: DeviceProcess,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """In-process daemon so the test sees the secrets it handles: none of the IDE keys,
    the VM's launch secret, the START_INTERFACE nonce, the GHCx session keys and IVs (both
    ends') or the platform token appears in the journal, in any log line (DEBUG), in the
    status document (``ctl status --json``) or in the device server's log.  (With a short
    --heartbeat, HEARTBEATs go out meanwhile.)"""
    keys: list[IdeKey] = []
    fresh = tsm_ide.fresh_keys

    def spy() -> tsm_ide.KeyTable:
        table = fresh()
        keys.extend(table.values())
        return table

    start_nonces: list[bytes] = []
    real_lock = TdispClient.lock

    def lock_spy(self: TdispClient, *args: Any, **kwargs: Any) -> bytes:
        nonce = real_lock(self, *args, **kwargs)
        start_nonces.append(nonce)
        return nonce

    session_keys: list[bytes] = []
    real_derive = ghcx_keys.derive_keys

    def derive_spy(*args: bytes) -> ghcx_keys.SessionKeys:
        k = real_derive(*args)
        session_keys.extend([k.k_g2t, k.k_t2g, k.iv_g2t, k.iv_t2g])
        return k

    monkeypatch.setattr(tsm_ide, "fresh_keys", spy)
    monkeypatch.setattr(TdispClient, "lock", lock_spy)
    monkeypatch.setattr(ghcx_keys, "derive_keys", derive_spy)
    statuses: list[str] = []
    caplog.set_level(logging.DEBUG)
    state = tmp_path / "tsm"
    d = Daemon(state, heartbeat=0.05)
    try:
        d.start()
        args = connect_args(ide_device)
        d.ctl_request("connect", {"device": "dev0", "doe_socket": str(ide_device.doe),
                                  "trust_anchor": str(args[6]),
                                  "platform_socket": str(ide_device.plat),
                                  "platform_credential": str(ide_device.cred), "stream_id": 3})
        d.ctl_request("bind", {"vm": "vm0", "device": "dev0",
                               "ghcx_socket": str(tmp_path / "ghcx.sock")})
        secret = (state / "vms" / "vm0.secret").read_bytes()
        guest = Guest(tmp_path / "ghcx.sock", secret, "vm0")
        guest.hello()
        lock_verify_accept(guest, ide_device.identity / "trust-anchor.pem")
        statuses.append(json.dumps(d.ctl_request("status", {}), sort_keys=True))
        guest.call(MsgType.TDI_STOP)
        guest.close()
        assert secret.hex() not in repr(d.vms["vm0"]) + repr(d.vms["vm0"].server)
        deadline = time.monotonic() + 10
        while d.devices["dev0"].link.heartbeats < 2:
            assert time.monotonic() < deadline, "no HEARTBEAT sent"
            time.sleep(0.05)
        assert d.ctl_status({})["devices"][0]["connected"]
        statuses.append(json.dumps(d.ctl_request("status", {}), sort_keys=True))
        with pytest.raises(CtlError, match="bound to VM vm0"):
            d.ctl_request("disconnect", {"device": "dev0"})
        d.ctl_request("unbind", {"vm": "vm0"})
        assert not (state / "vms" / "vm0.secret").exists()
        assert d.ctl_request("disconnect", {"device": "dev0"})["disconnected"]
        assert d.ctl_status({})["devices"] == []
    finally:
        d.close()
    assert len(keys) == 6
    assert len(start_nonces) == 1 and len(start_nonces[0]) == 32
    assert len(session_keys) == 8                  # the guest's and the TSM's derivation
    token = read_credential(ide_device.cred)
    journal = (state / JOURNAL_NAME).read_bytes()
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()
    assert any(r.levelno == logging.DEBUG and r.name.startswith("teeio.spdm")
               for r in caplog.records)        # the session's messages were logged
    device_log = ide_device.log_text().encode()
    for blob in (journal, logs, *(st.encode() for st in statuses), device_log):
        for material in [secret, token, *start_nonces, *session_keys, *(k.key for k in keys)]:
            assert material not in blob
            assert material.hex().encode() not in blob
            assert material.hex().upper().encode() not in blob


def start_inproc(tmp_path: Path, ide_device: DeviceProcess, **options: Any) -> tuple[Daemon, Guest]:
    """An in-process daemon, dev0 connected and bound to vm0, the guest's handshake done."""
    state = tmp_path / "tsm"
    d = Daemon(state, **options)
    try:
        d.start()
        d.ctl_request("connect", ide_device.connect_request())
        d.ctl_request("bind", {"vm": "vm0", "device": "dev0",
                               "ghcx_socket": str(tmp_path / "ghcx.sock")})
        guest = Guest(tmp_path / "ghcx.sock", (state / "vms" / "vm0.secret").read_bytes(),
                      "vm0")
        guest.hello()
    except BaseException:
        d.close()
        raise
    return d, guest


@pytest.fixture
def inproc(tmp_path: Path, ide_device: DeviceProcess) -> Iterator[tuple[Daemon, Guest]]:
    d, guest = start_inproc(tmp_path, ide_device)
    try:
        yield d, guest
        guest.close()
    finally:
        d.close()


def lose_session(d: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next HEARTBEAT fails (as if the device stopped answering): wait for the
    daemon's fail-safe."""
    link = d.devices["dev0"].link
    lost = d.counters["sessions_lost"]

    def dead(session_id: int) -> None:
        raise RequesterError("HEARTBEAT: no response (injected)")

    monkeypatch.setattr(link.requester, "heartbeat", dead)
    wait_for(lambda: d.counters["sessions_lost"] > lost, "the session was not lost")


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def after_reconnect(d: Daemon, ide_device: DeviceProcess, guest: Guest, secret: bytes) -> None:
    """The binding and secret are kept; the TDI is ERROR (at the device too) until the
    guest STOPs it; the stream is Secure again; the guest can start over."""
    assert d.vms["vm0"].server is not None
    assert Path(d.vms["vm0"].secret_file).read_bytes() == secret
    dev = d.devices["dev0"]
    assert dev.link.session_up and dev.stream_state == "secure" and dev.last_error is None
    assert (dev.tdi.state.name, dev.tdi.vm) == ("ERROR", "vm0")
    assert device_tdi_state(d) == "ERROR"
    assert ide_device.root_port()["windows"] == [] and d.vms["vm0"].windows == {}
    info = guest.call(MsgType.TDI_INFO)
    assert info["state"] == "ERROR" and "SPDM session lost" in info["reason"]
    guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000}, error="state")
    guest.call(MsgType.TDI_LOCK, error="state")
    assert guest.call(MsgType.TDI_STOP) == {"state": "CONFIG_UNLOCKED"}
    lock_verify_accept(guest, ide_device.identity / "trust-anchor.pem")
    guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000})


def test_lost_session_reconnects_on_its_own(tmp_path: Path, ide_device: DeviceProcess,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed HEARTBEAT: fail-safe (ERROR, windows revoked), then the daemon reconnects
    by itself (backoff), keeping the VM bound with its secret."""
    vfio = Client.connect(str(ide_device.sock))
    vfio.version()
    memfd = map_memfd(vfio, "tsm-reconnect")
    d, guest = start_inproc(tmp_path, ide_device, heartbeat=0.05,
                            reconnect_delays=(0.05, 0.1, 0.2))
    try:
        secret = Path(d.vms["vm0"].secret_file).read_bytes()
        lock_verify_accept(guest, ide_device.identity / "trust-anchor.pem")
        guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000})
        lose_session(d, monkeypatch)
        wait_for(lambda: d.counters["reconnects"] == 1, "no reconnect")
        after_reconnect(d, ide_device, guest, secret)
    finally:
        guest.close()
        d.close()
        os.close(memfd)
        vfio.close()


def test_bound_device_reconnected_by_hand(tmp_path: Path, ide_device: DeviceProcess,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without automatic reconnects (or after they gave up): `ctl connect` with the same
    parameters, or `ctl reconnect`, re-establishes the bound device."""
    vfio = Client.connect(str(ide_device.sock))
    vfio.version()
    memfd = map_memfd(vfio, "tsm-reconnect")
    d, guest = start_inproc(tmp_path, ide_device, heartbeat=0.05, reconnect_delays=())
    try:
        secret = Path(d.vms["vm0"].secret_file).read_bytes()
        with pytest.raises(CtlError, match="already connected"):
            d.ctl_request("reconnect", {"device": "dev0"})
        lock_verify_accept(guest, ide_device.identity / "trust-anchor.pem")
        lose_session(d, monkeypatch)
        assert not d.devices["dev0"].link.session_up
        with pytest.raises(CtlError, match="reconnect it as it was connected"):
            d.ctl_request("connect", ide_device.connect_request() | {"stream_id": 4})
        st = d.ctl_request("connect", ide_device.connect_request())
        assert st["connected"] and st["stream"]["state"] == "secure"
        after_reconnect(d, ide_device, guest, secret)
        lose_session(d, monkeypatch)
        assert d.ctl_request("reconnect", {"device": "dev0"})["connected"]
        after_reconnect(d, ide_device, guest, secret)
    finally:
        guest.close()
        d.close()
        os.close(memfd)
        vfio.close()


def device_tdi_state(d: Daemon) -> str:
    link = d.devices["dev0"].link
    with link.lock:
        return link.tdisp_client().get_state().name


def test_accept_with_private_mmio_failure_really_stops(
        inproc: tuple[Daemon, Guest], ide_device: DeviceProcess,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The platform cannot open (nor close) private MMIO at ACCEPT: the TSM still sends
    STOP_INTERFACE, so the TDI is CONFIG_UNLOCKED at the device too and DMA_ACCEPT is
    refused -- not left in RUN behind a failed cleanup."""
    d, guest = inproc
    real = DeviceLink.platform_call

    def failing(self: DeviceLink, op: str, **args: Any) -> dict[str, Any]:
        if op == "mmio_private":
            raise DeviceError("platform socket: injected failure")
        return real(self, op, **args)

    monkeypatch.setattr(DeviceLink, "platform_call", failing)
    locked = guest.call(MsgType.TDI_LOCK)
    nonce = os.urandom(32)
    digests = check_evidence(guest.call(MsgType.GET_EVIDENCE, {"nonce": nonce.hex()}), nonce,
                             ide_device.identity / "trust-anchor.pem")
    refused = guest.call(MsgType.TDI_ACCEPT, {"digests": digests,
                                              "lock_epoch": locked["lock_epoch"]},
                         error="refused")
    assert "private MMIO could not be opened" in refused["message"]
    assert guest.call(MsgType.TDI_INFO)["state"] == "CONFIG_UNLOCKED"
    assert device_tdi_state(d) == "CONFIG_UNLOCKED"
    guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000}, error="state")
    assert ide_device.root_port()["windows"] == []
    assert d.counters["platform_errors"] >= 1


def test_stop_failure_marks_the_tdi_error(inproc: tuple[Daemon, Guest], ide_device: DeviceProcess,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d, guest = inproc
    lock_verify_accept(guest, ide_device.identity / "trust-anchor.pem")

    def no_stop(self: Any) -> None:
        raise TdispClientError("STOP_INTERFACE: injected failure")

    monkeypatch.setattr(TdispClient, "stop", no_stop)
    rsp = guest.call(MsgType.TDI_STOP, error="device")
    assert "injected failure" in rsp["message"]
    info = guest.call(MsgType.TDI_INFO)
    assert info["state"] == "ERROR" and "STOP failed" in info["reason"]
    guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000}, error="state")
    monkeypatch.undo()
    assert guest.call(MsgType.TDI_STOP) == {"state": "CONFIG_UNLOCKED"}



def test_device_error_revokes_the_platform_side(tmp_path: Path, ide_device: DeviceProcess) -> None:
    """The device leaves RUN behind the TSM's back (the VMM writes a BAR: ERROR); the TSM
    learns it at the guest's next TDI_INFO and revokes the VM's windows and private MMIO
    at the platform too, not only in its record."""
    vfio = Client.connect(str(ide_device.sock))
    vfio.version()
    memfd = map_memfd(vfio, "tsm-device-error")
    d, guest = start_inproc(tmp_path, ide_device)
    try:
        lock_verify_accept(guest, ide_device.identity / "trust-anchor.pem")
        guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000})
        assert len(ide_device.root_port()["windows"]) == 1
        vfio.write32(7, 0x10, 0xFFFFFFFF)             # BAR0 write in RUN: ERROR
        info = guest.call(MsgType.TDI_INFO)
        # the guest's TDI_INFO asks the device, maybe before the platform's event came
        assert info["state"] == "ERROR"
        assert info["reason"] in ("device reported ERROR", "device: RUN -> ERROR on BAR_WRITE")
        assert ide_device.root_port()["windows"] == [] and d.vms["vm0"].windows == {}
        assert not d.devices["dev0"].tdi.mmio_private
        assert guest.call(MsgType.STATUS)["windows"] == []
    finally:
        guest.close()
        d.close()
        os.close(memfd)
        vfio.close()


def test_dma_windows_per_vm_are_capped(tmp_path: Path, ide_device: DeviceProcess,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_api, "MAX_WINDOWS_PER_VM", 2)
    vfio = Client.connect(str(ide_device.sock))
    vfio.version()
    memfd = map_memfd(vfio, "tsm-window-cap")
    d, guest = start_inproc(tmp_path, ide_device)
    try:
        lock_verify_accept(guest, ide_device.identity / "trust-anchor.pem")
        first = guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000})
        guest.call(MsgType.DMA_ACCEPT, {"base": GUEST + 0x1000, "size": 0x1000})
        refused = guest.call(MsgType.DMA_ACCEPT, {"base": GUEST + 0x2000, "size": 0x1000},
                             error="refused")
        assert "at most 2" in refused["message"]
        assert len(ide_device.root_port()["windows"]) == 2
        guest.call(MsgType.DMA_RELEASE, {"window_id": first["window_id"]})
        guest.call(MsgType.DMA_ACCEPT, {"base": GUEST + 0x2000, "size": 0x1000})
    finally:
        guest.close()
        d.close()
        os.close(memfd)
        vfio.close()


def test_daemon_doe_capture_and_session_secrets(tmp_path: Path, ide_device: DeviceProcess,
                                                daemons: list[DaemonProcess]) -> None:
    """``--doe-capture`` and ``--export-session-secrets`` on the daemon: its DOE connection
    (attestation, the session, IDE_KM, TDISP) in spdm_dump's pcap, the secret 0600, loud;
    spdm_dump decodes it when ``TEEIO_SPDM_DUMP`` names the binary."""
    from teeio import doe_pcap
    from teeio.doe import DoeObject
    cap, secrets = tmp_path / "tsm-doe.pcap", tmp_path / "secrets.txt"
    d = DaemonProcess(tmp_path / "tsm", tmp_path / "daemon.log", "--doe-capture", cap,
                      "--export-session-secrets", secrets)
    daemons.append(d)
    assert "WARNING" in d.log_text() and str(secrets) in d.log_text()
    out = d.ctl(*connect_args(ide_device)).stdout
    sid = int(out.split("session 0x", 1)[1].split()[0].rstrip(":,"), 16)
    objs = [DoeObject.decode(r.data) for r in doe_pcap.read(cap).records]
    assert doe_pcap.read(cap).linktype == 292
    assert [o.payload[1] for o in objs if o.data_object_type == 1][-2:] == [0xE4, 0x64]
    secured = [o.payload for o in objs if o.data_object_type == 2]
    assert len(secured) >= 8 and all(int.from_bytes(p[:4], "little") == sid for p in secured)
    assert (secrets.stat().st_mode & 0o777) == 0o600
    hexes = doe_pcap.read_secrets(secrets)
    assert len(hexes) == 1
    assert f"session 0x{sid:08x} was written" in d.log_text()
    spdm_dump = os.environ.get("TEEIO_SPDM_DUMP")
    if spdm_dump is None:
        pytest.skip("spdm_dump decoding not checked: set TEEIO_SPDM_DUMP to a DMTF "
                    "spdm_dump binary to run it")
    dump = subprocess.run([spdm_dump, "-r", str(cap), "-d", "--dhe_secret", hexes[0]],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    print(dump)
    assert "SPDM_KEY_EXCHANGE_RSP" in dump and "SPDM_FINISH_RSP" in dump
    assert "IDE_KM" in dump and "(?)->(?)" not in dump
