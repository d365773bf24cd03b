"""Device security manager (DSM, PCIe 6.x §6.31): the device's trusted side behind DOE.

It owns the device identity, the firmware measurements and the SPDM responder, served as
CMA/SPDM and Secured CMA/SPDM on the device's DOE dispatcher, and on it the PCI-SIG
vendor-defined protocols IDE_KM (§6.33.3) and TDISP (§11), in established secured
sessions only.  It implements TDISP's hardware hooks (:class:`TdiHooks`), the heartbeat
watchdog (DSP0274 §10.17) and firmware updates (refused under NO_FW_UPDATE, §11.3.6).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from teeio import pki
from teeio.doe import PCI_SIG_VENDOR_ID, DataObjectType, DoeDispatcher, pad_dw
from teeio.ide import Direction, KeySet, SubStream
from teeio.ide_km import (
    PCI_SIG_STANDARD_ID,
    IdeKeyStore,
    IdeKmResponder,
    PciSigProtocol,
    PciSigProtocolMux,
)
from teeio.measurements import MeasurementSource, measure_elf
from teeio.spdm import Responder
from teeio.spdm.errors import DropRequest
from teeio.spdm.responder import ResponderConfig
from teeio.spdm.secured import Phase
from teeio.tdisp import TdiEvent
from teeio.tdisp.responder import TdispResponder
from vfio_user_dev import firmware_build

log = logging.getLogger(__name__)

PROVISION_ALG = "P-384"
IDENTITY_FILES = ("chain.pem", "device.key")
IDE_KM_PORTS = (0, 1)     # 0: the spec's; 1: what DMTF spdm-emu's requester sends
DEFAULT_HEARTBEAT_PERIOD = 60   # seconds; a session idle for twice this is terminated
MAX_HEARTBEAT_PERIOD = 255      # KEY_EXCHANGE_RSP Param1 is one byte (DSP0274 §10.15)
#: The largest firmware image a firmware update reads (the project's image is a few KiB).
MAX_FIRMWARE_IMAGE = 16 << 20


class TdiHost(Protocol):
    """What the device supplies for its TDI: its memory BARs as assigned now in config
    space, and a hook to learn about the DSM that serves its TDI (to follow transitions)."""

    def mmio_bars(self) -> Sequence[tuple[int, int, int]]:
        """(BAR index, base address, size in bytes) of each implemented memory BAR."""
        ...

    @property
    def msix_bar(self) -> int:
        """The BAR of the MSI-X table and PBA (BAR1, or BAR2 behind a 64-bit BAR0)."""
        ...

    def tdi_attached(self, dsm: DeviceSecurityManager) -> None:
        """The DSM now serves TDISP for this function (``dsm.tdisp`` is set)."""
        ...


class TdiHooks:
    """TDISP's hardware hooks (:class:`teeio.tdisp.responder.TdispDeviceHooks`) for the
    device: its BARs from *host*, its IDE streams and keys from the IDE_KM responder
    (None: no IDE_KM, so LOCK cannot succeed)."""

    def __init__(self, host: TdiHost, ide_km: IdeKmResponder | None) -> None:
        self.host = host
        self.ide_km = ide_km

    def mmio_bars(self) -> Sequence[tuple[int, int, int]]:
        return self.host.mmio_bars()

    def msix_bar(self) -> int:
        return self.host.msix_bar

    def stream_configured(self, stream_id: int) -> bool:
        return self.ide_km is None or self.ide_km.store.has_stream(stream_id)

    def ide_keys_programmed(self, session_id: int, stream_id: int
                            ) -> set[tuple[KeySet, Direction, SubStream]] | None:
        """What the IDE_KM responder recorded for *session_id* (its keys live and die with
        the session that programmed them)."""
        if self.ide_km is None:
            return None
        return self.ide_km.keys_programmed_by(session_id, stream_id)


class DsmSetupError(RuntimeError):
    """The identity or the firmware image cannot be used; the message says why."""


class FirmwareUpdateError(Exception):
    """A firmware update was not done: *refused* by TDISP (NO_FW_UPDATE), or the image
    could not be measured."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class DeviceSecurityManager:
    """SPDM responder for one identity and one firmware image, served over DOE."""

    def __init__(self, identity: pki.Identity, measurements: Sequence[MeasurementSource],
                 name: str = "", *, heartbeat_period: int = DEFAULT_HEARTBEAT_PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= heartbeat_period <= MAX_HEARTBEAT_PERIOD:
            raise ValueError(f"heartbeat period must be 0..{MAX_HEARTBEAT_PERIOD} seconds")
        self.identity = identity
        self.measurements = tuple(measurements)
        self.name = name
        self.heartbeat_period = heartbeat_period
        self.clock = clock
        #: serialises the watchdog and firmware updates with DOE requests; the device
        #: replaces it with its own lock (the DOE dispatcher's) when it attaches
        self.lock: contextlib.AbstractContextManager[Any] = threading.RLock()
        self.firmware_path: Path | None = None
        self.responder = Responder(identity, self.measurements,
                                   ResponderConfig(heartbeat_period=heartbeat_period),
                                   name=name)
        self._ending: dict[int, TdiEvent] = {}      # why a session is being terminated
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self.heartbeat_timeouts = 0
        self.pci_sig = PciSigProtocolMux()
        self.responder.register_vendor_handler(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID,
                                               self.pci_sig)
        self.responder.on_session_end.append(self._session_ended)
        self.ide_km: IdeKmResponder | None = None
        self.tdisp: TdispResponder | None = None
        #: the device's measurements of itself (its configuration), kept across updates
        self.device_measurements: tuple[MeasurementSource, ...] = ()

    def set_device_measurements(self, extra: Sequence[MeasurementSource]) -> None:
        """Report *extra* (the device's configuration) beside the firmware's measurements."""
        self.device_measurements = tuple(extra)
        self.responder.measurements = {m.index: m for m in (*self.measurements, *extra)}

    def attach(self, doe: DoeDispatcher, ide: IdeKeyStore | None = None, *,
               requester_id: int = 0, segment: int = 0, tdi: TdiHost | None = None) -> None:
        """Register CMA/SPDM (0001:01) and Secured CMA/SPDM (0001:02) on *doe*; with *ide*
        (the device's IDE capability) also IDE_KM, reporting the function as
        *requester_id* (bus << 8 | dev/fn) in *segment*; with *tdi* (the device) also
        TDISP for the function as its one TDI."""
        doe.register(PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM, self.handle_spdm)
        doe.register(PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM, self.handle_secured)
        log.info("SPDM responder on DOE 0001:01 and 0001:02")
        if ide is not None:
            self.attach_ide(ide, requester_id=requester_id, segment=segment)
        if tdi is not None:
            self.attach_tdisp(tdi, requester_id=requester_id, segment=segment)

    def attach_ide(self, store: IdeKeyStore, *, requester_id: int = 0,
                   segment: int = 0) -> IdeKmResponder:
        """IDE_KM (Protocol ID 0) over *store* (the IDE capability), inside established
        secured sessions only; the first session that sends QUERY or KEY_PROG owns it
        until it ends, which invalidates its keys (streams Insecure).  An endpoint has
        one port, PortIndex 0; spdm-emu's requester sends PortIndex 1, so both are
        answered and QUERY_RESP says MaxPortIndex 1."""
        self.ide_km = IdeKmResponder(store, dev_func=requester_id & 0xFF,
                                     bus=requester_id >> 8 & 0xFF, segment=segment,
                                     ports=IDE_KM_PORTS, max_port_index=max(IDE_KM_PORTS),
                                     name=f"{self.name}.ide_km" if self.name else "ide_km")
        self.pci_sig.register(PciSigProtocol.IDE_KM, self._ide_km)
        log.info("IDE_KM responder for %02x:%02x.%x (segment %d), PortIndex %s",
                 requester_id >> 8 & 0xFF, requester_id >> 3 & 0x1F, requester_id & 7,
                 segment, "/".join(map(str, IDE_KM_PORTS)))
        return self.ide_km

    def attach_tdisp(self, host: TdiHost, *, requester_id: int = 0,
                     segment: int = 0) -> TdispResponder:
        """TDISP (Protocol ID 0x01) for the function as its one TDI (*host* gives its
        BARs), inside established secured sessions only.  LOCK needs IDE keys programmed
        by IDE_KM in the same session (:meth:`attach_ide` first); when the session that
        locked the TDI ends, the TDI goes to ERROR."""
        self.tdisp = TdispResponder(TdiHooks(host, self.ide_km), requester_id=requester_id,
                                    segment=segment,
                                    name=f"{self.name}.tdisp" if self.name else "tdisp")
        self.pci_sig.register(PciSigProtocol.TDISP, self._tdisp)
        log.info("TDISP responder for %02x:%02x.%x (segment %d)", requester_id >> 8 & 0xFF,
                 requester_id >> 3 & 0x1F, requester_id & 7, segment)
        host.tdi_attached(self)
        return self.tdisp

    def security_event(self, event: TdiEvent) -> None:
        """A TDISP security event from the device (config write, FLR, ...)."""
        if self.tdisp is not None:
            self.tdisp.security_event(event)

    def _established(self, session_id: int | None, what: str) -> None:
        """A request in a session still in its handshake phase gets no response at all
        (the spec's "silently discard"), as one in the clear does."""
        if session_id is not None:
            sess = self.responder.sessions.get(session_id)
            if sess is None or sess.channel.phase is not Phase.ESTABLISHED:
                log.info("%s request dropped, no response: session 0x%08x is not "
                         "established", what, session_id)
                raise DropRequest(f"{what} in a session that is not established")

    def _ide_km(self, payload: bytes, session_id: int | None) -> bytes:
        assert self.ide_km is not None
        self._established(session_id, "IDE_KM")
        try:
            return self.ide_km.handle(payload, session_id)
        finally:
            if self.tdisp is not None:
                self.tdisp.ide_changed()     # K_SET_STOP may have unkeyed the bound stream

    def _tdisp(self, payload: bytes, session_id: int | None) -> bytes:
        assert self.tdisp is not None
        self._established(session_id, "TDISP")
        return self.tdisp.handle(payload, session_id)

    def _session_ended(self, session_id: int) -> None:
        event = self._ending.pop(session_id, TdiEvent.SPDM_SESSION_TERMINATED)
        if self.tdisp is not None:
            self.tdisp.session_closed(session_id, event)
        if self.ide_km is not None:
            self.ide_km.session_closed(session_id)

    def handle_spdm(self, payload: bytes) -> bytes | None:
        """DOE 0001:01: one SPDM message in, one out (DW-padded again, PCIe 6.x
        §6.30.1), or None for no response (the DOE object is then dropped)."""
        rsp = self.responder.handle_spdm_or_drop(payload)
        return None if rsp is None else pad_dw(rsp)

    def handle_secured(self, payload: bytes) -> bytes | None:
        """DOE 0001:02: one DSP0277 record in, one out (DW-padded), or None."""
        rsp = self.responder.handle_secured(payload, now=self.clock())
        return None if rsp is None else pad_dw(rsp)

    # -- heartbeat (DSP0274 §10.17) -----------------------------------------------------------
    def check_heartbeats(self, now: float | None = None) -> list[int]:
        """Terminate every established session silent for more than 2 × HeartbeatPeriod by
        *now* (default: the clock); the TDI it locked takes HEARTBEAT_TIMEOUT.  Returns
        the session IDs terminated."""
        with self.lock:
            t = self.clock() if now is None else now
            expired = self.responder.heartbeat_expired(t)
            for sid in expired:
                self.heartbeat_timeouts += 1
                self._ending[sid] = TdiEvent.HEARTBEAT_TIMEOUT
                self.responder.terminate_session(
                    sid, f"heartbeat timeout (no secured message for more than 2 x "
                         f"{self.heartbeat_period} s)")
                self._ending.pop(sid, None)
            return expired

    def start_watchdog(self, interval: float | None = None) -> None:
        """A daemon thread that runs :meth:`check_heartbeats` every *interval* seconds
        (default: a quarter of the period, at most 1 s).  No-op with the heartbeat off."""
        if not self.heartbeat_period or self._watchdog is not None:
            return
        step = interval if interval is not None else min(1.0, self.heartbeat_period / 4)

        def loop() -> None:
            while not self._stop.wait(step):
                try:
                    self.check_heartbeats()
                except Exception:
                    log.exception("heartbeat watchdog failed")

        self._watchdog = threading.Thread(target=loop, name="dsm-heartbeat", daemon=True)
        self._watchdog.start()
        log.info("heartbeat watchdog: sessions silent for more than %d s are terminated",
                 2 * self.heartbeat_period)

    def close(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
            self._watchdog = None

    # -- firmware update --------------------------------------------------------------------
    def firmware_update(self, elf: Path) -> tuple[MeasurementSource, ...]:
        """Load and measure the firmware image *elf*; later GET_MEASUREMENTS report it.
        :class:`FirmwareUpdateError` (refused=True) while NO_FW_UPDATE protects the TDI;
        (refused=False) when the file cannot be used.  The file is read and measured
        before the device lock is taken (:func:`read_firmware_image`)."""
        image = read_firmware_image(elf)
        try:
            measurements = tuple(measure_elf(image))
        except ValueError as exc:   # FirmwareImageError is a ValueError
            raise FirmwareUpdateError(f"firmware image {elf}: {exc}") from None
        with self.lock:
            if self.tdisp is not None and not self.tdisp.firmware_update_allowed():
                raise FirmwareUpdateError(
                    f"firmware update refused: the TDI is {self.tdisp.state.name} with "
                    "NO_FW_UPDATE (PCIe 6.x §11.3.6)", refused=True)
            self.measurements = measurements
            self.responder.measurements = {m.index: m for m in (*measurements,
                                                                *self.device_measurements)}
            self.firmware_path = elf
            log.warning("firmware updated from %s: %d measurement blocks", elf,
                        len(measurements))
            if self.tdisp is not None:
                self.tdisp.security_event(TdiEvent.FIRMWARE_UPDATE)
            return measurements


def read_firmware_image(path: Path, limit: int = MAX_FIRMWARE_IMAGE) -> bytes:
    """The whole of the firmware image at *path*, for a firmware update the (untrusted)
    host asked for: opened with O_NOFOLLOW (a symbolic link as the last component is
    refused) and O_NONBLOCK (opening a FIFO never waits for a writer); only a regular file
    of at most *limit* bytes is read.  :class:`FirmwareUpdateError` (one line) otherwise."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FirmwareUpdateError(f"firmware image {path}: a symbolic link, "
                                      "refused") from None
        raise FirmwareUpdateError(f"firmware image {path}: "
                                  f"{exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FirmwareUpdateError(f"firmware image {path}: not a regular file")
        if st.st_size > limit:
            raise FirmwareUpdateError(f"firmware image {path}: {st.st_size} bytes, more "
                                      f"than the {limit}-byte limit")
        chunks: list[bytes] = []
        size = 0
        while True:   # a file that grows while it is read is still bounded by the limit
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FirmwareUpdateError(f"firmware image {path}: more than the "
                                          f"{limit}-byte limit")
        return b"".join(chunks)
    except OSError as exc:
        raise FirmwareUpdateError(f"firmware image {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def from_options(identity_dir: Path | None, firmware: Path | None,
                 heartbeat_period: int = DEFAULT_HEARTBEAT_PERIOD
                 ) -> DeviceSecurityManager | None:
    """The DSM for ``--identity DIR`` and ``--firmware ELF``; None without an identity (the
    device then has no SPDM responder, but a given firmware image is still checked)."""
    if identity_dir is None:
        if firmware is not None:
            load_firmware(firmware)
            log.warning("--firmware without --identity: no SPDM responder, so nothing "
                        "reports these measurements")
        return None
    identity = load_or_provision_identity(identity_dir)
    path, measurements = load_firmware(firmware)
    dsm = DeviceSecurityManager(identity, measurements, name="dsm",
                                heartbeat_period=heartbeat_period)
    dsm.firmware_path = path
    return dsm


def load_or_provision_identity(directory: Path) -> pki.Identity:
    """The identity in *directory* (teeio.pki.provision's layout); a fresh P-384 one is
    provisioned into it first if it holds none.  Half an identity is an error."""
    present = [name for name in IDENTITY_FILES if (directory / name).exists()]
    if not present:
        paths = pki.provision(directory, PROVISION_ALG)
        log.warning("no device identity in %s: provisioned a fresh %s one (trust anchor %s)",
                    directory, PROVISION_ALG, paths["trust_anchor"])
    elif len(present) != len(IDENTITY_FILES):
        missing = sorted(set(IDENTITY_FILES) - set(present))
        raise DsmSetupError(f"identity directory {directory} has {', '.join(present)} but not "
                            f"{', '.join(missing)}")
    try:
        ident = pki.load_identity(directory)
    except (OSError, ValueError, pki.ChainError) as exc:
        raise DsmSetupError(f"identity in {directory}: {exc}") from None
    log.info("device identity from %s: %s (chain of %d, root %s)", directory,
             ident.leaf.subject.rfc4514_string(), len(ident.certs),
             ident.root.subject.rfc4514_string())
    return ident


def load_firmware(elf: Path | None) -> tuple[Path, list[MeasurementSource]]:
    """Measure the firmware image *elf*; without one, the project's default image
    (firmware_build.default_image: out/firmware/ in a checkout, the user's cache when
    installed), which is built first if it is missing."""
    if elf is None:
        try:
            elf = firmware_build.ensure_default_image()
        except firmware_build.FirmwareBuildError as exc:
            raise DsmSetupError(str(exc)) from None
        log.info("no --firmware given: using the default image %s", elf)
    try:
        measurements = measure_elf(elf)
    except (OSError, ValueError) as exc:   # FirmwareImageError is a ValueError
        raise DsmSetupError(f"firmware image {elf}: {exc}") from None
    for m in measurements:
        log.info("firmware measurement %d (%s): %d bytes%s", m.index, m.label, len(m.data),
                 "" if m.as_digest else f", {m.data.decode(errors='replace')!r}")
    return elf, measurements


__all__ = ["DEFAULT_HEARTBEAT_PERIOD", "MAX_FIRMWARE_IMAGE", "DeviceSecurityManager",
           "DsmSetupError", "FirmwareUpdateError", "from_options", "load_firmware",
           "load_or_provision_identity", "read_firmware_image"]
