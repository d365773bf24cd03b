"""The guest agent's dma command (guest_agent/commands.py, dmajob.py): the job programmed
register by register, polling and status decoding, the DMA window asked for in RUN and
released, refusals outside RUN, human and JSON output.  Every register write is recorded
and asserted (fakes: tests/unit/guest_fakes.py).
"""

from __future__ import annotations

import hashlib
import json

import pytest

import guest_agent.__main__ as cli
from guest_agent import commands, dmajob, testdata
from teeio.device_regs import (
    CMD_GO,
    MAX_DMA_LEN,
    DmaError,
    Irq,
    Op,
    R,
    St,
)
from tests.unit.guest_fakes import (
    HUGE,
    PHYS,
    FakeBar,
    FakeClock,
    FakeMemory,
    FakeTsm,
    job_writes,
    patch_cli,
    run_dma,
)

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



def test_cli_dma_json(monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    tsm = FakeTsm("RUN")
    patch_cli(monkeypatch, tsm)
    assert cli.main(["dma", "--json", "--op", "copy", "--length", "1k"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["op"] == "copy" and res["length"] == 1024
    assert res["window"]["released"] and res["bdf"] == "0000:01:00.0"
    assert res["command"] == {"before": "0x0406", "after": "0x0406"}
    assert tsm.closed


def test_cli_dma_failure_prints_the_result_and_one_error_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    patch_cli(monkeypatch, FakeTsm("ERROR"))
    assert cli.main(["dma"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith("result: FAILED: the device does not answer BAR0")
    assert err.count("\n") == 1 and err.startswith("guest_agent dma: the device does not")


def test_cli_dma_without_ghcx_port_runs_t0(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    patch_cli(monkeypatch, None)
    assert cli.main(["dma", "--length", "16"]) == 0
    out = capsys.readouterr().out
    assert "T=0 (no TSM asked" in out and "note        no GHCx (no virtio-serial port" in out
