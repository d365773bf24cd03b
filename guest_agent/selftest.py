"""Self-test: scratch register, FILL, COPY and SHA-256 by DMA, interrupts through uio.

Every check records what was expected and what was seen; the report's ``ok`` is
the conjunction of all checks.

This is the plain (CONFIG_UNLOCKED, non-TEE) device test: it counts INTx delivered
through ``uio_pci_generic`` and DMAs with T=0 into a buffer no window covers.  It is not
for a TDI in CONFIG_LOCKED / RUN / ERROR: there BAR0 answers all ones (no job starts, so no
interrupt comes and every job waited out ``IRQ_TIMEOUT``), T=1 DMA needs a window, and
closing ``/dev/uioN`` at exit clears Bus Master Enable, which moves a locked TDI to ERROR
(guest_agent/pci.py).  In a TEE flow, ``python3 -m guest_agent dma`` runs a job polled,
with a window and without uio.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from guest_agent import dmajob, testdata
from guest_agent.dmabuf import HugeBuffer
from guest_agent.pci import Config, Mmio, UioIrq, enable_device, find_device
from teeio.device_regs import CMD_GO, DEVICE_ID_REG_VALUE, Irq, Op, R, St

VENDOR, DEVICE = 0x1234, 0x7E10
SRC, DST, DIGEST = 0x000000, 0x080000, 0x100000   # offsets inside the 2 MiB page
IRQ_TIMEOUT = 20.0
COMMAND_BUS_MASTER = 1 << 2


class Checks:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, **detail: Any) -> bool:
        self.items.append({"name": name, "ok": bool(ok), **detail})
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.items) and all(i["ok"] for i in self.items)


class Driver:
    """BAR0 mapped, a 2 MiB DMA buffer, and completion either by INTx through uio
    (``irq=True``: this self-test) or by polling STATUS (``irq=False``: no driver bound,
    no fd whose release could clear Bus Master Enable -- the TEE flows)."""

    def __init__(self, irq: bool = True, job_timeout: float = dmajob.JOB_TIMEOUT) -> None:
        self.dev = find_device(VENDOR, DEVICE)
        self.cfg = Config(self.dev)
        self.job_timeout = job_timeout
        self.irq: UioIrq | None = None
        if irq:
            self.irq = UioIrq(self.dev, VENDOR, DEVICE)   # binds uio_pci_generic
            cmd = self.cfg.read(0x04, 2)
            self.cfg.write(0x04, 2, cmd | COMMAND_BUS_MASTER | 0x2)
        else:
            self.command = enable_device(self.cfg)       # Memory Space + Bus Master, no driver
        self.mmio = Mmio(self.dev, 0)
        self.buf = HugeBuffer()
        if irq:
            self.mmio.write32(R.INT_STATUS, 0xFFFFFFFF)
            self.mmio.write32(R.INT_ENABLE, Irq.DMA_DONE | Irq.DMA_ERROR)

    def run_job(self, op: int, src: int, dst: int, length: int, pattern: int = 0) -> dict[str, Any]:
        if self.irq is None:
            done = dmajob.run(self.mmio, dmajob.Job(Op(op), src, dst, length, pattern),
                              self.job_timeout)
            return {"irq": None, "polled": True, "outcome": done.outcome,
                    "status": done.status, "int_status": done.int_status, "done": done.done,
                    "seconds": round(done.seconds, 4)}
        m = self.mmio
        m.write32(R.DMA_SRC_LO, src & 0xFFFFFFFF)
        m.write32(R.DMA_SRC_HI, src >> 32)
        m.write32(R.DMA_DST_LO, dst & 0xFFFFFFFF)
        m.write32(R.DMA_DST_HI, dst >> 32)
        m.write32(R.DMA_LEN, length)
        m.write32(R.DMA_PATTERN, pattern)
        t0 = time.monotonic()
        m.write32(R.DMA_CMD, CMD_GO | op)
        got_irq = self.irq.wait(IRQ_TIMEOUT)
        status = m.read32(R.STATUS)
        int_status = m.read32(R.INT_STATUS)
        m.write32(R.INT_STATUS, int_status)          # acknowledge (RW1C): INTx deasserts
        self.irq.reenable(self.cfg)
        return {"irq": got_irq, "status": status, "int_status": int_status,
                "done": bool(status & St.DONE) and not status & (St.ERROR | St.BUSY),
                "seconds": round(time.monotonic() - t0, 4)}


def run(seed: int, rounds: int) -> dict[str, Any]:
    checks = Checks()
    d = Driver(irq=True)
    assert d.irq is not None
    irq = d.irq
    m, buf = d.mmio, d.buf
    checks.add("id_register", m.read32(R.ID) == DEVICE_ID_REG_VALUE,
               value=hex(m.read32(R.ID)))
    scratch = testdata.stream(seed, "scratch", 16)
    for i in range(4):
        v = int.from_bytes(scratch[4 * i:4 * i + 4], "little")
        m.write32(R.SCRATCH, v)
        got = m.read32(R.SCRATCH)
        checks.add(f"scratch[{i}]", got == v, wrote=hex(v), read=hex(got))
    digests = []
    jobs = 0
    for plan in testdata.job_plan(seed, rounds):
        r = plan["round"]
        # FILL: the device writes a 32-bit pattern into the destination buffer.
        n = plan["fill_len"]
        buf.write(DST, b"\xAA" * n)
        res = d.run_job(Op.FILL, 0, buf.phys + DST, n, plan["fill_pattern"])
        jobs += 1
        checks.add(f"fill[{r}]", res["done"] and res["irq"]
                   and buf.read(DST, n) == testdata.fill_bytes(plan["fill_pattern"], n),
                   length=n, **res)
        # COPY: guest memory to guest memory.
        n = plan["copy_len"]
        src = testdata.stream(seed, f"src{r}", n)
        buf.write(SRC, src)
        buf.write(DST, b"\x55" * n)
        res = d.run_job(Op.COPY, buf.phys + SRC, buf.phys + DST, n)
        jobs += 1
        checks.add(f"copy[{r}]", res["done"] and res["irq"] and buf.read(DST, n) == src,
                   length=n, **res)
        # SHA-256: the device hashes the source and writes the digest back.
        buf.write(DIGEST, b"\0" * 32)
        res = d.run_job(Op.SHA256, buf.phys + SRC, buf.phys + DIGEST, n)
        jobs += 1
        digest = buf.read(DIGEST, 32).hex()
        digests.append(digest)
        checks.add(f"sha256[{r}]", res["done"] and res["irq"]
                   and digest == hashlib.sha256(src).hexdigest(), length=n, digest=digest, **res)
    # A job the device must refuse: DMA to an address no map covers.
    res = d.run_job(Op.FILL, 0, 0xFFFF_FFFF_0000_0000, 64, 0)
    jobs += 1
    checks.add("fault_refused", bool(res["status"] & St.ERROR) and res["irq"]
               and (res["status"] >> 8) & 0xFF == 3, **res)
    dev_jobs = m.read32(R.DMA_JOBS)
    dev_bytes = m.read32(R.DMA_BYTES_LO) | m.read32(R.DMA_BYTES_HI) << 32
    checks.add("device_job_counter", dev_jobs == jobs - 1, device=dev_jobs, issued_ok=jobs - 1)
    checks.add("interrupts_match", irq.received == jobs, received=irq.received, jobs=jobs)
    return {
        "mode": "selftest",
        "bdf": d.dev.name,
        "seed": hex(seed),
        "rounds": rounds,
        "dma_buffer_phys": hex(buf.phys),
        "jobs_issued": jobs,
        "device_jobs": dev_jobs,
        "device_bytes": dev_bytes,
        "device_irq_count": m.read32(R.IRQ_COUNT),
        "interrupts_received": irq.received,
        "sha256": digests,
        "checks": checks.items,
        "ok": checks.ok,
    }
