"""The agent's commands for a person at the VM's shell: ``tdi-info``, ``stop``, ``dma``.

Each returns a JSON-able dict and has a human formatter; the TSM is reached over GHCx
(docs/ghcx.md), the device through BAR0 and a DMA buffer, with no driver bound.  What each
does in which TDI state (PCIe 6.x §11): docs/tdisp-and-tsm.md, "The guest's commands".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from guest_agent import dmajob, testdata
from guest_agent.ghcx_client import ask
from guest_agent.pci import (
    COMMAND,
    COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE,
    COMMAND_MEMORY_SPACE,
    AgentError,
    Config,
    Mmio,
    bars_of,
    driver_of,
)
from teeio.device_regs import DEVICE_ID_REG_VALUE, MAX_DMA_LEN, Op, R
from teeio.ghcx import MsgType
from teeio.ghcx.messages import (
    DmaAccept,
    DmaRelease,
    Status,
    StatusResponse,
    TdiInfo,
    TdiInfoResponse,
    TdiStop,
)
from teeio.tdisp.defs import LockInterfaceFlags, TdiState

HUGE_PAGE = 2 * 1024 * 1024
SRC_OFF, DST_OFF = 0x000000, 0x100000       # inside the 2 MiB buffer; jobs are <= 1 MiB
OPS = {"fill": Op.FILL, "copy": Op.COPY, "sha256": Op.SHA256}
STOP_HINT = "run 'python3 -m guest_agent stop' first, or 'python3 -m guest_agent accept --restart'"


class CommandFailed(AgentError):
    """A command did not do what was asked; ``result`` holds what it did see."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


class Tsm(Protocol):
    """What the commands need of a GHCx client."""

    vm_id: str

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None) -> dict[str, Any]: ...


class Buffer(Protocol):
    """A DMA buffer: physically contiguous, ``phys`` its bus address (dmabuf.HugeBuffer)."""

    phys: int

    def write(self, off: int, data: bytes) -> None: ...

    def read(self, off: int, n: int) -> bytes: ...


# -- what the guest sees of the device (sysfs, lspci-level) ------------------------------------

def guest_view(dev: Path, *, read_mmio: bool = True) -> dict[str, Any]:
    """The device as the guest sees it: Command register (Memory Space, Bus Master, INTx
    Disable), BARs (sysfs ``resource``, and the raw BAR registers), the bound driver, and
    -- if Memory Space is on -- whether BAR0 answers (ID register; all ones means an
    Unsupported Request: TEE MMIO closed)."""
    cfg = Config(dev)
    cmd = cfg.read(COMMAND, 2)
    view: dict[str, Any] = {
        "bdf": dev.name,
        "vendor_device": f"{cfg.read(0x00, 2):04x}:{cfg.read(0x02, 2):04x}",
        "driver": driver_of(dev),
        "command": f"{cmd:#06x}",
        "memory_space": bool(cmd & COMMAND_MEMORY_SPACE),
        "bus_master": bool(cmd & COMMAND_BUS_MASTER),
        "intx_disabled": bool(cmd & COMMAND_INTX_DISABLE),
        "bars": [{"index": i, "address": f"{base:#x}", "size": size}
                 for i, base, size in bars_of(dev)],
        "bar_registers": [f"{cfg.read(0x10 + 4 * i, 4):#010x}" for i in range(2)],
    }
    if read_mmio and view["memory_space"]:
        mmio = Mmio(dev, 0)
        ident = mmio.read32(R.ID)
        view["bar0"] = {"id": f"{ident:#010x}", "status": f"{mmio.read32(R.STATUS):#010x}",
                        "answers": ident == DEVICE_ID_REG_VALUE}
    return view


# -- tdi-info ----------------------------------------------------------------------------------

def tdi_info(tsm: Tsm | None, view: dict[str, Any] | None) -> dict[str, Any]:
    """TDI_INFO and STATUS (docs/ghcx.md "Messages") plus the guest's own view."""
    out: dict[str, Any] = {"guest": view}
    if tsm is not None:
        out["vm_id"] = tsm.vm_id
        out["info"] = ask(tsm, TdiInfo()).encode()
        out["status"] = ask(tsm, Status()).encode()
    return out


def format_tdi_info(res: dict[str, Any]) -> str:
    lines: list[str] = []
    if res.get("info") is not None:
        info = TdiInfoResponse.decode(res["info"], "info")
        lines.append(f"TDI {info.tdi} (VM {res.get('vm_id')}): {info.state.name}")
        lines.append(f"  lock epoch       {info.lock_epoch}  (lock flags "
                     f"{_lock_flags(info.lock_flags)})")
        lines.append(f"  IDE stream       {info.stream.id} {info.stream.state}")
        lines.append(f"  MMIO rep. offset {info.mmio_reporting_offset:#x}")
        if info.digests is not None:
            lines.append(f"  digests ({info.digest_alg})")
            for k, v in info.digests.encode().items():
                lines.append(f"    {k:<12}   {v or '-'}")
        else:
            lines.append("  digests          none (not locked)")
        lines.append(f"  TSM boot id      {info.tsm_boot_id.hex()}")
        if info.reason:
            lines.append(f"  reason           {info.reason}")
        status = res.get("status")
        windows = StatusResponse.decode(status, "status").windows if status else ()
        lines.append(f"  DMA windows      {len(windows) or 'none'}")
        for w in windows:
            lines.append(f"    window {w.window_id}: {w.base:#x}+{w.size:#x} {w.access}")
    view = res.get("guest")
    if view is not None:
        lines.append(f"guest view ({view['bdf']} {view['vendor_device']}, driver "
                     f"{view['driver'] or 'none'})")
        lines.append(f"  Command          {view['command']}: memory space "
                     f"{_on(view['memory_space'])}, bus master {_on(view['bus_master'])}, "
                     f"INTx {'disabled' if view['intx_disabled'] else 'enabled'}")
        for bar in view["bars"]:
            lines.append(f"  BAR{bar['index']}             {bar['address']} "
                         f"({bar['size'] // 1024} KiB)")
        bar0 = view.get("bar0")
        if bar0 is not None:
            lines.append(f"  BAR0 registers   ID {bar0['id']}, STATUS {bar0['status']}: " + (
                "answering" if bar0["answers"] else
                "not answering (all ones: TEE MMIO closed unless the TDI is RUN)"))
        elif not view["memory_space"]:
            lines.append("  BAR0 registers   not read (Memory Space is off)")
    return "\n".join(lines)


# -- stop --------------------------------------------------------------------------------------

def stop(tsm: Tsm, *, force: bool = False) -> dict[str, Any]:
    """TDI_STOP.  A TDI that TDI_INFO already reports CONFIG_UNLOCKED is left alone unless
    *force* (the device would refuse a STOP there)."""
    info = ask(tsm, TdiInfo())
    out: dict[str, Any] = {"tdi": info.tdi, "vm_id": tsm.vm_id, "before": info.state.name,
                           "lock_epoch": info.lock_epoch, "stopped": False,
                           "state": info.state.name}
    if info.state is TdiState.CONFIG_UNLOCKED and not force:
        return out
    rsp = ask(tsm, TdiStop())
    out.update(stopped=True, state=rsp.state.name)
    return out


def format_stop(res: dict[str, Any]) -> str:
    if not res["stopped"]:
        return (f"TDI {res['tdi']} is already {res['state']}: nothing to stop "
                "(--force sends TDI_STOP anyway)")
    return (f"TDI {res['tdi']}: {res['before']} -> {res['state']} (TDI_STOP; lock epoch "
            f"{res['lock_epoch']}; the TSM revoked this VM's DMA windows and private MMIO)")


# -- accept: what to do when the TDI is not CONFIG_UNLOCKED -------------------------------------

@dataclass(frozen=True)
class AcceptDecision:
    """``run``: the whole flow; ``restart``: TDI_STOP, then the whole flow; ``already``:
    RUN already, nothing to do (exit 0); ``refuse``: fail with ``message``."""

    action: str
    message: str


def decide_accept(info: TdiInfoResponse, vm_id: str, restart: bool) -> AcceptDecision:
    """What ``accept`` does given TDI_INFO.  LOCK needs CONFIG_UNLOCKED (§11.3.6); a TDI
    bound to this VM in RUN was accepted already (the TSM binds one VM to one TDI and
    starts it only on that VM's TDI_ACCEPT)."""
    state, tdi, epoch = info.state.name, info.tdi, info.lock_epoch
    if info.state is TdiState.CONFIG_UNLOCKED:
        return AcceptDecision("run", f"TDI {tdi} is CONFIG_UNLOCKED")
    if restart:
        return AcceptDecision("restart", f"TDI {tdi} is {state} (lock epoch {epoch}): "
                                         "stopping it first (--restart)")
    if info.state is TdiState.RUN:
        return AcceptDecision("already", f"TDI {tdi} is already RUN for VM {vm_id} (lock "
                                         f"epoch {epoch}): nothing to do (--restart to "
                                         "redo the whole flow)")
    reason = f", {info.reason}" if info.reason else ""
    return AcceptDecision("refuse", f"TDI {tdi} is {state} (lock epoch {epoch}{reason}): "
                                    f"{STOP_HINT}")


def format_accept(report: dict[str, Any]) -> str:
    """accept's report for a person (the whole report is the JSON file / ``--json``)."""
    lines: list[str] = []
    pre = report.get("precheck") or {}
    if pre.get("action") == "already":
        return "\n".join([str(pre["message"]), *_format_nvme(report)])
    if pre.get("action") == "refuse":
        return ""           # the one-line error says it all
    lines.append(f"accept on {report.get('bdf', 'the device')} (Command register "
                 f"{' -> '.join(report.get('command_register', [])) or '?'})")
    if pre.get("action") == "restart":
        lines.append(pre["message"])
    info = report.get("info") or {}
    for st in report.get("steps", []):
        mark = "ok " if st["ok"] else "ERR"
        lines.append(f"  [{mark}] {st['step']:<18} {st['seconds']:8.3f} s"
                     + (f"  {st['error']}" if st.get("error") else ""))
    checks = report.get("checks", [])
    if checks:
        bad = [c["name"] for c in checks if not c["ok"]]
        lines.append(f"  checks: {len(checks) - len(bad)}/{len(checks)} passed"
                     + (f" (failed: {', '.join(bad)})" if bad else ""))
    if report.get("accepted"):
        end = "CONFIG_UNLOCKED (--stop 1)" if report.get("stop") else "RUN"
        lines.append(f"accepted: TDI {info.get('tdi')} (lock epoch {info.get('lock_epoch')}) "
                     f"is {end}")
        if "window_released" in report:
            lines.append(f"  DMA window {report['window_released']} released (its buffer "
                         "goes with this process); 'dma' asks for its own")
    elif report.get("refusal"):
        lines.append(f"refused: {report['refusal']}")
    elif report.get("tee") is False:
        lines.append("no TDISP (--no-tee): the driver's DMA is T=0 (in the clear on the link "
                     "unless the host keeps an IDE stream up)")
        if report.get("note"):
            lines.append(f"  {report['note']}")
    lines.extend(_format_nvme(report))
    return "\n".join(lines)


def _format_nvme(report: dict[str, Any]) -> list[str]:
    """The NVMe personality's hand-over: trusted-DMA windows, the driver, its namespaces."""
    lines = []
    for w in report.get("windows", []):
        how = "accepted" if w["new"] else "held already"
        lines.append(f"  DMA window {w['window_id']}: {w['base']}+{w['size']:#x} (System RAM, "
                     f"{how})")
    nvme = report.get("nvme")
    if nvme is not None:
        disks = ", ".join(f"{n} ({report['nvme']['bytes'].get(n[5:], 0) // 2**20} MiB)"
                          for n in nvme["namespaces"])
        lines.append(f"  driver {report['driver']['driver']}: controller {nvme['controller']} "
                     f"{nvme['state']}, {disks}")
    return lines


# -- dma ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DmaOptions:
    op: str = "fill"
    length: int = 4096
    pattern: int | None = None          # FILL: default derived from the seed
    seed: int = 0                       # COPY / SHA-256 source data (testdata.stream)
    timeout: float = dmajob.JOB_TIMEOUT
    window: bool = True                 # in RUN: DMA_ACCEPT a window over the buffer
    keep_window: bool = False


def job_data(opts: DmaOptions) -> tuple[bytes, int, bytes]:
    """(source bytes, fill pattern, expected destination bytes) for *opts*."""
    n = opts.length
    if opts.op == "fill":
        pattern = (int.from_bytes(testdata.stream(opts.seed, "dma-pattern", 4), "little")
                   if opts.pattern is None else opts.pattern) & 0xFFFF_FFFF
        return b"", pattern, testdata.fill_bytes(pattern, n)
    src = testdata.stream(opts.seed, "dma-src", n)
    if opts.op == "copy":
        return src, 0, src
    return src, 0, hashlib.sha256(src).digest()


def dma(opts: DmaOptions, *, regs: dmajob.Regs, buf: Buffer, tsm: Tsm | None,
        bdf: str = "", command: tuple[int, int] | None = None, note: str | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None) -> dict[str, Any]:
    """One DMA job (docs/tdisp-and-tsm.md, "The guest's commands").  *command*: the
    Command register before/after :func:`guest_agent.pci.enable_device`; *note*: why no
    TSM was asked.  Raises :class:`CommandFailed` (with the result) when the job did not
    complete with the right data; GHCx errors propagate."""
    if opts.op not in OPS:
        raise CommandFailed(f"unknown op {opts.op!r} (one of {', '.join(OPS)})")
    if not 0 < opts.length <= MAX_DMA_LEN:
        raise CommandFailed(f"length {opts.length} not in 1..{MAX_DMA_LEN}")
    info = ask(tsm, TdiInfo()) if tsm is not None else None
    run = info is not None and info.state is TdiState.RUN
    res: dict[str, Any] = {
        "bdf": bdf, "op": opts.op, "length": opts.length, "buffer": f"{buf.phys:#x}",
        "tdi": info.tdi if info else None, "tdi_state": info.state.name if info else None,
        "lock_epoch": info.lock_epoch if info else None,
        "t_bit": run, "stream": info.stream.id if info and run else None, "window": None,
    }
    if command is not None:
        res["command"] = {"before": f"{command[0]:#06x}", "after": f"{command[1]:#06x}"}
    if note:
        res["note"] = note
    src, pattern, expected = job_data(opts)
    job = dmajob.Job(OPS[opts.op], buf.phys + SRC_OFF if src else 0, buf.phys + DST_OFF,
                     opts.length, pattern)
    res.update(src=f"{job.src:#x}" if src else None, dst=f"{job.dst:#x}",
               pattern=f"{pattern:#010x}" if opts.op == "fill" else None)
    ours: int | None = None
    if run and opts.window and tsm is not None:
        res["window"], ours = _window_for(tsm, buf.phys, HUGE_PAGE)
    try:
        if src:
            buf.write(SRC_OFF, src)
        sentinel = bytes(b ^ 0xFF for b in expected)       # differs from it in every byte
        buf.write(DST_OFF, sentinel)
        jobs_before = regs.read32(R.DMA_JOBS)
        kw: dict[str, Any] = {}
        if clock is not None:
            kw["clock"] = clock
        if sleep is not None:
            kw["sleep"] = sleep
        done = dmajob.run(regs, job, opts.timeout, **kw)
        got = buf.read(DST_OFF, len(expected))
        res["result"] = {**done.as_dict(), "device_jobs_before": jobs_before,
                         "device_jobs_after": regs.read32(R.DMA_JOBS),
                         "landed": got != sentinel, "data_ok": got == expected}
        if opts.op == "sha256":
            res["result"]["digest"] = got.hex()
            res["result"]["expected_digest"] = expected.hex()
    finally:
        if ours is not None and not opts.keep_window and tsm is not None:
            try:
                ask(tsm, DmaRelease(window_id=ours))
                res["window"]["released"] = True
            except AgentError as exc:
                res["window"]["released"] = False
                res["window"]["release_error"] = str(exc)
    r = res["result"]
    res["ok"] = bool(done.done and r["data_ok"])
    if not res["ok"]:
        res["error"] = _dma_failure(res, done)
        raise CommandFailed(res["error"], res)
    return res


def _window_for(tsm: Tsm, base: int, size: int) -> tuple[dict[str, Any], int | None]:
    """A window covering [base, base + size): one the VM holds already (STATUS), else a new
    one (DMA_ACCEPT; returned as ours to release)."""
    for w in ask(tsm, Status()).windows:
        if w.base <= base and base + size <= w.base + w.size:
            return {"window_id": w.window_id, "base": f"{w.base:#x}", "size": w.size,
                    "ours": False}, None
    wid = ask(tsm, DmaAccept(base=base, size=size, access="rw")).window_id
    return {"window_id": wid, "base": f"{base:#x}", "size": size, "ours": True}, wid


def _dma_failure(res: dict[str, Any], done: dmajob.Completion) -> str:
    state = res["tdi_state"]
    if done.outcome == "no_response":
        return (f"the device does not answer BAR0 (all ones, Unsupported Request): the TDI "
                f"is {state or 'not RUN'}, its TEE MMIO is closed; nothing was started")
    if done.outcome == "timeout":
        return done.describe()
    if done.outcome == "error":
        if done.error_name == "FAULT" and state == "RUN" and res["window"] is None:
            return ("ERROR FAULT: refused: no DMA window covers the buffer (T=1 DMA in RUN "
                    "needs one; it was not asked for: --no-window)")
        if done.error_name == "FAULT" and state in ("CONFIG_LOCKED", "ERROR"):
            return f"ERROR FAULT: refused by the device: the TDI is {state}, it issues no DMA"
        return done.describe()
    r = res["result"]
    return ("the job completed but the destination does not hold the expected data"
            + ("" if r["landed"] else " (nothing landed)"))


def format_dma(res: dict[str, Any]) -> str:
    state = res.get("tdi_state")
    if state == "RUN":
        path = f"T=1 on IDE stream {res.get('stream')} (encrypted on the link)"
    elif state == "CONFIG_UNLOCKED":
        path = "T=0 (TDI CONFIG_UNLOCKED: not trusted DMA)"
    elif state is None:
        path = "T=0 (no TSM asked: not a TEE VM)"
    else:
        path = f"none: the TDI is {state}, the device issues no DMA"
    lines = [f"dma {res['op']} {res['length']} bytes on {res.get('bdf') or 'the device'}"
             + (f", TDI {res.get('tdi')} {state} (lock epoch {res.get('lock_epoch')})"
                if state else ""),
             f"  buffer      {res['buffer']} (2 MiB huge page)",
             f"  source      {res.get('src') or '-'}",
             f"  destination {res['dst']}"]
    if res.get("pattern"):
        lines.append(f"  pattern     {res['pattern']}")
    lines.append(f"  DMA path    {path}")
    if res.get("note"):
        lines.append(f"  note        {res['note']}")
    cmd = res.get("command")
    if cmd is not None:
        lines.append(f"  Command     {cmd['before']} -> {cmd['after']} (Memory Space + Bus "
                     "Master by config write; no driver, no uio)")
    w = res.get("window")
    if w is None:
        lines.append("  window      none")
    else:
        how = "accepted for this job" if w["ours"] else "already held by the VM"
        rel = ""
        if w["ours"]:
            rel = ("; released" if w.get("released") else
                   "; kept (--keep-window)" if "released" not in w else
                   f"; release failed: {w.get('release_error')}")
        lines.append(f"  window      {w['window_id']}: {w['base']}+{w['size']:#x} ({how}{rel})")
    r = res.get("result")
    if r is not None:
        lines.append(f"  STATUS      {r['status']} ({r['status_decoded']}), INT_STATUS "
                     f"{r['int_status']}, after {r['seconds']:.3f} s / {r['polls']} polls")
        lines.append(f"  jobs        device counter {r['device_jobs_before']:#x} -> "
                     f"{r['device_jobs_after']:#x}")
        check = ("ok" if r["data_ok"] else "MISMATCH" if r["landed"]
                 else "nothing landed")
        lines.append(f"  data check  {check}")
        if r.get("digest"):
            lines.append(f"  digest      {r['digest']}")
    lines.append("result: " + ("DONE" if res.get("ok") else f"FAILED: {res.get('error')}"))
    return "\n".join(lines)


def _lock_flags(flags: int) -> str:
    """LOCK_INTERFACE_REQUEST FLAGS (PCIe 6.x §11.3.7) by name."""
    names = [f.name for f in LockInterfaceFlags if flags & f and f.name]
    return f"{flags:#x} {'|'.join(names)}" if names else f"{flags:#x}"


def _on(b: bool) -> str:
    return "on" if b else "OFF"
