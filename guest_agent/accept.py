"""``python3 -m guest_agent accept --policy FILE``: lock, attest, accept, validate encrypted DMA.

The TVM's side of trusted device assignment (PCIe 6.x §11.2.7) over GHCx (docs/ghcx.md).
The steps, why the TDI stays in RUN after the agent exits, and the test options
(``--pause-at``, ``--expect``): docs/tdisp-and-tsm.md, "The guest's accept flow".
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from guest_agent import nvme_accept
from guest_agent.commands import decide_accept
from guest_agent.dmabuf import HugeBuffer
from guest_agent.ghcx_client import GhcxCallError, GhcxClient, ask
from guest_agent.pci import bars_of, msix_bars, rewrite_bars
from guest_agent.selftest import DEVICE, VENDOR, Checks, Driver
from guest_agent.tdi_steps import (
    PAUSE_POINTS,
    Steps,
    accept_request,
    attest,
    channel_record,
    ghcx_failed,
    lock_and_accept,
    pause,
    verdict,
)
from teeio import personality as personalities
from teeio import tdi_verify
from teeio.device_regs import DEVICE_ID_REG_VALUE, Op, R, descriptor
from teeio.ghcx.messages import (
    DmaAccept,
    DmaAcceptResponse,
    DmaRelease,
    TdiInfo,
    TdiLock,
    TdiStop,
)

__all__ = ["PAUSE_POINTS", "accept_request", "run"]

HUGE_PAGE = 2 * 1024 * 1024
SRC, DST, DIGEST = 0x0000, 0x40000, 0x80000
BATCH_LIST, BATCH_DST = 0xC0000, 0xC1000     # a BATCH's descriptors, and its output


def run(policy_path: Path, *, pause_at: str = "", sync_dir: Path = Path("/mnt/results"),
        expect: str = "accept", stop: bool = False, seed: int = 0,
        cycles: int = 0, restart: bool = False) -> dict[str, Any]:
    policy = tdi_verify.load_policy(policy_path)
    if (policy.vendor_id, policy.device_id) == (personalities.VENDOR_ID,
                                                personalities.NVME.device_id):
        if stop or cycles:
            raise tdi_verify.PolicyError("--stop and --cycles drive the accelerator; an NVMe "
                                         "function is handed to Linux's nvme driver")
        return nvme_accept.run(policy, pause_at=pause_at, sync_dir=sync_dir, expect=expect,
                               restart=restart)
    steps, checks = Steps(), Checks()
    report: dict[str, Any] = {"mode": "accept", "expect": expect, "steps": steps.items,
                              "checks": checks.items, "accepted": False}
    if (policy.vendor_id, policy.device_id) != (VENDOR, DEVICE):
        raise tdi_verify.PolicyError(f"the policy expects {policy.vendor_id:04x}:"
                                     f"{policy.device_id:04x}, this agent drives "
                                     f"{VENDOR:04x}:{DEVICE:04x}")
    # Polled, no uio: nothing clears Bus Master Enable when this process exits
    # (PCIe 6.x §11.2.6; docs/tdisp-and-tsm.md, "The guest's accept flow").
    d = steps.run("enumerate", lambda: Driver(irq=False))
    report["command_register"] = [hex(v) for v in d.command]
    bars, msix = bars_of(d.dev), msix_bars(d.cfg)
    report["bdf"], report["bars"] = d.dev.name, [[i, hex(b), s] for i, b, s in bars]
    report["msix_bars"] = sorted(msix)
    client = steps.run("ghcx_handshake", GhcxClient.connect)
    report["ghcx"] = client.counters
    try:
        info = ask(client, TdiInfo())
        decision = decide_accept(info, client.vm_id, restart)
        report["precheck"] = {"state": info.state.name, "lock_epoch": info.lock_epoch,
                              "action": decision.action, "message": decision.message}
        if decision.action in ("already", "refuse"):
            report["info"] = info.encode()
            report["ok"] = decision.action == "already"
            if decision.action == "refuse":
                report["error"] = decision.message
            return report
        if decision.action == "restart":
            report["restart_stop"] = steps.run(
                "restart_stop", lambda: ask(client, TdiStop()).encode())
        # CONFIG_UNLOCKED now: configure the function as the OS sees it before LOCK
        report["bars_written"] = rewrite_bars(d.cfg, bars)
        _flow(report, steps, checks, client, d, policy, (bars, msix), pause_at, sync_dir,
              stop, seed)
        if cycles and report["accepted"]:
            report["cycles"] = [_cycle(client, policy, bars, msix) for _ in range(cycles)]
    except GhcxCallError as exc:
        ghcx_failed(report, checks, exc)
    finally:
        channel_record(report, client)
    return verdict(report, checks, expect)


def _flow(report: dict[str, Any], steps: Steps, checks: Checks, client: GhcxClient,
          d: Driver, policy: tdi_verify.GuestPolicy,
          layout: tuple[list[tuple[int, int, int]], frozenset[int]],
          pause_at: str, sync_dir: Path, stop: bool, seed: int) -> None:
    def check_locked() -> None:             # reads are all ones
        checks.add("mmio_blocked_when_locked", d.mmio.read32(R.ID) == 0xFFFFFFFF,
                   value=hex(d.mmio.read32(R.ID)))

    if not lock_and_accept(report, steps, client, policy, layout, pause_at, sync_dir,
                           check_locked):
        return
    # RUN: the register BAR now answers through the TEE path (T=1 over the IDE stream).
    checks.add("mmio_in_run", d.mmio.read32(R.ID) == DEVICE_ID_REG_VALUE,
               value=hex(d.mmio.read32(R.ID)))
    win = steps.run("dma_validation", lambda: _dma(report, checks, client, d, seed))
    if pause_at == "in-run":
        report["paused_seconds"] = pause(sync_dir, "in-run")
        report["after_pause"] = _observe(client, d)
        return
    if stop:
        report["stop"] = steps.run("tdi_stop", lambda: ask(client, TdiStop()).encode())
        return
    # The TDI stays RUN; the buffer the window covers goes with this process.
    wid = win.window_id
    try:
        ask(client, DmaRelease(window_id=wid))
        report["window_released"] = wid
    except GhcxCallError as exc:
        report["window_release_error"] = f"{exc.code}: {exc.message}"


def _cycle(client: GhcxClient, policy: tdi_verify.GuestPolicy,
           bars: list[tuple[int, int, int]], msix: frozenset[int]) -> list[dict[str, Any]]:
    """One more STOP -> LOCK -> evidence -> verify -> ACCEPT round (for the benchmark of
    the LOCK -> RUN latency, split by step)."""
    steps = Steps()
    steps.run("tdi_stop", lambda: ask(client, TdiStop()))
    steps.run("tdi_lock", lambda: ask(client, TdiLock()))
    ev, info, verdict = attest(steps, client, policy, bars, msix)
    if not verdict.ok:
        raise RuntimeError(f"cycle: verification failed: {verdict.first_failure()}")
    steps.run("tdi_accept", lambda: ask(client, accept_request(ev, info)))
    return steps.items


def _dma(report: dict[str, Any], checks: Checks, client: GhcxClient, d: Driver,
         seed: int) -> DmaAcceptResponse:
    """The private-DMA checks; returns the window held at the end (accepted again)."""
    private = d.buf                       # 2 MiB hugetlbfs page, accepted below
    other = HugeBuffer(name="teeio-dma-unaccepted")
    win = ask(client, DmaAccept(base=private.phys, size=HUGE_PAGE, access="rw"))
    report["window"] = win.encode()
    data = hashlib.sha256(seed.to_bytes(8, "little")).digest() * 2048     # 64 KiB
    pattern = 0xC0DE0000 | seed & 0xFFFF
    private.write(DST, b"\xAA" * 4096)
    res = d.run_job(Op.FILL, 0, private.phys + DST, 4096, pattern)
    checks.add("private_fill", res["done"] and private.read(DST, 4096)
               == pattern.to_bytes(4, "little") * 1024, length=4096, **res)
    private.write(SRC, data)
    private.write(DST, b"\x55" * len(data))
    res = d.run_job(Op.COPY, private.phys + SRC, private.phys + DST, len(data))
    checks.add("private_copy", res["done"] and private.read(DST, len(data)) == data,
               length=len(data), **res)
    private.write(DIGEST, bytes(32))
    res = d.run_job(Op.SHA256, private.phys + SRC, private.phys + DIGEST, len(data))
    digest = private.read(DIGEST, 32)
    checks.add("private_sha256", res["done"] and digest == hashlib.sha256(data).digest(),
               digest=digest.hex(), **res)
    report["private_sha256"] = digest.hex()
    report["private_pattern"] = data[:32].hex()
    # A BATCH: its descriptor list sits in the private buffer too, read with T=1.
    fill = (pattern ^ 0xFFFF).to_bytes(4, "little") * 1024
    private.write(BATCH_LIST, descriptor(Op.FILL, 0, private.phys + BATCH_DST, 4096,
                                         pattern ^ 0xFFFF)
                  + descriptor(Op.COPY, private.phys + SRC, private.phys + BATCH_DST + 4096,
                               4096))
    private.write(BATCH_DST, b"\x66" * 8192)
    res = d.run_job(Op.BATCH, private.phys + BATCH_LIST, 0, 64)
    checks.add("private_batch", res["done"] and private.read(BATCH_DST, 8192)
               == fill + data[:4096], descriptors=2, **res)
    # T=1 DMA outside every window: refused at the root port, nothing lands.
    other.write(0, b"\x11" * 4096)
    res = d.run_job(Op.FILL, 0, other.phys, 4096, pattern)
    checks.add("unaccepted_buffer_refused", not res["done"]
               and other.read(0, 4096) == b"\x11" * 4096, length=4096, **res)
    ask(client, DmaRelease(window_id=win.window_id))
    private.write(DST, b"\x22" * 4096)
    res = d.run_job(Op.FILL, 0, private.phys + DST, 4096, pattern)
    checks.add("released_buffer_refused", not res["done"]
               and private.read(DST, 4096) == b"\x22" * 4096, length=4096, **res)
    # Accept it again for whatever follows (in-run observations, STOP).
    win = ask(client, DmaAccept(base=private.phys, size=HUGE_PAGE, access="rw"))
    report["window"] = win.encode()
    return win


def _observe(client: GhcxClient, d: Driver) -> dict[str, Any]:
    """After the host acted during RUN: what the guest now sees (judged by the host)."""
    out: dict[str, Any] = {}
    d.buf.write(DST, b"\x33" * 4096)
    res = d.run_job(Op.FILL, 0, d.buf.phys + DST, 4096, 0x5A5A5A5A)
    out["dma_job"] = {**res, "landed": d.buf.read(DST, 4096) != b"\x33" * 4096}
    out["mmio_id"] = hex(d.mmio.read32(R.ID))
    try:
        out["info"] = ask(client, TdiInfo()).encode()
    except GhcxCallError as exc:
        out["info_error"] = f"{exc.code}: {exc.message}"
    out["tsm_restarted"] = client.tsm_restarted
    return out
