"""The emulated PCIe function, composed: config space (``config_space.py``, PCIe 6.x §7),
its personality behind BAR0 (``personality/``: the accelerator's registers and DMA engine,
or an NVMe controller), the MSI-X BAR (``msix.py``, §7.7.2) and the TDISP enforcement
(``tee.py``, §11.2).

The device reaches the outside only through its link endpoint (``link.py``); BAR0 is TEE
MMIO served by its completer (:meth:`TeeIoDevice.mmio_request`).  Layout and design
notes: docs/device-internals.md.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from teeio.device_regs import R
from teeio.doe import DoeDispatcher, DoeMailbox, protocol_name
from teeio.measurements import MeasurementSource
from teeio.pcie import aer, ide_cap
from teeio.pcie.config import Command, Reg
from teeio.personality import configuration_measurements, configuration_text
from teeio.tdisp import TdiEvent
from teeio.tdisp.defs import TdiState
from teeio.tlp import check_tlp_size
from vfio_user_dev.bar0 import Bar0Registers
from vfio_user_dev.config_space import (
    AER_CAP,
    BAR1_SIZE,
    CONFIG_SIZE,
    DEVCAP,
    DEVCTL,
    DEVICE_ID,
    DEVSTA,
    DOE_CAP,
    DOE_MSIX_VECTOR,
    DSN_CAP,
    IDE_CAP,
    MSIX_CAP,
    MSIX_ENABLE,
    PCIE_CAP,
    PM_CAP,
    VENDOR_ID,
    FunctionLayout,
    apply_device_control,
    bar_address,
    build_config,
    build_config_and_ide,
    config_read,
    config_write,
    device_control_link,
)
from vfio_user_dev.dma_engine import DmaEngine, DmaRefused
from vfio_user_dev.enforcement import Refusals
from vfio_user_dev.irq import IrqController
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.interfaces import DEFAULT_MPS, DEFAULT_MRRS, LinkError, MmioRequest
from vfio_user_dev.msix import MsixTable
from vfio_user_dev.personality import Personality, PersonalityFactory
from vfio_user_dev.personality.accelerator import AcceleratorPersonality
from vfio_user_dev.platform_events import PlatformEvents
from vfio_user_dev.protocol import PciIrq, PciRegion, ProtocolError, RegionFlags
from vfio_user_dev.tee import T0_SERVED, TeeEnforcement

if TYPE_CHECKING:
    from teeio.tdisp.responder import TdispResponder
    from vfio_user_dev.dsm import DeviceSecurityManager

# The names other modules import from here (their homes are config_space and dma_engine).
__all__ = ["AER_CAP", "BAR1_SIZE", "DEVCAP", "DEVCTL", "DEVICE_ID", "DEVSTA", "DOE_CAP",
           "DOE_MSIX_VECTOR", "DSN_CAP", "IDE_CAP", "MSIX_CAP", "MSIX_ENABLE", "PCIE_CAP",
           "PM_CAP", "VENDOR_ID", "DmaRefused", "RegionSpec", "TeeIoDevice", "build_config",
           "build_config_and_ide", "device_control_link"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionSpec:
    size: int
    flags: int


BAR0_IS_TEE_MMIO = "BAR0 is TEE MMIO: it is reached through the platform's root port"
_UNLOCKED = TdiState.CONFIG_UNLOCKED    # looked up once (an enum class attribute costs a call)


class TeeIoDevice:
    """Device model behind any transport: region accesses, reset, IRQs, its personality
    (*personality*: its factory; default the accelerator)."""

    NUM_REGIONS = 9  # VFIO_PCI_NUM_REGIONS

    def __init__(self, serial: int = 0x7E10_0000_0000_0001, *, mps: int = DEFAULT_MPS,
                 mrrs: int = DEFAULT_MRRS, events: PlatformEvents | None = None,
                 personality: PersonalityFactory = AcceleratorPersonality) -> None:
        self.serial = serial
        self.personality: Personality = personality(self)
        self.layout: FunctionLayout = self.personality.layout
        #: the BAR of the MSI-X table and PBA (IS_NON_TEE_MEM in the interface report)
        self.msix_bar = self.layout.msix_bar
        flags = RegionFlags.READ | RegionFlags.WRITE
        self.REGIONS = {PciRegion.BAR0: RegionSpec(self.layout.bar0_size, flags),
                        PciRegion(self.msix_bar): RegionSpec(BAR1_SIZE, flags),
                        PciRegion.CONFIG: RegionSpec(CONFIG_SIZE, flags)}
        #: region index -> size, for the bounds check of every access
        self._region_size = {int(index): spec.size for index, spec in self.REGIONS.items()}
        # --mps: Device Capabilities Max_Payload_Size Supported; --mrrs: Device Control
        # Max_Read_Request_Size after reset.  The link follows Device Control.
        self._config_options = {"mps_supported": check_tlp_size("Max_Payload_Size", mps),
                                "mrrs": check_tlp_size("Max_Read_Request_Size", mrrs)}
        #: where the device reports what changed TDI or stream truth (the platform's log,
        #: ``platform_events.py``); the platform (``platform.py``) listens
        self.events = events if events is not None else PlatformEvents()
        #: the device's only way out: its end of the link (``link.py``)
        self.link_end = LinkEndpoint()
        self.irq = IrqController(self.layout.msix_vectors, self._intx_allowed)
        self._lock = threading.RLock()
        # TDISP (tdi_attached): the DSM and its TDISP responder; tee enforces.
        self.dsm: DeviceSecurityManager | None = None
        self.tdisp: TdispResponder | None = None
        self.tee = TeeEnforcement(self)
        self.msix = MsixTable(self.layout.msix_vectors)
        self.link_end.mmio_completer = self
        # DOE: one dispatcher for the config-space mailbox and the host socket, serialised
        # by the device lock.  Protocols (SPDM 0001:01, secured SPDM 0001:02) register here.
        self.doe = DoeDispatcher(lock=self._lock)
        self.doe_mailbox = DoeMailbox(self.doe.handle_object,
                                      interrupt_message_number=self.layout.doe_vector)
        # The IDE capability model lives as long as the device (the DSM's IDE_KM responder
        # holds it); a reset moves it onto the fresh registers (_reset_state).
        self.config, self.ide = build_config_and_ide(self.serial, **self._config_options,
                                                   layout=self.layout)
        self.ide.listeners.append(self._ide_event)
        self.link_end.on_error.append(self._link_error)
        self.link_end.attach_ide_capability(self.ide, lock=self._lock)
        self._reset_state()
        self.personality.start()

    # -- the parts' state, under the names it always had ------------------------------------
    @property
    def accelerator(self) -> AcceleratorPersonality:
        """The accelerator personality (AttributeError with another one)."""
        if not isinstance(self.personality, AcceleratorPersonality):
            raise AttributeError(f"the device is {self.layout.info.name}, not an accelerator")
        return self.personality

    @property
    def bar0(self) -> Bar0Registers:
        """The accelerator's BAR0 register file."""
        return self.accelerator.bar0

    @property
    def engine(self) -> DmaEngine:
        """The accelerator's DMA engine."""
        return self.accelerator.engine

    @property
    def r(self) -> dict[R, int]:
        """The accelerator's BAR0 registers."""
        return self.bar0.r

    @property
    def msix_table(self) -> bytearray:
        return self.msix.table

    @property
    def generation(self) -> int:
        return self.engine.generation

    @property
    def listeners(self) -> list[Callable[[TeeIoDevice], None]]:
        """Called (with the device) after each DMA job's result was applied."""
        return self.personality.listeners

    @property
    def total(self) -> dict[str, int]:
        return self.engine.total

    @property
    def security_listeners(self) -> list[Callable[[TdiEvent], None]]:
        return self.tee.security_listeners

    @property
    def refusals(self) -> Refusals:
        return self.tee.refusals

    @property
    def tdi_epoch(self) -> int:
        return self.tee.epoch

    @property
    def tee_access(self) -> bool:
        return self.tee.tee_access

    @property
    def scrubs(self) -> int:
        return self.tee.scrubs

    @property
    def lock(self) -> threading.RLock:
        """The device's lock (config space, registers, TDI): the platform takes it around
        a CPU access so that an access and a TDI transition never interleave."""
        return self._lock

    # -- state ------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        old, self.config = self.config, build_config(self.serial, **self._config_options,
                                                layout=self.layout)
        aer.carry_sticky(old, self.config, AER_CAP)     # sticky: FLR keeps them (§7.4)
        apply_device_control(self.config, self.link_end)    # MPS, MRRS, tags back to defaults
        # Conventional reset / FLR: IDE registers to defaults, keys invalidated, streams
        # Insecure (PCIe 6.x §6.33.6).
        self.ide.cs = self.config
        self.ide.reset()
        self.msix.reset()

    def reset(self, reason: str = "client_reset") -> None:
        """Function-level reset of device state (DMA maps and eventfds belong to the client).
        *reason* names who reset it in the platform event (``platform_events.py``)."""
        with self._lock:
            self.personality.reset()     # work in flight dropped, BAR0 to its defaults
            self.tee.security_event(TdiEvent.FLR)
            self._reset_state()
            # The device's IDE keys are gone (§6.33.6): the platform takes the root port's
            # end of its stream out of Secure too, and its windows and private MMIO.
            self.events.emit("device_reset", requester_id=self.link_end.requester_id,
                             reason=reason)
            self.doe_mailbox.reset()   # §6.30.2: a reset aborts any DOE transfer in progress
            self.irq.set_intx(False)
        log.info("device reset")

    def close(self) -> None:
        self.personality.close()

    def link_attached(self) -> None:
        """The platform connected the endpoint to a link: it follows Device Control."""
        with self._lock:
            apply_device_control(self.config, self.link_end)

    # -- TDISP: the TdiHost of the DSM's TDISP responder (PCIe 6.x §11.2) ---------------------
    def tdi_attached(self, dsm: DeviceSecurityManager) -> None:
        """The DSM serves TDISP for this function: follow its TDI (TdiHost hook)."""
        assert dsm.tdisp is not None
        with self._lock:
            self.dsm = dsm
            self.tdisp = dsm.tdisp
            dsm.lock = self._lock            # the DOE dispatcher's lock too
            dsm.set_device_measurements(self.measurements())
            if self.layout.info.measured:    # the report names the personality too
                dsm.tdisp.device_specific_info = configuration_text(self.layout.info)
            dsm.tdisp.on_transition.append(self.tee.transition)
            dsm.tdisp.ide_listeners.append(self.tee.check_bound_stream)
            if dsm.security_event not in self.security_listeners:
                self.security_listeners.append(dsm.security_event)

    def measurements(self) -> tuple[MeasurementSource, ...]:
        """What the device measures of itself beside its firmware: its configuration
        (``teeio/personality.py``; none for the accelerator)."""
        return configuration_measurements(self.layout.info.name)

    def tdi_state(self) -> TdiState:
        return self.tdisp.state if self.tdisp is not None else _UNLOCKED

    def bound_stream(self) -> int | None:
        return self.tdisp.default_stream_id if self.tdisp is not None else None

    def mmio_bars(self) -> list[tuple[int, int, int]]:
        """(BAR index, base address, size) of the memory BARs as assigned in config space."""
        with self._lock:
            return [(bar, bar_address(self.config, bar), size)
                    for bar, size in ((0, self.layout.bar0_size), (self.msix_bar, BAR1_SIZE))]

    def bar0_address(self) -> int:
        """BAR0's address as assigned now (both halves of a 64-bit BAR)."""
        return bar_address(self.config, 0)

    def firmware_update(self, elf: Path) -> tuple[MeasurementSource, ...]:
        """A firmware update from the host (DSM: NO_FW_UPDATE, re-measurement); a refusal
        is counted and logged, and re-raised."""
        return self.tee.firmware_update(elf)

    def tdi_status(self) -> dict[str, object]:
        return self.tee.status()

    def tdisp_refusals(self) -> dict[str, int]:
        """The device's refusals by kind (the platform adds the root port's)."""
        return self.refusals.as_dict()

    # -- status -----------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "tdi": self.tdi_status(),
                "tdisp_refusals": self.tdisp_refusals(),
                "scrubs": self.scrubs,
                "personality": self.layout.info.name,
                **self.personality.stats(),
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
        self.tee.check_bound_stream()

    def ide_status(self) -> list[dict[str, object]]:
        """The IDE stream blocks as their registers and state say."""
        with self._lock:
            return [{"kind": st.kind.name.lower(), "index": st.index, "stream_id": st.stream_id,
                     "enabled": st.enabled, "state": st.state.name.lower(),
                     "failure": st.failure, "rid_range": st.rid_range,
                     "address_ranges": st.address_ranges()} for st in self.ide.streams]

    def _link_error(self, kind: LinkError, header: bytes) -> None:
        """An error the link endpoint detected, logged in AER (PCIe 6.x §6.2.4, §7.8.4):
        a failed IDE check as Uncorrectable Internal Error, a request it completed with UR
        as Unsupported Request; *header* goes to the Header Log."""
        error = (aer.Uncorrectable.INTERNAL if kind is LinkError.IDE_CHECK_FAILED
                 else aer.Uncorrectable.UNSUPPORTED_REQUEST)
        with self._lock:
            aer.report_uncorrectable(self.config, AER_CAP, error, header, devsta=DEVSTA)

    # -- interrupts -------------------------------------------------------------------------
    def _intx_allowed(self) -> bool:
        return not self.config.get(Reg.COMMAND, 2) & Command.INTERRUPT_DISABLE

    def msix_enabled(self) -> bool:
        """MSI-X Enable as software set it (one register read; no lock taken, so an IRQ
        sink may call it under the IRQ controller's lock)."""
        return bool(self.config.get(MSIX_CAP + 2, 2) & MSIX_ENABLE)

    def _doe_interrupt(self) -> None:
        # §6.30.3: DOE interrupts are MSI/MSI-X only, never INTx.
        vector = self.layout.doe_vector
        if self.doe_mailbox.take_interrupt() and self.irq.msix_ready(vector):
            self.irq.raise_msix(vector)

    # -- region access ------------------------------------------------------------------------
    def check_bounds(self, index: int, offset: int, count: int) -> None:
        """EINVAL unless *index* is a region of the device and the access lies in it."""
        size = self._region_size.get(index)
        if size is None:
            raise ProtocolError(errno.EINVAL, f"region {index} is not implemented")
        if count == 0 or offset < 0 or offset + count > size:
            raise ProtocolError(errno.EINVAL, f"region {index}: access {offset:#x}+{count} "
                                              f"outside {size:#x}")

    def region_read(self, index: int, offset: int, count: int, *,
                    host: bool = False) -> bytes:
        """A read of region *index* (QEMU's; *host*: the host's own path, always T=0)."""
        self.check_bounds(index, offset, count)
        with self._lock:
            if index == PciRegion.CONFIG:
                data, doe = config_read(self.config, self.doe_mailbox, offset, count)
                if doe:
                    self._doe_interrupt()
                return data
            if index == PciRegion.BAR0:
                raise ProtocolError(errno.EINVAL, BAR0_IS_TEE_MMIO)
            return self.msix.read(offset, count, self.irq.pending[PciIrq.MSIX])

    def region_write(self, index: int, offset: int, data: bytes, *,
                     host: bool = False) -> None:
        """A write to region *index* (QEMU's; *host*: the host's own path, always T=0)."""
        self.check_bounds(index, offset, len(data))
        if index == PciRegion.BAR0:
            raise ProtocolError(errno.EINVAL, BAR0_IS_TEE_MMIO)
        with self._lock:
            self.tee.writer = "host" if host else "vmm"
            if index == PciRegion.CONFIG:
                before = self.tee.before_config_write()
                if config_write(self.config, self.ide, self.doe_mailbox, self.link_end,
                                offset, data):
                    self._doe_interrupt()
                if offset < Reg.COMMAND + 2 and offset + len(data) > Reg.COMMAND:
                    self.irq.update_intx()
                self.tee.after_config_write(before, offset, data)
            else:
                self.msix.write(offset, data)

    # -- TEE MMIO (BAR0) over the link, the device as completer (PCIe 6.x §11.2.1) ----------
    def mmio_request(self, req: MmioRequest) -> bytes | None:
        """The completer (link.MmioCompleter): serve a memory request per §11.2.1, or None
        (Unsupported Request)."""
        with self._lock:
            offset = req.address - self.bar0_address()
            in_bar = offset >= 0 and offset + req.length <= self.layout.bar0_size
            if not self.tee.mmio_allowed(req, in_bar):
                return None
            if req.write:
                self.personality.bar0_write(offset, req.data)
                return b""
            return self.personality.bar0_read(offset, req.length)

    def unlocked_completer(self) -> tuple[Callable[[int, int], bytes],
                                          Callable[[int, bytes], None]]:
        """BAR0's read and write (*offset* from its base, inside it) for the CPU's T=0
        request in the clear while the TDI is CONFIG_UNLOCKED, called under the device
        lock: what :meth:`mmio_request` does for it, without a request object (the
        platform's direct path).  §11.2.1 serves every such request in that state
        (``tee.T0_SERVED``), so nothing is refused: the personality's registers."""
        assert _UNLOCKED in T0_SERVED
        return self.personality.bar0_read, self.personality.bar0_write
