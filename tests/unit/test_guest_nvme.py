"""The guest agent's NVMe flow (guest_agent/nvme_accept.py, linux_driver.py, the pci.py
helpers it uses): System RAM from /proc/iomem, the MSI-X BARs from the capability list,
64-bit BARs written back whole, one trusted-DMA window per RAM range, the nvme driver
bound through sysfs, the whole accept flow over typed GHCx messages, and ``--no-tee``
(fakes: tests/unit/guest_fakes.py; a fake sysfs in a temporary folder).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import guest_agent.__main__ as cli
from guest_agent import accept, linux_driver, nvme_accept
from guest_agent.ghcx_client import (
    GhcxCallError,
    GhcxClient,
    GhcxSetupError,
    GhcxTimeout,
    GhcxTransportError,
)
from guest_agent.pci import AgentError, Config, msix_bars, rewrite_bars
from teeio import tdi_verify
from teeio.ghcx import MsgType
from tests.unit.guest_fakes import FakeTsm

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000bffff : PCI Bus 0000:00
00100000-3ffd6fff : System RAM
  0e000000-0f1fffff : Kernel code
3ffd7000-3fffffff : Reserved
100000000-13fffffff : System RAM
"""
RAM = [(0x1000, 0x9EC00), (0x100000, 0x3FED7000), (0x1_0000_0000, 0x4000_0000)]


def test_system_ram_is_every_top_level_range() -> None:
    assert linux_driver.system_ram(IOMEM) == RAM


@pytest.mark.parametrize("text,problem", [
    ("00000000-00000000 : System RAM\n", "not root"),
    ("00000000-00000fff : Reserved\n", "no System RAM"),
])
def test_system_ram_refuses_what_it_cannot_use(text: str, problem: str) -> None:
    with pytest.raises(AgentError, match=problem):
        linux_driver.system_ram(text)


def _config(tmp_path: Path, regs: dict[int, tuple[int, int]]) -> Config:
    raw = bytearray(256)
    for off, (size, value) in regs.items():
        raw[off:off + size] = value.to_bytes(size, "little")
    (tmp_path / "config").write_bytes(bytes(raw))
    return Config(tmp_path)


def test_msix_bars_follow_the_capability_list(tmp_path: Path) -> None:
    """PM at 0x40 -> MSI-X at 0x50: table in BAR2, PBA in BAR2 (the NVMe layout)."""
    cfg = _config(tmp_path, {0x06: (2, 1 << 4), 0x34: (1, 0x40), 0x40: (2, 0x5001),
                             0x50: (2, 0x0011), 0x54: (4, 0x0000_0002),
                             0x58: (4, 0x0000_0802)})
    assert msix_bars(cfg) == {2}
    cfg = _config(tmp_path, {0x06: (2, 0), 0x34: (1, 0x40)})      # no capability list
    assert msix_bars(cfg) == frozenset()
    cfg = _config(tmp_path, {0x06: (2, 1 << 4), 0x34: (1, 0x40), 0x40: (2, 0x4001)})
    assert msix_bars(cfg) == frozenset()                             # a loop ends too


def test_a_64_bit_bar_is_written_back_whole(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {0x10: (4, 0xFE40_0004), 0x14: (4, 0x1), 0x18: (4, 0xFE40_4000)})
    assert rewrite_bars(cfg, [(0, 0x1_FE40_0000, 0x4000), (2, 0xFE40_4000, 0x1000)]) == [
        "BAR0=0xfe400004", "BAR1=0x00000001", "BAR2=0xfe404000"]


def test_one_window_per_ram_range_unless_one_is_held() -> None:
    tsm = FakeTsm("RUN", {3: {"base": 0x0, "size": 0xA0000, "access": "rw"}})
    out = nvme_accept.ram_windows(tsm, RAM)          # type: ignore[arg-type]
    assert [(w["window_id"], w["new"]) for w in out] == [(3, False), (7, True), (8, True)]
    assert tsm.names() == ["STATUS", "DMA_ACCEPT", "DMA_ACCEPT"]
    assert tsm.calls[1][1] == {"base": 0x100000, "size": 0x3FED7000, "access": "rw"}


# -- the driver through a fake sysfs ----------------------------------------------------------

@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    dev = tmp_path / "devices" / "0000:01:00.0"
    dev.mkdir(parents=True)
    (dev / "driver_override").write_text("(null)")
    drivers, block, devnodes = tmp_path / "drivers", tmp_path / "block", tmp_path / "dev"
    for d in (drivers, block, devnodes):
        d.mkdir()
    monkeypatch.setattr(linux_driver, "DRIVERS", drivers)
    monkeypatch.setattr(linux_driver, "BLOCK", block)
    monkeypatch.setattr(linux_driver, "DEV", devnodes)
    loaded: list[str] = []

    def modprobe(module: str) -> None:          # the driver registers and probes: it binds
        loaded.append(module)
        (drivers / module).mkdir()
        (dev / "driver").symlink_to(drivers / module)
        ctrl = dev / "nvme" / "nvme0"
        (ctrl / "nvme0n1").mkdir(parents=True)
        (ctrl / "state").write_text("live\n")
        (ctrl / "nvme0n1" / "size").write_text("131072\n")
        (block / "nvme0n1").symlink_to(ctrl / "nvme0n1")
        (block / "nvme0c0n1").symlink_to(ctrl / "nvme0n1")     # a hidden path: skipped
        (devnodes / "nvme0n1").write_text("")

    monkeypatch.setattr(linux_driver, "modprobe", modprobe)
    return SimpleNamespace(dev=dev, loaded=loaded)


def test_bind_names_the_driver_and_loads_it(sysfs: SimpleNamespace) -> None:
    out = linux_driver.bind(sysfs.dev, "nvme", timeout=1)
    assert out["driver"] == "nvme" and out["modprobe"] and sysfs.loaded == ["nvme"]
    assert (sysfs.dev / "driver_override").read_text() == "nvme"
    assert linux_driver.nvme_namespaces(sysfs.dev, timeout=1) == {
        "controller": "nvme0", "state": "live", "namespaces": ["/dev/nvme0n1"],
        "bytes": {"nvme0n1": 64 << 20}}
    assert linux_driver.bind(sysfs.dev, "nvme", timeout=1)["driver"] == "nvme"   # again


def test_bind_refuses_a_function_another_driver_holds(sysfs: SimpleNamespace) -> None:
    (sysfs.dev / "driver").symlink_to(sysfs.dev.parent / "uio_pci_generic")
    with pytest.raises(AgentError, match="bound to uio_pci_generic, not nvme"):
        linux_driver.bind(sysfs.dev, "nvme", timeout=1)


# -- the whole flow -----------------------------------------------------------------------------

class AttestingTsm(FakeTsm):
    """GET_EVIDENCE (fixed blobs) and TDI_ACCEPT (RUN if the digests and epoch are the
    current ones) besides FakeTsm's messages, as tsm/guest_api.py answers them."""

    def __init__(self, state: str = "CONFIG_UNLOCKED") -> None:
        super().__init__(state)
        self.counters: dict[str, int] = {}
        self.tsm_restarted = False

    def info(self) -> dict[str, Any]:
        out = super().info()
        if out["digests"] is not None:
            out["digests"] = {"cert_chain": hashlib.sha384(b"chain").hexdigest(),
                              "transcript": hashlib.sha384(b"vcaqr").hexdigest(),
                              "report": hashlib.sha384(b"report").hexdigest()}
        return out

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = {} if payload is None else payload
        if mtype is MsgType.GET_EVIDENCE:
            self.calls.append((mtype, payload))
            return {"cert_chain": b"chain".hex(), "vca": b"vca".hex(),
                    "report": b"report".hex(), "measurements": [["71", "72"]]}
        if mtype is MsgType.TDI_ACCEPT:
            self.calls.append((mtype, payload))
            if payload != {"digests": self.info()["digests"], "lock_epoch": self.epoch}:
                raise GhcxCallError("mismatch", "digests or lock epoch")
            self.state = "RUN"
            return {"state": "RUN", "dma_stream": 1}
        return super().call(mtype, payload)


class FakeBar0:
    """The controller's VS register behind the TEE gate: all ones unless CONFIG_UNLOCKED or
    RUN (PCIe 6.x §11.2.1)."""

    def __init__(self, tsm: FakeTsm) -> None:
        self.tsm = tsm
        self.mm = SimpleNamespace(close=lambda: None)

    def read32(self, off: int) -> int:
        assert off == nvme_accept.REG_VS
        return 0x0001_0400 if self.tsm.state in ("RUN", "CONFIG_UNLOCKED") else 0xFFFF_FFFF


def _patch_flow(monkeypatch: pytest.MonkeyPatch, tsm: FakeTsm,
                bound: str | None = None) -> dict[str, Any]:
    seen: dict[str, Any] = {"driver": bound, "unbound": []}
    dev = Path("/sys/bus/pci/devices/0000:01:00.0")
    monkeypatch.setattr(nvme_accept, "find", lambda vendor=0, device=0: dev)
    monkeypatch.setattr(nvme_accept, "Config", lambda d: object())
    monkeypatch.setattr(nvme_accept, "bars_of",
                        lambda d: [(0, 0xFE400000, 0x4000), (2, 0xFE404000, 0x1000)])
    monkeypatch.setattr(nvme_accept, "msix_bars", lambda cfg: frozenset({2}))
    monkeypatch.setattr(nvme_accept, "enable_device", lambda cfg: (0x106, 0x106))
    monkeypatch.setattr(nvme_accept, "rewrite_bars", lambda cfg, bars: ["BAR0=0xfe400004"])
    monkeypatch.setattr(nvme_accept, "Mmio", lambda d, bar: FakeBar0(tsm))
    monkeypatch.setattr(nvme_accept, "driver_of", lambda d: seen["driver"])
    monkeypatch.setattr(linux_driver, "IOMEM", SimpleNamespace(read_text=lambda: IOMEM))

    def unbind(d: Path) -> str | None:
        seen["unbound"].append((seen["driver"], tsm.state))
        seen["driver"] = None
        return "nvme"

    def bind(d: Path, driver: str) -> dict[str, Any]:
        seen["bound_in"] = tsm.state
        seen["driver"] = driver
        return {"driver": driver, "bdf": d.name, "seconds": 0.1}

    monkeypatch.setattr(linux_driver, "unbind", unbind)
    monkeypatch.setattr(linux_driver, "bind", bind)
    monkeypatch.setattr(linux_driver, "nvme_namespaces", lambda d: {
        "controller": "nvme0", "state": "live", "namespaces": ["/dev/nvme0n1"],
        "bytes": {"nvme0n1": 64 << 20}})
    monkeypatch.setattr(GhcxClient, "connect", staticmethod(lambda **_: tsm))

    def verify(policy: Any, ev: tdi_verify.Evidence, info: dict[str, Any], nonce: bytes,
               bars: Any, msix: Any) -> tdi_verify.Verdict:
        seen.update(bars=bars, msix=msix, ev=ev)
        v = tdi_verify.Verdict()
        v.add("all", True)
        return v

    monkeypatch.setattr(tdi_verify, "verify", verify)
    return seen


POLICY = SimpleNamespace(vendor_id=0x1234, device_id=0x7E11)


def test_accept_locks_verifies_accepts_covers_ram_then_binds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tsm = AttestingTsm()
    seen = _patch_flow(monkeypatch, tsm, bound="nvme")      # bound at T=0 before the flow
    rep = nvme_accept.run(POLICY)                           # type: ignore[arg-type]
    assert rep["ok"] and rep["accepted"], rep
    assert tsm.names() == ["TDI_INFO", "TDI_LOCK", "GET_EVIDENCE", "TDI_INFO", "TDI_ACCEPT",
                           "STATUS", "DMA_ACCEPT", "DMA_ACCEPT", "DMA_ACCEPT"]
    assert seen["unbound"] == [("nvme", "CONFIG_UNLOCKED")]  # before LOCK: no event
    assert seen["bound_in"] == "RUN" and seen["msix"] == {2}
    assert [c["name"] for c in rep["checks"]] == ["mmio_blocked_when_locked", "mmio_in_run",
                                                  "ram_covered", "nvme_live"]
    assert all(c["ok"] for c in rep["checks"])
    assert [w["base"] for w in rep["windows"]] == ["0x1000", "0x100000", "0x100000000"]
    assert set(tsm.windows) == {7, 8, 9}
    assert rep["nvme"]["namespaces"] == ["/dev/nvme0n1"] and rep["msix_bars"] == [2]
    text = cli.commands.format_accept(rep)
    assert "DMA window 8: 0x100000+0x3fed7000 (System RAM, accepted)" in text
    assert "driver nvme: controller nvme0 live, /dev/nvme0n1 (64 MiB)" in text


def test_accept_when_already_run_binds_the_driver_if_it_is_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tsm = AttestingTsm("RUN")
    tsm.windows = {3: {"base": 0x1000, "size": 0x9EC00, "access": "rw"}}
    seen = _patch_flow(monkeypatch, tsm)
    rep = nvme_accept.run(POLICY)                           # type: ignore[arg-type]
    assert rep["ok"] and rep["precheck"]["action"] == "already", rep
    assert tsm.names() == ["TDI_INFO", "STATUS", "DMA_ACCEPT", "DMA_ACCEPT"]
    assert seen["driver"] == "nvme" and [w["new"] for w in rep["windows"]] == [False, True,
                                                                              True]


def test_a_window_the_tsm_refuses_fails_the_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    class Full(AttestingTsm):
        def call(self, mtype: MsgType, payload: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
            if mtype is MsgType.DMA_ACCEPT and len(self.windows) == 1:
                raise GhcxCallError("refused", "VM vm0 already has 64 DMA windows")
            return super().call(mtype, payload)

    tsm = Full()
    seen = _patch_flow(monkeypatch, tsm)
    rep = nvme_accept.run(POLICY)                           # type: ignore[arg-type]
    assert not rep["ok"] and rep["error"] == "GHCx refused: VM vm0 already has 64 DMA windows"
    assert seen["driver"] is None                           # never bound without windows


def test_accept_dispatches_an_nvme_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tdi_verify, "load_policy", lambda p: POLICY)
    monkeypatch.setattr(nvme_accept, "run", lambda policy, **kw: {"nvme": kw})
    assert accept.run(Path("/p.json"), restart=True) == {"nvme": {
        "pause_at": "", "sync_dir": Path("/mnt/results"), "expect": "accept", "restart": True}}
    with pytest.raises(tdi_verify.PolicyError, match="--stop and --cycles"):
        accept.run(Path("/p.json"), stop=True)


# -- --no-tee -------------------------------------------------------------------------------------

def test_no_tee_binds_on_an_unlocked_tdi_and_refuses_a_locked_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tsm = AttestingTsm("CONFIG_UNLOCKED")
    seen = _patch_flow(monkeypatch, tsm)
    rep = nvme_accept.run_plain()
    assert rep["ok"] and rep["tee"] is False and rep["tdi_state"] == "CONFIG_UNLOCKED"
    assert seen["bound_in"] == "CONFIG_UNLOCKED" and tsm.names() == ["TDI_INFO"]
    assert "no TDISP (--no-tee)" in cli.commands.format_accept(rep)
    tsm.state, seen["driver"] = "RUN", None
    rep = nvme_accept.run_plain()
    assert not rep["ok"] and "is RUN: a locked TDI serves no T=0 request" in rep["error"]
    assert seen["driver"] is None


def test_no_tee_without_ghcx_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _patch_flow(monkeypatch, AttestingTsm())

    def no_port(**_: object) -> None:
        raise GhcxSetupError("no virtio-serial port named org.teeio.ghcx.0")

    monkeypatch.setattr(GhcxClient, "connect", staticmethod(no_port))
    rep = nvme_accept.run_plain()
    assert rep["ok"] and "the TSM was not asked" in rep["note"] and seen["driver"] == "nvme"


@pytest.mark.parametrize("silence", [GhcxTimeout("no valid HELLO_ACK after 4 attempts"),
                                     GhcxTransportError("GHCx peer closed the socket")])
def test_no_tee_when_no_tsm_answers_on_the_port(monkeypatch: pytest.MonkeyPatch,
                                                silence: Exception) -> None:
    """The port exists but the host unbound the VM: nobody answers the handshake."""
    seen = _patch_flow(monkeypatch, AttestingTsm())

    def unanswered(**kw: object) -> None:
        asked.append(kw)
        raise silence

    asked: list[dict[str, object]] = []

    monkeypatch.setattr(GhcxClient, "connect", staticmethod(unanswered))
    rep = nvme_accept.run_plain()
    assert rep["ok"] and rep["note"].startswith("no GHCx answer") and seen["driver"] == "nvme"
    assert "the TSM was not asked" in rep["note"] and "tdi_state" not in rep
    # a short handshake: a VM nobody serves is not kept waiting long
    assert asked == [{"handshake_timeout": nvme_accept.NO_TEE_HANDSHAKE_TIMEOUT,
                      "handshake_retries": nvme_accept.NO_TEE_HANDSHAKE_RETRIES}]


def test_cli_no_tee_and_the_policy_requirement(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[dict[str, int]] = []
    monkeypatch.setattr(nvme_accept, "run_plain",
                        lambda **ids: calls.append(ids) or {"ok": True, "tee": False})
    assert cli.main(["accept", "--no-tee"]) == 0 and calls == [{}]
    with pytest.raises(SystemExit) as ei:
        cli.main(["accept"])
    assert ei.value.code == 2
    assert "--policy is required (unless --no-tee)" in capsys.readouterr().err


def test_accept_again_in_run_adds_windows_for_new_ram_and_keeps_the_driver(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RAM hot-plugged after the first accept: one more window; the bound driver stays."""
    tsm = AttestingTsm("RUN")
    tsm.windows = {3: {"base": 0x1000, "size": 0x9EC00, "access": "rw"},
                   4: {"base": 0x100000, "size": 0x3FED7000, "access": "rw"}}
    seen = _patch_flow(monkeypatch, tsm, bound="nvme")
    rep = nvme_accept.run(POLICY)                           # type: ignore[arg-type]
    assert rep["ok"] and rep["driver"]["bound_already"] and "bound_in" not in seen
    assert tsm.names() == ["TDI_INFO", "STATUS", "DMA_ACCEPT"]
    assert tsm.calls[2][1] == {"base": 0x1_0000_0000, "size": 0x4000_0000, "access": "rw"}
