"""The NVMe controller (NVMe 1.4 §3.1 registers, §7.6 initialisation and shutdown): BAR0
registers and doorbells in, commands fetched and completed by one worker thread.

The controller reaches guest memory and interrupts only through a :class:`Bus` the device
provides, so every SQ fetch, PRP list, data transfer and CQ post crosses the device's
link and root port (and is refused there when the TDI does not allow it)."""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Protocol

from vfio_user_dev.nvme import admin, io
from vfio_user_dev.nvme.commands import Command, completion
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.nvme.prp import segments
from vfio_user_dev.nvme.queues import CompletionQueue, SubmissionQueue
from vfio_user_dev.nvme.spec import (
    CAP_VALUE,
    CC_EN,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CC_WRITABLE,
    CQE_SIZE,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_COMPLETE,
    DOORBELL_BASE,
    IO_QUEUES,
    PAGE,
    SQE_SIZE,
    VERSION,
    CommandError,
    Feature,
    Reg,
    Status,
)

log = logging.getLogger(__name__)

BAR0_SIZE = 0x4000      # registers + doorbells for IO_QUEUES + 1 queue pairs, 16 KiB


class Bus(Protocol):
    """What the controller needs from the device around it."""

    def begin_command(self) -> None:
        """A command is about to be fetched: its DMA (fetch, PRP lists, data, completion)
        goes out as the device allows now, and not at all once that changed (QUIESCE)."""

    def dma_read(self, address: int, length: int) -> bytes: ...

    def dma_write(self, address: int, data: bytes) -> None: ...

    def interrupt(self, vector: int) -> None:
        """Signal MSI-X *vector* (the device drops it when MSI-X is off)."""

    def msix_enabled(self) -> bool: ...

    def set_intx(self, level: bool) -> None: ...


class DmaFailed(Exception):
    """A DMA the bus refused or faulted (the bus raises any exception it likes)."""


class NvmeController:
    def __init__(self, bus: Bus, namespace: Namespace, serial: str = "TEEIO0001",
                 vectors: int = IO_QUEUES + 1) -> None:
        self.bus = bus
        self.namespace = namespace
        self.serial = serial
        self.vectors = vectors
        self.io_queue_limit = IO_QUEUES
        self.started = time.monotonic()
        self.errors = 0
        self._lock = threading.Condition()
        self._generation = 0
        self._stop = False
        self._reset_state()
        self.aqa = self.asq = self.acq = 0
        self.stats = {"commands": 0, "errors": 0, "bad_doorbells": 0}
        self._worker = threading.Thread(target=self._run, name="nvme-controller", daemon=True)
        self._worker.start()

    def _reset_state(self) -> None:
        self.cc = 0
        self.csts = 0
        self.intms = 0
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.features: dict[Feature, int] = {}
        self.aers: list[int] = []
        self._generation += 1

    # -- registers (BAR0) ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            regs = struct.pack("<QIIIIIIIIQQ", CAP_VALUE, VERSION, self.intms, self.intms,
                               self.cc, 0, self.csts, 0, self.aqa, self.asq, self.acq)
        regs = regs.ljust(DOORBELL_BASE, b"\0")
        if offset + size <= len(regs):
            return regs[offset:offset + size]
        return bytes(size)                               # doorbells read as zero

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset >= DOORBELL_BASE:
            self._doorbell(offset - DOORBELL_BASE, value & 0xFFFF)
            return
        with self._lock:
            if offset == Reg.CC and len(data) == 4:
                self._write_cc(value & CC_WRITABLE)
            elif offset == Reg.INTMS:
                self.intms |= value
            elif offset == Reg.INTMC:
                self.intms &= ~value
            elif offset == Reg.AQA:
                self.aqa = value & 0x0FFF0FFF
            elif offset in (Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4):
                base = Reg.ASQ if offset < Reg.ACQ else Reg.ACQ
                cur = self.asq if base == Reg.ASQ else self.acq
                shift = 8 * (offset - base)
                mask = ((1 << (8 * len(data))) - 1) << shift
                new = (cur & ~mask | value << shift) & ~(PAGE - 1) & (1 << 64) - 1
                if base == Reg.ASQ:
                    self.asq = new
                else:
                    self.acq = new
        self._update_intx()

    def _write_cc(self, value: int) -> None:
        was = self.cc
        self.cc = value
        if value & CC_EN and not was & CC_EN:
            asqs, acqs = (self.aqa & 0xFFF) + 1, (self.aqa >> 16) + 1
            if asqs < 2 or acqs < 2 or (value >> 7) & 0xF or (value >> 4) & 0x7:
                self.csts |= CSTS_CFS                    # §7.6.1: bad admin set-up or MPS
                return
            self.cqs[0] = CompletionQueue(0, self.acq, acqs)
            self.sqs[0] = SubmissionQueue(0, self.asq, asqs, 0)
            self.cqs[0].sqs.add(0)
            self.csts = CSTS_RDY
            self._lock.notify_all()
        elif was & CC_EN and not value & CC_EN:          # controller reset (§7.3.2)
            self._controller_reset(keep_cc=value)
        if (value >> CC_SHN_SHIFT) & CC_SHN_MASK:        # shutdown notification (§7.6.2)
            self.namespace.flush()
            self.csts |= CSTS_SHST_COMPLETE

    def _controller_reset(self, keep_cc: int = 0) -> None:
        aqa, asq, acq = self.aqa, self.asq, self.acq
        self._reset_state()
        self.cc = keep_cc & ~CC_EN
        self.aqa, self.asq, self.acq = aqa, asq, acq

    def reset(self) -> None:
        """Function-level reset or the device's reset: every register to its default."""
        with self._lock:
            self._reset_state()
            self.aqa = self.asq = self.acq = 0
        self.bus.set_intx(False)

    def _doorbell(self, rel: int, value: int) -> None:
        qid, is_cq = rel // 8, rel % 8 == 4
        with self._lock:
            if not self.cc & CC_EN or rel % 4:
                self.stats["bad_doorbells"] += 1
                return
            q: SubmissionQueue | CompletionQueue | None = \
                self.cqs.get(qid) if is_cq else self.sqs.get(qid)
            if q is None or value >= q.size:
                self.stats["bad_doorbells"] += 1          # §4.1: invalid doorbell write
                return
            if isinstance(q, CompletionQueue):
                q.head = value
            else:
                q.tail = value
            self._lock.notify_all()
        self._update_intx()

    def _update_intx(self) -> None:
        """INTx (§7.5.1): asserted while an interrupt-enabled CQ holds entries the host has
        not consumed and vector 0 is not masked; never with MSI-X."""
        if self.bus.msix_enabled():
            return
        with self._lock:
            level = not self.intms & 1 and any(
                cq.irq_enabled and cq.pending() for cq in self.cqs.values())
        self.bus.set_intx(level)

    # -- the worker ------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._worker.join(5)

    def _next(self) -> tuple[SubmissionQueue, CompletionQueue, int, int] | None:
        if not self.csts & CSTS_RDY or self.csts & CSTS_CFS:
            return None
        for qid in sorted(self.sqs):
            sq = self.sqs[qid]
            cq = self.cqs.get(sq.cqid)
            if cq is not None and not sq.empty() and not cq.full():
                return sq, cq, sq.take(), self._generation
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                work = self._next()
                while work is None and not self._stop:
                    self._lock.wait()
                    work = self._next()
                if self._stop:
                    return
            assert work is not None
            self._process(*work)

    def _process(self, sq: SubmissionQueue, cq: CompletionQueue, addr: int,
                 generation: int) -> None:
        self.bus.begin_command()
        try:
            cmd = Command.decode(self.bus.dma_read(addr, SQE_SIZE))
        except Exception as exc:           # noqa: BLE001 - any bus refusal is fatal here
            self._fatal(f"SQ {sq.qid} fetch at {addr:#x}: {exc}")
            return
        status, dw0 = Status.SUCCESS, 0
        try:
            dw0 = (admin.execute if sq.qid == 0 else io.execute)(self, cmd)
        except CommandError as exc:
            status = exc.status
            log.info("NVMe %s command %#x (cid %d) on SQ %d: %s", "admin" if sq.qid == 0
                     else "I/O", cmd.opcode, cmd.cid, sq.qid, exc)
        except DmaFailed as exc:
            status = Status.DATA_TRANSFER_ERROR
            log.warning("NVMe command %#x (cid %d) data transfer: %s", cmd.opcode, cmd.cid,
                        exc)
        except Exception:
            status = Status.INTERNAL_ERROR
            log.exception("NVMe command %#x (cid %d) failed", cmd.opcode, cmd.cid)
        self.stats["commands"] += 1
        if status != Status.SUCCESS:
            self.stats["errors"] += 1
            self.errors += 1
        if dw0 == admin.HELD and status == Status.SUCCESS:
            return
        self._complete(sq, cq, cmd.cid, dw0, status, generation)

    def _complete(self, sq: SubmissionQueue, cq: CompletionQueue, cid: int, dw0: int,
                  status: Status, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return                       # reset since it was fetched: no completion
            entry = completion(dw0, sq.head, sq.qid, cid, cq.phase, status.dw3_bits())
            slot = cq.base + cq.tail * CQE_SIZE
        try:
            self.bus.dma_write(slot, entry)
        except Exception as exc:             # noqa: BLE001
            self._fatal(f"CQ {cq.qid} post at {slot:#x}: {exc}")
            return
        with self._lock:
            if generation != self._generation:
                return
            cq.advance()
            vector, enabled = cq.vector, cq.irq_enabled
        if enabled:
            if self.bus.msix_enabled():
                self.bus.interrupt(vector)
            else:
                self._update_intx()

    def _fatal(self, why: str) -> None:
        log.warning("NVMe controller fatal status: %s", why)
        with self._lock:
            self.csts |= CSTS_CFS

    # -- data transfer for the command sets -------------------------------------------------
    def dma_read(self, address: int, length: int) -> bytes:
        try:
            return self.bus.dma_read(address, length)
        except Exception as exc:             # noqa: BLE001 - the bus's refusal, whatever it is
            raise DmaFailed(str(exc)) from exc

    def gather(self, cmd: Command, length: int) -> bytes:
        return b"".join(self.dma_read(a, n)
                        for a, n in segments(cmd.prp1, cmd.prp2, length, self.dma_read))

    def scatter(self, cmd: Command, data: bytes) -> None:
        done = 0
        for a, n in segments(cmd.prp1, cmd.prp2, len(data), self.dma_read):
            try:
                self.bus.dma_write(a, data[done:done + n])
            except Exception as exc:         # noqa: BLE001
                raise DmaFailed(str(exc)) from exc
            done += n

    def status(self) -> dict[str, object]:
        with self._lock:
            return {"cc": self.cc, "csts": self.csts, "io_sqs": sorted(self.sqs)[1:],
                    "io_cqs": sorted(self.cqs)[1:], **self.stats,
                    "namespace": dict(self.namespace.counters)}


