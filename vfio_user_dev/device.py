"""The emulated PCIe function: config space, BAR0 registers, MSI-X BAR, DMA engine.

Config space layout (4 KiB)::

    0x000 Type 0 header   vendor 0x1234 device 0x7E10, class 12:00:00 (accelerator)
          BAR0 0x10  32-bit memory, 4 KiB   registers (see regs.py)
          BAR1 0x14  32-bit memory, 4 KiB   MSI-X table @0x000, PBA @0x800
    0x040 Power Management (ID 01)   PMC v3, PMCSR power state RW
    0x050 MSI-X (ID 11)              4 vectors, table BIR 1/0x000, PBA BIR 1/0x800
    0x060 PCI Express (ID 10)        v2, Endpoint; DevCap: TEE-IO Supported (bit 30), FLR
                                     (28), Extended Tag (5), Max_Payload_Size Supported =
                                     ``--mps``; DevCtl MPS/MRRS/Extended Tag drive the link
                                     (link.py), Initiate FLR resets the function
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
    0x17C Advanced Error Reporting (ext 0001) v2, 0x2C bytes (teeio/pcie/aer.py), last in
          the list: IDE check failures the device detects log Uncorrectable Internal
          Error, requests it completes with UR log Unsupported Request.

No region is offered as mmappable: every BAR access traps here (docs/design.md decision 7).

TDISP enforcement (PCIe 6.x §11.2; rules in ``enforcement.py``).  The DSM's TDISP
responder (``tdisp_responder.py``) tells the device about itself (:meth:`tdi_attached`)
and every transition it takes (:meth:`_tdi_transition`), and the device enforces:

* **TEE MMIO over the link.**  BAR0 (registers, a TEE range in the interface report) is
  reached through the root port: a CPU access becomes MRd/MWr TLPs down the link, IDE-
  protected (T=1 once the TSM turned on private MMIO), and the device's completer
  (:meth:`mmio_request`) serves it only per :func:`~vfio_user_dev.enforcement.mmio_refusal`
  (else UR: all ones / dropped).  Only in plain CONFIG_UNLOCKED, with the access in the
  clear and nothing on the link watching, does it take a direct path (same gate).  BAR1
  (MSI-X table and PBA, IS_NON_TEE_MEM) is served directly as ever.
* **DMA gating** (:func:`~vfio_user_dev.enforcement.dma_route`): T=0 in CONFIG_UNLOCKED,
  T=1 on the bound stream in RUN, nothing in CONFIG_LOCKED/ERROR; a job is aborted when
  the TDI changes state under it (QUIESCE), and the data of a read issued in RUN is
  dropped if the TDI left that RUN before it arrived.
* **Security events** (§11.2.6): BAR/ROM/BIST writes, Memory Space or Bus Master Enable
  cleared, Device Control protected fields (Extended Tag, Phantom Functions, Enable No
  Snoop, Initiate FLR; 10-bit Tag Requester in Device Control 2), writes to the bound
  stream's IDE Control / RID / address association registers, the bound stream going
  Insecure once it had been Secure (MAC failure, IDE Fail Message, Enable cleared, its
  keys stopped or invalidated), FLR.  The write itself completes normally.
* **Actions**: QUIESCE aborts DMA jobs, SCRUB_SECRETS clears SCRATCH and the DMA
  registers and drops job state (``scrubs``), ENABLE/REVOKE_TEE_ACCESS switch T=1 access.

Every refusal is counted by kind (``stats()["tdisp_refusals"]``, with the root port's
window refusals as ``root_port.<reason>``) and logged without flooding.

DMA (docs/design.md decision 10): the engine reaches guest memory only through its link endpoint
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
from pathlib import Path
from typing import TYPE_CHECKING

from teeio import device_regs as regs
from teeio.device_regs import Irq, Op, R, St
from teeio.doe import DOE_CAP_SIZE, DOE_CAP_VERSION, DoeDispatcher, DoeMailbox, protocol_name
from teeio.measurements import MeasurementSource
from teeio.pcie import aer, ide_cap
from teeio.pcie.config import (
    DEVCTL_MPS_SHIFT,
    DEVCTL_MRRS_SHIFT,
    PAYLOAD_SIZES,
    STATUS_RW1C,
    CapId,
    Command,
    ConfigSpace,
    DevCap,
    DevCtl,
    ExtCapId,
    Reg,
    Status,
    bar_wmask,
    payload_size,
    payload_size_code,
)
from teeio.tdisp import TdiAction, TdiEvent
from teeio.tdisp.defs import TdiState
from teeio.tlp import check_tlp_size
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.dsm import FirmwareUpdateError
from vfio_user_dev.enforcement import Refusals, dma_route, mmio_refusal
from vfio_user_dev.irq import IrqController
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.interfaces import DEFAULT_MPS, DEFAULT_MRRS, LinkError, MmioRequest
from vfio_user_dev.platform_events import PlatformEvents
from vfio_user_dev.protocol import PciRegion, ProtocolError, RegionFlags

if TYPE_CHECKING:
    from teeio.tdisp.responder import TdispResponder
    from vfio_user_dev.dsm import DeviceSecurityManager

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
MSIX_ENABLE = 1 << 15         # PCIe 6.x §7.7.2.2 MSI-X Message Control bit 15 "MSI-X Enable"
DSN_CAP = 0x100
DOE_CAP = 0x110
DOE_REGS = range(DOE_CAP + 4, DOE_CAP + DOE_CAP_SIZE)   # served by the mailbox, not ConfigSpace
DOE_MSIX_VECTOR = 1
IDE_CAP = DOE_CAP + DOE_CAP_SIZE     # 0x128: the first free DW after DOE
IDE_SELECTIVE_STREAMS = 2
IDE_ADDR_BLOCKS = 1
DEVCAP = PCIE_CAP + 0x04
DEVCTL = PCIE_CAP + 0x08
DEVSTA = PCIE_CAP + 0x0A
DEVCTL2 = PCIE_CAP + 0x28
IDE_CAP_SIZE = 0x54
AER_CAP = IDE_CAP + IDE_CAP_SIZE     # 0x17C: the first free DW after IDE
# Device Control after reset (PCIe 6.x §7.5.3.4): Enable Relaxed Ordering, Extended Tag
# Field Enable (8-bit tags), Enable No Snoop, MPS 128 B (000b); MRRS from the device's
# options (default 512 B, 010b).  Writable: error reporting enables, Relaxed Ordering,
# MPS, Extended Tag, Aux Power PM, No Snoop, MRRS; Phantom Functions is not supported
# (RO 0); Initiate FLR (bit 15) always reads 0 (its write is acted on, see _config_write).
DEVCTL_RESET = DevCtl.RELAXED_ORDERING | DevCtl.EXTENDED_TAG_FIELD | DevCtl.NO_SNOOP
DEVCTL_WMASK = 0x7DFF
# Device Control fields whose change is a TDISP security event (PCIe 6.x §11.2.6; §7.5.3.4):
# Extended Tag Field Enable (8), Phantom Functions Enable (9), Enable No Snoop (11);
# Initiate Function Level Reset (15) is a write-1 trigger.  Device Control 2: 10-Bit Tag
# Requester Enable (12).
DEVCTL_PROTECTED = (1 << 8) | (1 << 9) | (1 << 11)
DEVCTL_INITIATE_FLR = 1 << 15
DEVCTL2_PROTECTED = 1 << 12


def _written(offset: int, data: bytes, reg: int, old: int, size: int = 2) -> int:
    """Register *reg* (of *size* bytes, now *old*) as a write of *data* at *offset*
    meant it: the written bytes over the old ones."""
    value = old
    for i in range(size):
        if offset <= reg + i < offset + len(data):
            value = value & ~(0xFF << 8 * i) | data[reg + i - offset] << 8 * i
    return value


@dataclass(frozen=True)
class RegionSpec:
    size: int
    flags: int


def build_config(serial: int, *, mps_supported: int = DEFAULT_MPS,
                 mrrs: int = DEFAULT_MRRS) -> ConfigSpace:
    return build_config_and_ide(serial, mps_supported=mps_supported, mrrs=mrrs)[0]


def build_config_and_ide(serial: int, *, mps_supported: int = DEFAULT_MPS,
                         mrrs: int = DEFAULT_MRRS
                         ) -> tuple[ConfigSpace, ide_cap.IdeCapability]:
    """The function's config space and the model of its IDE capability in it.
    *mps_supported*: Device Capabilities Max_Payload_Size Supported; *mrrs*: the Device
    Control Max_Read_Request_Size after reset (ValueError unless 128..4096, a power of
    two: what the 3-bit fields encode)."""
    devcap = (DevCap.TEE_IO_SUPPORTED | DevCap.FUNCTION_LEVEL_RESET
              | DevCap.ROLE_BASED_ERROR_REPORTING | DevCap.EXTENDED_TAG_FIELD_SUPPORTED
              | payload_size_code(mps_supported))
    devctl = DEVCTL_RESET | payload_size_code(mrrs) << DEVCTL_MRRS_SHIFT
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
    cs.set(DEVCAP, 4, devcap)                                 # §7.5.3.3
    cs.set(DEVCTL, 2, devctl, wmask=DEVCTL_WMASK)             # §7.5.3.4
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
    assert ide.end == IDE_CAP + IDE_CAP_SIZE

    # Advanced Error Reporting (PCIe 6.x §7.8.4), after the last capability.
    aer.build(cs, AER_CAP)
    return cs, ide


def device_control_link(cs: ConfigSpace) -> tuple[int, int, bool]:
    """(MPS, MRRS, Extended Tag Field Enable) the function works with, as software
    programmed Device Control (PCIe 6.x §7.5.3.4): MPS never above Device Capabilities
    Max_Payload_Size Supported (§7.5.3.3; a larger value or a reserved encoding gives the
    supported size); a reserved MRRS encoding counts as the largest, 4096 B."""
    devctl = cs.get(DEVCTL, 2)
    supported = payload_size(cs.get(DEVCAP, 4) & DevCap.MAX_PAYLOAD_SIZE_SUPPORTED)
    assert supported is not None
    mps = min(payload_size(devctl >> DEVCTL_MPS_SHIFT & 7) or supported, supported)
    mrrs = payload_size(devctl >> DEVCTL_MRRS_SHIFT & 7) or PAYLOAD_SIZES[-1]
    return mps, mrrs, bool(devctl & DevCtl.EXTENDED_TAG_FIELD)


def apply_device_control(cs: ConfigSpace, endpoint: LinkEndpoint) -> None:
    """Make the endpoint's link (once it has one) split TLPs by the sizes Device Control
    now says, and the device's DMA reads use the tags Extended Tag Field Enable allows
    (§2.2.6.2)."""
    mps, mrrs, extended_tags = device_control_link(cs)
    if endpoint.link is not None:
        endpoint.link.set_payload_sizes(mps, mrrs)
    endpoint.set_extended_tags(extended_tags)



@dataclass
class _Job:
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


class DmaRefused(DmaFault):
    """The device itself does not issue (or accept the data of) a DMA request (TDISP)."""


class TeeIoDevice:
    """Device model behind any transport: region accesses, reset, IRQs, DMA engine."""

    REGIONS = {
        PciRegion.BAR0: RegionSpec(regs.BAR0_SIZE, RegionFlags.READ | RegionFlags.WRITE),
        PciRegion.BAR1: RegionSpec(BAR1_SIZE, RegionFlags.READ | RegionFlags.WRITE),
        PciRegion.CONFIG: RegionSpec(4096, RegionFlags.READ | RegionFlags.WRITE),
    }
    NUM_REGIONS = 9  # VFIO_PCI_NUM_REGIONS

    def __init__(self, serial: int = 0x7E10_0000_0000_0001, *, mps: int = DEFAULT_MPS,
                 mrrs: int = DEFAULT_MRRS, events: PlatformEvents | None = None) -> None:
        self.serial = serial
        # --mps: Device Capabilities Max_Payload_Size Supported; --mrrs: Device Control
        # Max_Read_Request_Size after reset.  The link follows Device Control.
        self._config_options = {"mps_supported": check_tlp_size("Max_Payload_Size", mps),
                                "mrrs": check_tlp_size("Max_Read_Request_Size", mrrs)}
        #: where the device reports what changed TDI or stream truth (the platform's log,
        #: ``platform_events.py``); the platform (``platform.py``) listens
        self.events = events if events is not None else PlatformEvents()
        #: the device's only way out: its end of the link (``link.py``)
        self.link_end = LinkEndpoint()
        self.irq = IrqController(MSIX_VECTORS, self._intx_allowed)
        self._lock = threading.RLock()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self.generation = 0
        self.listeners: list[Callable[[TeeIoDevice], None]] = []
        # TDISP security events seen in config space / resets (the DSM's TDISP responder).
        self.security_listeners: list[Callable[[TdiEvent], None]] = []
        self.total = {"jobs": 0, "bytes": 0, "errors": 0}
        # TDISP (tdi_attached): the DSM, its TDISP responder, what the device enforces.
        self.dsm: DeviceSecurityManager | None = None
        self.tdisp: TdispResponder | None = None
        self.tdi_epoch = 0              # +1 at every TDI state change (aborts DMA jobs)
        self.tee_access = False         # START enabled T=1 access; revoked on leaving RUN
        self._bound_secure = False      # the bound stream has been Secure since LOCK
        self.scrubs = 0
        self._writer = "vmm"            # who wrote config space last (platform events)
        self.refusals = Refusals(log)
        self.link_end.mmio_completer = self
        # DOE: one dispatcher for the config-space mailbox and the host socket, serialised
        # by the device lock.  Protocols (SPDM 0001:01, secured SPDM 0001:02) register here.
        self.doe = DoeDispatcher(lock=self._lock)
        self.doe_mailbox = DoeMailbox(self.doe.handle_object,
                                      interrupt_message_number=DOE_MSIX_VECTOR)
        # The IDE capability model lives as long as the device (the DSM's IDE_KM responder
        # holds it); a reset moves it onto the fresh registers (_reset_state).
        self.config, self.ide = build_config_and_ide(self.serial, **self._config_options)
        self.ide.listeners.append(self._ide_event)
        self.link_end.on_error.append(self._link_error)
        self.link_end.attach_ide_capability(self.ide, lock=self._lock)
        self._reset_state()
        self._engine = threading.Thread(target=self._engine_loop, name="dma-engine", daemon=True)
        self._engine.start()

    # -- state ------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        old, self.config = self.config, build_config(self.serial, **self._config_options)
        aer.carry_sticky(old, self.config, AER_CAP)     # sticky: FLR keeps them (§7.4)
        apply_device_control(self.config, self.link_end)    # MPS, MRRS, tags back to defaults
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

    def tdi_attached(self, dsm: DeviceSecurityManager) -> None:
        """The DSM serves TDISP for this function: follow its TDI (TdiHost hook)."""
        assert dsm.tdisp is not None
        with self._lock:
            self.dsm = dsm
            self.tdisp = dsm.tdisp
            dsm.lock = self._lock            # the DOE dispatcher's lock too
            dsm.tdisp.on_transition.append(self._tdi_transition)
            dsm.tdisp.ide_listeners.append(self._check_bound_stream)
            if dsm.security_event not in self.security_listeners:
                self.security_listeners.append(dsm.security_event)

    def tdi_state(self) -> TdiState:
        return self.tdisp.state if self.tdisp is not None else TdiState.CONFIG_UNLOCKED

    def bound_stream(self) -> int | None:
        return self.tdisp.default_stream_id if self.tdisp is not None else None

    def _tdi_transition(self, event: TdiEvent, before: TdiState, after: TdiState,
                        actions: TdiAction) -> None:
        """Perform the actions of a transition the TDISP responder took (§11.2)."""
        with self._lock:
            if after is not before or actions & TdiAction.QUIESCE:
                # QUIESCE: queued and running DMA jobs see the new epoch and stop.
                self.tdi_epoch += 1
            if actions & TdiAction.SCRUB_SECRETS:
                self._scrub()
            if actions & TdiAction.REVOKE_TEE_ACCESS:
                self.tee_access = False
            if actions & TdiAction.ENABLE_TEE_ACCESS:
                self.tee_access = True
            if actions & TdiAction.LOCK_CONFIG:
                self._bound_secure = self._bound_stream_ok()
            if actions & TdiAction.UNLOCK_CONFIG:
                self._bound_secure = False
            if after is not before:
                # the platform hears it (its root port revokes windows and private MMIO
                # the moment the TDI is not RUN), and the TSM from the platform
                self.events.emit("tdi", requester_id=self.link_end.requester_id,
                                 before=before.name, after=after.name, event=event.name)
        if after is not before:
            log.info("TDI %s -> %s on %s (actions %s)", before.name, after.name, event.name,
                     actions.name if actions else "none")

    def _scrub(self) -> None:
        """SCRUB_SECRETS: TVM data in BAR0 and the DMA engine's job state are gone."""
        self.generation += 1            # a running or queued job's result is dropped
        for reg in (R.SCRATCH, R.STATUS, R.INT_STATUS, R.DMA_SRC_LO, R.DMA_SRC_HI,
                    R.DMA_DST_LO, R.DMA_DST_HI, R.DMA_LEN, R.DMA_PATTERN):
            self.r[reg] = 0
        self._update_irq(new_bits=0)
        self.scrubs += 1
        log.info("TDI secrets scrubbed (BAR0 data and DMA registers, job state)")

    def _bound_stream_ok(self) -> bool:
        sid = self.bound_stream()
        st = None if sid is None else self.ide.stream(sid)
        return st is not None and st.secure and st.keys_ready()

    def _check_bound_stream(self) -> None:
        """IDE_STREAM_INSECURE once the bound stream, Secure since LOCK, no longer is (or
        lost its keys: K_SET_STOP, invalidation) -- §11.2.6."""
        with self._lock:
            if self.tdi_state() not in (TdiState.CONFIG_LOCKED, TdiState.RUN):
                return
            if self._bound_stream_ok():
                self._bound_secure = True
            elif self._bound_secure:
                self._bound_secure = False
                self._security_event(TdiEvent.IDE_STREAM_INSECURE)

    def firmware_update(self, elf: Path) -> tuple[MeasurementSource, ...]:
        """A firmware update from the host (DSM: NO_FW_UPDATE, re-measurement); a refusal
        is counted and logged, and re-raised."""
        if self.dsm is None:
            raise FirmwareUpdateError("the device has no DSM: nothing measures firmware")
        try:
            return self.dsm.firmware_update(elf)
        except FirmwareUpdateError as exc:
            if exc.refused:
                with self._lock:
                    self.refusals.add("fw_update", str(exc))
            raise

    def reset(self, reason: str = "client_reset") -> None:
        """Function-level reset of device state (DMA maps and eventfds belong to the client).
        *reason* names who reset it in the platform event (``platform_events.py``)."""
        with self._lock:
            self.generation += 1
            self._security_event(TdiEvent.FLR)
            self._reset_state()
            # The device's IDE keys are gone (§6.33.6): the platform takes the root port's
            # end of its stream out of Secure too, and its windows and private MMIO.
            self.events.emit("device_reset", requester_id=self.link_end.requester_id,
                             reason=reason)
            self.doe_mailbox.reset()   # §6.30.2: a reset aborts any DOE transfer in progress
            self.irq.set_intx(False)
        log.info("device reset")

    def close(self) -> None:
        self._jobs.put(None)
        self._engine.join(timeout=5)

    @property
    def lock(self) -> threading.RLock:
        """The device's lock (config space, registers, TDI): the platform takes it around
        a CPU access so that an access and a TDI transition never interleave."""
        return self._lock

    def link_attached(self) -> None:
        """The platform connected the endpoint to a link: it follows Device Control."""
        with self._lock:
            apply_device_control(self.config, self.link_end)

    def tdi_status(self) -> dict[str, object]:
        with self._lock:
            t = self.tdisp
            return {"state": self.tdi_state().name,
                    "bound_session": None if t is None else t.bound_session,
                    "lock_flags": 0 if t is None else int(t.tdi.lock_flags),
                    "default_stream_id": self.bound_stream(),
                    "tee_access": self.tee_access}

    def tdisp_refusals(self) -> dict[str, int]:
        """The device's refusals by kind (the platform adds the root port's)."""
        return self.refusals.as_dict()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "tdi": self.tdi_status(),
                "tdisp_refusals": self.tdisp_refusals(),
                "scrubs": self.scrubs,
                "dma_jobs": self.total["jobs"],
                "dma_bytes": self.total["bytes"],
                "dma_errors": self.total["errors"],
                "irq_signalled": self.irq.signalled,
                "irq_signalled_intx": self.irq.signalled_by_type["intx"],
                "irq_signalled_msix": self.irq.signalled_by_type["msix"],
                "doe_objects": self.doe.objects,
                "doe_responses": self.doe.responses,
                "doe_protocols": [protocol_name(*p) for p in self.doe.protocols()],
                "link_endpoint": self.link_end.status(),
                "ide": self.ide_status(),
            }

    def _ide_event(self, stream: ide_cap.IdeStream, event: str) -> None:
        log.info("IDE stream %d (%s block %d): %s", stream.stream_id,
                 stream.kind.name.lower(), stream.index, event)
        self.events.emit("ide_stream", end="device", stream=stream.stream_id,
                         block=f"{stream.kind.name.lower()}{stream.index}",
                         state=stream.state.name.lower(), enabled=stream.enabled, event=event)
        self._check_bound_stream()

    def ide_status(self) -> list[dict[str, object]]:
        """The IDE stream blocks as their registers and state say."""
        with self._lock:
            return [{"kind": st.kind.name.lower(), "index": st.index, "stream_id": st.stream_id,
                     "enabled": st.enabled, "state": st.state.name.lower(),
                     "failure": st.failure, "rid_range": st.rid_range,
                     "address_ranges": st.address_ranges()} for st in self.ide.streams]

    def _intx_allowed(self) -> bool:
        return not self.config.get(Reg.COMMAND, 2) & Command.INTERRUPT_DISABLE

    def msix_enabled(self) -> bool:
        """MSI-X Enable as software set it (one register read; no lock taken, so an IRQ
        sink may call it under the IRQ controller's lock)."""
        return bool(self.config.get(MSIX_CAP + 2, 2) & MSIX_ENABLE)

    # -- region access ------------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int, *,
                    host: bool = False) -> bytes:
        """A read of region *index* (QEMU's; *host*: the host's own path, always T=0)."""
        self.check_bounds(index, offset, count)
        with self._lock:
            if index == PciRegion.CONFIG:
                return self._config_read(offset, count)
            if index == PciRegion.BAR0:
                raise ProtocolError(errno.EINVAL, "BAR0 is TEE MMIO: it is reached through "
                                                  "the platform's root port")
            return self._bar1_read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes, *,
                     host: bool = False) -> None:
        """A write to region *index* (QEMU's; *host*: the host's own path, always T=0)."""
        self.check_bounds(index, offset, len(data))
        if index == PciRegion.BAR0:
            raise ProtocolError(errno.EINVAL, "BAR0 is TEE MMIO: it is reached through the "
                                              "platform's root port")
        with self._lock:
            self._writer = "host" if host else "vmm"
            if index == PciRegion.CONFIG:
                old_cmd = self.config.get(Reg.COMMAND, 2)
                old_devctl = self.config.get(DEVCTL, 2), self.config.get(DEVCTL2, 2)
                watched = self._bound_ide_registers()
                self._config_write(offset, data)
                if offset < Reg.COMMAND + 2 and offset + len(data) > Reg.COMMAND:
                    self.irq.update_intx()
                self._config_security_events(offset, data, old_cmd, old_devctl, watched)
                self._check_bound_stream()
            else:
                self._bar1_write(offset, data)

    # -- TEE MMIO (BAR0) over the link, the device as completer (PCIe 6.x §11.2.1) ----------
    def _bar0_base(self) -> int:
        return self.config.get(Reg.BAR0, 4) & ~0xF & 0xFFFFFFFF

    def mmio_request(self, req: MmioRequest) -> bytes | None:
        """The completer (link.MmioCompleter): serve a memory request per §11.2.1, or None
        (Unsupported Request)."""
        with self._lock:
            offset = req.address - self._bar0_base()
            what = f"{'MWr' if req.write else 'MRd'} {req.address:#x}+{req.length}"
            if not (offset >= 0 and offset + req.length <= regs.BAR0_SIZE):
                self.refusals.add("mmio_outside_bar", f"{what}: not in BAR0")
                return None
            refusal = mmio_refusal(self.tdi_state(), req.t_bit, req.stream_id,
                                   self.bound_stream(), self.tee_access)
            if refusal is not None:
                kind, detail = refusal
                self.refusals.add(kind, f"{what}: {detail}: Unsupported Request")
                return None
            if req.write:
                self._bar0_write(offset, req.data)
                return b""
            return self._bar0_read(offset, req.length)

    # -- TDISP: what the TDI's security manager must hear about (PCIe 6.x §11.2.6) ------------
    def mmio_bars(self) -> list[tuple[int, int, int]]:
        """(BAR index, base address, size) of the memory BARs as assigned in config space."""
        with self._lock:
            return [(bar, self.config.get(Reg.BAR0 + 4 * bar, 4) & ~0xF & 0xFFFFFFFF, size)
                    for bar, size in ((0, regs.BAR0_SIZE), (1, BAR1_SIZE))]

    def _security_event(self, event: TdiEvent) -> None:
        for listener in dict.fromkeys(self.security_listeners):   # each one once
            listener(event)

    def _bound_ide_registers(self) -> list[tuple[int, int]]:
        """Config ranges of the bound stream's Control, RID and address association
        registers (§11.2.6), while the TDI is locked."""
        sid = self.bound_stream()
        if sid is None or self.tdi_state() not in (TdiState.CONFIG_LOCKED, TdiState.RUN):
            return []
        st = self.ide.stream(sid)
        if st is None:
            return []
        if st.kind is ide_cap.StreamKind.LINK:
            return [(st.ctl_off, st.ctl_off + 4)]
        return [(st.ctl_off, st.ctl_off + 4), (st.base + 0x0C, st.end)]

    def _config_security_events(self, offset: int, data: bytes, old_cmd: int,
                                old_devctl: tuple[int, int],
                                watched: list[tuple[int, int]]) -> None:
        count = len(data)
        end = offset + count
        if (offset < Reg.BAR0 + 24 and end > Reg.BAR0) or (
                offset < Reg.ROM_ADDRESS + 4 and end > Reg.ROM_ADDRESS) or (
                offset <= BIST_OFFSET < end):
            self._security_event(TdiEvent.BAR_WRITE)
        new_cmd = self.config.get(Reg.COMMAND, 2)
        if (old_cmd ^ new_cmd) & (Command.MEMORY_SPACE | Command.BUS_MASTER):
            self.events.emit("command", requester_id=self.link_end.requester_id,
                             memory=bool(new_cmd & Command.MEMORY_SPACE),
                             bus_master=bool(new_cmd & Command.BUS_MASTER),
                             by=self._writer)
        if old_cmd & ~new_cmd & Command.MEMORY_SPACE:
            self._security_event(TdiEvent.MEMORY_SPACE_DISABLED)
        if old_cmd & ~new_cmd & Command.BUS_MASTER:
            self._security_event(TdiEvent.BUS_MASTER_DISABLED)
        # "Changing" a protected field: the value written differs from the register's
        # (a read-only field here is still an attempt), or Initiate FLR is written 1.
        devctl = _written(offset, data, DEVCTL, old_devctl[0])
        devctl2 = _written(offset, data, DEVCTL2, old_devctl[1])
        if ((old_devctl[0] ^ devctl) & DEVCTL_PROTECTED or devctl & DEVCTL_INITIATE_FLR
                or (old_devctl[1] ^ devctl2) & DEVCTL2_PROTECTED):
            self._security_event(TdiEvent.PROTECTED_CONFIG_WRITE)
        if offset < self.ide.end and self.ide.offset < end:
            self.events.emit("ide_registers", requester_id=self.link_end.requester_id,
                             offset=offset, size=count, by=self._writer)
        if any(offset < hi and lo < end for lo, hi in watched):
            self._security_event(TdiEvent.IDE_STREAM_REGISTERS_CHANGED)
        if devctl & DEVCTL_INITIATE_FLR:
            # Initiate Function Level Reset (§7.5.3.4 bit 15, §6.6.2), advertised in Device
            # Capabilities: the write completes, then the function resets.
            self.reset("initiate_flr")

    def _link_error(self, kind: LinkError, header: bytes) -> None:
        """An error the link endpoint detected, logged in AER (PCIe 6.x §6.2.4, §7.8.4):
        a failed IDE check as Uncorrectable Internal Error, a request it completed with UR
        as Unsupported Request; *header* goes to the Header Log."""
        error = (aer.Uncorrectable.INTERNAL if kind is LinkError.IDE_CHECK_FAILED
                 else aer.Uncorrectable.UNSUPPORTED_REQUEST)
        with self._lock:
            aer.report_uncorrectable(self.config, AER_CAP, error, header, devsta=DEVSTA)

    def check_bounds(self, index: int, offset: int, count: int) -> None:
        """EINVAL unless *index* is a region of the device and the access lies in it."""
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
        if offset < DEVCTL + 2 and end > DEVCTL:
            # Device Control (§7.5.3.4): the link follows its MPS, MRRS and Extended Tag.
            # (Initiate FLR is acted on after the write's security events.)
            self.config.write(offset, data[:DEVCTL + 2 - offset])
            apply_device_control(self.config, self.link_end)
            if end <= DEVCTL + 2:
                return
            data, offset = data[DEVCTL + 2 - offset:], DEVCTL + 2
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
        job = _Job(op, self.r[R.DMA_SRC_LO] | self.r[R.DMA_SRC_HI] << 32,
                   self.r[R.DMA_DST_LO] | self.r[R.DMA_DST_HI] << 32,
                   length, self.r[R.DMA_PATTERN], self.generation, self.tdi_epoch)
        route = dma_route(self.tdi_state(), self.tee_access, self.bound_stream())
        if isinstance(route, str):
            job.refused = route
        else:
            job.t_bit, job.stream_id = route
        self._jobs.put(job)

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
            if job.generation != self.generation:
                continue        # reset or scrubbed before it ran: dropped
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
        if job.refused is not None:     # §11.2.1: no requests in CONFIG_LOCKED / ERROR
            with self._lock:
                self.refusals.add("dma_not_allowed", f"{job.refused}: nothing sent")
            return regs.DmaError.FAULT, 0
        if not 0 < job.length <= regs.MAX_DMA_LEN:
            return regs.DmaError.BAD_LENGTH, 0
        try:
            if job.op == Op.COPY:
                data = self._dma_read(job, job.src, job.length)
                self._dma_write(job, job.dst, data)
                return regs.DmaError.NONE, 2 * job.length
            if job.op == Op.FILL:
                pat = job.pattern.to_bytes(4, "little")
                data = (pat * (job.length // 4 + 1))[:job.length]
                self._dma_write(job, job.dst, data)
                return regs.DmaError.NONE, job.length
            if job.op == Op.SHA256:
                digest = hashlib.sha256(self._dma_read(job, job.src, job.length)).digest()
                self._dma_write(job, job.dst, digest)
                return regs.DmaError.NONE, job.length + len(digest)
        except DmaFault as exc:
            log.warning("DMA fault: %s", exc)
            return regs.DmaError.FAULT, 0
        return regs.DmaError.BAD_OPCODE, 0

    def _dma_check(self, job: _Job) -> None:
        """QUIESCE: a job whose TDI changed state since it started issues nothing more."""
        if job.epoch != self.tdi_epoch:
            with self._lock:
                self.refusals.add("dma_aborted", f"job (opcode {job.op}): the TDI changed "
                                                 "state since it started")
            raise DmaRefused("DMA job aborted: the TDI changed state (QUIESCE)")

    def _dma_read(self, job: _Job, address: int, length: int) -> bytes:
        self._dma_check(job)
        data = self.link_end.read(address, length, t_bit=job.t_bit, stream_id=job.stream_id)
        if job.t_bit and job.epoch != self.tdi_epoch:
            # §11.2.1: completions of a read issued in RUN only while still in that RUN.
            with self._lock:
                self.refusals.add("dma_late_completion", f"read {address:#x}+{length}: the "
                                  "TDI left RUN before its completions arrived; dropped")
            raise DmaRefused("completions arrived after the TDI left RUN: dropped")
        return data

    def _dma_write(self, job: _Job, address: int, data: bytes) -> None:
        self._dma_check(job)
        self.link_end.write(address, data, t_bit=job.t_bit, stream_id=job.stream_id)

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
        self.irq.set_intx(bool(level), event=bool(new_bits & self.r[R.INT_ENABLE]))
