"""The guest agent's commands for a person (guest_agent/__main__.py, commands.py, dmajob.py):
argument parsing, human and JSON output, accept's decision when the TDI is not
CONFIG_UNLOCKED, and the dma command's job programming and result decoding.

The device is a fake BAR0 that follows teeio/device_regs.py (a job starts on the DMA_CMD
write with GO, runs over a fake 2 MiB buffer, STATUS is BUSY for a few reads, then DONE or
ERROR with a code); in CONFIG_LOCKED / ERROR it answers all ones and drops writes, as the
device's TEE MMIO does (PCIe 6.x §11.2.1).  In RUN it refuses DMA outside the fake TSM's
windows with FAULT, as the root port does.  The TSM is a fake GHCx client keeping the TDI
state and windows as tsm/daemon.py does.  Every register write is recorded and asserted.
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
from guest_agent import accept, commands, dmajob, selftest, testdata
from guest_agent.ghcx_client import GhcxCallError, GhcxClient, GhcxSetupError
from guest_agent.pci import Config, enable_device, rewrite_bars
from teeio import tdi_verify
from teeio.device_regs import (
    CMD_GO,
    DEVICE_ID_REG_VALUE,
    MAX_DMA_LEN,
    DmaError,
    Irq,
    Op,
    R,
    St,
)
from teeio.ghcx import MsgType, TdiInfoResponse

PHYS = 0x1_2340_0000          # the fake huge page's bus address (above 4 GiB: HI words used)
HUGE = 2 * 1024 * 1024


# -- fakes ---------------------------------------------------------------------------------------

class FakeMemory:
    """The 2 MiB DMA buffer (commands.Buffer) that the fake device reaches by bus address."""

    def __init__(self, phys: int = PHYS) -> None:
        self.phys = phys
        self.data = bytearray(HUGE)

    def write(self, off: int, data: bytes) -> None:
        self.data[off:off + len(data)] = data

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.data[off:off + n])

    def dma_read(self, addr: int, n: int) -> bytes:
        return self.read(addr - self.phys, n)

    def dma_write(self, addr: int, data: bytes) -> None:
        self.write(addr - self.phys, data)


class FakeTsm:
    """A GHCx client whose TSM keeps one TDI and this VM's windows (tsm/daemon.py rules)."""

    def __init__(self, state: str = "RUN", windows: dict[int, dict[str, Any]] | None = None,
                 *, lock_error: GhcxCallError | None = None) -> None:
        self.vm_id = "vm0"
        self.state = state
        self.epoch = 3
        self.windows = dict(windows or {})
        self.next_window = 7
        self.calls: list[tuple[MsgType, dict[str, Any]]] = []
        self.lock_error = lock_error
        self.closed = False

    def info(self) -> dict[str, Any]:
        locked = self.state != "CONFIG_UNLOCKED"
        return {"tdi": "dev0", "state": self.state, "lock_epoch": self.epoch, "lock_flags": 1,
                "mmio_reporting_offset": 0x10_0000_0000,
                "stream": {"id": 1, "state": "secure"}, "digest_alg": "sha384",
                "digests": ({"cert_chain": "aa" * 48, "transcript": "bb" * 48,
                             "report": "cc" * 48} if locked else None),
                "tsm_boot_id": "0f" * 16,
                "reason": "device reported ERROR" if self.state == "ERROR" else None}

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = {} if payload is None else payload
        self.calls.append((mtype, payload))
        if mtype is MsgType.TDI_INFO:
            return self.info()
        if mtype is MsgType.STATUS:
            return {"boot_id": "0f" * 16, "vm_id": self.vm_id, "tdi": "dev0",
                    "state": self.state, "windows": [{"window_id": k, **v}
                                                     for k, v in sorted(self.windows.items())]}
        if mtype is MsgType.DMA_ACCEPT:
            if self.state != "RUN":
                raise GhcxCallError("state", f"TDI dev0 is {self.state}: DMA windows only in RUN")
            wid = self.next_window
            self.next_window += 1
            self.windows[wid] = {"base": payload["base"], "size": payload["size"],
                                 "access": payload["access"]}
            return {"window_id": wid}
        if mtype is MsgType.DMA_RELEASE:
            if payload["window_id"] not in self.windows:
                raise GhcxCallError("refused", "not one of this VM's")
            del self.windows[payload["window_id"]]
            return {}
        if mtype is MsgType.TDI_STOP:
            self.state, self.windows = "CONFIG_UNLOCKED", {}
            return {"state": "CONFIG_UNLOCKED"}
        if mtype is MsgType.TDI_LOCK:
            if self.lock_error is not None:
                raise self.lock_error
            if self.state != "CONFIG_UNLOCKED":
                raise GhcxCallError("state", f"TDI dev0 is {self.state}, not CONFIG_UNLOCKED")
            self.state, self.epoch = "CONFIG_LOCKED", self.epoch + 1
            return {"state": self.state, "lock_epoch": self.epoch}
        raise GhcxCallError("unknown_request", mtype.name)

    def close(self) -> None:
        self.closed = True

    def names(self) -> list[str]:
        return [m.name for m, _ in self.calls]


class FakeBar:
    """BAR0 (teeio/device_regs.py) with a DMA engine over a FakeMemory."""

    def __init__(self, mem: FakeMemory, tsm: FakeTsm | None = None, *,
                 busy_reads: int = 2, never_finish: bool = False) -> None:
        self.mem, self.tsm = mem, tsm
        self.r: dict[int, int] = dict.fromkeys(R, 0)
        self.r[R.ID] = DEVICE_ID_REG_VALUE
        self.r[R.DMA_JOBS] = 5
        self.busy_reads = busy_reads
        self.never_finish = never_finish
        self.pending = -1
        self.writes: list[tuple[int, int]] = []
        self.reads: list[int] = []

    @property
    def state(self) -> str:
        return "CONFIG_UNLOCKED" if self.tsm is None else self.tsm.state

    def answers(self) -> bool:
        return self.state in ("CONFIG_UNLOCKED", "RUN")

    def read32(self, off: int) -> int:
        self.reads.append(off)
        if not self.answers():
            return 0xFFFF_FFFF                 # Unsupported Request
        if off == R.STATUS and self.pending >= 0 and not self.never_finish:
            if self.pending == 0:
                self._complete()
            else:
                self.pending -= 1
        return self.r[R(off)]

    def write32(self, off: int, value: int) -> None:
        self.writes.append((off, value))
        if not self.answers():
            return                             # dropped
        if off == R.INT_STATUS:
            self.r[R.INT_STATUS] &= ~value
        elif off == R.DMA_CMD:
            if value & CMD_GO:
                self.r[R.STATUS] = St.BUSY
                self.pending = self.busy_reads
        elif off in (R.ID, R.STATUS, R.DMA_JOBS):
            pass
        else:
            self.r[R(off)] = value

    def _in_window(self, addr: int, n: int) -> bool:
        if self.state != "RUN":
            return True                        # T=0: no window needed
        assert self.tsm is not None
        return any(w["base"] <= addr and addr + n <= w["base"] + w["size"]
                   for w in self.tsm.windows.values())

    def _complete(self) -> None:
        self.pending = -1
        r = self.r
        src = r[R.DMA_SRC_LO] | r[R.DMA_SRC_HI] << 32
        dst = r[R.DMA_DST_LO] | r[R.DMA_DST_HI] << 32
        n, op = r[R.DMA_LEN], self.last_op()
        code = DmaError.NONE
        if not 0 < n <= MAX_DMA_LEN:
            code = DmaError.BAD_LENGTH
        elif op == Op.FILL:
            if self._in_window(dst, n):
                self.mem.dma_write(dst, testdata.fill_bytes(r[R.DMA_PATTERN], n))
            else:
                code = DmaError.FAULT
        elif op == Op.COPY:
            if self._in_window(src, n) and self._in_window(dst, n):
                self.mem.dma_write(dst, self.mem.dma_read(src, n))
            else:
                code = DmaError.FAULT
        elif op == Op.SHA256:
            if self._in_window(src, n) and self._in_window(dst, 32):
                self.mem.dma_write(dst, hashlib.sha256(self.mem.dma_read(src, n)).digest())
            else:
                code = DmaError.FAULT
        else:
            code = DmaError.BAD_OPCODE
        if code == DmaError.NONE:
            r[R.STATUS] = St.DONE
            r[R.DMA_JOBS] += 1
            r[R.INT_STATUS] |= Irq.DMA_DONE
        else:
            r[R.STATUS] = St.ERROR | code << 8
            r[R.INT_STATUS] |= Irq.DMA_ERROR

    def last_op(self) -> int:
        return next(v for o, v in reversed(self.writes) if o == R.DMA_CMD) & 0xF


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def run_dma(tsm: FakeTsm | None, *, bar_kw: dict[str, Any] | None = None,
            **opts: Any) -> tuple[dict[str, Any], FakeBar, FakeMemory]:
    mem = FakeMemory()
    bar = FakeBar(mem, tsm, **(bar_kw or {}))
    clock = FakeClock()
    res = commands.dma(commands.DmaOptions(**opts), regs=bar, buf=mem, tsm=tsm,
                       bdf="0000:01:00.0", command=(0x0, 0x6), clock=clock,
                       sleep=clock.sleep)
    return res, bar, mem


def job_writes(bar: FakeBar) -> list[tuple[int, int]]:
    """The writes from INT_ENABLE (the start of a job) on."""
    i = next(i for i, (o, _) in enumerate(bar.writes) if o == R.INT_ENABLE)
    return bar.writes[i:]


# -- dmajob: programming and decoding ------------------------------------------------------------

def test_program_writes_every_register_in_order_with_go_last() -> None:
    bar = FakeBar(FakeMemory())
    dmajob.program(bar, dmajob.Job(Op.COPY, 0x1_2345_6789, 0xFFFF_0000_1000, 100, 0xDEADBEEF))
    assert bar.writes == [(R.DMA_SRC_LO, 0x2345_6789), (R.DMA_SRC_HI, 0x1),
                          (R.DMA_DST_LO, 0x1000), (R.DMA_DST_HI, 0xFFFF),
                          (R.DMA_LEN, 100), (R.DMA_PATTERN, 0xDEADBEEF),
                          (R.DMA_CMD, CMD_GO | Op.COPY)]


def test_poll_reads_status_until_done_and_backs_off() -> None:
    mem = FakeMemory()
    bar = FakeBar(mem, busy_reads=3)
    clock = FakeClock()
    done = dmajob.run(bar, dmajob.Job(Op.FILL, 0, PHYS, 64, 0x01020304), 5.0,
                      clock=clock, sleep=clock.sleep)
    assert done.outcome == "done" and done.done and done.error_code is None
    assert done.polls == 4 and done.status == St.DONE
    assert clock.slept == [0.0005, 0.001, 0.002]         # doubling from POLL_FIRST
    assert mem.read(0, 8) == bytes([4, 3, 2, 1] * 2)
    # idle check, then interrupts off, stale bits acknowledged, the job, and its ack
    assert bar.writes[:2] == [(R.INT_ENABLE, 0), (R.INT_STATUS, Irq.DMA_DONE | Irq.DMA_ERROR)]
    assert bar.writes[-1] == (R.INT_STATUS, Irq.DMA_DONE)
    assert bar.r[R.INT_STATUS] == 0


def test_error_status_is_decoded() -> None:
    bar = FakeBar(FakeMemory())
    done = dmajob.run(bar, dmajob.Job(Op.FILL, 0, PHYS, MAX_DMA_LEN + 1), 5.0,
                      clock=FakeClock(), sleep=lambda s: None)
    assert done.outcome == "error" and done.error_code == DmaError.BAD_LENGTH
    assert done.error_name == "BAD_LENGTH"
    assert done.describe().startswith("ERROR BAD_LENGTH: length not in 1..")
    assert dmajob.decode_status(St.ERROR | 3 << 8) == "ERROR code 3 (FAULT)"
    assert dmajob.decode_status(St.BUSY) == "BUSY"
    assert dmajob.decode_status(0) == "idle"
    assert dmajob.decode_status(0xFFFF_FFFF).startswith("all ones")


def test_a_job_that_never_completes_times_out_bounded() -> None:
    bar = FakeBar(FakeMemory(), never_finish=True)
    clock = FakeClock()
    done = dmajob.run(bar, dmajob.Job(Op.FILL, 0, PHYS, 64), 2.0, clock=clock,
                      sleep=clock.sleep)
    assert done.outcome == "timeout" and not done.done
    assert 2.0 <= done.seconds <= 2.0 + dmajob.POLL_MAX
    assert max(clock.slept) <= dmajob.POLL_MAX
    assert "no completion within 2.0 s (STATUS BUSY)" in done.describe()


def test_all_ones_means_no_response_and_nothing_is_written() -> None:
    tsm = FakeTsm("ERROR")
    bar = FakeBar(FakeMemory(), tsm)
    done = dmajob.run(bar, dmajob.Job(Op.FILL, 0, PHYS, 64), 5.0, clock=FakeClock(),
                      sleep=lambda s: None)
    assert done.outcome == "no_response" and bar.writes == [] and bar.reads == [R.STATUS]


# -- the dma command -----------------------------------------------------------------------------

def test_dma_in_run_accepts_a_window_runs_t1_and_releases_it() -> None:
    tsm = FakeTsm("RUN")
    res, bar, mem = run_dma(tsm, op="fill", length=4096, pattern=0xC0DE1234)
    assert tsm.names() == ["TDI_INFO", "STATUS", "DMA_ACCEPT", "DMA_RELEASE"]
    assert tsm.calls[2][1] == {"base": PHYS, "size": HUGE, "access": "rw"}
    assert tsm.calls[3][1] == {"window_id": 7} and tsm.windows == {}
    dst = PHYS + commands.DST_OFF
    assert job_writes(bar) == [
        (R.INT_ENABLE, 0), (R.INT_STATUS, 3),
        (R.DMA_SRC_LO, 0), (R.DMA_SRC_HI, 0),
        (R.DMA_DST_LO, dst & 0xFFFF_FFFF), (R.DMA_DST_HI, dst >> 32),
        (R.DMA_LEN, 4096), (R.DMA_PATTERN, 0xC0DE1234), (R.DMA_CMD, CMD_GO | Op.FILL),
        (R.INT_STATUS, Irq.DMA_DONE)]
    assert mem.read(commands.DST_OFF, 4096) == testdata.fill_bytes(0xC0DE1234, 4096)
    assert res["ok"] and res["t_bit"] and res["stream"] == 1 and res["tdi_state"] == "RUN"
    assert res["window"] == {"window_id": 7, "base": hex(PHYS), "size": HUGE, "ours": True,
                             "released": True}
    r = res["result"]
    assert r["outcome"] == "done" and r["status"] == "0x2" and r["data_ok"] and r["landed"]
    assert (r["device_jobs_before"], r["device_jobs_after"]) == (5, 6)


def test_dma_keep_window_leaves_it_with_the_tsm() -> None:
    tsm = FakeTsm("RUN")
    res, _, _ = run_dma(tsm, keep_window=True)
    assert "DMA_RELEASE" not in tsm.names() and list(tsm.windows) == [7]
    assert "released" not in res["window"]
    assert "(accepted for this job; kept (--keep-window))" in commands.format_dma(res)


def test_dma_uses_a_window_the_vm_already_holds_and_does_not_release_it() -> None:
    tsm = FakeTsm("RUN", {3: {"base": PHYS - HUGE, "size": 4 * HUGE, "access": "rw"}})
    res, _, _ = run_dma(tsm, op="copy", length=65536, seed=0xABC)
    assert tsm.names() == ["TDI_INFO", "STATUS"] and list(tsm.windows) == [3]
    assert res["window"]["window_id"] == 3 and not res["window"]["ours"]
    assert res["ok"] and res["result"]["data_ok"]


def test_dma_sha256_writes_the_digest_of_the_seeded_source() -> None:
    tsm = FakeTsm("RUN")
    res, bar, mem = run_dma(tsm, op="sha256", length=1000, seed=0x42)
    src = testdata.stream(0x42, "dma-src", 1000)
    assert mem.read(commands.SRC_OFF, 1000) == src
    assert res["result"]["digest"] == hashlib.sha256(src).hexdigest()
    assert (R.DMA_SRC_LO, PHYS & 0xFFFF_FFFF) in bar.writes
    assert (R.DMA_CMD, CMD_GO | Op.SHA256) in bar.writes


def test_dma_without_window_in_run_is_refused_and_says_why() -> None:
    tsm = FakeTsm("RUN")
    with pytest.raises(commands.CommandFailed, match="no DMA window covers the buffer") as ei:
        run_dma(tsm, window=False)
    res = ei.value.result
    assert res is not None and tsm.names() == ["TDI_INFO"]
    r = res["result"]
    assert r["error_name"] == "FAULT" and r["status"] == hex(St.ERROR | 3 << 8)
    assert not r["landed"] and not r["data_ok"]
    assert r["device_jobs_after"] == r["device_jobs_before"]


def test_dma_releases_its_window_even_when_the_job_fails() -> None:
    tsm = FakeTsm("RUN")
    with pytest.raises(commands.CommandFailed, match="no completion within 3.0 s"):
        run_dma(tsm, timeout=3.0, bar_kw={"never_finish": True})
    assert tsm.names()[-1] == "DMA_RELEASE" and tsm.windows == {}


@pytest.mark.parametrize("state", ["ERROR", "CONFIG_LOCKED"])
def test_dma_when_the_tdi_is_not_run_fails_at_once_without_writing(state: str) -> None:
    tsm = FakeTsm(state)
    with pytest.raises(commands.CommandFailed, match=f"does not answer BAR0.*TDI is {state}"):
        run_dma(tsm)
    assert tsm.names() == ["TDI_INFO"]            # no DMA_ACCEPT outside RUN


def test_dma_unlocked_is_t0_without_a_window() -> None:
    tsm = FakeTsm("CONFIG_UNLOCKED")
    res, _, _ = run_dma(tsm, op="copy", length=300)
    assert tsm.names() == ["TDI_INFO"] and res["window"] is None and not res["t_bit"]
    assert "T=0 (TDI CONFIG_UNLOCKED" in commands.format_dma(res)


def test_dma_without_tsm() -> None:
    res, _, _ = run_dma(None, length=8)
    assert res["tdi_state"] is None and res["ok"]


def test_dma_human_output() -> None:
    res, _, _ = run_dma(FakeTsm("RUN"), op="fill", length=4096, pattern=0x11223344)
    text = commands.format_dma(res)
    dst = PHYS + commands.DST_OFF
    assert text.splitlines()[0] == ("dma fill 4096 bytes on 0000:01:00.0, TDI dev0 RUN "
                                    "(lock epoch 3)")
    for needle in (f"destination {dst:#x}", "pattern     0x11223344",
                   "DMA path    T=1 on IDE stream 1 (encrypted on the link)",
                   f"window      7: {PHYS:#x}+0x200000 (accepted for this job; released)",
                   "STATUS      0x2 (DONE)", "jobs        device counter 0x5 -> 0x6",
                   "data check  ok", "Command     0x0000 -> 0x0006"):
        assert needle in text, (needle, text)
    assert text.splitlines()[-1] == "result: DONE"


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


def _patch_cli(monkeypatch: pytest.MonkeyPatch, tsm: FakeTsm | None,
               bar_kw: dict[str, Any] | None = None) -> FakeMemory:
    mem = FakeMemory()
    bar = FakeBar(mem, tsm, **(bar_kw or {}))

    class FakeDriver:
        def __init__(self, irq: bool = True, job_timeout: float = 20.0) -> None:
            assert irq is False                 # the TEE commands never open uio
            self.dev = Path("/sys/bus/pci/devices/0000:01:00.0")
            self.mmio, self.buf, self.command = bar, mem, (0x0406, 0x0406)

    def connect() -> FakeTsm:
        if tsm is None:
            raise GhcxSetupError("no virtio-serial port named org.teeio.ghcx.0")
        return tsm

    monkeypatch.setattr(selftest, "Driver", FakeDriver)
    monkeypatch.setattr(GhcxClient, "connect", staticmethod(connect))
    return mem


def test_cli_dma_json(monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm("RUN")
    _patch_cli(monkeypatch, tsm)
    assert cli.main(["dma", "--json", "--op", "copy", "--length", "1k"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["op"] == "copy" and res["length"] == 1024
    assert res["window"]["released"] and res["bdf"] == "0000:01:00.0"
    assert res["command"] == {"before": "0x0406", "after": "0x0406"}
    assert tsm.closed


def test_cli_dma_failure_prints_the_result_and_one_error_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _patch_cli(monkeypatch, FakeTsm("ERROR"))
    assert cli.main(["dma"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith("result: FAILED: the device does not answer BAR0")
    assert err.count("\n") == 1 and err.startswith("guest_agent dma: the device does not")


def test_cli_dma_without_ghcx_port_runs_t0(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _patch_cli(monkeypatch, None)
    assert cli.main(["dma", "--length", "16"]) == 0
    out = capsys.readouterr().out
    assert "T=0 (no TSM asked" in out and "note        no GHCx (no virtio-serial port" in out


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
    _patch_cli(monkeypatch, None)
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


def _patch_accept(monkeypatch: pytest.MonkeyPatch, tsm: FakeTsm) -> list[bool]:
    drivers: list[bool] = []

    class FakeConfig:
        def __init__(self) -> None:
            self.regs = {0x10: 0xFE80_0000}
            self.writes: list[tuple[int, int, int]] = []

        def read(self, off: int, size: int) -> int:
            return self.regs[off]

        def write(self, off: int, size: int, value: int) -> None:
            self.writes.append((off, size, value))

    class FakeDriver:
        def __init__(self, irq: bool = True) -> None:
            drivers.append(irq)
            self.dev = Path("/sys/bus/pci/devices/0000:01:00.0")
            self.command = (0x0406, 0x0406)
            self.cfg = FakeConfig()

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
