"""The device, the platform (root port, link) and the TSM agree after VMM and host events.

A real device-server process and an in-process TSM daemon, the guest played over GHCx
(as in test_tsm_daemon.py), the VMM played by a vfio-user client.  Each test makes one
event happen behind the TSM's back -- an FLR through the host socket, the VMM going away,
Bus Master cleared, a reset before LOCK -- and then checks what *every* party believes:
the TSM's status (without any guest request: it hears platform events), the device's
own TDI state, the root port's windows and private MMIO, and what the guest is told.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from teeio import device_regs as regs
from teeio.ghcx import MsgType
from teeio.pcie.config import Command, Reg
from tests.integration.device_process import DeviceProcess, StartDevice
from tests.support.ghcx_guest import Guest, lock_verify_accept
from tests.support.lockstep import GUEST, map_memfd
from tsm.daemon import Daemon
from vfio_user_dev.client import Client
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(120)

#: The TSM must know within this long, without any guest request.
PROMPT = 1.0


class Stack:
    def __init__(self, tmp: Path, device: DeviceProcess) -> None:
        self.device = device
        self.vmm = Client.connect(str(device.sock))     # QEMU's part
        self.vmm.version()
        self.memfd = map_memfd(self.vmm, "platform-events")
        self.enable()
        self.daemon = Daemon(tmp / "tsm")
        self.daemon.start()
        req = device.connect_request()
        self.daemon.ctl_request("connect", req)
        self.daemon.ctl_request("bind", {"vm": "vm0", "device": "dev0",
                                         "ghcx_socket": str(tmp / "ghcx.sock")})
        self.guest = Guest(tmp / "ghcx.sock",
                           (tmp / "tsm" / "vms" / "vm0.secret").read_bytes(), "vm0")
        self.guest.hello()
        self.anchor = device.identity / "trust-anchor.pem"

    def enable(self) -> None:
        """What the guest's driver does before LOCK: Memory Space and Bus Master on."""
        self.vmm.region_write(PciRegion.CONFIG, Reg.COMMAND, int(
            Command.MEMORY_SPACE | Command.BUS_MASTER).to_bytes(2, "little"))

    def close(self) -> None:
        self.guest.close()
        self.daemon.close()
        os.close(self.memfd)
        self.vmm.close()

    def status(self, refresh: bool = False) -> dict[str, Any]:
        return self.daemon.ctl_request("status", {"refresh": True} if refresh else {})

    def tdi(self) -> dict[str, Any]:
        t = self.status()["tdis"][0]
        assert isinstance(t, dict)
        return t

    def wait_tsm(self, check: Callable[[dict[str, Any]], bool], within: float = PROMPT
                 ) -> dict[str, Any]:
        """The TSM's status once *check* holds, which must happen *within* seconds."""
        deadline = time.monotonic() + within
        while True:
            st = self.status()
            if check(st):
                return st
            assert time.monotonic() < deadline, f"the TSM did not learn it in {within} s: {st}"
            time.sleep(0.02)

    def run_with_window(self) -> int:
        lock_verify_accept(self.guest, self.anchor)
        wid = self.guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000})["window_id"]
        assert [w["id"] for w in self.device.root_port()["windows"]] == [wid]
        assert self.tdi()["mmio_private"] is True
        return int(wid)

    def device_tdi(self) -> str:
        tdi = self.device.host_call("stats")["tdi"]
        return str(tdi["state"])

    def assert_all_error(self, st: dict[str, Any]) -> None:
        """Every party: the device, the root port, the TSM, the guest."""
        assert self.device_tdi() == "ERROR"
        rp = self.device.root_port()
        assert rp["windows"] == [] and rp["mmio_private"] == {}
        tdi = st["tdis"][0]
        assert tdi["state"] == "ERROR" and tdi["mmio_private"] is False
        assert st["vms"][0]["windows"] == []
        assert self.guest.call(MsgType.TDI_INFO)["state"] == "ERROR"
        refused = self.guest.call(MsgType.DMA_ACCEPT, {"base": GUEST, "size": 0x1000},
                                  error="state")
        assert "RUN" in refused["message"]
        assert self.device.root_port()["windows"] == []
        again = self.guest.call(MsgType.TDI_LOCK, error="state")
        assert "STOP it first" in again["message"]

    def stop_and_run_again(self) -> None:
        assert self.guest.call(MsgType.TDI_STOP) == {"state": "CONFIG_UNLOCKED"}
        assert self.device_tdi() == "CONFIG_UNLOCKED"
        self.run_with_window()
        assert self.device_tdi() == "RUN"


@pytest.fixture
def stack(tmp_path: Path, start_device: StartDevice, firmware: Path) -> Iterator[Stack]:
    """The device server with identity, firmware, platform and host sockets, its TSM and
    its guest."""
    s = Stack(tmp_path, start_device(identity=True, firmware=firmware, platform=True,
                                     host=True))
    yield s
    s.close()


def error_learnt(st: dict[str, Any]) -> bool:
    return bool(st["tdis"][0]["state"] == "ERROR")


def test_host_flr_in_run(stack: Stack) -> None:
    stack.run_with_window()
    stack.device.host_call("flr")
    # the TSM learns the TDI's ERROR and then, a moment later, that the reset took the keys
    st = stack.wait_tsm(lambda s: error_learnt(s) and
                        s["devices"][0]["stream"]["state"] == "insecure")
    assert st["tdis"][0]["source"] == "device"
    stack.assert_all_error(st)
    refreshed = stack.status(refresh=True)
    assert refreshed["tdis"][0]["state"] == "ERROR"
    assert refreshed["tdis"][0]["age_s"] < PROMPT
    stack.stop_and_run_again()        # LOCK keys the stream again
    hist = stack.daemon.ctl_request("history", {"device": "dev0"})["records"]
    kinds = [r.get("kind") for r in hist if r["type"] == "platform"]
    assert "device_reset" in kinds and "tdi" in kinds and "window_revoked" in kinds
    states = iter(r["state"] for r in hist if r["type"] == "tdi")
    # the timeline, in order (other records may lie between)
    assert all(any(s == want for s in states) for want in
               ("RUN", "ERROR", "CONFIG_UNLOCKED", "CONFIG_LOCKED", "RUN"))


def test_vmm_gone_in_run_then_a_new_vmm(stack: Stack) -> None:
    stack.run_with_window()
    fds = stack.device.fds()
    stack.vmm.close()
    os.close(stack.memfd)
    st = stack.wait_tsm(lambda s: error_learnt(s) and
                        s["devices"][0]["vmm"]["connected"] is False)
    stack.assert_all_error(st)
    # a new VMM on the same device server; the TSM STOPs, the guest locks again
    stack.vmm = Client.connect(str(stack.device.sock))
    stack.vmm.version()
    stack.memfd = map_memfd(stack.vmm, "platform-events-2")
    stack.enable()
    stack.wait_tsm(lambda s: s["devices"][0]["vmm"]["connected"] is True)
    stack.daemon.ctl_request("stop", {"vm": "vm0"})
    assert stack.tdi()["state"] == "CONFIG_UNLOCKED"
    stack.run_with_window()
    assert stack.device.fds_settle(fds) <= fds     # nothing of the first VMM is left open


def test_bus_master_cleared_in_run(stack: Stack) -> None:
    stack.run_with_window()
    cmd = int.from_bytes(stack.vmm.region_read(PciRegion.CONFIG, Reg.COMMAND, 2), "little")
    stack.vmm.region_write(PciRegion.CONFIG, Reg.COMMAND,
                           (cmd & ~Command.BUS_MASTER).to_bytes(2, "little"))
    st = stack.wait_tsm(error_learnt)
    assert "BUS_MASTER" in (st["tdis"][0]["reason"] or "") or \
        st["tdis"][0]["source"] == "device"
    stack.assert_all_error(st)
    stack.stop_and_run_again()


def test_bar0_is_served_before_lock_after_a_reset(stack: Stack) -> None:
    """The VMM resets the device at VM start: its IDE keys go, and so does the root
    port's end of the stream, so T=0 MMIO works in CONFIG_UNLOCKED (not UR)."""
    stack.vmm.reset()
    st = stack.wait_tsm(lambda s: s["devices"][0]["stream"]["state"] == "insecure")
    assert st["tdis"][0]["state"] == "CONFIG_UNLOCKED"
    got = stack.vmm.read32(PciRegion.BAR0, regs.R.ID)
    assert got == regs.DEVICE_ID_REG_VALUE
    stack.vmm.write32(PciRegion.BAR0, regs.R.SCRATCH, 0x5A5A1234)
    assert stack.vmm.read32(PciRegion.BAR0, regs.R.SCRATCH) == 0x5A5A1234
    stack.run_with_window()               # LOCK sets the stream up again


def test_status_refresh_agrees_with_the_device(stack: Stack) -> None:
    stack.run_with_window()
    st = stack.status(refresh=True)
    assert st["tdis"][0]["state"] == "RUN" == stack.device_tdi()
    assert st["tdis"][0]["source"] == "device" and st["tdis"][0]["age_s"] < PROMPT
    assert st["devices"][0]["stream"]["state"] == "secure"
    assert st["devices"][0]["platform_events"]["connected"] is True
