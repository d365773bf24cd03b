"""The device's side of TDISP (PCIe 6.x §11.2): it follows its TDI and enforces.

The TDISP responder reports each transition it takes; the device performs the actions
(§11.2: QUIESCE, SCRUB_SECRETS, ENABLE/REVOKE_TEE_ACCESS), gates TEE MMIO by the T-bit
rules of §11.2.1 (``enforcement.py``) and reports the security events of §11.2.6 (config
writes, the bound IDE stream going Insecure, FLR).  Every refusal is counted by kind.
Design notes: docs/device-internals.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from teeio.measurements import MeasurementSource
from teeio.pcie import ide_cap
from teeio.pcie.config import Command, Reg
from teeio.tdisp import TdiAction, TdiEvent
from teeio.tdisp.defs import TdiState
from vfio_user_dev.config_space import DEVCTL, DEVCTL2
from vfio_user_dev.dsm import FirmwareUpdateError
from vfio_user_dev.enforcement import Refusals, mmio_refusal
from vfio_user_dev.link.interfaces import MmioRequest

if TYPE_CHECKING:
    from vfio_user_dev.device import TeeIoDevice

log = logging.getLogger("vfio_user_dev.device")     # the device model's one log

BIST_OFFSET = 0x0F     # BIST register (a write to it is a TDISP security event)
# Device Control fields whose change is a TDISP security event (PCIe 6.x §11.2.6; §7.5.3.4):
# Extended Tag Field Enable (8), Phantom Functions Enable (9), Enable No Snoop (11);
# Initiate Function Level Reset (15) is a write-1 trigger.  Device Control 2: 10-Bit Tag
# Requester Enable (12).
DEVCTL_PROTECTED = (1 << 8) | (1 << 9) | (1 << 11)
DEVCTL_INITIATE_FLR = 1 << 15
DEVCTL2_PROTECTED = 1 << 12


def written(offset: int, data: bytes, reg: int, old: int, size: int = 2) -> int:
    """Register *reg* (of *size* bytes, now *old*) as a write of *data* at *offset*
    meant it: the written bytes over the old ones."""
    value = old
    for i in range(size):
        if offset <= reg + i < offset + len(data):
            value = value & ~(0xFF << 8 * i) | data[reg + i - offset] << 8 * i
    return value


# The TDI states in which mmio_refusal serves a T=0 request in the clear whatever else
# holds (so the hot path needs no call; §11.2.1), found once from the rule itself.
T0_SERVED = tuple(state for state in TdiState
                   if all(mmio_refusal(state, False, None, None, access) is None
                          for access in (False, True)))


def _what(write: bool, address: int, length: int) -> str:
    """A memory request as a refusal names it."""
    return f"{'MWr' if write else 'MRd'} {address:#x}+{length}"


@dataclass(frozen=True)
class ConfigSnapshot:
    """What a config write is judged against (§11.2.6): the registers before it."""

    command: int
    devctl: int
    devctl2: int
    watched: list[tuple[int, int]]     # the bound stream's IDE registers, while locked


class TeeEnforcement:
    """The TDI's state as the device enforces it: the epoch (every state change aborts DMA
    jobs), T=1 access (START), whether the bound stream has been Secure since LOCK, the
    refusals.  All under the device lock."""

    def __init__(self, device: TeeIoDevice) -> None:
        self.device = device
        self.epoch = 0                  # +1 at every TDI state change (aborts DMA jobs)
        self.tee_access = False         # START enabled T=1 access; revoked on leaving RUN
        self._bound_secure = False      # the bound stream has been Secure since LOCK
        self.scrubs = 0
        self.writer = "vmm"             # who wrote config space last (platform events)
        self.refusals = Refusals(log)
        #: TDISP security events seen in config space / resets (the DSM's TDISP responder)
        self.security_listeners: list[Callable[[TdiEvent], None]] = []

    # -- transitions (§11.2) ------------------------------------------------------------------
    def transition(self, event: TdiEvent, before: TdiState, after: TdiState,
                   actions: TdiAction) -> None:
        """Perform the actions of a transition the TDISP responder took (§11.2)."""
        dev = self.device
        with dev.lock:
            if after is not before or actions & TdiAction.QUIESCE:
                # QUIESCE: queued and running DMA jobs see the new epoch and stop.
                self.epoch += 1
                dev.personality.quiesce()
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
                dev.events.emit("tdi", requester_id=dev.link_end.requester_id,
                                before=before.name, after=after.name, event=event.name)
        if after is not before:
            log.info("TDI %s -> %s on %s (actions %s)", before.name, after.name, event.name,
                     actions.name if actions else "none")

    def _scrub(self) -> None:
        """SCRUB_SECRETS: TVM data in the personality's state (BAR0, work in flight) is
        gone."""
        what = self.device.personality.scrub()
        self.scrubs += 1
        log.info("TDI secrets scrubbed (%s)", what)

    # -- the bound IDE stream (§11.2.6) ---------------------------------------------------------
    def _bound_stream_ok(self) -> bool:
        sid = self.device.bound_stream()
        st = None if sid is None else self.device.ide.stream(sid)
        return st is not None and st.secure and st.keys_ready()

    def check_bound_stream(self) -> None:
        """IDE_STREAM_INSECURE once the bound stream, Secure since LOCK, no longer is (or
        lost its keys: K_SET_STOP, invalidation) -- §11.2.6."""
        with self.device.lock:
            if self.device.tdi_state() not in (TdiState.CONFIG_LOCKED, TdiState.RUN):
                return
            if self._bound_stream_ok():
                self._bound_secure = True
            elif self._bound_secure:
                self._bound_secure = False
                self.security_event(TdiEvent.IDE_STREAM_INSECURE)

    def _bound_ide_registers(self) -> list[tuple[int, int]]:
        """Config ranges of the bound stream's Control, RID and address association
        registers (§11.2.6), while the TDI is locked."""
        dev = self.device
        sid = dev.bound_stream()
        if sid is None or dev.tdi_state() not in (TdiState.CONFIG_LOCKED, TdiState.RUN):
            return []
        st = dev.ide.stream(sid)
        if st is None:
            return []
        if st.kind is ide_cap.StreamKind.LINK:
            return [(st.ctl_off, st.ctl_off + 4)]
        return [(st.ctl_off, st.ctl_off + 4), (st.base + 0x0C, st.end)]

    # -- security events (§11.2.6) ------------------------------------------------------------
    def security_event(self, event: TdiEvent) -> None:
        for listener in dict.fromkeys(self.security_listeners):   # each one once
            listener(event)

    def before_config_write(self) -> ConfigSnapshot:
        cs = self.device.config
        return ConfigSnapshot(cs.get(Reg.COMMAND, 2), cs.get(DEVCTL, 2), cs.get(DEVCTL2, 2),
                              self._bound_ide_registers())

    def after_config_write(self, old: ConfigSnapshot, offset: int, data: bytes) -> None:
        """The security events of a config write (which completed normally), then an
        Initiate FLR it asked for, then the bound stream's state."""
        dev = self.device
        count = len(data)
        end = offset + count
        if (offset < Reg.BAR0 + 24 and end > Reg.BAR0) or (
                offset < Reg.ROM_ADDRESS + 4 and end > Reg.ROM_ADDRESS) or (
                offset <= BIST_OFFSET < end):
            self.security_event(TdiEvent.BAR_WRITE)
        new_cmd = dev.config.get(Reg.COMMAND, 2)
        if (old.command ^ new_cmd) & (Command.MEMORY_SPACE | Command.BUS_MASTER):
            dev.events.emit("command", requester_id=dev.link_end.requester_id,
                            memory=bool(new_cmd & Command.MEMORY_SPACE),
                            bus_master=bool(new_cmd & Command.BUS_MASTER),
                            by=self.writer)
        if old.command & ~new_cmd & Command.MEMORY_SPACE:
            self.security_event(TdiEvent.MEMORY_SPACE_DISABLED)
        if old.command & ~new_cmd & Command.BUS_MASTER:
            self.security_event(TdiEvent.BUS_MASTER_DISABLED)
        # "Changing" a protected field: the value written differs from the register's
        # (a read-only field here is still an attempt), or Initiate FLR is written 1.
        devctl = written(offset, data, DEVCTL, old.devctl)
        devctl2 = written(offset, data, DEVCTL2, old.devctl2)
        if ((old.devctl ^ devctl) & DEVCTL_PROTECTED or devctl & DEVCTL_INITIATE_FLR
                or (old.devctl2 ^ devctl2) & DEVCTL2_PROTECTED):
            self.security_event(TdiEvent.PROTECTED_CONFIG_WRITE)
        if offset < dev.ide.end and dev.ide.offset < end:
            dev.events.emit("ide_registers", requester_id=dev.link_end.requester_id,
                            offset=offset, size=count, by=self.writer)
        if any(offset < hi and lo < end for lo, hi in old.watched):
            self.security_event(TdiEvent.IDE_STREAM_REGISTERS_CHANGED)
        if devctl & DEVCTL_INITIATE_FLR:
            # Initiate Function Level Reset (§7.5.3.4 bit 15, §6.6.2), advertised in Device
            # Capabilities: the write completes, then the function resets.
            dev.reset("initiate_flr")
        self.check_bound_stream()

    # -- TEE MMIO, the device as completer (§11.2.1) -------------------------------------------
    def mmio_allowed(self, req: MmioRequest, in_bar: bool) -> bool:
        """Whether a memory request to BAR0 (*in_bar*: it lies inside) is served; a
        refusal is counted (the completer answers Unsupported Request)."""
        dev = self.device
        if not in_bar:
            self.refusals.add("mmio_outside_bar",
                              f"{_what(req.write, req.address, req.length)}: not in BAR0")
            return False
        refusal = mmio_refusal(dev.tdi_state(), req.t_bit, req.stream_id,
                               dev.bound_stream(), self.tee_access)
        if refusal is not None:
            self._refused(refusal, req.write, req.address, req.length)
            return False
        return True

    def _refused(self, refusal: tuple[str, str], write: bool, address: int,
                 length: int) -> None:
        kind, detail = refusal
        self.refusals.add(kind, f"{_what(write, address, length)}: {detail}: "
                                "Unsupported Request")

    # -- firmware update (the DSM measures it) --------------------------------------------------
    def firmware_update(self, elf: Path) -> tuple[MeasurementSource, ...]:
        """A firmware update from the host (DSM: NO_FW_UPDATE, re-measurement); a refusal
        is counted and logged, and re-raised."""
        dev = self.device
        if dev.dsm is None:
            raise FirmwareUpdateError("the device has no DSM: nothing measures firmware")
        try:
            return dev.dsm.firmware_update(elf)
        except FirmwareUpdateError as exc:
            if exc.refused:
                with dev.lock:
                    self.refusals.add("fw_update", str(exc))
            raise

    def status(self) -> dict[str, object]:
        dev = self.device
        with dev.lock:
            t = dev.tdisp
            return {"state": dev.tdi_state().name,
                    "bound_session": None if t is None else t.bound_session,
                    "lock_flags": 0 if t is None else int(t.tdi.lock_flags),
                    "default_stream_id": dev.bound_stream(),
                    "tee_access": self.tee_access}
