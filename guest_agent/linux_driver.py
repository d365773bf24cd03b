"""A stock Linux driver for the function, through sysfs (``driver_override``, ``bind``,
``unbind``; Documentation/ABI/testing/sysfs-bus-pci), and the guest's System RAM as
``/proc/iomem`` lists it.

Stdlib only.  Unbinding a driver clears Bus Master Enable (``pci_disable_device``): a TDISP
security event in CONFIG_LOCKED or RUN (PCIe 6.x §11.2.6), so the agent unbinds only a TDI
that is CONFIG_UNLOCKED.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from guest_agent.pci import AgentError, driver_of

DRIVERS = Path("/sys/bus/pci/drivers")
IOMEM = Path("/proc/iomem")
DEV = Path("/dev")
BLOCK = Path("/sys/block")
NAMESPACE = re.compile(r"nvme\d+n\d+")
BIND_TIMEOUT = 60.0
MODPROBE_TIMEOUT = 60.0


def system_ram(text: str) -> list[tuple[int, int]]:
    """(base, size) of each top-level ``System RAM`` range of ``/proc/iomem`` text (root
    sees the addresses; anyone else reads zeros, refused here)."""
    out = []
    for line in text.splitlines():
        if line[:1].isspace() or ":" not in line:
            continue                              # a child range, or not a range
        span, name = (part.strip() for part in line.split(":", 1))
        if name != "System RAM":
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        if end <= start:
            raise AgentError("/proc/iomem shows no addresses (not root?)")
        out.append((start, end - start + 1))
    if not out:
        raise AgentError("no System RAM in /proc/iomem")
    return out


def unbind(dev: Path) -> str | None:
    """Release *dev* from its driver; the driver's name, or None if none was bound."""
    name = driver_of(dev)
    if name is not None:
        (dev / "driver" / "unbind").write_text(dev.name)
    return name


def bind(dev: Path, driver: str, timeout: float = BIND_TIMEOUT) -> dict[str, Any]:
    """Bind *driver* to *dev*: ``driver_override`` names it (no other driver takes the
    function), ``modprobe`` loads it (its registration probes the function), else an
    explicit ``bind``.  Returns what was done and how long it took."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"driver": driver, "bdf": dev.name}
    current = driver_of(dev)
    if current is not None and current != driver:
        raise AgentError(f"{dev.name} is bound to {current}, not {driver}")
    (dev / "driver_override").write_text(driver)
    if current is None:
        if not (DRIVERS / driver).is_dir():
            modprobe(driver)
            out["modprobe"] = True
        if driver_of(dev) is None:
            try:
                (DRIVERS / driver / "bind").write_text(dev.name)
            except OSError as exc:
                if driver_of(dev) != driver:     # bound meanwhile by the probe: fine
                    raise AgentError(f"{driver} did not bind {dev.name}: {exc}") from None
    _wait(lambda: driver_of(dev) == driver, timeout, f"{driver} bound to {dev.name}")
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def modprobe(module: str) -> None:
    try:
        r = subprocess.run(["modprobe", module], capture_output=True, text=True,
                           timeout=MODPROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"modprobe {module}: {exc}") from None
    if r.returncode != 0:
        raise AgentError(f"modprobe {module} failed: {r.stderr.strip() or r.returncode}")


def nvme_namespaces(dev: Path, timeout: float = BIND_TIMEOUT) -> dict[str, Any]:
    """The controller the nvme driver made of *dev* and its namespaces' block devices, once
    their nodes exist in /dev (the driver scans namespaces after the controller is live).
    A namespace's disk hangs under the controller, or -- with native multipath -- under
    its subsystem, which links the controller."""
    ctrl_dir = dev / "nvme"
    _wait(lambda: ctrl_dir.is_dir() and any(ctrl_dir.iterdir()), timeout,
          f"an NVMe controller on {dev.name}")
    ctrl = sorted(p.name for p in ctrl_dir.iterdir())[0]
    names: list[str] = []

    def found() -> bool:
        names[:] = [n for n in _disks() if _belongs(n, dev, ctrl)]
        return bool(names) and all((DEV / n).exists() for n in names)

    _wait(found, timeout, f"a namespace of {ctrl} ({dev.name}) in /dev")
    state = (ctrl_dir / ctrl / "state").read_text().strip()
    return {"controller": ctrl, "state": state, "namespaces": [f"/dev/{n}" for n in names],
            "bytes": {n: int((BLOCK / n / "size").read_text()) * 512 for n in names}}


def _disks() -> list[str]:
    """Visible NVMe namespace disks (``nvme<subsys>n<nsid>``; the hidden per-path ones of
    native multipath are ``nvme<s>c<ctrl>n<nsid>``)."""
    return sorted(p.name for p in BLOCK.glob("nvme*n*") if NAMESPACE.fullmatch(p.name))


def _belongs(disk: str, dev: Path, ctrl: str) -> bool:
    path = (BLOCK / disk).resolve()
    return path.is_relative_to(dev.resolve()) or (path.parent / ctrl).exists()


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AgentError(f"no {what} after {timeout:g} s")
        time.sleep(0.05)


__all__ = ["bind", "modprobe", "nvme_namespaces", "system_ram", "unbind"]
