"""Linux's stock nvme driver doing real I/O over an accepted TDI, in one TCG guest
(guest side: nvme_io.sh; docs/nvme.md, "What the e2e test shows").

The guest agent locks, attests and accepts the NVMe function, asks for a trusted-DMA window
per System RAM range and binds ``nvme``; ``nvme list`` / ``id-ctrl`` see the controller; an
ext4 file system survives umount, fsck and mount; fio verifies with crc32c at queue depths
1 and 8.  The host recomputes what the guest wrote from the namespace file.  Then, while a
writer runs, the host writes a doorbell (refused: Unsupported Request) and rewrites the
BAR0 register: the TDI goes to ERROR, the driver sees a dead controller and gives up within
its timeout and nothing written after the ERROR reaches the media.  In the same boot the
guest recovers (``accept --restart``: stop, lock, attest, accept, the driver again) and
finds its file system intact; then it stops the TDI, the host unbinds the VM and
disconnects the device (no TSM, no IDE stream), and the guest binds the same driver with
no TEE (``accept --no-tee``).  The link capture holds none of the guest's TEE-era data in
the clear, and does hold what it wrote without the TEE (the check can fail).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.testdata import stream
from qemu_configs import image
from qemu_configs.tee_stack import DEVICE, capture_summary
from tests.e2e.journeys import Journey

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

MIB = 1 << 20
NS_SIZE = "64M"
PATTERN_OFF, INFLIGHT_OFF, AFTER_OFF = 32 * MIB, 40 * MIB, 60 * MIB
RECOVERED_OFF, CLEARTEXT_OFF = 48 * MIB, 52 * MIB
INFLIGHT_BLOCK = 16 * 1024
SCRIPT = Path(__file__).with_name("nvme_io.sh")
#: The TSM learns the device's ERROR from the platform within this long.
PROMPT = 1.0
SQ1_TAIL_DOORBELL = 0x1008          # NVMe 1.4 §3.1.24, doorbell stride 4


def marker(kind: str, seed: int, n: int) -> bytes:
    """What nvme_io.sh's ``marker`` writes."""
    m = b"teeio-nvme-%s-%08x|" % (kind.encode(), seed)
    return (m * (n // len(m) + 1))[:n]


@pytest.fixture
def nvme_journey(guest_image: image.GuestImage, tmp_path: Path) -> Iterator[Journey]:
    j = Journey(tmp_path / "run", seed=secrets.randbits(32), personality="nvme",
                nvme_size=NS_SIZE)
    try:
        yield j
    finally:
        j.close()
        print(j.diagnose())


def test_stock_nvme_driver_over_an_accepted_tdi(nvme_journey: Journey) -> None:
    j = nvme_journey
    seed = j.stack.opts.seed
    ns = j.wd / "nvme-namespace.img"
    t0 = time.monotonic()
    j.boot(f"SEED={seed:x}\n" + SCRIPT.read_text())
    j.paused("io")
    booted = time.monotonic() - t0
    j.agree("RUN")
    _check_accept_and_io(j, seed, ns)

    # -- the host breaks the TDI while the guest's writer runs -------------------------------
    refused = sum(j.device_stats()["tdisp_refusals"].values())
    assert j.stack.host("bar_write", bar=0, offset=SQ1_TAIL_DOORBELL, size=4, value=7)["ok"]
    stats = j.device_stats()
    assert stats["tdi"]["state"] == "RUN", stats["tdi"]   # Unsupported Request, no more
    assert sum(stats["tdisp_refusals"].values()) > refused, stats["tdisp_refusals"]
    bar0 = j.stack.host("config_read", offset=0x10, size=4)["result"]["value"]
    assert j.stack.host("config_write", offset=0x10, size=4, value=bar0)["ok"]
    took = j.wait_tsm_state("ERROR", PROMPT)
    tdi = j.agree("ERROR")
    assert tdi["reason"] == "device: RUN -> ERROR on BAR_WRITE"
    time.sleep(0.5)                                  # a write in flight lands or not: now
    at_error = hashlib.sha256(ns.read_bytes()).hexdigest()
    j.resume("io")
    j.paused("after-error")
    _check_after_error(j, seed, ns, at_error)
    j.agree("ERROR")
    assert "ERROR" in j.tsm_cli("status").stdout

    # -- the guest recovers in the same boot, then binds the driver with no TEE --------------
    j.resume("after-error")
    j.paused("recovered")
    _check_recovered(j, seed, ns)
    j.resume("recovered")
    j.paused("stopped")
    _forget_the_device(j)
    j.resume("stopped")
    j.finished()
    total = time.monotonic() - t0
    _check_plain(j, seed, ns)
    print(f"NVMe e2e: guest at the pause after {booted:.1f} s, the TSM said ERROR "
          f"{took * 1000:.0f} ms after the BAR write, guest done after {total:.1f} s")

    # -- the link capture, complete once the device server closed it ----------------------------
    assert j.device is not None
    j.device.send_signal(signal.SIGTERM)
    j.device.wait(30)
    needles = {"pattern": marker("plaintext", seed, 64), "in_flight": marker("in-flight", seed, 64),
               "file": stream(seed, "nvme-file-2", 64)}
    cap = capture_summary(j.stack.capture, needles)
    assert cap["plaintext_found"] == [], cap
    # the same search finds what the guest wrote at T=0, in the clear
    plain = capture_summary(j.stack.capture, {"cleartext": marker("cleartext", seed, 64)})
    assert plain["plaintext_found"] == ["cleartext"], plain
    assert cap["ide_protected"] > 1000, cap          # the driver's I/O, all of it T=1
    print(f"link capture: {cap['tlps']} TLPs, {cap['ide_protected']} IDE-protected, "
          f"{j.stack.capture.stat().st_size // MIB} MiB")


def _check_accept_and_io(j: Journey, seed: int, ns: Path) -> None:
    acc = j.guest_json("accept.json")
    assert acc["ok"] and acc["accepted"], acc
    assert acc["msix_bars"] == [2] and [b[0] for b in acc["bars"]] == [0, 2]
    checks = {c["name"]: c["ok"] for c in acc["checks"]}
    assert checks == {"mmio_blocked_when_locked": True, "mmio_in_run": True,
                      "ram_covered": True, "nvme_live": True}, acc["checks"]
    assert acc["verdict"]["ok"] and acc["verdict"]["report"]["mmio_ranges"][0]["pages"] == 4
    assert acc["driver"]["driver"] == "nvme" and acc["nvme"]["state"] == "live"
    tsm_windows = j.tsm()["vms"][0]["windows"]
    assert len(tsm_windows) == len(acc["system_ram"]) == len(acc["windows"]) >= 1
    assert j.guest_json("info-run.json")["info"]["state"] == "RUN"
    listed = (j.results / "nvme-list.json").read_text()
    assert "TEEIO TDISP NVMe" in listed and acc["nvme"]["namespaces"][0] in listed
    idc = j.guest_json("id-ctrl.json")
    assert (idc["vid"], idc["ver"], idc["mn"].strip()) == (0x1234, 0x10400, "TEEIO TDISP NVMe")
    # the file system: fsck clean, checksums equal after the second mount
    assert "one.bin: OK" in (j.results / "sums-check.txt").read_text()
    assert "two.bin: OK" in (j.results / "sums-check.txt").read_text()
    assert " 0 files" not in (j.results / "fsck.txt").read_text()
    two = stream(seed, "nvme-file-2", 1048699)
    sums = (j.results / "sums.txt").read_text()
    assert hashlib.sha256(two).hexdigest() in sums
    assert hashlib.sha256(stream(seed, "nvme-file-1", 300000)).hexdigest() in sums
    # the host reads two.bin's blocks (debugfs) from the namespace file
    blocks = [int(b) for b in re.findall(r"\d+", (j.results / "blocks.txt").read_text())]
    with open(ns, "rb") as f:
        got = b""
        for b in blocks:
            f.seek(b * 4096)
            got += f.read(4096)
        f.seek(PATTERN_OFF)
        pattern = f.read(MIB)
    assert got[:len(two)] == two, "two.bin's blocks in the namespace file differ"
    assert pattern == marker("plaintext", seed, MIB)
    fio = j.guest_json("fio.json")
    assert [job["jobname"] for job in fio["jobs"]] == ["qd1", "qd8"]
    for job in fio["jobs"]:
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and \
            job["read"]["io_bytes"] > 0, job["jobname"]


def _check_recovered(j: Journey, seed: int, ns: Path) -> None:
    acc = j.guest_json("accept-restart.json")
    assert acc["ok"] and acc["accepted"], acc
    assert acc["precheck"]["state"] == "ERROR" and acc["precheck"]["action"] == "restart"
    assert acc["driver"]["driver"] == "nvme" and acc["nvme"]["state"] == "live", acc
    tdi = j.agree("RUN")
    assert tdi["lock_epoch"] > j.guest_json("info-run.json")["info"]["lock_epoch"], tdi
    assert j.guest_json("info-recovered.json")["info"]["state"] == "RUN"
    assert len(j.tsm()["vms"][0]["windows"]) == len(acc["system_ram"]) >= 1
    # the file system the guest wrote before the ERROR, read back through the new TDI
    checked = (j.results / "sums-recovered.txt").read_text()
    assert "one.bin: OK" in checked and "two.bin: OK" in checked, checked
    three = stream(seed, "nvme-file-3", 200000)
    assert hashlib.sha256(three).hexdigest() in (j.results / "sums-three.txt").read_text()
    with open(ns, "rb") as f:
        f.seek(RECOVERED_OFF)
        assert f.read(65536) == marker("recovered", seed, 65536)
        f.seek(AFTER_OFF)
        assert marker("after-error", seed, 64) not in f.read(4 * MIB)


def _forget_the_device(j: Journey) -> None:
    """The guest stopped its TDI: the host unbinds the VM and disconnects the device, and
    every party says so: the TSM knows no device, the root port's stream and the device's
    are down, the device's TDI is CONFIG_UNLOCKED."""
    j.agree("CONFIG_UNLOCKED")
    # the driver's unbind cleared Bus Master Enable in RUN: ERROR, then the stop
    assert "ERROR -> CONFIG_UNLOCKED" in (j.results / "stop.txt").read_text()
    j.tsm_cli("unbind", "--vm", j.stack.opts.vm_id)
    j.tsm_cli("disconnect", "--device", DEVICE)
    tsm = j.tsm()
    assert tsm["devices"] == [] and tsm["tdis"] == [] and tsm["vms"] == [], tsm
    assert all(s["state"] != "secure" for s in j.root_port()["streams"]), j.root_port()
    stats = j.device_stats()
    assert stats["tdi"]["state"] == "CONFIG_UNLOCKED", stats["tdi"]
    assert all(s["state"] != "secure" for s in stats["ide"]), stats["ide"]


def _check_plain(j: Journey, seed: int, ns: Path) -> None:
    acc = j.guest_json("accept-plain.json")
    assert acc["ok"] and acc["tee"] is False and "tdi_state" not in acc, acc
    assert acc["note"].startswith("no GHCx"), acc          # the TSM no longer serves this VM
    print(f"accept --no-tee: {acc['note']}")
    assert acc["driver"]["driver"] == "nvme" and acc["nvme"]["state"] == "live", acc
    assert j.device_stats()["tdi"]["state"] == "CONFIG_UNLOCKED"
    assert "Kernel driver in use: nvme" in (j.results / "lspci-plain.txt").read_text()
    assert (j.results / "cleartext-back.txt").read_text().split() == ["same"]
    with open(ns, "rb") as f:
        f.seek(CLEARTEXT_OFF)
        assert f.read(65536) == marker("cleartext", seed, 65536)


def _check_after_error(j: Journey, seed: int, ns: Path, at_error: str) -> None:
    # no write issued after the ERROR reached the media
    assert hashlib.sha256(ns.read_bytes()).hexdigest() == at_error
    data = ns.read_bytes()
    assert marker("after-error", seed, 64) not in data
    done = int((j.results / "writer.txt").read_text())
    block = marker("in-flight", seed, INFLIGHT_BLOCK)
    landed = 0
    while data[INFLIGHT_OFF + landed * INFLIGHT_BLOCK:][:INFLIGHT_BLOCK] == block:
        landed += 1
    rest = data[INFLIGHT_OFF + landed * INFLIGHT_BLOCK:AFTER_OFF]
    assert rest == bytes(len(rest)), "a block past the writer's run landed"
    assert 3 <= done <= landed, (done, landed)     # each write that completed is there
    # the driver saw a dead controller and gave up within its timeout: no hang
    dmesg = (j.results / "dmesg.txt").read_text()
    assert re.search(r"nvme nvme\d+: controller is down; will reset: CSTS=0xffffffff", dmesg)
    assert re.search(r"nvme nvme\d+: (Disabling device after reset failure|Removing after "
                     r"probe failure)", dmesg), dmesg[-3000:]
    assert (j.results / "ctrl-state.txt").read_text().split() in (["dead"], ["deleting"], [])
    assert j.guest_json("info-error.json")["info"]["state"] == "ERROR"
    after = (j.results / "after.txt").read_text()
    assert re.search(r"cannot seek|Input/output error|No such device|is gone", after), after
    print("guest dmesg (nvme):\n" + "\n".join(
        line for line in dmesg.splitlines() if "nvme" in line)[-2500:])
