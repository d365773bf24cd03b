"""TDISP around the NVMe personality (PCIe 6.x §11.2), driven the way the TSM drives it
(tests/support/tee_rig.py): the interface report and the configuration measurement
describe the controller; in RUN its queues and data move T=1 on the bound stream, never in
plaintext; LOCK aborts a command in flight (QUIESCE); a host write to BAR0 while LOCKED is
UR and rewriting BAR0's address takes the TDI to ERROR, where the controller issues no DMA;
STOP and FLR reset the controller."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from teeio import pki
from teeio.pcie.config import Reg
from teeio.personality import NVME, configuration_text
from teeio.tdisp.defs import MmioRangeAttributes, TdiState
from teeio.tlp import IdePrefix, is_protected, peek
from tests.support.lockstep import wait_until
from tests.support.nvme_host import COMPACT, Host, HostQueue, MemfdMemory
from tests.support.tee_rig import BAR0_ADDR, GUEST, SID, TeeRig
from vfio_user_dev.nvme.controller import NvmeController
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.spec import CSTS_CFS, CSTS_RDY, DOORBELL_BASE
from vfio_user_dev.nvme.spec import Reg as NvmeReg
from vfio_user_dev.personality.nvme import NvmePersonality, nvme_personality
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(60)

WINDOW, WINDOW_SIZE = GUEST + 0x8000, 0x8000     # where COMPACT puts everything
WRITE, READ, FLUSH = 0x01, 0x02, 0x00
ALL_ONES = b"\xff" * 4


class RigBar0:
    """BAR0 as the VMM reaches it (*host*: the host's own path, always T=0)."""

    def __init__(self, rig: TeeRig, host: bool = False) -> None:
        self.rig, self.host = rig, host

    def read(self, offset: int, size: int) -> bytes:
        return self.rig.machine.region_read(PciRegion.BAR0, offset, size, host=self.host)

    def write(self, offset: int, data: bytes) -> None:
        self.rig.machine.region_write(PciRegion.BAR0, offset, data, host=self.host)


def _rig(tmp: Path, identity: pki.Identity, capture: bool = False) -> TeeRig:
    ns = Namespace(tmp / "ns.img", 1 << 20)
    return TeeRig(tmp, identity, capture=capture, personality=nvme_personality(ns))


@pytest.fixture
def nvme_tee(tmp_path: Path, identity: pki.Identity) -> Iterator[TeeRig]:
    r = _rig(tmp_path, identity)
    yield r
    r.close()


@pytest.fixture
def nvme_tee_captured(tmp_path: Path, identity: pki.Identity) -> Iterator[TeeRig]:
    r = _rig(tmp_path, identity, capture=True)
    yield r
    r.close()


def nvme(rig: TeeRig) -> NvmePersonality:
    p = rig.device.personality
    assert isinstance(p, NvmePersonality)
    return p


def controller(rig: TeeRig) -> NvmeController:
    return nvme(rig).controller


def host_of(rig: TeeRig) -> Host:
    return Host(RigBar0(rig), MemfdMemory(rig.fd, GUEST), base=GUEST, layout=COMPACT)


def ready_host(rig: TeeRig) -> tuple[Host, HostQueue]:
    host = host_of(rig)
    host.enable()
    return host, host.create_io_queue(1, 4)


def run_with_window(rig: TeeRig) -> None:
    """What the TSM does before the TVM uses the device: LOCK, START, a window over the
    host's queues and buffers, private MMIO."""
    rig.setup_stream()
    rig.tdisp.start(rig.lock())
    rig.rp.call("window_authorise", requester_id=rig.rid, stream_id=SID, base=WINDOW,
                size=WINDOW_SIZE, access="rw")
    rig.private_mmio(True)


def refusals(rig: TeeRig) -> dict[str, int]:
    got = rig.machine.stats()["tdisp_refusals"]
    assert isinstance(got, dict)
    return got


def upstream(rig: TeeRig) -> int:
    return int(rig.machine.link.counters["tlps_upstream"])


# -- what the verifier sees ---------------------------------------------------------------------

def test_report_and_measurements_describe_the_controller(nvme_tee: TeeRig) -> None:
    nvme_tee.lock()
    rep = nvme_tee.tdisp.get_report()
    ranges = [(r.first_page, r.number_of_pages, r.attributes, r.range_id)
              for r in rep.mmio_ranges]
    assert ranges == [(BAR0_ADDR >> 12, 4, MmioRangeAttributes(0), 0),       # registers
                      (nvme_tee.msix_addr >> 12, 1, MmioRangeAttributes.IS_NON_TEE_MEM, 2)]
    assert rep.device_specific_info == configuration_text(NVME)
    blocks = {b.index: b for b in nvme_tee.req.get_measurements(session_id=nvme_tee.sid).blocks}
    assert sorted(blocks) == [1, 6]
    assert blocks[6].raw and blocks[6].value == configuration_text(NVME)
    assert b"personality=nvme" in blocks[6].value


def test_the_accelerator_reports_no_configuration_measurement(tee_rig: TeeRig) -> None:
    blocks = tee_rig.req.get_measurements(session_id=tee_rig.sid).blocks
    assert [b.index for b in blocks] == [1]


# -- RUN: T=1 on the bound stream -----------------------------------------------------------------

def test_io_in_run_is_t1_and_never_in_plaintext(nvme_tee_captured: TeeRig) -> None:
    rig = nvme_tee_captured
    run_with_window(rig)
    t1_before = rig.machine.root_port.counters["mmio_t1"]
    host, q = ready_host(rig)
    assert rig.machine.root_port.counters["mmio_t1"] > t1_before        # registers: T=1
    secret = b"TVM-private-NVMe-block!-" * 170 + b"0123456789abcdef"    # 4 KiB
    assert len(secret) == 4096
    host.bus.write(host.data, secret)
    assert host.call(q, WRITE, nsid=1, prp1=host.data, cdw=(0, 0, 7)) == (0, 0)
    out = host.data + 0x1000
    assert host.call(q, READ, nsid=1, prp1=out, cdw=(0, 0, 7)) == (0, 0)
    assert host.bus.read(out, len(secret)) == secret
    assert host.call(q, FLUSH, nsid=1) == (0, 0)
    assert nvme(rig).namespace.read(0, 8) == secret
    records = rig.records()
    ups = [peek(w) for w in records if is_protected(w)
           and IdePrefix.decode(w[:4]).substream == 0]      # PR: data, queue entries
    assert ups and all(t is not None and t.t_bit and t.stream_id == SID for t in ups)
    assert rig.capture_path is not None
    assert secret[:24] not in rig.capture_path.read_bytes()
    assert refusals(rig) == {}


# -- QUIESCE, ERROR ---------------------------------------------------------------------------

def test_lock_aborts_a_command_in_flight(nvme_tee: TeeRig, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    nvme_tee.setup_stream()
    host, q = ready_host(nvme_tee)
    ns = nvme(nvme_tee).namespace
    entered, release = threading.Event(), threading.Event()
    real_write = ns.write

    def slow_write(slba: int, data: bytes) -> None:
        entered.set()
        release.wait(10)
        real_write(slba, data)
    monkeypatch.setattr(ns, "write", slow_write)
    host.bus.write(host.data, b"\x5a" * 4096)
    host.submit(q, WRITE, nsid=1, prp1=host.data, cdw=(0, 0, 7))
    assert entered.wait(5), "the command never reached the media"
    nvme_tee.lock()                                # QUIESCE: the command was fetched before
    before = upstream(nvme_tee)
    release.set()
    wait_until(lambda: controller(nvme_tee).csts & CSTS_CFS, "the controller's fatal status")
    assert upstream(nvme_tee) == before            # no completion posted, nothing sent
    assert host.bus.read(q.cq_base, 16) == bytes(16)
    assert refusals(nvme_tee) == {"dma_aborted": 1}


def test_host_bar0_writes_while_locked_and_no_dma_in_error(
        nvme_tee: TeeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    nvme_tee.setup_stream()
    host, q = ready_host(nvme_tee)
    bus = nvme(nvme_tee).bus
    arrived, go = threading.Event(), threading.Event()
    real_begin = bus.begin_command

    def gated() -> None:
        arrived.set()
        go.wait(10)
        real_begin()
    monkeypatch.setattr(bus, "begin_command", gated)
    host.bus.write(host.data, b"\xa5" * 4096)
    host.submit(q, WRITE, nsid=1, prp1=host.data, cdw=(0, 0, 7))   # rung in CONFIG_UNLOCKED
    assert arrived.wait(5)
    nvme_tee.lock()
    # The host's T=0 MMIO to TEE memory of a locked TDI: UR, the controller never sees it.
    doorbells = controller(nvme_tee).stats["bad_doorbells"]
    RigBar0(nvme_tee, host=True).write(DOORBELL_BASE + 8 * q.qid, (3).to_bytes(4, "little"))
    assert RigBar0(nvme_tee, host=True).read(NvmeReg.CSTS, 4) == ALL_ONES
    assert controller(nvme_tee).stats["bad_doorbells"] == doorbells
    assert nvme_tee.state() is TdiState.CONFIG_LOCKED
    assert refusals(nvme_tee) == {"mmio_t0_not_unlocked": 2}
    # The host rewrites BAR0's address behind the TVM's back: the write completes, ERROR.
    nvme_tee.machine.region_write(PciRegion.CONFIG, Reg.BAR0, BAR0_ADDR.to_bytes(4, "little"),
                             host=True)
    assert nvme_tee.state() is TdiState.ERROR
    before = upstream(nvme_tee)
    go.set()                                    # the command is fetched in ERROR: refused
    wait_until(lambda: controller(nvme_tee).csts & CSTS_CFS, "the controller's fatal status")
    assert upstream(nvme_tee) == before                  # nothing crossed the link
    assert nvme(nvme_tee).namespace.read(0, 8) == bytes(4096)
    assert host.bus.read(q.cq_base, 16) == bytes(16)
    assert refusals(nvme_tee) == {"mmio_t0_not_unlocked": 2, "dma_not_allowed": 1}
    counters = nvme_tee.machine.stats()["nvme"]
    assert isinstance(counters, dict) and counters["dma_refused"] == 1


# -- SCRUB and FLR reset the controller ------------------------------------------------------------

def test_stop_scrubs_the_controller(nvme_tee: TeeRig) -> None:
    run_with_window(nvme_tee)
    host, _ = ready_host(nvme_tee)
    assert host.r32(NvmeReg.CSTS) & CSTS_RDY
    nvme_tee.private_mmio(False)
    nvme_tee.tdisp.stop()
    assert nvme_tee.state() is TdiState.CONFIG_UNLOCKED
    assert nvme_tee.machine.stats()["scrubs"] == 1
    assert host.r32(NvmeReg.CSTS) == 0 and host.r32(NvmeReg.AQA) == 0     # T=0 again
    assert int.from_bytes(RigBar0(nvme_tee).read(NvmeReg.ASQ, 8), "little") == 0
    assert controller(nvme_tee).status()["io_sqs"] == []


def test_flr_in_run_errors_the_tdi_and_resets_the_controller(nvme_tee: TeeRig) -> None:
    run_with_window(nvme_tee)
    host, _ = ready_host(nvme_tee)
    assert host.r32(NvmeReg.CSTS) & CSTS_RDY
    nvme_tee.machine.reset("host_flr")
    assert nvme_tee.state() is TdiState.ERROR
    ctl = controller(nvme_tee)
    assert (ctl.csts, ctl.cc, ctl.aqa) == (0, 0, 0)
    assert ctl.status()["io_sqs"] == [] and ctl.status()["io_cqs"] == []
