"""The device server of ``bench.bench`` in its own process, with probes on the steps of a
DMA job, so that round trips are measured with the client out of process and the
server's side of each step inside it.

Run as ``python -m bench.dma_server SOCKET``: it serves one vfio-user client on SOCKET
and answers one command per line on stdin with one JSON line on stdout: ``reset``
(forget the samples), ``report`` (the samples since the last reset, summarised), ``cpu``
(this process's CPU time so far, all threads),
``threaded`` / ``default`` (where jobs run, see :func:`control`), ``quit``.

Probes, each timing wall clock (``perf_counter_ns``) and this thread's CPU time
(``thread_time_ns``):

* ``transport``: reading each message off the socket and sending each reply (CPU only:
  the wall time of a read includes waiting for the client);
* ``register_write``, ``register_read``, ``go_write``: the session's handling of a
  REGION_WRITE / REGION_READ to BAR0 (decode, the platform's path to the register,
  reply), a GO write without the job it starts;
* ``start_job``: the engine's hand-off (job, route, where it runs), without the DMA and
  completion inside it when the job runs at once; ``handoff_wait``: for a job on the
  engine thread, from the end of ``start_job`` until the thread starts it (wall);
* ``dma``: the job's transfers (the engine's ``_run``, or its COPY fast path's
  ``_copy_now``); ``completion``: STATUS, counters,
  INT_STATUS (``finish`` without ``update_irq``); ``interrupt``: ``update_irq`` (MSI-X
  vector 0 or INTx, the eventfd write);
* ``job``: from the start of ``start_job`` to the end of ``finish`` (wall), the engine's
  time for one job on the server.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from teeio.device_regs import R
from vfio_user_dev import protocol as p
from vfio_user_dev import server as server_mod
from vfio_user_dev.dma_engine import DmaEngine
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import Command, Header, PciRegion
from vfio_user_dev.server import Server
from vfio_user_dev.session import Session

wall, cpu = time.perf_counter_ns, time.thread_time_ns


class Probes:
    """Samples (wall ns, CPU ns) by step; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self.local = threading.local()
        self.pending_go: collections.deque[tuple[int, int]] = collections.deque()
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, step: str, w: int, c: int) -> None:
        with self._lock:
            self.samples[step].append((w, c))

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def nested(self) -> list[int]:
        """This thread's time spent in probed calls nested in the current one."""
        acc: list[int] | None = getattr(self.local, "nested", None)
        if acc is None:
            acc = self.local.nested = [0, 0]
        return acc

    def reset(self) -> None:
        with self._lock:
            self.samples.clear()
            self.counts.clear()

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {"steps": {step: summarise(s) for step, s in self.samples.items()},
                    "counts": dict(self.counts)}


def summarise(samples: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Medians and 10th percentiles in microseconds, and the count."""
    walls = sorted(s[0] for s in samples)
    cpus = sorted(s[1] for s in samples)
    return {"n": len(samples),
            "wall_median_us": round(statistics.median(walls) / 1000, 3),
            "wall_p10_us": round(walls[len(walls) // 10] / 1000, 3),
            "cpu_median_us": round(statistics.median(cpus) / 1000, 3),
            "cpu_p10_us": round(cpus[len(cpus) // 10] / 1000, 3)}


def _bar0_access(hdr: Header, payload: bytes) -> str | None:
    """The step a message is: a BAR0 register write, GO write or register read."""
    if hdr.command not in (Command.REGION_WRITE, Command.REGION_READ):
        return None
    access = p.RegionAccess.decode(payload, with_data=hdr.command == Command.REGION_WRITE)
    if access.region != PciRegion.BAR0:
        return None
    if hdr.command == Command.REGION_READ:
        return "register_read"
    return "go_write" if access.offset == R.DMA_CMD else "register_write"


def install(platform: Platform, probes: Probes) -> None:
    """Wrap the steps of this process's session, transport and the platform's engine."""
    handle = Session.handle

    def timed_handle(self: Session, hdr: Header, payload: bytes, fds: list[int]) -> Any:
        acc = probes.nested()
        acc[0] = acc[1] = 0
        w0, c0 = wall(), cpu()
        out = handle(self, hdr, payload, fds)
        w, c = wall() - w0 - acc[0], cpu() - c0 - acc[1]
        probes.count("messages")
        step = _bar0_access(hdr, payload)
        if step is not None:
            probes.add(step, w, c)
        return out

    Session.handle = timed_handle                             # type: ignore[method-assign]
    region_access = Session.region_access

    def timed_region_access(self: Session, msg_id: int, command: int, buf: memoryview,
                            at: int, size: int, posted: bool = False) -> bytes | None:
        acc = probes.nested()
        acc[0] = acc[1] = 0
        w0, c0 = wall(), cpu()
        out = region_access(self, msg_id, command, buf, at, size, posted)
        if out is None and not posted:    # not taken on the hot path: handle() counts it
            return out
        w, c = wall() - w0 - acc[0], cpu() - c0 - acc[1]
        probes.count("messages")
        offset, region, _count = p.REGION_RW.unpack_from(buf, at + p.HEADER_SIZE)
        if region == PciRegion.BAR0:
            step = "register_read" if command == Command.REGION_READ else (
                "go_write" if offset == R.DMA_CMD else "register_write")
            probes.add(step, w, c)
        return out

    Session.region_access = timed_region_access               # type: ignore[method-assign]
    inbox_init = server_mod.Inbox.__init__

    def timed_inbox_init(self: server_mod.Inbox, sock: Any, *args: Any, **kwargs: Any) -> None:
        inbox_init(self, _TimedSocket(sock, probes), *args, **kwargs)  # type: ignore[arg-type]

    server_mod.Inbox.__init__ = timed_inbox_init              # type: ignore[method-assign]
    recv_exact, send_all = server_mod.recv_exact, server_mod.send_all

    def timed_recv(*args: Any, **kwargs: Any) -> bytes:
        c0 = cpu()
        try:
            return recv_exact(*args, **kwargs)
        finally:
            probes.count("transport_cpu_ns", cpu() - c0)

    def timed_send(*args: Any, **kwargs: Any) -> None:
        c0 = cpu()
        try:
            send_all(*args, **kwargs)
        finally:
            probes.count("transport_cpu_ns", cpu() - c0)

    server_mod.recv_exact = timed_recv
    server_mod.send_all = timed_send
    _install_engine(platform.device.engine, probes)
    platform.device.bar0.go = platform.device.engine.start_job


class _TimedSocket:
    """The connection's socket as the Inbox sees it: reads counted as transport time."""

    def __init__(self, sock: Any, probes: Probes) -> None:
        self._sock, self._probes = sock, probes

    def recvmsg_into(self, *args: Any) -> Any:
        c0 = cpu()
        try:
            return self._sock.recvmsg_into(*args)
        finally:
            self._probes.count("transport_cpu_ns", cpu() - c0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _install_engine(engine: DmaEngine, probes: Probes) -> None:
    start_job, run, finish, update_irq = (engine.start_job, engine._run, engine.finish,
                                          engine.update_irq)
    copy_now = engine._copy_now
    local = probes.local

    def timed_start_job(op: int) -> None:
        local.in_start, local.inner, local.ran, local.finished = True, [0, 0], False, False
        w0, c0 = wall(), cpu()
        local.job_start = w0
        try:
            start_job(op)
        finally:
            w1, c1 = wall(), cpu()
            local.in_start = False
            inner = local.inner
            probes.add("start_job", w1 - w0 - inner[0], c1 - c0 - inner[1])
            acc = probes.nested()
            acc[0] += w1 - w0
            acc[1] += c1 - c0
            if not local.ran and not local.finished:     # queued for the engine thread
                probes.pending_go.append((w0, w1))

    def timed_run(job: Any) -> Any:
        inline = getattr(local, "in_start", False)
        w0, c0 = wall(), cpu()
        if inline:
            local.ran = True
            local.this_job = local.job_start
            probes.count("jobs_inline")
        else:
            start, end = probes.pending_go.popleft()
            probes.add("handoff_wait", w0 - end, 0)
            local.this_job = start
            probes.count("jobs_engine_thread")
        out = run(job)
        w, c = wall() - w0, cpu() - c0
        probes.add("dma", w, c)
        if inline:
            local.inner[0] += w
            local.inner[1] += c
        return out

    def timed_copy_now(src: int, dst: int, length: int) -> bool:
        """The COPY fast path's transfer (inline, on the GO writer's thread): "dma"."""
        w0, c0 = wall(), cpu()
        done = copy_now(src, dst, length)
        w, c = wall() - w0, cpu() - c0
        if done:                # else the try is part of the hand-off
            local.inner[0] += w
            local.inner[1] += c
            local.ran = True
            local.this_job = local.job_start
            probes.count("jobs_inline")
            probes.add("dma", w, c)
        return done

    def timed_finish(code: Any) -> None:
        local.irq = [0, 0]
        w0, c0 = wall(), cpu()
        finish(code)
        w1, c1 = wall(), cpu()
        irq = local.irq
        probes.add("completion", w1 - w0 - irq[0], c1 - c0 - irq[1])
        probes.add("interrupt", irq[0], irq[1])
        if getattr(local, "in_start", False):
            local.finished = True
            local.inner[0] += w1 - w0
            local.inner[1] += c1 - c0
        start = getattr(local, "this_job", None)
        if start is not None:
            probes.add("job", w1 - start, 0)
            local.this_job = None

    def timed_update_irq(new_bits: int) -> None:
        w0, c0 = wall(), cpu()
        update_irq(new_bits)
        irq = getattr(local, "irq", None)
        if irq is not None:
            irq[0] += wall() - w0
            irq[1] += cpu() - c0

    engine.start_job = timed_start_job                        # type: ignore[method-assign]
    engine._run = timed_run                                   # type: ignore[method-assign]
    engine._copy_now = timed_copy_now                         # type: ignore[method-assign]
    engine.finish = timed_finish                              # type: ignore[method-assign]
    engine.update_irq = timed_update_irq                      # type: ignore[method-assign]


def install_job_clock(engine: DmaEngine, probes: Probes) -> None:
    """Only the ``job`` step (wall clock, GO reaching the engine to the job's completion):
    two clock reads per job, no CPU clock (a system call each) and no other probe, so
    that the process's own CPU time per job is that of an unprobed server."""
    start_job, finish = engine.start_job, engine.finish
    started = [0]

    def clocked_start_job(op: int) -> None:
        started[0] = wall()
        start_job(op)

    def clocked_finish(code: Any) -> None:
        finish(code)
        probes.add("job", wall() - started[0], 0)

    engine.start_job = clocked_start_job                      # type: ignore[method-assign]
    engine.finish = clocked_finish                            # type: ignore[method-assign]


def probe_overhead_us(n: int = 20_000) -> float:
    """What one probe's clock reads and bookkeeping add (CPU microseconds)."""
    probes = Probes()
    c0 = cpu()
    for _ in range(n):
        w1, c1 = wall(), cpu()
        probes.add("x", wall() - w1, cpu() - c1)
    return round((cpu() - c0) / n / 1000, 3)


def control(probes: Probes, engine: DmaEngine, lines: Callable[[], str],
            out: Callable[[str], None], stop: Callable[[], None]) -> None:
    """Answer the parent's commands until ``quit`` or the end of input (then the server
    stops).  ``threaded``: every job that touches memory goes to the engine thread (none
    runs at once); ``default`` undoes it.  A command that fails is answered with its
    error, so that the parent never waits for an answer that does not come."""
    try:
        while (line := lines().strip()) not in ("quit", ""):
            try:
                out(json.dumps(_command(probes, engine, line)))
            except Exception as exc:
                out(json.dumps({"error": f"{line[:40]!r}: {exc!r}"}))
    finally:
        stop()


def _command(probes: Probes, engine: DmaEngine, line: str) -> dict[str, Any]:
    if line == "reset":
        probes.reset()
    elif line == "cpu":
        return {"cpu_ns": time.process_time_ns()}
    elif line == "report":
        return probes.report()
    elif line in ("threaded", "default"):
        engine.memory_inline = line == "default"
    else:
        return {"error": f"unknown command {line[:40]!r}"}
    return {"ok": True}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dma_server")
    ap.add_argument("socket")
    ap.add_argument("--probes", choices=("steps", "job"), default="steps",
                    help="steps: every probe of the module docstring; job: only the job's "
                         "wall time (the process's CPU time is then an unprobed server's)")
    args = ap.parse_args(argv)
    platform = Platform()
    probes = Probes()
    if args.probes == "steps":
        install(platform, probes)
    else:
        install_job_clock(platform.device.engine, probes)
        platform.device.bar0.go = platform.device.engine.start_job
    server = Server(args.socket, platform)

    def out(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    out(json.dumps({"ready": True, "probe_overhead_us": probe_overhead_us()}))
    threading.Thread(target=control, args=(probes, platform.device.engine, sys.stdin.readline,
                                           out, server.close),
                     name="bench-control", daemon=True).start()
    try:
        server.serve_forever(max_clients=1)
    finally:
        platform.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
