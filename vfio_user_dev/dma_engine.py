"""The device's DMA engine: the job hand-off from BAR0, the engine thread, completion and
the function's interrupt (INT_STATUS & INT_ENABLE as MSI-X vector 0 or INTx).

Jobs reach memory only through the device's link endpoint, gated per PCIe 6.x §11.2.1
(``enforcement.dma_route``; QUIESCE aborts a job, late completions of a read issued in
RUN are dropped).  A short job on the link's clear path runs at once, on the thread that
wrote GO; any other, and every BATCH, runs on the engine thread.  Design notes:
docs/device-internals.md.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from teeio import device_regs as regs
from teeio.device_regs import Irq, Op, R, St
from teeio.pcie.config import Command, Reg, Status
from teeio.tdisp.defs import TdiState
from vfio_user_dev.dma import Copy, DmaFault
from vfio_user_dev.enforcement import dma_route

if TYPE_CHECKING:
    from vfio_user_dev.bar0 import Bar0Registers
    from vfio_user_dev.device import TeeIoDevice

log = logging.getLogger("vfio_user_dev.device")     # the device model's one log

KiB = 1 << 10
#: the longest job of each kind that runs at once on the thread that wrote GO (when its
#: transfers take the link's clear path into memory this process reaches directly):
#: about as long as a register round trip costs, so that the vCPU is not held up longer
INLINE_MAX: dict[int, int] = {Op.COPY: regs.MAX_DMA_LEN, Op.FILL: regs.MAX_DMA_LEN,
                              Op.SHA256: 64 * KiB, Op.BATCH: 0}
#: the opcodes a BATCH descriptor may carry (no BATCH in a BATCH)
DESCRIPTOR_OPS = frozenset({int(Op.COPY), int(Op.FILL), int(Op.SHA256)})
_BATCH = int(Op.BATCH)
_BATCH_DONE = int(R.BATCH_DONE)
_BATCH_MAX_BYTES = regs.MAX_BATCH * regs.DESCRIPTOR_SIZE

_BUS_MASTER = int(Command.BUS_MASTER)
_COMMAND = int(Reg.COMMAND)
# Register offsets as plain ints: an IntEnum member costs a lookup on every use.
_STATUS, _INT_STATUS, _DMA_JOBS = int(R.STATUS), int(R.INT_STATUS), int(R.DMA_JOBS)
_SRC_LO, _SRC_HI, _DST_LO, _DST_HI = (int(R.DMA_SRC_LO), int(R.DMA_SRC_HI), int(R.DMA_DST_LO),
                                      int(R.DMA_DST_HI))
_LEN, _PATTERN, _INT_ENABLE = int(R.DMA_LEN), int(R.DMA_PATTERN), int(R.INT_ENABLE)
_NO_ERROR = regs.DmaError.NONE
_UNLOCKED = TdiState.CONFIG_UNLOCKED
_STATUS_REG = int(Reg.STATUS)   # its Interrupt Status bit (3) is in the low byte
_CLEAR_ROUTE = dma_route(_UNLOCKED, False, None)     # no TDISP: T=0
_COPY = int(Op.COPY)
_INTERRUPT_STATUS = int(Status.INTERRUPT_STATUS)
_DONE, _ERROR, _BUSY = int(St.DONE), int(St.ERROR), int(St.BUSY)
_DMA_DONE, _DMA_ERROR = int(Irq.DMA_DONE), int(Irq.DMA_ERROR)
_NOTIFY = "notify"      # queued after an inline job: call the listeners on the engine thread


@dataclass
class DmaJob:
    op: int
    src: int
    dst: int
    length: int
    pattern: int
    generation: int
    epoch: int = 0                  # TDI state epoch when the job was started
    t_bit: bool = False             # its requests: T=1 on the bound stream (RUN) or T=0
    stream_id: int | None = None
    refused: str | None = None      # why TDISP does not let the device issue it
    done: int = 0                   # BATCH: descriptors completed


def valid_length(op: int, length: int) -> bool:
    """DMA_LEN for *op*: 1 .. 1 MiB bytes; for a BATCH, whole descriptors, 1 .. 64."""
    if op == _BATCH:
        return 0 < length <= _BATCH_MAX_BYTES and not length % regs.DESCRIPTOR_SIZE
    return 0 < length <= regs.MAX_DMA_LEN


class DmaRefused(DmaFault):
    """The device itself does not issue (or accept the data of) a DMA request (TDISP)."""


class DmaEngine:
    """One job at a time, on its own thread or (short ones, the engine idle) at once.
    ``generation`` moves on at every reset and scrub: a job of an older generation is
    dropped, before or after it ran.  The caller holds the device lock around
    :meth:`start_job`, :meth:`finish` and :meth:`update_irq`."""

    #: the register file it runs jobs from (set by the personality that owns both)
    bar0: Bar0Registers

    def __init__(self, device: TeeIoDevice) -> None:
        self.device = device
        self.generation = 0
        self.total = {"jobs": 0, "bytes": 0, "errors": 0}
        #: jobs by where they ran: at once on the GO writer's thread, or the engine thread
        self.runs = {"inline": 0, "engine_thread": 0}
        #: called (with the device) after each job's result was applied, on the engine
        #: thread and without the device lock
        self.listeners: list[Callable[[TeeIoDevice], None]] = []
        #: whether an access to guest range (address, length) never waits for the client
        #: (no DMA_READ/DMA_WRITE message): the platform's DMA map set answers.  Until it
        #: is set, every job that touches memory runs on the engine thread.
        self.direct_memory: Callable[[int, int], bool] = lambda _address, _length: False
        #: False: every job that touches memory runs on the engine thread (to compare)
        self.memory_inline = True
        self._jobs: queue.SimpleQueue[DmaJob | str | None] = queue.SimpleQueue()
        self._queued = 0        # jobs and notifications handed to the thread, not done yet
        self.thread = threading.Thread(target=self._loop, name="dma-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._jobs.put(None)
        self.thread.join(timeout=5)

    def drop_jobs(self) -> None:
        """A queued or running job's result is dropped (reset, SCRUB_SECRETS)."""
        self.generation += 1

    # -- hand-off from BAR0 (DMA_CMD with GO) -------------------------------------------------
    def start_job(self, op: int) -> None:
        dev = self.device
        r = self.bar0.by_offset
        if r[_STATUS] & _BUSY:
            self.finish(regs.DmaError.BUSY)
            return
        r[_STATUS] = _BUSY
        tdisp = dev.tdisp
        length = r[_LEN]
        if (op == _COPY and self._queued == 0 and self.memory_inline
                and (tdisp is None or tdisp.state is _UNLOCKED)
                and 0 < length <= regs.MAX_DMA_LEN and dev.config.data[_COMMAND] & _BUS_MASTER
                and self._copy_now(r[_SRC_LO] | r[_SRC_HI] << 32, r[_DST_LO] | r[_DST_HI] << 32,
                                   length)):
            # What the general path below does for a T=0 COPY (CONFIG_UNLOCKED: any
            # requests, in the clear) that is one memmove, without its job object.
            self.runs["inline"] += 1
            self._apply(_NO_ERROR, 2 * length)
            self._notify_later()
            return
        tee = dev.tee
        job = DmaJob(op, r[_SRC_LO] | r[_SRC_HI] << 32, r[_DST_LO] | r[_DST_HI] << 32,
                     r[_LEN], r[_PATTERN], self.generation, tee.epoch)
        route = (_CLEAR_ROUTE if tdisp is None else
                 dma_route(tdisp.state, tee.tee_access, tdisp.default_stream_id))
        if isinstance(route, str):
            job.refused = route
        else:
            job.t_bit, job.stream_id = route
        # No thread switch for a job that needs no one else: it runs here, under the
        # device lock its GO holds, so no TDI transition, reset or unmap comes in between
        # (they take that lock or come from this same thread).
        if self._queued == 0 and self._inline(job):
            self.runs["inline"] += 1
            self._apply(*self._execute(job), job)
            self._notify_later()
            return
        self._queued += 1
        self._jobs.put(job)

    def _copy_now(self, src: int, dst: int, length: int) -> bool:
        """A T=0 COPY done here as one memmove on the link's clear path; False, and
        nothing done, when it is not that (a bad range included: the general path says
        why)."""
        try:
            return self.device.link_end.copy_clear(src, dst, length, direct_only=True)
        except DmaFault:
            return False

    def _inline(self, job: DmaJob) -> bool:
        """Whether *job* runs at once: it touches no memory (refused, Bus Master off, bad
        length or opcode), or it is short and its transfers take the link's clear path
        (no Secure IDE stream, nothing watching the link) into memory reached directly,
        so that it never waits for the client (whose messages this thread may serve)."""
        dev = self.device
        limit = INLINE_MAX.get(job.op)
        if (job.refused is not None or limit is None or not valid_length(job.op, job.length)
                or not dev.config.data[_COMMAND] & _BUS_MASTER):
            return True
        if job.length > limit or not self.memory_inline:
            return False
        link = dev.link_end.link
        if link is None or link.tapped or any(st.secure for st in dev.ide.streams):
            return False
        if job.op != Op.FILL and not self.direct_memory(job.src, job.length):
            return False
        return self.direct_memory(job.dst, 32 if job.op == Op.SHA256 else job.length)

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        dev = self.device
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if isinstance(job, str):
                    self._notify()
                elif job.generation == self.generation:  # else reset or scrubbed: dropped
                    self.runs["engine_thread"] += 1
                    code, moved = self._execute(job)
                    with dev.lock:
                        if job.generation != self.generation:
                            continue  # reset while running: the result is dropped
                        self._apply(code, moved, job)
                    self._notify()
            finally:
                with dev.lock:
                    self._queued -= 1

    def _notify_later(self) -> None:
        """After a job run at once: the listeners are called on the engine thread."""
        if self.listeners:
            self._queued += 1
            self._jobs.put(_NOTIFY)

    def _notify(self) -> None:
        for fn in list(self.listeners):
            try:
                fn(self.device)
            except Exception:
                log.exception("device listener failed")

    def _execute(self, job: DmaJob) -> tuple[regs.DmaError, int]:
        try:
            return self._run(job)
        except Exception:
            log.exception("DMA engine bug while running %s", job)
            return regs.DmaError.INTERNAL, 0

    def _apply(self, code: regs.DmaError, moved: int, job: DmaJob | None = None) -> None:
        """Under the device lock: a job's result in the registers, and its interrupt."""
        if job is not None and job.op == _BATCH:
            self.bar0.by_offset[_BATCH_DONE] = job.done
        self.total["bytes"] += moved
        self.bar0.add_bytes(moved)
        self.finish(code)

    def _run(self, job: DmaJob) -> tuple[regs.DmaError, int]:
        """The job's transfers and result (a T=0 COPY as one memmove where it can)."""
        dev = self.device
        if not dev.config.data[_COMMAND] & _BUS_MASTER:
            return regs.DmaError.BUS_MASTER_OFF, 0
        if job.refused is not None:     # §11.2.1: no requests in CONFIG_LOCKED / ERROR
            with dev.lock:
                dev.tee.refusals.add("dma_not_allowed", f"{job.refused}: nothing sent")
            return regs.DmaError.FAULT, 0
        if not valid_length(job.op, job.length):
            return regs.DmaError.BAD_LENGTH, 0
        try:
            if job.op == Op.COPY:
                if not job.t_bit and job.stream_id is None:
                    self._check(job)
                    if dev.link_end.copy_clear(job.src, job.dst, job.length):
                        return regs.DmaError.NONE, 2 * job.length
                data = self._read(job, job.src, job.length)
                self._write(job, job.dst, data)
                return regs.DmaError.NONE, 2 * job.length
            if job.op == Op.FILL:
                self._write(job, job.dst, fill_pattern(job.pattern, job.length))
                return regs.DmaError.NONE, job.length
            if job.op == Op.SHA256:
                digest = hashlib.sha256(self._read(job, job.src, job.length)).digest()
                self._write(job, job.dst, digest)
                return regs.DmaError.NONE, job.length + len(digest)
            if job.op == _BATCH:
                return self._run_batch(job)
        except DmaFault as exc:
            log.warning("DMA fault: %s", exc)
            return regs.DmaError.FAULT, 0
        return regs.DmaError.BAD_OPCODE, 0

    def _run_batch(self, job: DmaJob) -> tuple[regs.DmaError, int]:
        """A BATCH: its descriptor list read like any of the job's reads, then each
        descriptor run as a job of its own with the batch's route and TDI epoch (so that
        QUIESCE stops the rest), up to the first that fails (``job.done``: how many
        completed).  A run of T=0 COPYs on the link's clear path goes as memmoves, the
        gates looked at once for the run and the job's own (TDI epoch, reset, Bus Master)
        before each; whatever that way does not take runs as any job does."""
        descs = list(regs.DESCRIPTOR.iter_unpack(self._read(job, job.src, job.length)))
        moved = job.length
        clear = not job.t_bit and job.stream_id is None
        i = 0
        while i < len(descs) and job.generation == self.generation:  # else reset: dropped
            if clear:
                copies = list(_copy_run(descs, i))
                done = self._copy_many(job, copies) if copies else 0
                if done:
                    moved += 2 * sum(c[2] for c in copies[:done])
                    job.done += done
                    i += done
                    continue
                if job.generation != self.generation:
                    break       # what stopped the run: a reset
            op, length, src, dst, pattern, reserved = descs[i]
            if op not in DESCRIPTOR_OPS or reserved:
                return regs.DmaError.BAD_OPCODE, moved
            code, n = self._run(DmaJob(op, src, dst, length, pattern, job.generation,
                                       job.epoch, job.t_bit, job.stream_id))
            if code is not _NO_ERROR:
                return code, moved
            moved += n
            job.done += 1
            i += 1
        return _NO_ERROR, moved

    def _copy_many(self, job: DmaJob, copies: list[Copy]) -> int:
        """T=0 COPYs of *job* (a BATCH) as memmoves while its own gates hold."""
        dev = self.device
        tee, config = dev.tee, dev.config

        def proceed() -> bool:
            return (job.generation == self.generation and job.epoch == tee.epoch
                    and bool(config.data[_COMMAND] & _BUS_MASTER))
        try:
            return dev.link_end.copy_clear_many(copies, proceed)
        except DmaFault:
            return 0            # the general path says why

    def _check(self, job: DmaJob) -> None:
        """QUIESCE: a job whose TDI changed state since it started issues nothing more."""
        tee = self.device.tee
        if job.epoch != tee.epoch:
            with self.device.lock:
                tee.refusals.add("dma_aborted", f"job (opcode {job.op}): the TDI changed "
                                                "state since it started")
            raise DmaRefused("DMA job aborted: the TDI changed state (QUIESCE)")

    def _read(self, job: DmaJob, address: int, length: int) -> bytes:
        self._check(job)
        tee = self.device.tee
        data = self.device.link_end.read(address, length, t_bit=job.t_bit,
                                         stream_id=job.stream_id)
        if job.t_bit and job.epoch != tee.epoch:
            # §11.2.1: completions of a read issued in RUN only while still in that RUN.
            with self.device.lock:
                tee.refusals.add("dma_late_completion", f"read {address:#x}+{length}: the "
                                 "TDI left RUN before its completions arrived; dropped")
            raise DmaRefused("completions arrived after the TDI left RUN: dropped")
        return data

    def _write(self, job: DmaJob, address: int, data: bytes) -> None:
        self._check(job)
        self.device.link_end.write(address, data, t_bit=job.t_bit, stream_id=job.stream_id)

    # -- completion and the function's interrupt ------------------------------------------------
    def finish(self, code: regs.DmaError) -> None:
        r = self.bar0.by_offset
        if code is _NO_ERROR:
            r[_STATUS] = _DONE
            bit = _DMA_DONE
            r[_DMA_JOBS] = (r[_DMA_JOBS] + 1) & 0xFFFFFFFF
            self.total["jobs"] += 1
        else:
            busy = r[_STATUS] & _BUSY if code == regs.DmaError.BUSY else 0
            r[_STATUS] = busy | _ERROR | (int(code) << 8)
            bit = _DMA_ERROR
            self.total["errors"] += 1
        r[_INT_STATUS] |= bit
        self.update_irq(bit)

    def update_irq(self, new_bits: int) -> None:
        """Signal INT_STATUS & INT_ENABLE: MSI-X vector 0 on a new event when it is ready
        (INTx then never asserted, §7.7.2.2), else the INTx level and Status Interrupt
        Status (§7.5.1.2)."""
        dev = self.device
        r, config, irq = self.bar0.by_offset, dev.config, dev.irq
        level = r[_INT_STATUS] & r[_INT_ENABLE]
        if irq.msix_ready(0):
            if config.data[_STATUS_REG] & _INTERRUPT_STATUS:
                config.poke(Reg.STATUS, 2, config.get(Reg.STATUS, 2) & ~_INTERRUPT_STATUS)
            if irq.intx_asserted:
                irq.set_intx(False)  # a function using MSI-X never asserts INTx
            if new_bits & r[_INT_ENABLE]:
                irq.raise_msix(0)
            return
        status = config.get(Reg.STATUS, 2) & ~_INTERRUPT_STATUS
        if level:
            status |= _INTERRUPT_STATUS
        config.poke(Reg.STATUS, 2, status)
        irq.set_intx(bool(level), event=bool(new_bits & r[R.INT_ENABLE]))


def _copy_run(descs: list[tuple[int, ...]], start: int) -> Iterator[Copy]:
    """The COPY descriptors from *start* on that are well formed, as (source,
    destination, length), up to the first that is not."""
    for op, length, src, dst, _pattern, reserved in descs[start:]:
        if op != _COPY or reserved or not valid_length(op, length):
            return
        yield src, dst, length


def fill_pattern(pattern: int, length: int) -> bytes:
    """*length* bytes of the 32-bit *pattern* repeated little-endian (FILL)."""
    pat = pattern.to_bytes(4, "little")
    data = pat * (length >> 2)
    return data + pat[:length & 3] if length & 3 else data
