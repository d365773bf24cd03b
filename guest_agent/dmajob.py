"""One DMA job on the device's BAR0 engine (:mod:`teeio.device_regs`), completed by polling.

Polling, not INTx (docs/design.md decision 8): closing uio would clear Bus Master Enable, a
TDISP security event (PCIe 6.x §11.2.6).  A STATUS of all ones is an Unsupported Request
(§11.2.1): the job never started.  Every wait is bounded.  Only :class:`Regs`
(``read32`` / ``write32``) is touched, so tests drive a fake BAR.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from teeio.device_regs import CMD_GO, MAX_DMA_LEN, DmaError, Irq, Op, R, St

ALL_ONES = 0xFFFF_FFFF
JOB_TIMEOUT = 20.0          # seconds; a 1 MiB job over the IDE link under TCG takes ~1 s
POLL_FIRST = 0.0005         # the first poll interval; doubled up to POLL_MAX
POLL_MAX = 0.02

#: What each STATUS.ERROR_CODE means (teeio/device_regs.py DmaError).
ERROR_TEXT = {
    DmaError.NONE: "no error",
    DmaError.BAD_OPCODE: "unknown opcode",
    DmaError.BAD_LENGTH: f"length not in 1..{MAX_DMA_LEN}",
    DmaError.FAULT: "the DMA was refused or faulted (an address no DMA map covers; in RUN "
                    "also no DMA window for it at the root port, or the TDI not in RUN)",
    DmaError.BUS_MASTER_OFF: "Bus Master Enable is clear in the Command register",
    DmaError.BUSY: "GO while a job was still running",
    DmaError.INTERNAL: "an emulator bug (see the device server's log)",
}


class Regs(Protocol):
    """BAR0 as 32-bit registers (guest_agent.pci.Mmio, or a fake)."""

    def read32(self, off: int) -> int: ...

    def write32(self, off: int, value: int) -> None: ...


@dataclass(frozen=True)
class Job:
    op: Op
    src: int
    dst: int
    length: int
    pattern: int = 0


@dataclass
class Completion:
    """How a job ended.  ``outcome``: ``done``, ``error`` (STATUS.ERROR with a code),
    ``no_response`` (STATUS read all ones: MMIO not served) or ``timeout`` (still BUSY, or
    never started, when the timeout ran out)."""

    outcome: str
    status: int
    int_status: int
    seconds: float
    polls: int

    @property
    def done(self) -> bool:
        return self.outcome == "done"

    @property
    def error_code(self) -> int | None:
        if self.outcome != "error":
            return None
        return (self.status >> 8) & 0xFF

    @property
    def error_name(self) -> str | None:
        code = self.error_code
        if code is None:
            return None
        try:
            return DmaError(code).name
        except ValueError:
            return f"code {code}"

    def describe(self) -> str:
        """One line: what STATUS says."""
        if self.outcome == "no_response":
            return ("STATUS reads all ones: the device does not answer BAR0 (Unsupported "
                    "Request): TEE MMIO is closed, the TDI is not RUN (or CONFIG_UNLOCKED)")
        if self.outcome == "timeout":
            return (f"no completion within {self.seconds:.1f} s "
                    f"(STATUS {decode_status(self.status)})")
        if self.outcome == "error":
            code = self.error_code or 0
            text = next((t for c, t in ERROR_TEXT.items() if c == code), "unknown code")
            return f"ERROR {self.error_name}: {text}"
        return "DONE"

    def as_dict(self) -> dict[str, object]:
        return {"outcome": self.outcome, "status": hex(self.status),
                "status_decoded": decode_status(self.status),
                "int_status": hex(self.int_status), "error_code": self.error_code,
                "error_name": self.error_name, "seconds": round(self.seconds, 4),
                "polls": self.polls}


def decode_status(status: int) -> str:
    """STATUS as text: ``BUSY|DONE|ERROR``, the error code, or ``all ones``."""
    if status == ALL_ONES:
        return "all ones (Unsupported Request)"
    bits = [b.name for b in (St.BUSY, St.DONE, St.ERROR) if status & b and b.name]
    text = "|".join(bits) or "idle"
    if status & St.ERROR:
        code = (status >> 8) & 0xFF
        try:
            text += f" code {code} ({DmaError(code).name})"
        except ValueError:
            text += f" code {code}"
    return text


def program(regs: Regs, job: Job) -> None:
    """Program one job and start it (DMA_CMD with GO last: the write that starts it)."""
    regs.write32(R.DMA_SRC_LO, job.src & 0xFFFF_FFFF)
    regs.write32(R.DMA_SRC_HI, (job.src >> 32) & 0xFFFF_FFFF)
    regs.write32(R.DMA_DST_LO, job.dst & 0xFFFF_FFFF)
    regs.write32(R.DMA_DST_HI, (job.dst >> 32) & 0xFFFF_FFFF)
    regs.write32(R.DMA_LEN, job.length)
    regs.write32(R.DMA_PATTERN, job.pattern & 0xFFFF_FFFF)
    regs.write32(R.DMA_CMD, CMD_GO | int(job.op))


def poll(regs: Regs, timeout: float, *, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep, started: float | None = None,
         ) -> Completion:
    """Read STATUS until the job completes, MMIO is not served, or *timeout* runs out."""
    t0 = clock() if started is None else started
    interval = POLL_FIRST
    polls = 0
    while True:
        status = regs.read32(R.STATUS)
        polls += 1
        elapsed = clock() - t0
        if status == ALL_ONES:
            return Completion("no_response", status, ALL_ONES, elapsed, polls)
        if not status & St.BUSY and status & (St.DONE | St.ERROR):
            outcome = "error" if status & St.ERROR else "done"
            return Completion(outcome, status, regs.read32(R.INT_STATUS), elapsed, polls)
        if elapsed >= timeout:
            return Completion("timeout", status, regs.read32(R.INT_STATUS), elapsed, polls)
        sleep(min(interval, max(0.0, timeout - elapsed)))
        interval = min(interval * 2, POLL_MAX)


def wait_idle(regs: Regs, timeout: float, *, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> int:
    """STATUS once BUSY is clear (or all ones, or whatever it is at the timeout)."""
    end = clock() + timeout
    interval = POLL_FIRST
    while True:
        status = regs.read32(R.STATUS)
        if status == ALL_ONES or not status & St.BUSY or clock() >= end:
            return status
        sleep(interval)
        interval = min(interval * 2, POLL_MAX)


def run(regs: Regs, job: Job, timeout: float = JOB_TIMEOUT, *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep) -> Completion:
    """One job, polled: idle wait, interrupts off, INT_STATUS acknowledged, program, poll,
    acknowledge.  Never longer than about 2 x *timeout*.  Nothing is written when STATUS
    already reads all ones (``no_response``)."""
    t0 = clock()
    idle = wait_idle(regs, timeout, clock=clock, sleep=sleep)
    if idle == ALL_ONES:            # MMIO not served: nothing written, nothing started
        return Completion("no_response", idle, ALL_ONES, clock() - t0, 1)
    if idle & St.BUSY:              # an earlier job still running: GO would be refused
        return Completion("timeout", idle, regs.read32(R.INT_STATUS), clock() - t0, 1)
    regs.write32(R.INT_ENABLE, 0)                       # polled: the device asserts no INTx
    regs.write32(R.INT_STATUS, Irq.DMA_DONE | Irq.DMA_ERROR)    # RW1C: stale bits off
    program(regs, job)
    done = poll(regs, timeout, clock=clock, sleep=sleep)
    if done.outcome in ("done", "error"):
        regs.write32(R.INT_STATUS, done.int_status & (Irq.DMA_DONE | Irq.DMA_ERROR))
    return done
