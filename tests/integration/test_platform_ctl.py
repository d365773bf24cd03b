"""The device server as a real process with ``--platform-socket``: only a holder of the
credential configures the root port; malformed requests get clear errors and the server
keeps serving; status, window enforcement on DMA jobs, remaps as security events, the
TLP capture file.  The device log is printed at teardown, so a failing test shows it."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from teeio.device_regs import DmaError, Op, St
from teeio.ide import IdeKey, SubStream
from teeio.platform_channel import (
    MAX_LINE,
    PlatformClient,
    PlatformCtlError,
    canonical,
    read_credential,
)
from teeio.tlp import is_protected
from tests.integration.device_process import PROJECT, DeviceProcess, StartDevice
from tests.support.lockstep import enable_device, error_code, memfd, ok, run_job
from vfio_user_dev import protocol as p
from vfio_user_dev.link.capture import iter_tlps, read_capture
from vfio_user_dev.protocol import Command, DmaFlags

pytestmark = pytest.mark.timeout(60)

GUEST = 0x1_0000_0000
SIZE = 0x10000
RW = DmaFlags.READ | DmaFlags.WRITE
RID = 0x0100
SID = 1


#: The device server with the platform socket and the link capture (no DOE socket).
PLATFORM = {"doe": False, "platform": True, "capture": True}


@pytest.fixture
def platform_device(start_device: StartDevice) -> DeviceProcess:
    return start_device(**PLATFORM)


def raw(c: PlatformClient, obj: Any) -> dict[str, Any]:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
    return c.send_raw(data)


def code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


def key_the_root_port(c: PlatformClient, sid: int = SID) -> list[IdeKey]:
    keys = []
    c.call("stream_setup", stream_id=sid, rid_base=RID, rid_limit=RID)
    for direction in ("rx", "tx"):
        for s in SubStream:
            k = IdeKey.generate()
            keys.append(k)
            c.key_prog(sid, direction, s.name, 0, k)
    c.call("key_set_go", stream_id=sid, direction="rx", key_set=0)
    c.call("key_set_go", stream_id=sid, direction="tx", key_set=0)
    return keys


# -- the credential ------------------------------------------------------------------------------

def test_credential_and_socket_are_private(platform_device: DeviceProcess) -> None:
    assert stat.S_IMODE(os.stat(platform_device.cred).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(platform_device.plat).st_mode) == 0o600
    assert len(platform_device.cred.read_text().strip()) == 64
    os.chmod(platform_device.cred, 0o644)
    with pytest.raises(PermissionError, match="0600"):
        read_credential(platform_device.cred)


def test_missing_or_wrong_credential_is_refused(platform_device: DeviceProcess) -> None:
    with platform_device.platform() as good, platform_device.platform(token=os.urandom(32)) as bad:
        # no MAC at all
        assert code(raw(bad, {"seq": 1, "op": "stream_setup", "args": {"stream_id": 5}})) \
            == "unauthenticated"
        # a MAC with the wrong token
        with pytest.raises(PlatformCtlError) as info:
            bad.call("stream_setup", stream_id=5)
        assert info.value.code == "unauthenticated"
        with pytest.raises(PlatformCtlError):
            bad.call("status")
        # a request signed for another connection (its nonce) is no good here either
        stolen = good.request("stream_setup", {"stream_id": 6})
        with platform_device.platform() as third:
            assert code(raw(third, canonical(stolen) + b"\n")) == "unauthenticated"
        # nothing changed; the rightful client is served, and sees the failures counted
        st = good.call("status")
        assert st["root_port"]["streams"] == []
        assert st["server"]["auth_failures"] == 4
        # replay within a connection: same seq again
        good.call("stream_setup", stream_id=7)
        again = good.request("stream_setup", {"stream_id": 7}, seq=good.seq)
        assert code(raw(good, canonical(again) + b"\n")) == "replay"
    assert platform_device.token().hex() not in platform_device.log_text()


def test_malformed_requests_get_clear_errors(platform_device: DeviceProcess) -> None:
    with platform_device.platform() as c:
        assert code(raw(c, b"this is not json\n")) == "malformed"
        assert code(raw(c, b"[1, 2, 3]\n")) == "malformed"
        assert code(raw(c, b"[" * 30000 + b"\n")) == "malformed"        # RecursionError
        assert code(raw(c, {"op": "status"})) == "malformed"                  # no seq
        assert code(raw(c, {"seq": True, "op": "status", "mac": "00"})) == "malformed"
        reply = raw(c, b"{" + b" " * (MAX_LINE + 10) + b"}\n")
        assert code(reply) == "malformed" and "longer" in reply["error"]["message"]
        for op, args, want in [
            ("no_such_op", {}, "unknown_op"),
            ("stream_setup", {}, "bad_args"),
            ("stream_setup", {"stream_id": "1"}, "bad_args"),
            ("stream_setup", {"stream_id": 300}, "refused"),
            ("key_set_go", {"stream_id": 1, "direction": "sideways", "key_set": 0}, "bad_args"),
            ("key_prog", {"stream_id": 1, "direction": "rx", "substream": "PR", "key_set": 0,
                          "wrapped_key": "00" * 56}, "bad_args"),
            ("stream_enable", {"stream_id": 9}, "refused"),
            ("window_authorise", {"requester_id": RID, "stream_id": 9, "base": GUEST,
                                  "size": 4096}, "refused"),
            ("window_revoke", {"window_id": 1}, "refused"),
        ]:
            with pytest.raises(PlatformCtlError) as info:
                c.call(op, **args)
            assert info.value.code == want, (op, args, info.value)
            assert info.value.message
        assert c.call("status")["server"]["errors"] >= 14     # and it still serves
    assert platform_device.proc.poll() is None


def test_status_reports_link_stream_and_refusals(start_device: StartDevice) -> None:
    dev = start_device("--mps", "128", "--mrrs", "256", **PLATFORM)
    with dev.platform() as c:
        st = c.call("status")
        assert set(st) == {"link", "endpoint", "root_port", "server"}
        assert st["link"]["mps"] == 128 and st["link"]["mrrs"] == 256
        assert st["link"]["capture"] == str(dev.capture)
        assert st["endpoint"]["requester_id"] == RID
        keys = key_the_root_port(c)
        st = c.call("status")["root_port"]
        (stream,) = st["streams"]
        assert stream["state"] == "insecure" and stream["rid_base"] == RID
        assert stream["keys"]["rx"]["CPL"] == {"active": "K0", "K0": "go", "K1": "empty"}
        assert c.call("stream_enable", stream_id=SID) == {"state": "secure"}
        text = json.dumps(c.call("status"))
        assert not any(k.key.hex() in text for k in keys)
        assert c.call("stream_enable", stream_id=SID, enable=False) == {"state": "insecure"}
    log = dev.log_text()
    assert "key programmed" in log
    assert not any(k.key.hex() in log for k in keys)
    assert dev.token().hex() not in log


def test_windows_enforced_on_dma_jobs_and_remap_is_a_security_event(
        start_device: StartDevice) -> None:
    dev = start_device("--mps", "128", **PLATFORM)
    fd = memfd("plat-guest", SIZE)
    v = dev.vfio()
    try:
        ok(v, Command.DMA_MAP, p.DmaMap(RW, 0, GUEST, SIZE).encode(), fds=[fd])
        enable_device(v)
        with dev.platform() as c:
            key_the_root_port(c)
            w = c.call("window_authorise", requester_id=RID, stream_id=SID, base=GUEST + 0x8000,
                       size=0x4000, access="rw")
            assert w["id"] == 1 and w["state"] == "active"
            assert w["backing"][0]["inode"] == [os.fstat(fd).st_dev, os.fstat(fd).st_ino]

            # T=0 (no TDI in RUN): private memory is out of reach, shared memory is fine.
            st = run_job(v, Op.FILL, dst=GUEST + 0x8000, length=64, pattern=0x5EC5EC5E)
            assert st & St.ERROR and error_code(st) == DmaError.FAULT
            assert os.pread(fd, 64, 0x8000) == bytes(64)
            assert run_job(v, Op.FILL, dst=GUEST + 0x100, length=300,
                           pattern=0x11223344) == St.DONE
            assert os.pread(fd, 4, 0x100) == bytes.fromhex("44332211")
            rp = c.call("status")["root_port"]
            assert rp["refusals"] == {"t0_into_window": 1}
            assert rp["recent_refusals"][-1]["address"] == GUEST + 0x8000

            # The VMM remaps under the window: reported, never followed.
            last = c.call("events", since=0)["last"]
            ok(v, Command.DMA_UNMAP, p.DmaUnmap(24, 0, GUEST, SIZE).encode())
            got = c.call("events", since=last, wait=5)
            (ev,) = got["events"]
            assert ev["kind"] == "remap" and ev["window"] == 1 and ev["op"] == "unmap"
            assert got["lost"] is False and got["last"] == ev["seq"]
            (win,) = c.call("status")["root_port"]["windows"]
            assert win["state"] == "suspended"
            t0 = time.monotonic()
            nothing = c.call("events", since=ev["seq"], wait=0.3)    # a long poll: waits
            assert nothing["events"] == [] and time.monotonic() - t0 >= 0.25
            assert nothing["boot"] == got["boot"]
            with pytest.raises(PlatformCtlError, match="not wholly mapped"):
                c.call("window_reauthorise", window_id=1)
            c.call("window_revoke", window_id=1)
    finally:
        v.close()
        os.close(fd)

    # The capture: every TLP as it crossed, in the clear (no IDE here), split by MPS 128.
    recs = read_capture(dev.capture)
    assert recs and not any(is_protected(r.data) for r in recs)
    tlps = list(iter_tlps(recs))
    writes = [t for t in tlps if t.type.has_data and t.type.is_request]
    assert all(len(t.data) <= 128 for t in writes)
    assert b"".join(t.payload_bytes() for t in writes[-3:]) == bytes.fromhex("44332211") * 75


def test_option_rules(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vfio_user_dev", "--socket",
                               str(tmp_path / "s"), *args], capture_output=True, text=True,
                              cwd=PROJECT, timeout=30,
                              env=dict(os.environ, PYTHONPATH=str(PROJECT)))

    r = run("--platform-socket", str(tmp_path / "p"))
    assert r.returncode == 2 and "go together" in r.stderr
    r = run("--mps", "100")
    assert r.returncode == 2 and "Max_Payload_Size must be one of" in r.stderr


def test_many_connections_do_not_lock_out_the_tsm(platform_device: DeviceProcess) -> None:
    idle = []
    try:
        for _ in range(6):                  # squatters that never authenticate
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(platform_device.plat))
            idle.append(s)
        with platform_device.platform() as c:
            assert c.call("status")["server"]["connections"] == 7
    finally:
        for s in idle:
            s.close()
