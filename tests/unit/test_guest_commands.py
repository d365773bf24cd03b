"""The guest agent's commands for a person (guest_agent/__main__.py, commands.py, accept.py):
argument parsing and help, tdi-info and stop with their human and JSON output, accept's
decision when the TDI is not CONFIG_UNLOCKED and its whole flow over typed GHCx messages,
the device enabled by config writes, and script (fakes: tests/unit/guest_fakes.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import guest_agent.__main__ as cli
from guest_agent import accept, commands, dmajob, selftest
from guest_agent.ghcx_client import GhcxCallError, GhcxClient
from guest_agent.pci import Config, enable_device, rewrite_bars
from teeio import tdi_verify
from teeio.device_regs import DEVICE_ID_REG_VALUE, Op, R, St
from teeio.ghcx import MsgType, TdiInfoResponse
from tests.unit.guest_fakes import HUGE, PHYS, FakeBar, FakeClock, FakeMemory, FakeTsm, patch_cli

# -- the CLI: parsing, --help, output, one-line failures -----------------------------------------

def _sub(name: str) -> Any:
    ap = cli.build_parser()
    action = next(a for a in ap._actions if a.dest == "command")
    return action.choices[name]  # type: ignore[index]


def test_dma_arguments() -> None:
    ns = cli.build_parser().parse_args(
        ["dma", "--op", "copy", "--length", "64k", "--pattern", "0xdeadbeef", "--seed", "ff",
         "--timeout", "2.5", "--no-window", "--keep-window", "--json"])
    assert (ns.op, ns.length, ns.pattern, ns.seed, ns.timeout) == ("copy", 65536, 0xDEADBEEF,
                                                                  0xFF, 2.5)
    assert ns.no_window and ns.keep_window and ns.json and not ns.no_tsm
    ns = cli.build_parser().parse_args(["dma"])
    assert (ns.op, ns.length, ns.pattern, ns.timeout) == ("fill", 4096, None,
                                                          dmajob.JOB_TIMEOUT)


@pytest.mark.parametrize("argv", [["dma", "--length", "0"], ["dma", "--length", "2M"],
                                  ["dma", "--op", "xor"], ["dma", "--timeout", "0"],
                                  ["dma", "--pattern", "0x100000000"], ["dma", "--bogus"],
                                  ["stop", "extra"], ["accept"], ["nonsense"]])
def test_bad_usage_is_one_line_and_exit_2(argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err


@pytest.mark.parametrize("name", ["accept", "tdi-info", "stop", "dma", "selftest", "probe",
                                  "doe-discovery", "spdm-probe", "script"])
def test_every_subcommand_has_help_for_every_option(name: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sub = _sub(name)
    for action in sub._actions:
        assert action.help and action.help.strip(), (name, action.option_strings)
    with pytest.raises(SystemExit) as ei:
        cli.main([name, "--help"])
    assert ei.value.code == 0
    assert f"usage: guest_agent {name}" in capsys.readouterr().out


def test_accept_and_legacy_arguments_as_the_init_script_passes_them(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """run.sh: ``python3 -m guest_agent MODE --K=V ... --report R`` with every teeio.K=V."""
    seen: dict[str, Any] = {}

    def fake_accept(policy: Path, **kw: Any) -> dict[str, Any]:
        seen.update(kw, policy=policy)
        return {"mode": "accept", "ok": True, "accepted": True, "steps": [], "checks": [],
                "stop": {"state": "CONFIG_UNLOCKED"}, "info": {"tdi": "dev0",
                                                               "lock_epoch": 4}}

    monkeypatch.setattr(accept, "run", fake_accept)
    report = tmp_path / "report.json"
    rc = cli.main(["accept", "--policy=/mnt/results/policy.json", "--seed=1f",
                   "--expect=accept", "--stop=1", "--pause-at=in-run", "--cycles=2",
                   "--report", str(report)])
    assert rc == 0
    assert seen == {"policy": Path("/mnt/results/policy.json"), "pause_at": "in-run",
                    "sync_dir": Path("/mnt/results"), "expect": "accept", "stop": True,
                    "cycles": 2, "seed": 0x1F, "restart": False}
    assert json.loads(report.read_text())["accepted"] is True
    assert "is CONFIG_UNLOCKED (--stop 1)" in capsys.readouterr().out

    monkeypatch.setattr(selftest, "run", lambda seed, rounds: {
        "mode": "selftest", "ok": True, "seed": hex(seed), "rounds": rounds,
        "checks": [{"name": "x", "ok": True}]})
    rc = cli.main(["selftest", "--seed=abc", "--rounds=2", "--policy=/x", "--report",
                   str(report)])
    out, err = capsys.readouterr()
    assert rc == 0 and "ignoring options it does not use: --policy=/x" in err
    assert json.loads(out) == {"mode": "selftest", "ok": True, "seed": "0xabc", "rounds": 2}
    assert json.loads(report.read_text())["checks"] == [{"name": "x", "ok": True}]



# -- tdi-info ------------------------------------------------------------------------------------

def fake_sysfs_device(tmp_path: Path, command: int = 0x0406) -> Path:
    dev = tmp_path / "0000:01:00.0"
    dev.mkdir(parents=True)
    cfg = bytearray(256)
    cfg[0:4] = (0x7E10_1234).to_bytes(4, "little")
    cfg[4:6] = command.to_bytes(2, "little")
    cfg[0x10:0x14] = (0xFE80_0000).to_bytes(4, "little")
    cfg[0x14:0x18] = (0xFE80_1000).to_bytes(4, "little")
    (dev / "config").write_bytes(bytes(cfg))
    (dev / "resource").write_text(
        "0x00000000fe800000 0x00000000fe800fff 0x0000000000040200\n"
        "0x00000000fe801000 0x00000000fe801fff 0x0000000000040200\n"
        + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 4)
    bar0 = bytearray(4096)
    bar0[0:4] = DEVICE_ID_REG_VALUE.to_bytes(4, "little")
    bar0[R.STATUS:R.STATUS + 4] = int(St.DONE).to_bytes(4, "little")
    (dev / "resource0").write_bytes(bytes(bar0))
    return dev


def test_guest_view_from_sysfs(tmp_path: Path) -> None:
    view = commands.guest_view(fake_sysfs_device(tmp_path))
    assert view == {
        "bdf": "0000:01:00.0", "vendor_device": "1234:7e10", "driver": None,
        "command": "0x0406", "memory_space": True, "bus_master": True, "intx_disabled": True,
        "bars": [{"index": 0, "address": "0xfe800000", "size": 4096},
                 {"index": 1, "address": "0xfe801000", "size": 4096}],
        "bar_registers": ["0xfe800000", "0xfe801000"],
        "bar0": {"id": "0x7e101234", "status": "0x00000002", "answers": True}}
    off = commands.guest_view(fake_sysfs_device(tmp_path / "b", command=0))
    assert not off["memory_space"] and "bar0" not in off      # BAR0 not touched


def test_tdi_info_human_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm("RUN", {7: {"base": PHYS, "size": HUGE, "access": "rw"}})
    dev = fake_sysfs_device(tmp_path)
    monkeypatch.setattr(cli, "find_device", lambda v, d: dev)
    monkeypatch.setattr(GhcxClient, "connect", staticmethod(lambda: tsm))
    assert cli.main(["tdi-info"]) == 0
    text = capsys.readouterr().out
    for needle in ("TDI dev0 (VM vm0): RUN", "lock epoch       3  (lock flags 0x1 NO_FW_UPDATE)",
                   "IDE stream       1 secure", "MMIO rep. offset 0x1000000000",
                   "cert_chain     " + "aa" * 48, "TSM boot id      " + "0f" * 16,
                   f"window 7: {PHYS:#x}+0x200000 rw",
                   "guest view (0000:01:00.0 1234:7e10, driver none)",
                   "Command          0x0406: memory space on, bus master on, INTx disabled",
                   "BAR0             0xfe800000 (4 KiB)",
                   "BAR0 registers   ID 0x7e101234, STATUS 0x00000002: answering"):
        assert needle in text, (needle, text)
    assert tsm.names() == ["TDI_INFO", "STATUS"] and tsm.closed
    assert cli.main(["tdi-info", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["info"]["state"] == "RUN" and res["status"]["windows"][0]["window_id"] == 7
    assert res["guest"]["bus_master"] is True and res["vm_id"] == "vm0"


def test_tdi_info_error_state_shows_the_reason() -> None:
    text = commands.format_tdi_info(commands.tdi_info(FakeTsm("ERROR"), None))
    assert "TDI dev0 (VM vm0): ERROR" in text and "reason           device reported ERROR" in text


def test_tdi_info_without_ghcx_fails_in_one_line(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    dev = fake_sysfs_device(tmp_path)
    monkeypatch.setattr(cli, "find_device", lambda v, d: dev)
    patch_cli(monkeypatch, None)
    assert cli.main(["tdi-info"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--local" in err
    assert cli.main(["tdi-info", "--local"]) == 0
    assert "guest view (0000:01:00.0" in capsys.readouterr().out


# -- stop ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["RUN", "CONFIG_LOCKED", "ERROR"])
def test_stop_from_each_state(state: str, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm(state, {7: {"base": PHYS, "size": HUGE, "access": "rw"}})
    monkeypatch.setattr(GhcxClient, "connect", staticmethod(lambda: tsm))
    assert cli.main(["stop"]) == 0
    assert tsm.names() == ["TDI_INFO", "TDI_STOP"] and tsm.state == "CONFIG_UNLOCKED"
    assert capsys.readouterr().out.strip() == (
        f"TDI dev0: {state} -> CONFIG_UNLOCKED (TDI_STOP; lock epoch 3; the TSM revoked "
        "this VM's DMA windows and private MMIO)")


def test_stop_when_unlocked_sends_nothing_unless_forced(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm("CONFIG_UNLOCKED")
    monkeypatch.setattr(GhcxClient, "connect", staticmethod(lambda: tsm))
    assert cli.main(["stop", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == {"tdi": "dev0", "vm_id": "vm0", "before": "CONFIG_UNLOCKED",
                   "lock_epoch": 3, "stopped": False, "state": "CONFIG_UNLOCKED"}
    assert tsm.names() == ["TDI_INFO"]
    assert cli.main(["stop", "--force"]) == 0
    assert tsm.names() == ["TDI_INFO", "TDI_INFO", "TDI_STOP"]


def test_stop_refused_by_the_tsm_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    class Refusing(FakeTsm):
        def call(self, mtype: MsgType, payload: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
            if mtype is MsgType.TDI_STOP:
                raise GhcxCallError("device", "STOP_INTERFACE: INVALID_INTERFACE_STATE")
            return super().call(mtype, payload)

    monkeypatch.setattr(GhcxClient, "connect", staticmethod(lambda: Refusing("RUN")))
    assert cli.main(["stop"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == ("guest_agent stop: error: GHCx device: STOP_INTERFACE: "
                                 "INVALID_INTERFACE_STATE\n")


# -- accept: already RUN, LOCKED, ERROR, --restart ----------------------------------------------

@pytest.mark.parametrize(("state", "restart", "action"), [
    ("CONFIG_UNLOCKED", False, "run"), ("CONFIG_UNLOCKED", True, "run"),
    ("RUN", False, "already"), ("RUN", True, "restart"),
    ("CONFIG_LOCKED", False, "refuse"), ("CONFIG_LOCKED", True, "restart"),
    ("ERROR", False, "refuse"), ("ERROR", True, "restart")])
def test_accept_decision(state: str, restart: bool, action: str) -> None:
    d = commands.decide_accept(TdiInfoResponse.decode(FakeTsm(state).info()), "vm0", restart)
    assert d.action == action
    if action == "already":
        assert d.message == ("TDI dev0 is already RUN for VM vm0 (lock epoch 3): nothing "
                             "to do (--restart to redo the whole flow)")
    if action == "refuse":
        assert d.message.startswith(f"TDI dev0 is {state} (lock epoch 3")
        assert "guest_agent stop' first" in d.message and "accept --restart" in d.message
    if state == "ERROR" and action == "refuse":
        assert "device reported ERROR" in d.message


def _patch_accept(monkeypatch: pytest.MonkeyPatch, tsm: FakeTsm,
                  mem: FakeMemory | None = None) -> list[bool]:
    """accept's device and TSM faked; with *mem* the device has BAR0 and a DMA buffer."""
    drivers: list[bool] = []

    class FakeConfig:
        def __init__(self) -> None:
            self.regs = {0x10: 0xFE80_0000}
            self.writes: list[tuple[int, int, int]] = []

        def read(self, off: int, size: int) -> int:
            return self.regs.get(off, 0)          # no capability list: no MSI-X BAR

        def write(self, off: int, size: int, value: int) -> None:
            self.writes.append((off, size, value))

    class FakeDriver:
        def __init__(self, irq: bool = True) -> None:
            drivers.append(irq)
            self.dev = Path("/sys/bus/pci/devices/0000:01:00.0")
            self.command = (0x0406, 0x0406)
            self.cfg = FakeConfig()
            self.buf = mem
            self.mmio = FakeBar(mem, tsm) if mem is not None else None

        def run_job(self, op: int, src: int, dst: int, n: int,
                    pattern: int = 0) -> dict[str, Any]:
            clock = FakeClock()
            done = dmajob.run(self.mmio, dmajob.Job(Op(op), src, dst, n, pattern), 5.0,
                              clock=clock, sleep=clock.sleep)
            return {"done": done.done, "outcome": done.outcome}

    tsm.counters = {}  # type: ignore[attr-defined]
    tsm.tsm_restarted = False  # type: ignore[attr-defined]
    monkeypatch.setattr(accept, "Driver", FakeDriver)
    monkeypatch.setattr(accept, "bars_of", lambda dev: [(0, 0xFE800000, 4096)])
    monkeypatch.setattr(GhcxClient, "connect", staticmethod(lambda: tsm))
    monkeypatch.setattr(tdi_verify, "load_policy",
                        lambda p: SimpleNamespace(vendor_id=0x1234, device_id=0x7E10))
    return drivers


def test_accept_when_already_run_says_so_and_succeeds(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm("RUN")
    drivers = _patch_accept(monkeypatch, tsm)
    assert cli.main(["accept", "--policy", "/p.json"]) == 0
    assert capsys.readouterr().out.strip() == (
        "TDI dev0 is already RUN for VM vm0 (lock epoch 3): nothing to do (--restart to "
        "redo the whole flow)")
    assert tsm.names() == ["TDI_INFO"] and tsm.state == "RUN"
    assert drivers == [False]                  # polled: no uio whose close clears BME


@pytest.mark.parametrize("state", ["CONFIG_LOCKED", "ERROR"])
def test_accept_when_locked_or_error_fails_in_one_line(
        state: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm(state)
    _patch_accept(monkeypatch, tsm)
    report = tmp_path / "r.json"
    assert cli.main(["accept", "--policy", "/p.json", "--report", str(report)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"guest_agent accept: TDI dev0 is {state} (lock epoch 3")
    assert "run 'python3 -m guest_agent stop' first" in err
    assert tsm.names() == ["TDI_INFO"]
    rep = json.loads(report.read_text())
    assert rep["precheck"]["action"] == "refuse" and not rep["ok"]


def test_accept_restart_stops_first_then_runs_the_flow(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm("ERROR", lock_error=GhcxCallError("device", "LOCK_INTERFACE: refused"))
    _patch_accept(monkeypatch, tsm)
    rep = accept.run(Path("/p.json"), restart=True)
    assert tsm.names() == ["TDI_INFO", "TDI_STOP", "TDI_LOCK"]
    assert [s["step"] for s in rep["steps"]] == ["enumerate", "ghcx_handshake",
                                                 "restart_stop", "tdi_lock"]
    assert rep["precheck"]["action"] == "restart"
    assert rep["error"] == "GHCx device: LOCK_INTERFACE: refused" and not rep["ok"]


def test_accept_from_unlocked_keeps_the_step_order_the_host_checks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tsm = FakeTsm("CONFIG_UNLOCKED", lock_error=GhcxCallError("state", "stop here"))
    _patch_accept(monkeypatch, tsm)
    rep = accept.run(Path("/p.json"))
    assert [s["step"] for s in rep["steps"]] == ["enumerate", "ghcx_handshake", "tdi_lock"]
    assert tsm.names() == ["TDI_INFO", "TDI_LOCK"]


# -- the device is enabled by config writes, never by uio ----------------------------------------

class RecordingConfig(Config):
    def __init__(self, path: Path) -> None:
        super().__init__(path.parent)
        self.path = path
        self.writes: list[tuple[int, int, int]] = []

    def write(self, off: int, size: int, value: int) -> None:
        self.writes.append((off, size, value))
        super().write(off, size, value)


def test_rewrite_bars_writes_back_what_the_os_assigned(tmp_path: Path) -> None:
    """After an FLR behind its back the function's BARs are 0: accept writes back what the
    OS shows (the VMM forwards the write), before LOCK."""
    path = tmp_path / "config"
    cfg_bytes = bytearray(256)
    cfg_bytes[0x10:0x14] = (0xFE80_0000).to_bytes(4, "little")
    cfg_bytes[0x14:0x18] = (0xFE80_1000).to_bytes(4, "little")
    path.write_bytes(bytes(cfg_bytes))
    cfg = RecordingConfig(path)
    assert rewrite_bars(cfg, [(0, 0xFE80_0000, 4096), (1, 0xFE80_1000, 4096)]) == [
        "BAR0=0xfe800000", "BAR1=0xfe801000"]
    assert cfg.writes == [(0x10, 4, 0xFE80_0000), (0x14, 4, 0xFE80_1000)]


@pytest.mark.parametrize(("before", "after", "writes"), [
    (0x0000, 0x0006, [(4, 2, 0x0006)]),
    (0x0400, 0x0406, [(4, 2, 0x0406)]),      # INTx Disable kept
    (0x0006, 0x0006, []),                    # already on: nothing written
])
def test_enable_device_sets_memory_space_and_bus_master(tmp_path: Path, before: int,
                                                        after: int, writes: list[Any]) -> None:
    path = tmp_path / "config"
    path.write_bytes(bytes(4) + before.to_bytes(2, "little") + bytes(250))
    cfg = RecordingConfig(path)
    assert enable_device(cfg) == (before, after)
    assert cfg.writes == writes
    assert int.from_bytes(path.read_bytes()[4:6], "little") == after


# -- script (for e2e runs of these commands in the guest) ---------------------------------------

def test_script_runs_each_command_as_its_own_process(tmp_path: Path) -> None:
    script = tmp_path / "cmds.txt"
    probe = tmp_path / "probe.json"
    script.write_text(f"# a comment\nprobe --report {probe}\n!dma --length 0\n")
    report = tmp_path / "report.json"
    env_root = Path(__file__).resolve().parents[2]
    cwd = os.getcwd()
    os.chdir(env_root)
    try:
        rc = cli.main(["script", "--file", str(script), "--report", str(report),
                       "--seed=1"])
    finally:
        os.chdir(cwd)
    rep = json.loads(report.read_text())
    assert rc == 0 and rep["ok"], rep
    first, second = rep["steps"]
    assert first["argv"] == ["probe", "--report", str(probe)] and first["rc"] == 0
    assert first["json"] == {"mode": "probe", "ok": True}
    assert second["must_fail"] and second["rc"] == 2 and second["ok"]


class AttestingTsm(FakeTsm):
    """A TSM that also serves GET_EVIDENCE (fixed blobs) and TDI_ACCEPT (RUN only if the
    digests and lock epoch are the current ones), as tsm/guest_api.py does."""

    BLOBS = {"cert_chain": b"chain", "vca": b"vca", "report": b"report"}
    PAIRS = ((b"q1", b"r1"), (b"q2", b"r2"))

    def __init__(self) -> None:
        super().__init__("CONFIG_UNLOCKED")
        self.evidence = False

    def info(self) -> dict[str, Any]:
        out = super().info()
        if out["digests"] is not None:
            sha = {k: hashlib.sha384(v).hexdigest() for k, v in self.BLOBS.items()}
            transcript = b"vca" + b"".join(q + r for q, r in self.PAIRS)
            out["digests"] = {"cert_chain": sha["cert_chain"], "transcript": hashlib.sha384(
                transcript).hexdigest() if self.evidence else None, "report": sha["report"]}
        return out

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = {} if payload is None else payload
        if mtype is MsgType.GET_EVIDENCE:
            self.calls.append((mtype, payload))
            self.evidence = True
            return {**{k: v.hex() for k, v in self.BLOBS.items()},
                    "measurements": [[q.hex(), r.hex()] for q, r in self.PAIRS]}
        if mtype is MsgType.TDI_ACCEPT:
            self.calls.append((mtype, payload))
            if payload != {"digests": self.info()["digests"], "lock_epoch": self.epoch}:
                raise GhcxCallError("mismatch", "digests or lock epoch")
            self.state = "RUN"
            return {"state": "RUN", "dma_stream": 1}
        return super().call(mtype, payload)


def test_accept_whole_flow_over_typed_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOCK, evidence with the guest's nonce, TDI_INFO, verification on the typed fields,
    ACCEPT with the digests and lock epoch verified, DMA in RUN inside an accepted window
    and refused outside it, the window released at the end."""
    tsm, mem = AttestingTsm(), FakeMemory()
    _patch_accept(monkeypatch, tsm, mem)
    monkeypatch.setattr(accept, "HugeBuffer", lambda name: FakeMemory(phys=PHYS + 8 * HUGE))
    seen: dict[str, Any] = {}

    def verify(policy: Any, ev: tdi_verify.Evidence, info: dict[str, Any], nonce: bytes,
               bars: Any, msix_bars: Any) -> tdi_verify.Verdict:
        seen.update(ev=ev, info=info, nonce=nonce, msix_bars=msix_bars)
        v = tdi_verify.Verdict()
        v.add("all", True)
        return v

    monkeypatch.setattr(tdi_verify, "verify", verify)
    rep = accept.run(Path("/p.json"))
    assert rep["ok"] and rep["accepted"], rep
    assert tsm.names() == ["TDI_INFO", "TDI_LOCK", "GET_EVIDENCE", "TDI_INFO", "TDI_ACCEPT",
                           "DMA_ACCEPT", "DMA_RELEASE", "DMA_ACCEPT", "DMA_RELEASE"]
    assert tsm.calls[2][1] == {"nonce": seen["nonce"].hex()} and len(seen["nonce"]) == 32
    assert seen["ev"] == tdi_verify.Evidence(b"chain", b"vca", AttestingTsm.PAIRS, b"report")
    assert seen["info"] == rep["info"] == tsm.info() | {"state": "CONFIG_LOCKED"}
    assert tsm.calls[4][1] == {"digests": seen["info"]["digests"], "lock_epoch": 4}
    assert tsm.calls[5][1] == {"base": PHYS, "size": HUGE, "access": "rw"}
    assert rep["lock"] == {"state": "CONFIG_LOCKED", "lock_epoch": 4}
    assert rep["accept"] == {"state": "RUN", "dma_stream": 1}
    assert rep["window"] == {"window_id": 8} and rep["window_released"] == 8
    assert all(c["ok"] for c in rep["checks"]), rep["checks"]
    assert {c["name"] for c in rep["checks"]} >= {"mmio_blocked_when_locked", "mmio_in_run",
                                                  "private_batch",
                                                  "unaccepted_buffer_refused",
                                                  "released_buffer_refused"}
    assert tsm.state == "RUN" and tsm.windows == {}
