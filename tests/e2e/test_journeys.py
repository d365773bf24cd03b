"""Journeys a user takes off the scripted path, in a real TCG guest, each ending with what
*every* party believes: the TSM (``status --refresh`` against what it learnt by itself),
the device, the root port, and the guest (its own ``tdi-info``).

* kill -9 QEMU in RUN, then a new VM on the same device server: the TSM says ERROR
  within a second (no guest request), the root port has revoked everything, the device
  server has closed what the dead VMM held; after the TSM's STOP the new VM locks,
  attests, accepts and runs DMA;
* FLR from the host in RUN: ERROR everywhere; the guest sees it, STOPs and accepts again;
* the agent exits after ``accept`` and the guest runs ``accept`` again: RUN stays RUN
  (no ERROR from the exit), ``accept`` says so, ``dma`` works, ``accept --restart`` too;
* a host BAR write in RUN: ERROR everywhere, the guest STOPs and accepts again;
* the guest's driver unbound in RUN (Bus Master cleared): ERROR everywhere.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.testdata import stream
from qemu_configs import image
from tests.e2e.journeys import Journey

pytestmark = pytest.mark.timeout(420)

#: The TSM learns an event from the platform within this long.
PROMPT = 1.0

ACCEPT = '$A accept --policy $R/policy.json --report "$R/accept-$1.json"'
RUN = f"""accept() {{ {ACCEPT}; }}
info() {{ $A tdi-info --json > "$R/info-$1.json"; }}
"""


@pytest.fixture
def journey(guest_image: image.GuestImage, tmp_path: Path) -> Iterator[Journey]:
    j = Journey(tmp_path / "run", seed=secrets.randbits(32))
    try:
        yield j
    finally:
        j.close()
        print(j.diagnose())


def test_qemu_killed_in_run_then_a_new_vm(journey: Journey) -> None:
    j = journey
    before = j.device_fds()
    j.boot(RUN + "accept 1\ninfo 1\npause run\n")
    j.paused("run")
    j.agree("RUN")
    assert j.guest_json("info-1.json")["info"]["state"] == "RUN"
    assert j.device_fds() > before                  # the VMM's maps and eventfds
    j.kill_qemu()
    took = j.wait_tsm_state("ERROR", PROMPT)
    print(f"the TSM said ERROR {took * 1000:.0f} ms after QEMU was killed")
    j.agree("ERROR")
    st = j.tsm()
    assert st["devices"][0]["vmm"]["connected"] is False
    assert st["vms"][0]["ghcx"]["session"] in ("closed", "none")
    assert j.device_fds(settle_to=before) == before  # nothing of the dead VMM is left open
    # A new VM on the same device server: refused until the TSM STOPs the TDI.
    j.tsm_cli("stop", "--vm", "vm0")
    j.agree("CONFIG_UNLOCKED")
    (j.results / "paused-run").unlink()
    j.boot(RUN + "accept 2\ninfo 2\n$A dma --json --op sha256 --length 64k --seed 1f "
                 "> $R/dma-2.json\npause end\n")
    j.paused("end")
    j.agree("RUN")
    assert j.guest_json("info-2.json")["info"]["state"] == "RUN"
    dma = j.guest_json("dma-2.json")
    assert dma["ok"] and dma["t_bit"] and dma["window"]["released"]
    assert dma["result"]["digest"] == hashlib.sha256(
        stream(0x1F, "dma-src", 65536)).hexdigest()
    j.resume("end")
    j.finished()
    # powered off: the VMM is gone, and with it the device's RUN (reset on release)
    j.wait_tsm_state("ERROR", PROMPT)
    assert j.tsm()["devices"][0]["vmm"]["connected"] is False


def test_flr_in_run(journey: Journey) -> None:
    j = journey
    j.boot(RUN + "accept 1\npause run\ninfo 2\nmust_fail $A dma --op fill\n"
                 "$A stop --json > $R/stop.json\naccept 3\ninfo 3\npause end\n")
    j.paused("run")
    j.agree("RUN")
    reply = j.stack.host("flr")
    assert reply["ok"] and reply["result"]["tdi"] == "ERROR"
    j.wait_tsm_state("ERROR", PROMPT)
    tdi = j.agree("ERROR")
    assert tdi["reason"] == "device: RUN -> ERROR on FLR"
    assert j.tsm()["devices"][0]["stream"]["state"] == "insecure"   # the FLR took the keys
    j.resume("run")
    j.paused("end")
    assert j.guest_json("info-2.json")["info"]["state"] == "ERROR"
    assert j.guest_json("stop.json")["before"] == "ERROR"
    assert j.guest_json("info-3.json")["info"]["state"] == "RUN"
    assert j.guest_json("info-3.json")["info"]["lock_epoch"] > tdi["lock_epoch"]
    # the FLR had reset the BARs: accept wrote them back before LOCK
    assert j.guest_json("accept-3.json")["bars_written"]
    j.agree("RUN")
    j.resume("end")
    j.finished()
    hist = j.tsm_cli("status", "--history").stdout
    assert "platform device_reset" in hist and "platform mmio_private" in hist


def test_agent_exits_then_accept_again(journey: Journey) -> None:
    j = journey
    j.boot(RUN + "accept 1\ninfo 1\n"
                 "$A accept --policy $R/policy.json > $R/again.txt\n"
                 "info 2\n$A dma --json --op fill --length 4096 > $R/dma.json\n"
                 "$A accept --policy $R/policy.json --restart --report $R/accept-3.json\n"
                 "info 3\npause end\n")
    j.paused("end")
    j.agree("RUN")
    assert "already RUN" in (j.results / "again.txt").read_text()
    one, two = j.guest_json("info-1.json"), j.guest_json("info-2.json")
    assert one["info"]["state"] == two["info"]["state"] == "RUN"
    assert two["guest"]["bus_master"] and two["guest"]["memory_space"]
    assert j.guest_json("dma.json")["ok"]
    three = j.guest_json("info-3.json")
    assert three["info"]["state"] == "RUN"
    assert three["info"]["lock_epoch"] == one["info"]["lock_epoch"] + 1   # restarted
    j.resume("end")
    j.finished()


def test_host_bar_write_in_run(journey: Journey) -> None:
    j = journey
    j.boot(RUN + "accept 1\npause run\ninfo 2\n$A stop --json > $R/stop.json\n"
                 "accept 3\ninfo 3\npause end\n")
    j.paused("run")
    j.agree("RUN")
    bar0 = j.stack.host("config_read", offset=0x10, size=4)["result"]["value"]
    assert j.stack.host("config_write", offset=0x10, size=4, value=bar0)["ok"]
    j.wait_tsm_state("ERROR", PROMPT)
    tdi = j.agree("ERROR")
    assert tdi["reason"] == "device: RUN -> ERROR on BAR_WRITE"
    j.resume("run")
    j.paused("end")
    assert j.guest_json("info-2.json")["info"]["state"] == "ERROR"
    assert j.guest_json("info-3.json")["info"]["state"] == "RUN"
    j.agree("RUN")
    j.resume("end")
    j.finished()


def test_guest_driver_unbound_in_run(journey: Journey) -> None:
    j = journey
    bind = """BDF=$(basename "$(dirname "$(grep -l 0x7e10 /sys/bus/pci/devices/*/device)")")
echo "1234 7e10" > /sys/bus/pci/drivers/uio_pci_generic/new_id
test -e /sys/bus/pci/devices/$BDF/driver
echo "$BDF" > /sys/bus/pci/drivers/uio_pci_generic/unbind
"""
    j.boot(RUN + "accept 1\ninfo 1\n" + bind + "pause unbound\ninfo 2\n"
           "$A stop --json > $R/stop.json\naccept 3\ninfo 3\npause end\n")
    j.paused("unbound")
    j.wait_tsm_state("ERROR", PROMPT)
    assert j.agree("ERROR")["reason"] == "device: RUN -> ERROR on BUS_MASTER_DISABLED"
    j.resume("unbound")
    j.paused("end")
    assert j.guest_json("info-1.json")["info"]["state"] == "RUN"
    info = j.guest_json("info-2.json")
    assert info["info"]["state"] == "ERROR"
    assert not info["guest"]["bus_master"]
    assert j.guest_json("stop.json")["state"] == "CONFIG_UNLOCKED"
    assert j.guest_json("info-3.json")["info"]["state"] == "RUN"     # locked again
    j.agree("RUN")
    j.resume("end")
    j.finished()
