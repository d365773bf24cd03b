"""``accept`` for the NVMe personality: lock, attest, accept, trusted DMA over all of the
guest's RAM, then Linux's stock ``nvme`` driver on the function (PCIe 6.x §11.2.7).

A stock driver allocates its queues and data buffers anywhere in guest memory, so the agent
asks the TSM for one trusted-DMA window per System RAM range, as TDX and SEV-SNP cover all
private memory.  ``--no-tee`` binds the same driver with no TDISP at all (T=0 DMA, as an
ordinary assigned device).  The flow and its limits: docs/nvme.md, "The guest's flow".
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from guest_agent import linux_driver
from guest_agent.commands import STOP_HINT, decide_accept
from guest_agent.ghcx_client import (
    GhcxCallError,
    GhcxClient,
    GhcxSetupError,
    GhcxTimeout,
    GhcxTransportError,
    ask,
)
from guest_agent.pci import (
    Config,
    Mmio,
    bars_of,
    driver_of,
    enable_device,
    find_by_class,
    msix_bars,
    rewrite_bars,
)
from guest_agent.selftest import Checks
from guest_agent.tdi_steps import (
    Steps,
    channel_record,
    ghcx_failed,
    lock_and_accept,
    pause,
    verdict,
)
from teeio import personality as personalities
from teeio import tdi_verify
from teeio.ghcx.messages import DmaAccept, Status, TdiInfo, TdiStop
from teeio.tdisp.defs import TdiState

NVME = personalities.NVME
DRIVER = "nvme"
#: Controller registers read to see whether BAR0 answers (NVMe 1.4 §3.1.2: VS)
REG_VS = 0x08
VERSION_1_4 = 0x0001_0400
ALL_ONES = 0xFFFF_FFFF
#: ``--no-tee`` asks the TSM only whether the TDI is locked: a short handshake (a TSM
#: answers HELLO in milliseconds), so that a VM nobody serves is not kept waiting long
NO_TEE_HANDSHAKE_TIMEOUT, NO_TEE_HANDSHAKE_RETRIES = 2.0, 1


def find(vendor: int = personalities.VENDOR_ID, device: int = NVME.device_id) -> Path:
    """The NVMe function: its IDs and class code 01:08:02."""
    return find_by_class(vendor, device, NVME.class_code)


def run(policy: tdi_verify.GuestPolicy, *, pause_at: str = "",
        sync_dir: Path = Path("/mnt/results"), expect: str = "accept",
        restart: bool = False) -> dict[str, Any]:
    """The whole flow; the report as ``accept`` writes it (``ok``: accepted and bound)."""
    steps, checks = Steps(), Checks()
    report: dict[str, Any] = {"mode": "accept", "personality": NVME.name, "expect": expect,
                              "steps": steps.items, "checks": checks.items, "accepted": False}
    dev = steps.run("enumerate", lambda: find(policy.vendor_id, policy.device_id))
    cfg = Config(dev)
    bars, msix = bars_of(dev), msix_bars(cfg)
    report.update(bdf=dev.name, bars=[[i, hex(b), s] for i, b, s in bars],
                  msix_bars=sorted(msix), driver_before=driver_of(dev))
    client = steps.run("ghcx_handshake", GhcxClient.connect)
    try:
        info = ask(client, TdiInfo())
        decision = decide_accept(info, client.vm_id, restart)
        report["precheck"] = {"state": info.state.name, "lock_epoch": info.lock_epoch,
                              "action": decision.action, "message": decision.message}
        if decision.action == "refuse":
            report.update(info=info.encode(), ok=False, error=decision.message)
            return report
        if decision.action == "already":        # windows for RAM added since, the driver
            report["info"] = info.encode()
            _hand_over(report, steps, checks, client, dev)
            report["ok"] = checks.ok
            return report
        if decision.action == "restart":
            report["restart_stop"] = steps.run(
                "restart_stop", lambda: ask(client, TdiStop()).encode())
        # CONFIG_UNLOCKED now: a driver bound at T=0 goes first (its unbind clears Bus
        # Master Enable, no security event here); then the function as the OS sees it.
        if driver_of(dev) is not None:
            report["unbound"] = steps.run("unbind", lambda: linux_driver.unbind(dev))
        report["command_register"] = [hex(v) for v in enable_device(cfg)]
        report["bars_written"] = rewrite_bars(cfg, bars)
        _flow(report, steps, checks, client, dev, policy, (bars, msix), pause_at, sync_dir)
    except GhcxCallError as exc:
        ghcx_failed(report, checks, exc)
    finally:
        channel_record(report, client)
    return verdict(report, checks, expect)


def _flow(report: dict[str, Any], steps: Steps, checks: Checks, client: GhcxClient,
          dev: Path, policy: tdi_verify.GuestPolicy,
          layout: tuple[list[tuple[int, int, int]], frozenset[int]],
          pause_at: str, sync_dir: Path) -> None:
    mmio = Mmio(dev, 0)
    def check_locked() -> None:             # reads are all ones
        vs = mmio.read32(REG_VS)
        checks.add("mmio_blocked_when_locked", vs == ALL_ONES, value=hex(vs))

    if not lock_and_accept(report, steps, client, policy, layout, pause_at, sync_dir,
                           check_locked):
        return
    # RUN: the controller's registers answer through the TEE path (T=1 on the IDE stream).
    vs = mmio.read32(REG_VS)
    checks.add("mmio_in_run", vs == VERSION_1_4, value=hex(vs))
    with contextlib.suppress(BufferError):
        mmio.mm.close()                     # the driver maps BAR0 itself
    _hand_over(report, steps, checks, client, dev)
    if pause_at == "in-run":
        report["paused_seconds"] = pause(sync_dir, "in-run")


def _hand_over(report: dict[str, Any], steps: Steps, checks: Checks, client: GhcxClient,
               dev: Path) -> None:
    """In RUN: a trusted-DMA window over each System RAM range, then the nvme driver."""
    ram = linux_driver.system_ram(linux_driver.IOMEM.read_text())
    report["system_ram"] = [[hex(b), s] for b, s in ram]
    report["windows"] = steps.run("dma_windows", lambda: ram_windows(client, ram))
    checks.add("ram_covered", len(report["windows"]) == len(ram),
               ranges=len(ram), windows=len(report["windows"]))
    if driver_of(dev) == DRIVER:
        report["driver"] = {"driver": DRIVER, "bdf": dev.name, "bound_already": True}
    else:
        report["driver"] = steps.run("bind_driver", lambda: linux_driver.bind(dev, DRIVER))
    report["nvme"] = steps.run("nvme_namespaces", lambda: linux_driver.nvme_namespaces(dev))
    checks.add("nvme_live", report["nvme"]["state"] == "live" and
               bool(report["nvme"]["namespaces"]), **report["nvme"])


def ram_windows(client: GhcxClient, ram: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """One trusted-DMA window per range (DMA_ACCEPT), unless one the VM holds covers it."""
    held = ask(client, Status()).windows
    out = []
    for base, size in ram:
        have = next((w for w in held if w.base <= base and base + size <= w.base + w.size),
                    None)
        if have is not None:
            out.append({"window_id": have.window_id, "base": hex(base), "size": size,
                        "new": False})
            continue
        wid = ask(client, DmaAccept(base=base, size=size, access="rw")).window_id
        out.append({"window_id": wid, "base": hex(base), "size": size, "new": True})
    return out


def run_plain(vendor: int = personalities.VENDOR_ID,
              device: int = NVME.device_id) -> dict[str, Any]:
    """``accept --no-tee``: the nvme driver on a CONFIG_UNLOCKED function, no TDISP: its DMA
    is T=0 (in the clear on the link unless the TSM keeps an IDE stream up for the
    function) and the host can reach everything."""
    steps, checks = Steps(), Checks()
    report: dict[str, Any] = {"mode": "accept", "personality": NVME.name, "tee": False,
                              "steps": steps.items, "checks": checks.items}
    dev = steps.run("enumerate", lambda: find(vendor, device))
    report["bdf"] = dev.name
    asked = time.monotonic()
    try:
        client = GhcxClient.connect(handshake_timeout=NO_TEE_HANDSHAKE_TIMEOUT,
                                    handshake_retries=NO_TEE_HANDSHAKE_RETRIES)
    except GhcxSetupError as exc:
        report["note"] = f"no GHCx ({exc}): the TSM was not asked"
    except (GhcxTimeout, GhcxTransportError) as exc:
        # The port is there but nobody answers on it: the host unbound this VM's TDI (or
        # never bound one), as for an ordinary assigned device.
        report["note"] = (f"no GHCx answer ({exc}) in {time.monotonic() - asked:.0f} s: the "
                          "TSM was not asked")
    else:
        try:
            info = ask(client, TdiInfo())
        finally:
            client.close()
        report["tdi_state"] = info.state.name
        if info.state is not TdiState.CONFIG_UNLOCKED:
            report.update(ok=False, error=f"TDI {info.tdi} is {info.state.name}: a locked TDI "
                                          f"serves no T=0 request; {STOP_HINT}")
            return report
    report["command_register"] = [hex(v) for v in enable_device(Config(dev))]
    report["driver"] = steps.run("bind_driver", lambda: linux_driver.bind(dev, DRIVER))
    report["nvme"] = steps.run("nvme_namespaces", lambda: linux_driver.nvme_namespaces(dev))
    checks.add("nvme_live", report["nvme"]["state"] == "live" and
               bool(report["nvme"]["namespaces"]), **report["nvme"])
    report["ok"] = checks.ok
    return report


__all__ = ["DRIVER", "find", "ram_windows", "run", "run_plain"]
