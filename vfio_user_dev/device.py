"""The emulated PCIe function: config space, BAR0 registers, MSI-X BAR, DMA engine.

Config space layout (4 KiB)::

    0x000 Type 0 header   vendor 0x1234 device 0x7E10, class 12:00:00 (accelerator)
          BAR0 0x10  32-bit memory, 4 KiB   registers (see regs.py)
          BAR1 0x14  32-bit memory, 4 KiB   MSI-X table @0x000, PBA @0x800
    0x040 Power Management (ID 01)   PMC v3, PMCSR power state RW
    0x050 MSI-X (ID 11)              4 vectors, table BIR 1/0x000, PBA BIR 1/0x800
    0x060 PCI Express (ID 10)        v2, Endpoint; DevCap bit 30 TEE-IO Supported
    0x100 Device Serial Number (ext 0003)
    0x110 Data Object Exchange (ext 002E) v2, 0x18 bytes; registers +0x04..+0x17 are served
          by the DOE mailbox (teeio/doe.py); DOE interrupts use MSI-X vector 1
    0x128 Integrity and Data Encryption (ext 0030) v1, 0x54 bytes (teeio/pcie/ide_cap.py):
          one Link IDE stream block, two Selective IDE stream blocks with RID and one
          Address Association block each; IDE_KM, TEE-Limited.  Config writes in its
          window are applied with the register masks, then ``self.ide`` reacts (Enable,
          Stream ID...); its Status registers report the stream state.  ``self.ide`` is
          also the key store of the DSM's IDE_KM responder (dsm.py) and the source of
          the link endpoint's IDE streams (link.py).

No region is offered as mmappable: every BAR access traps here (DESIGN decision 7).

DMA (DESIGN decision 10): the engine reaches guest memory only through its link endpoint
(``self.link_end``, ``link.py``): its reads and writes cross the link as TLPs to the root
port (``root_port.py``), the only part that maps guest RAM.  ``dma`` (the client's DMA
maps), ``root_port`` and ``link`` are the platform side; the device object holds them
only for the vfio-user transport (DMA_MAP/UNMAP) and the platform control socket.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from teeio import device_regs as regs
from teeio.device_regs import Irq, Op, R, St
from teeio.doe import DOE_CAP_SIZE, DOE_CAP_VERSION, DoeDispatcher, DoeMailbox, protocol_name
from teeio.pcie import ide_cap
from teeio.pcie.config import (
    STATUS_RW1C,
    CapId,
    Command,
    ConfigSpace,
    ExtCapId,
    Reg,
    Status,
    bar_wmask,
)
from teeio.tdisp import TdiEvent
from vfio_user_dev.dma import DmaFault, DmaMapSet
from vfio_user_dev.irq import IrqController
from vfio_user_dev.link import DEFAULT_MPS, DEFAULT_MRRS, CaptureWriter, Link, LinkEndpoint
from vfio_user_dev.protocol import PciRegion, ProtocolError, RegionFlags
from vfio_user_dev.root_port import RootPort

log = logging.getLogger(__name__)

VENDOR_ID = 0x1234
DEVICE_ID = 0x7E10
MSIX_VECTORS = 4
BAR1_SIZE = 4096
BIST_OFFSET = 0x0F     # BIST register (a write to it is a TDISP security event)
MSIX_TABLE_OFF = 0x000
MSIX_PBA_OFF = 0x800
PM_CAP = 0x40
MSIX_CAP = 0x50
PCIE_CAP = 0x60
PCI_EXP_DEVCAP_TEE = 1 << 30  # PCIe 6.x §7.5.3.3 Device Capabilities bit 30 "TEE-IO Supported"
DSN_CAP = 0x100
DOE_CAP = 0x110
DOE_REGS = range(DOE_CAP + 4, DOE_CAP + DOE_CAP_SIZE)   # served by the mailbox, not ConfigSpace
DOE_MSIX_VECTOR = 1
IDE_CAP = DOE_CAP + DOE_CAP_SIZE     # 0x128: the first free DW after DOE
IDE_SELECTIVE_STREAMS = 2
IDE_ADDR_BLOCKS = 1


@dataclass(frozen=True)
class RegionSpec:
    size: int
    flags: int


def build_config(serial: int) -> ConfigSpace:
    return build_config_and_ide(serial)[0]


def build_config_and_ide(serial: int) -> tuple[ConfigSpace, ide_cap.IdeCapability]:
    """The function's config space and the model of its IDE capability in it."""
    cs = ConfigSpace()
    cs.set(Reg.VENDOR_ID, 2, VENDOR_ID)
    cs.set(Reg.DEVICE_ID, 2, DEVICE_ID)
    cs.set(Reg.COMMAND, 2, 0, wmask=Command.MEMORY_SPACE | Command.BUS_MASTER
           | Command.PARITY_ERROR_RESPONSE | Command.SERR_ENABLE | Command.INTERRUPT_DISABLE)
    cs.set(Reg.STATUS, 2, 0, w1c=STATUS_RW1C)
    cs.set(Reg.REVISION_ID, 1, 0x01)
    cs.set(Reg.CLASS_CODE, 3, 0x120000)
    cs.set(Reg.CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
    cs.set(Reg.HEADER_TYPE, 1, 0x00)
    for bar, size in ((0, regs.BAR0_SIZE), (1, BAR1_SIZE)):
        value, mask = bar_wmask(size)
        cs.set(Reg.BAR0 + 4 * bar, 4, value, wmask=mask)
    cs.set(Reg.SUBSYSTEM_VENDOR_ID, 2, VENDOR_ID)
    cs.set(Reg.SUBSYSTEM_ID, 2, 0x0001)
    cs.set(Reg.INTERRUPT_LINE, 1, 0, wmask=0xFF)
    cs.set(Reg.INTERRUPT_PIN, 1, 1)  # INTA#

    # Power Management (PCI PM 1.2 §3.2): PMC version 3; PMCSR bits 1:0 RW, No_Soft_Reset.
    cs.add_capability(PM_CAP, CapId.POWER_MANAGEMENT, bytes(6))
    cs.set(PM_CAP + 2, 2, 0x0003)
    cs.set(PM_CAP + 4, 2, 0x0008, wmask=0x0003)

    # MSI-X (PCIe 6.x §7.7.2): Message Control, Table Offset/BIR, PBA Offset/BIR.
    cs.add_capability(MSIX_CAP, CapId.MSIX, bytes(10))
    cs.set(MSIX_CAP + 2, 2, MSIX_VECTORS - 1, wmask=0xC000)
    cs.set(MSIX_CAP + 4, 4, MSIX_TABLE_OFF | 1)
    cs.set(MSIX_CAP + 8, 4, MSIX_PBA_OFF | 1)

    # PCI Express capability v2, Endpoint (PCIe 6.x §7.5.3).
    cs.add_capability(PCIE_CAP, CapId.PCI_EXPRESS, bytes(0x3A))
    cs.set(PCIE_CAP + 0x02, 2, 0x0002)                        # version 2, type 0 Endpoint
    cs.set(PCIE_CAP + 0x04, 4, PCI_EXP_DEVCAP_TEE | (1 << 15) | 0x1)  # RBER, MPS 256 B
    cs.set(PCIE_CAP + 0x08, 2, 0x2810, wmask=0x7CFF)          # DevCtl (no FLR: bit 15 RO)
    cs.set(PCIE_CAP + 0x0A, 2, 0, w1c=0x000F)                 # DevSta error bits RW1C
    cs.set(PCIE_CAP + 0x0C, 4, 0x00000011)                    # LinkCap 2.5 GT/s x1
    cs.set(PCIE_CAP + 0x10, 2, 0, wmask=0x01C3)               # LinkCtl
    cs.set(PCIE_CAP + 0x12, 2, 0x0011)                        # LinkSta 2.5 GT/s x1
    cs.set(PCIE_CAP + 0x2C, 4, 0x00000002)                    # LinkCap2: 2.5 GT/s
    cs.set(PCIE_CAP + 0x30, 2, 0x0001, wmask=0x000F)          # LinkCtl2 target speed

    # Device Serial Number (PCIe 6.x §7.9.3), proves extended config space reaches the guest.
    cs.add_ext_capability(DSN_CAP, ExtCapId.DEVICE_SERIAL_NUMBER, 1, serial.to_bytes(8, "little"))

    # Data Object Exchange (PCIe 6.3 §7.9.24): only the header lives here; the register
    # bytes stay zero and read-only, region accesses to DOE_REGS go to the DoeMailbox.
    cs.add_ext_capability(DOE_CAP, ExtCapId.DOE, DOE_CAP_VERSION, bytes(DOE_CAP_SIZE - 4))

    # Integrity and Data Encryption (PCIe 6.x §7.9.26).
    ide = ide_cap.build(cs, IDE_CAP, link=True, n_selective=IDE_SELECTIVE_STREAMS,
                        n_addr=IDE_ADDR_BLOCKS, tee_limited=True, name="device")
    return cs, ide



@dataclass
class _Job:
    op: int
    src: int
    dst: int
    length: int
    pattern: int
    generation: int


class TeeIoDevice:
    """Device model behind any transport: region accesses, reset, IRQs, DMA engine."""

    REGIONS = {
        PciRegion.BAR0: RegionSpec(regs.BAR0_SIZE, RegionFlags.READ | RegionFlags.WRITE),
        PciRegion.BAR1: RegionSpec(BAR1_SIZE, RegionFlags.READ | RegionFlags.WRITE),
        PciRegion.CONFIG: RegionSpec(4096, RegionFlags.READ | RegionFlags.WRITE),
    }
    NUM_REGIONS = 9  # VFIO_PCI_NUM_REGIONS

    def __init__(self, serial: int = 0x7E10_0000_0000_0001, *, mps: int = DEFAULT_MPS,
                 mrrs: int = DEFAULT_MRRS, capture: CaptureWriter | None = None) -> None:
        self.serial = serial
        self.dma = DmaMapSet()
        self.root_port = RootPort(self.dma)
        self.link_end = LinkEndpoint()
        self.link = Link(self.link_end, self.root_port, mps=mps, mrrs=mrrs, capture=capture)
        self.irq = IrqController(MSIX_VECTORS, self._intx_allowed)
        self._lock = threading.RLock()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self.generation = 0
        self.listeners: list[Callable[[TeeIoDevice], None]] = []
        # TDISP security events seen in config space / resets (the DSM's TDISP responder).
        self.security_listeners: list[Callable[[TdiEvent], None]] = []
        self.total = {"jobs": 0, "bytes": 0, "errors": 0}
        # DOE: one dispatcher for the config-space mailbox and the host socket, serialised
        # by the device lock.  Protocols (SPDM 0001:01, secured SPDM 0001:02) register here.
        self.doe = DoeDispatcher(lock=self._lock)
        self.doe_mailbox = DoeMailbox(self.doe.handle_object,
                                      interrupt_message_number=DOE_MSIX_VECTOR)
        # The IDE capability model lives as long as the device (the DSM's IDE_KM responder
        # holds it); a reset moves it onto the fresh registers (_reset_state).
        self.config, self.ide = build_config_and_ide(self.serial)
        self.ide.listeners.append(self._ide_event)
        self.link_end.attach_ide_capability(self.ide, lock=self._lock)
        self._reset_state()
        self._engine = threading.Thread(target=self._engine_loop, name="dma-engine", daemon=True)
        self._engine.start()

    # -- state ------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.config = build_config(self.serial)
        # Conventional reset / FLR: IDE registers to defaults, keys invalidated, streams
        # Insecure (PCIe 6.x §6.33.6).
        self.ide.cs = self.config
        self.ide.reset()
        self.r = {reg: 0 for reg in R}
        self.r[R.ID] = regs.DEVICE_ID_REG_VALUE
        self.r[R.VERSION] = regs.REGMAP_VERSION
        self.msix_table = bytearray(BAR1_SIZE)
        for v in range(MSIX_VECTORS):  # vector control: masked after reset (§7.7.2)
            self.msix_table[MSIX_TABLE_OFF + 16 * v + 12] = 1

    def reset(self) -> None:
        """Function-level reset of device state (DMA maps and eventfds belong to the client)."""
        with self._lock:
            self.generation += 1
            self._security_event(TdiEvent.FLR)
            self._reset_state()
            self.doe_mailbox.reset()   # §6.30.2: a reset aborts any DOE transfer in progress
            self.irq.set_intx(False)
        log.info("device reset")

    def close(self) -> None:
        self._jobs.put(None)
        self._engine.join(timeout=5)
        self.link.close()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "dma_jobs": self.total["jobs"],
                "dma_bytes": self.total["bytes"],
                "dma_errors": self.total["errors"],
                "irq_signalled": self.irq.signalled,
                "irq_signalled_intx": self.irq.signalled_by_type["intx"],
                "irq_signalled_msix": self.irq.signalled_by_type["msix"],
                "dma_maps_live": len(self.dma.snapshot()),
                "dma_maps_total": self.dma.maps_total,
                "doe_objects": self.doe.objects,
                "doe_responses": self.doe.responses,
                "doe_protocols": [protocol_name(*p) for p in self.doe.protocols()],
                "link": self.link.status(),
                "link_endpoint": self.link_end.status(),
                "ide": self.ide_status(),
            }

    def _ide_event(self, stream: ide_cap.IdeStream, event: str) -> None:
        log.info("IDE stream %d (%s block %d): %s", stream.stream_id,
                 stream.kind.name.lower(), stream.index, event)

    def ide_status(self) -> list[dict[str, object]]:
        """The IDE stream blocks as their registers and state say."""
        with self._lock:
            return [{"kind": st.kind.name.lower(), "index": st.index, "stream_id": st.stream_id,
                     "enabled": st.enabled, "state": st.state.name.lower(),
                     "failure": st.failure, "rid_range": st.rid_range,
                     "address_ranges": st.address_ranges()} for st in self.ide.streams]

    def _intx_allowed(self) -> bool:
        return not self.config.get(Reg.COMMAND, 2) & Command.INTERRUPT_DISABLE

    # -- region access ------------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._bounds(index, offset, count)
        with self._lock:
            if index == PciRegion.CONFIG:
                return self._config_read(offset, count)
            if index == PciRegion.BAR0:
                return self._bar0_read(offset, count)
            return self._bar1_read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._bounds(index, offset, len(data))
        with self._lock:
            if index == PciRegion.CONFIG:
                old_cmd = self.config.get(Reg.COMMAND, 2)
                self._config_write(offset, data)
                if offset < Reg.COMMAND + 2 and offset + len(data) > Reg.COMMAND:
                    self.irq.update_intx()
                self._config_security_events(offset, len(data), old_cmd)
            elif index == PciRegion.BAR0:
                self._bar0_write(offset, data)
            else:
                self._bar1_write(offset, data)

    # -- TDISP: what the TDI's security manager must hear about (PCIe 6.x §11.2.6) ------------
    def mmio_bars(self) -> list[tuple[int, int, int]]:
        """(BAR index, base address, size) of the memory BARs as assigned in config space."""
        with self._lock:
            return [(bar, self.config.get(Reg.BAR0 + 4 * bar, 4) & ~0xF & 0xFFFFFFFF, size)
                    for bar, size in ((0, regs.BAR0_SIZE), (1, BAR1_SIZE))]

    def _security_event(self, event: TdiEvent) -> None:
        for listener in self.security_listeners:
            listener(event)

    def _config_security_events(self, offset: int, count: int, old_cmd: int) -> None:
        end = offset + count
        if (offset < Reg.BAR0 + 24 and end > Reg.BAR0) or (
                offset < Reg.ROM_ADDRESS + 4 and end > Reg.ROM_ADDRESS) or (
                offset <= BIST_OFFSET < end):
            self._security_event(TdiEvent.BAR_WRITE)
        new_cmd = self.config.get(Reg.COMMAND, 2)
        if old_cmd & ~new_cmd & Command.MEMORY_SPACE:
            self._security_event(TdiEvent.MEMORY_SPACE_DISABLED)
        if old_cmd & ~new_cmd & Command.BUS_MASTER:
            self._security_event(TdiEvent.BUS_MASTER_DISABLED)

    def _bounds(self, index: int, offset: int, count: int) -> None:
        spec = self.REGIONS.get(PciRegion(index)) if index in set(PciRegion) else None
        if spec is None:
            raise ProtocolError(errno.EINVAL, f"region {index} is not implemented")
        if count == 0 or offset < 0 or offset + count > spec.size:
            raise ProtocolError(errno.EINVAL, f"region {index}: access {offset:#x}+{count} "
                                              f"outside {spec.size:#x}")

    # -- config space: ConfigSpace, with the DOE registers routed to the mailbox --------------
    def _config_read(self, offset: int, count: int) -> bytes:
        data = bytearray(self.config.read(offset, count))
        end = offset + count
        if end <= DOE_REGS.start or offset >= DOE_REGS.stop:
            return bytes(data)
        now = time.monotonic()
        for base in range(max(offset & ~3, DOE_REGS.start), min(end, DOE_REGS.stop), 4):
            word = self.doe_mailbox.read(base - DOE_CAP, now).to_bytes(4, "little")
            for i in range(4):
                if offset <= base + i < end:
                    data[base + i - offset] = word[i]
        self._doe_interrupt()
        return bytes(data)

    def _config_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end <= DOE_REGS.start or offset >= DOE_REGS.stop:
            self.config.write(offset, data)
            self.ide.after_write(offset, len(data))     # a no-op outside its window
            return
        if offset < DOE_REGS.start:
            self.config.write(offset, data[:DOE_REGS.start - offset])
        now = time.monotonic()
        for base in range(max(offset & ~3, DOE_REGS.start), min(end, DOE_REGS.stop), 4):
            value, enable = 0, 0
            for i in range(4):
                if offset <= base + i < end:
                    value |= data[base + i - offset] << (8 * i)
                    enable |= 1 << i
            self.doe_mailbox.write(base - DOE_CAP, value, now, enable)
        if end > DOE_REGS.stop:
            self.config.write(DOE_REGS.stop, data[DOE_REGS.stop - offset:])
            self.ide.after_write(DOE_REGS.stop, end - DOE_REGS.stop)
        self._doe_interrupt()

    def _doe_interrupt(self) -> None:
        # §6.30.3: DOE interrupts are MSI/MSI-X only, never INTx.
        if self.doe_mailbox.take_interrupt() and self.irq.msix_ready(DOE_MSIX_VECTOR):
            self.irq.raise_msix(DOE_MSIX_VECTOR)

    # -- BAR0 -------------------------------------------------------------------------------
    def _bar0_read(self, offset: int, count: int) -> bytes:
        out = bytearray()
        for pos in range(offset & ~3, offset + count, 4):
            out += self._reg_read(pos).to_bytes(4, "little")
        start = offset & 3
        return bytes(out[start:start + count])

    def _reg_read(self, off: int) -> int:
        if off == R.IRQ_COUNT:
            return self.irq.signalled & 0xFFFFFFFF
        try:
            return self.r[R(off)]
        except ValueError:
            return 0  # reserved: reads as zero

    def _bar0_write(self, offset: int, data: bytes) -> None:
        pos = offset
        while pos < offset + len(data):
            base = pos & ~3
            cur = bytearray(self._reg_read(base).to_bytes(4, "little"))
            mask = bytearray(4)
            for i in range(4):
                if offset <= base + i < offset + len(data):
                    cur[i] = data[base + i - offset]
                    mask[i] = 0xFF
            self._reg_write(base, int.from_bytes(cur, "little"), int.from_bytes(mask, "little"))
            pos = base + 4

    def _reg_write(self, off: int, value: int, bytemask: int) -> None:
        rw = (R.SCRATCH, R.INT_ENABLE, R.DMA_SRC_LO, R.DMA_SRC_HI, R.DMA_DST_LO, R.DMA_DST_HI,
              R.DMA_LEN, R.DMA_PATTERN)
        if off in rw:
            self.r[R(off)] = value
            if off == R.INT_ENABLE:
                self._update_irq(new_bits=0)
        elif off == R.INT_STATUS:
            self.r[R.INT_STATUS] &= ~(value & bytemask)
            self._update_irq(new_bits=0)
        elif off == R.DMA_CMD and value & regs.CMD_GO:
            self._start_job(value & 0xF)
        # RO and reserved registers ignore writes.

    def _start_job(self, op: int) -> None:
        if self.r[R.STATUS] & St.BUSY:
            self._finish(regs.DmaError.BUSY)
            return
        length = self.r[R.DMA_LEN]
        self.r[R.STATUS] = St.BUSY
        self._jobs.put(_Job(op, self.r[R.DMA_SRC_LO] | self.r[R.DMA_SRC_HI] << 32,
                            self.r[R.DMA_DST_LO] | self.r[R.DMA_DST_HI] << 32,
                            length, self.r[R.DMA_PATTERN], self.generation))

    # -- BAR1: MSI-X table and PBA ----------------------------------------------------------
    def _bar1_read(self, offset: int, count: int) -> bytes:
        pba = 0
        for v, p in enumerate(self.irq.pending[2]):
            pba |= int(p) << v
        view = bytearray(self.msix_table)
        view[MSIX_PBA_OFF:MSIX_PBA_OFF + 8] = pba.to_bytes(8, "little")
        return bytes(view[offset:offset + count])

    def _bar1_write(self, offset: int, data: bytes) -> None:
        end = MSIX_TABLE_OFF + 16 * MSIX_VECTORS
        for i, b in enumerate(data):
            o = offset + i
            if MSIX_TABLE_OFF <= o < end:  # the PBA is read-only
                self.msix_table[o] = b & 0x01 if (o - MSIX_TABLE_OFF) % 16 == 12 else b

    # -- DMA engine -------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                code, moved = self._run(job)
            except Exception:
                log.exception("DMA engine bug while running %s", job)
                code, moved = regs.DmaError.INTERNAL, 0
            with self._lock:
                if job.generation != self.generation:
                    continue  # reset while running: the result is dropped
                self.total["bytes"] += moved
                self.r_add_bytes(moved)
                self._finish(code)
            for fn in list(self.listeners):
                try:
                    fn(self)
                except Exception:
                    log.exception("device listener failed")

    def r_add_bytes(self, n: int) -> None:
        total = (self.r[R.DMA_BYTES_HI] << 32 | self.r[R.DMA_BYTES_LO]) + n
        self.r[R.DMA_BYTES_LO] = total & 0xFFFFFFFF
        self.r[R.DMA_BYTES_HI] = (total >> 32) & 0xFFFFFFFF

    def _run(self, job: _Job) -> tuple[regs.DmaError, int]:
        if not self.config.get(Reg.COMMAND, 2) & Command.BUS_MASTER:
            return regs.DmaError.BUS_MASTER_OFF, 0
        if not 0 < job.length <= regs.MAX_DMA_LEN:
            return regs.DmaError.BAD_LENGTH, 0
        try:
            mem = self.link_end
            if job.op == Op.COPY:
                data = mem.read(job.src, job.length)
                mem.write(job.dst, data)
                return regs.DmaError.NONE, 2 * job.length
            if job.op == Op.FILL:
                pat = job.pattern.to_bytes(4, "little")
                data = (pat * (job.length // 4 + 1))[:job.length]
                mem.write(job.dst, data)
                return regs.DmaError.NONE, job.length
            if job.op == Op.SHA256:
                digest = hashlib.sha256(mem.read(job.src, job.length)).digest()
                mem.write(job.dst, digest)
                return regs.DmaError.NONE, job.length + len(digest)
        except DmaFault as exc:
            log.warning("DMA fault: %s", exc)
            return regs.DmaError.FAULT, 0
        return regs.DmaError.BAD_OPCODE, 0

    def _finish(self, code: regs.DmaError) -> None:
        if code == regs.DmaError.NONE:
            self.r[R.STATUS] = St.DONE
            bit = Irq.DMA_DONE
            self.r[R.DMA_JOBS] = (self.r[R.DMA_JOBS] + 1) & 0xFFFFFFFF
            self.total["jobs"] += 1
        else:
            busy = self.r[R.STATUS] & St.BUSY if code == regs.DmaError.BUSY else 0
            self.r[R.STATUS] = busy | St.ERROR | (int(code) << 8)
            bit = Irq.DMA_ERROR
            self.total["errors"] += 1
        self.r[R.INT_STATUS] |= bit
        self._update_irq(new_bits=bit)

    def _update_irq(self, new_bits: int) -> None:
        level = self.r[R.INT_STATUS] & self.r[R.INT_ENABLE]
        if self.irq.msix_ready(0):
            self.config.poke(Reg.STATUS, 2, self.config.get(Reg.STATUS, 2)
                             & ~Status.INTERRUPT_STATUS)
            self.irq.set_intx(False)  # a function using MSI-X never asserts INTx
            if new_bits & self.r[R.INT_ENABLE]:
                self.irq.raise_msix(0)
            return
        status = self.config.get(Reg.STATUS, 2) & ~Status.INTERRUPT_STATUS
        if level:
            status |= Status.INTERRUPT_STATUS
        self.config.poke(Reg.STATUS, 2, status)
        self.irq.set_intx(bool(level))
