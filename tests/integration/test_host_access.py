"""The host access socket (``--host-socket``, docs/design.md decision 12) against a real
device-server process: config and BAR access (BAR0 always T=0), FLR, firmware update, link faults,
stats; malformed lines, unknown ops and bad arguments get errors and the connection keeps
serving; the CLI prints JSON.  The device log is printed at teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teeio.device_regs import R
from teeio.pcie.config import Reg
from tests.integration.device_process import PROJECT, DeviceProcess, StartDevice
from vfio_user_dev import firmware_build
from vfio_user_dev.device import DEVCTL
from vfio_user_dev.host_access import MAX_LINE, HostAccessError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def host_device(start_device: StartDevice) -> DeviceProcess:
    """The device server with its host access socket (and an identity, no DOE socket)."""
    return start_device(doe=False, identity=True, host=True)


def test_config_and_bar_access(host_device: DeviceProcess) -> None:
    with host_device.host_client() as c:
        assert c.call("config_read", offset=0, size=4) == {"value": 0x7E10_1234}
        assert c.call("config_write", offset=Reg.CACHE_LINE_SIZE, size=1,
                      value=0x10) == {"value": 0x10}
        assert c.call("config_write", offset=Reg.COMMAND, size=2, value=0x6) == {"value": 6}
        # BAR0 from the host is T=0: served while the TDI is CONFIG_UNLOCKED.
        assert c.call("bar_read", bar=0, offset=R.ID, size=4) == {"value": 0x7E10_1234}
        assert c.call("bar_write", bar=0, offset=R.SCRATCH, size=4, value=0xFEED) == {}
        assert c.call("bar_read", bar=0, offset=R.SCRATCH, size=4)["value"] == 0xFEED
        assert c.call("bar_read", bar=0, offset=R.ID, size=8)["value"] & 0xFFFF_FFFF \
            == 0x7E10_1234
        c.call("bar_write", bar=1, offset=0, size=4, value=0x1234_5678)
        assert c.call("bar_read", bar=1, offset=0, size=4)["value"] == 0x1234_5678
        stats = c.call("stats")
        assert stats["tdi"] == {"state": "CONFIG_UNLOCKED", "bound_session": None,
                                "lock_flags": 0, "default_stream_id": None,
                                "private_mmio": None, "tee_access": False}
        assert stats["tdisp_refusals"] == {} and stats["scrubs"] == 0
        # FLR: registers back to their defaults.
        assert c.call("flr") == {"tdi": "CONFIG_UNLOCKED"}
        assert c.call("bar_read", bar=0, offset=R.SCRATCH, size=4)["value"] == 0
        assert c.call("config_read", offset=Reg.CACHE_LINE_SIZE, size=1)["value"] == 0


def test_protected_config_write_is_applied(host_device: DeviceProcess) -> None:
    """The host's config writes take QEMU's path: a Device Control write completes (with
    an unlocked TDI nothing else happens)."""
    with host_device.host_client() as c:
        before = c.call("config_read", offset=DEVCTL, size=2)["value"]
        after = c.call("config_write", offset=DEVCTL, size=2, value=before ^ 1 << 11)
        assert after["value"] == before ^ 1 << 11
        assert c.call("stats")["tdi"]["state"] == "CONFIG_UNLOCKED"


def test_errors_keep_the_connection_serving(host_device: DeviceProcess) -> None:
    with host_device.host_client() as c:
        def err(reply: dict[str, object]) -> str:
            assert reply["ok"] is False, reply
            e = reply["error"]
            assert isinstance(e, dict) and e["message"]
            return str(e["code"])

        assert err(c.send_raw(b"this is not json\n")) == "malformed"
        assert err(c.send_raw(b"[1, 2]\n")) == "malformed"
        assert err(c.send_raw(b'{"op": 5}\n')) == "malformed"
        assert err(c.send_raw(b'{"op": "stats", "args": []}\n')) == "malformed"
        assert err(c.send_raw(b"\xff\xfe\n")) == "malformed"
        assert err(c.send_raw(b"[" * 30000 + b"\n")) == "malformed"     # RecursionError
        assert err(c.send_raw(b"{" + b" " * (MAX_LINE + 10) + b"}\n")) == "malformed"
        assert err(c.request("format_disk")) == "unknown_op"
        for op, args in [("config_read", {"offset": 0, "size": 3}),
                         ("config_read", {"offset": 0xFFF, "size": 4}),
                         ("config_read", {"offset": -1, "size": 1}),
                         ("config_read", {"size": 4}),
                         ("config_write", {"offset": 0x3C, "size": 1, "value": 0x100}),
                         ("config_write", {"offset": 0x3C, "size": 1, "value": True}),
                         ("bar_read", {"bar": 2, "offset": 0, "size": 4}),
                         ("bar_read", {"bar": 0, "offset": 4093, "size": 4}),
                         ("bar_read", {"bar": 0, "offset": 0, "size": 16}),
                         ("bar_write", {"bar": 0, "offset": 8, "size": 4}),
                         ("fw_update", {}),
                         ("fw_update", {"path": 7}),
                         ("link_inject", {"kind": "melt"}),
                         ("link_inject", {"kind": "DROP", "direction": "sideways"}),
                         ("link_inject", {"kind": "DROP", "count": 0}),
                         ("link_inject", {"kind": "DROP", "count": 100_000})]:
            assert err(c.request(op, **args)) == "bad_args", (op, args)
        # An id is echoed; the connection still serves.
        reply = c.send_raw(b'{"op": "config_read", "args": {"offset": 0, "size": 2}, '
                           b'"id": 42}\n')
        assert reply == {"ok": True, "result": {"value": 0x1234}, "id": 42}
        with pytest.raises(HostAccessError) as e:
            c.call("bar_read", bar=3, offset=0, size=4)
        assert e.value.code == "bad_args"
        assert c.call("config_read", offset=0, size=2) == {"value": 0x1234}
    # A new connection works as well.
    with host_device.host_client() as c:
        assert c.call("config_read", offset=2, size=2) == {"value": 0x7E10}


def test_link_faults(host_device: DeviceProcess) -> None:
    with host_device.host_client() as c:
        assert c.call("link_inject", kind="FLIP_PAYLOAD", count=2, bit=3) == {"armed": 2}
        assert c.call("link_inject", kind="drop", direction="downstream") == {"armed": 1}
        assert c.call("stats")["link"]["faults_armed"] == 3
        assert c.call("link_clear") == {}
        assert c.call("stats")["link"]["faults_armed"] == 0


def test_firmware_update(host_device: DeviceProcess, tmp_path: Path) -> None:
    try:
        patched = firmware_build.build(tmp_path / "fw-patched.elf", {"TEEIO_FW_PATCH": "1"})
    except firmware_build.FirmwareBuildError as exc:    # gcc is a declared dependency
        pytest.fail(f"the patched firmware does not build: {exc}")
    with host_device.host_client() as c:
        result = c.call("fw_update", path=str(patched))
        assert result["measurements"] and all(m["size"] > 0 for m in result["measurements"])
        with pytest.raises(HostAccessError) as e:
            c.call("fw_update", path=str(tmp_path / "missing.elf"))
        assert e.value.code == "failed"
        assert c.call("stats")["tdisp_refusals"] == {}
    assert "firmware updated from" in host_device.log_text()


def test_fw_update_refuses_what_is_not_a_bounded_regular_file(host_device: DeviceProcess,
                                                                tmp_path: Path) -> None:
    """A FIFO, a device node, a symbolic link or an oversized file: one-line errors at once,
    and the device (its lock) is never held up by the file the host named."""
    fifo = tmp_path / "fw.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.elf"
    with open(big, "wb") as f:                  # sparse: 17 MiB of nothing on disk
        f.truncate(17 << 20)
    real = tmp_path / "fw.elf"
    real.write_bytes(b"\x7fELF" + bytes(60))
    link = tmp_path / "link.elf"
    link.symlink_to(real)
    expected = [(fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                (big, f"{17 << 20} bytes, more than the {16 << 20}-byte limit"),
                (link, "a symbolic link, refused"), (tmp_path, "not a regular file")]
    with host_device.host_client() as c, host_device.host_client() as other:
        c.conn.sock.settimeout(5)
        for path, message in expected:
            t0 = time.monotonic()
            with pytest.raises(HostAccessError) as e:
                c.call("fw_update", path=str(path))
            assert time.monotonic() - t0 < 3, path
            assert e.value.code == "failed" and message in e.value.message, e.value.message
            assert "\n" not in e.value.message
            # the device is not held: another connection's config access is served
            assert other.call("config_read", offset=0, size=4) == {"value": 0x7E10_1234}
        assert c.call("stats")["tdisp_refusals"] == {}


def test_cli_prints_json(host_device: DeviceProcess) -> None:
    def cli(*args: str) -> tuple[int, dict[str, object]]:
        p = subprocess.run([sys.executable, "-m", "vfio_user_dev.host_access", "--socket",
                            str(host_device.host), *args], cwd=PROJECT, capture_output=True,
                           text=True, timeout=30)
        return p.returncode, json.loads(p.stdout)

    rc, out = cli("config_read", "offset=0x0", "size=4")
    assert rc == 0 and out == {"ok": True, "result": {"value": 0x7E10_1234}}
    rc, out = cli("bar_write", "bar=0", f"offset={int(R.SCRATCH)}", "size=4", "value=0xABC")
    assert rc == 0
    rc, out = cli("bar_read", "bar=0", f"offset={int(R.SCRATCH)}", "size=4")
    assert out["result"] == {"value": 0xABC}
    rc, out = cli("link_inject", "kind=flip-t-bit")
    assert rc == 0 and out["result"] == {"armed": 1}
    rc, out = cli("nope")
    assert rc == 1 and out["ok"] is False
