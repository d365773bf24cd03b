"""Fakes for the guest agent's command tests: the device's BAR0 with its DMA engine, a DMA
buffer, a clock, and a TSM behind a GHCx client.

The device is a fake BAR0 that follows teeio/device_regs.py (a job starts on the DMA_CMD
write with GO, runs over a fake 2 MiB buffer, STATUS is BUSY for a few reads, then DONE or
ERROR with a code); in CONFIG_LOCKED / ERROR it answers all ones and drops writes, as the
device's TEE MMIO does (PCIe 6.x §11.2.1).  In RUN it refuses DMA outside the fake TSM's
windows with FAULT, as the root port does.  The TSM answers the GHCx payloads of
docs/ghcx.md "Messages" and keeps the TDI state and windows as tsm/guest_api.py does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from guest_agent import commands, selftest, testdata
from guest_agent.ghcx_client import GhcxCallError, GhcxClient, GhcxSetupError
from teeio.device_regs import (
    CMD_GO,
    DESCRIPTOR,
    DESCRIPTOR_SIZE,
    DEVICE_ID_REG_VALUE,
    MAX_BATCH,
    MAX_DMA_LEN,
    DmaError,
    Irq,
    Op,
    R,
    St,
)
from teeio.ghcx import MsgType

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
        code = self._batch(src, n) if op == Op.BATCH else self._job(op, src, dst, n,
                                                                    r[R.DMA_PATTERN])
        if code == DmaError.NONE:
            r[R.STATUS] = St.DONE
            r[R.DMA_JOBS] += 1
            r[R.INT_STATUS] |= Irq.DMA_DONE
        else:
            r[R.STATUS] = St.ERROR | code << 8
            r[R.INT_STATUS] |= Irq.DMA_ERROR

    def _batch(self, table: int, n: int) -> DmaError:
        """A BATCH: the descriptors in order, up to the first that fails."""
        if n % DESCRIPTOR_SIZE or not 0 < n <= DESCRIPTOR_SIZE * MAX_BATCH:
            return DmaError.BAD_LENGTH
        if not self._in_window(table, n):
            return DmaError.FAULT
        self.r[R.BATCH_DONE] = 0
        for op, length, src, dst, pattern, reserved in DESCRIPTOR.iter_unpack(
                self.mem.dma_read(table, n)):
            code = (DmaError.BAD_OPCODE if op == Op.BATCH or reserved
                    else self._job(op, src, dst, length, pattern))
            if code != DmaError.NONE:
                return code
            self.r[R.BATCH_DONE] += 1
        return DmaError.NONE

    def _job(self, op: int, src: int, dst: int, n: int, pattern: int) -> DmaError:
        code = DmaError.NONE
        if not 0 < n <= MAX_DMA_LEN:
            code = DmaError.BAD_LENGTH
        elif op == Op.FILL:
            if self._in_window(dst, n):
                self.mem.dma_write(dst, testdata.fill_bytes(pattern, n))
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
        return code

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


def patch_cli(monkeypatch: pytest.MonkeyPatch, tsm: FakeTsm | None,
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
