"""Device security manager (DSM): the device's trusted side behind its DOE mailbox.

The DSM owns the device identity (certificate chain and key, slot 0), the firmware
measurements and the SPDM responder; IDE_KM and TDISP join it in later issues.  It
serves two DOE protocols on the device's dispatcher, so both the config-space
mailbox (the guest, Linux) and the host DOE socket (the TSM, spdm-emu) reach it:

* 0001:01 CMA/SPDM -- one SPDM message in, one out (``Responder.handle_spdm``);
* 0001:02 Secured CMA/SPDM -- one DSP0277 record in, one out, or no response at
  all (``Responder.handle_secured``; the DOE object is then dropped).

Payloads arrive DW-padded; the responder accepts that padding, and its responses
are padded again here (PCIe 6.3 §6.30.1).  The dispatcher's lock (the device lock)
serialises every request, whichever transport it came from.

Also here: where the identity and the firmware image come from when the device
server starts (``--identity DIR``, ``--firmware ELF``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from teeio import pki
from teeio.doe import PCI_SIG_VENDOR_ID, DataObjectType, DoeDispatcher, pad_dw
from teeio.measurements import MeasurementSource, measure_elf
from teeio.spdm import Responder
from vfio_user_dev import firmware_build

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_FIRMWARE = PROJECT_DIR / "out" / "firmware" / "teeio-fw.elf"
PROVISION_ALG = "P-384"
IDENTITY_FILES = ("chain.pem", "device.key")


class DsmSetupError(RuntimeError):
    """The identity or the firmware image cannot be used; the message says why."""


class DeviceSecurityManager:
    """SPDM responder for one identity and one firmware image, served over DOE."""

    def __init__(self, identity: pki.Identity, measurements: Sequence[MeasurementSource],
                 name: str = "") -> None:
        self.identity = identity
        self.measurements = tuple(measurements)
        self.responder = Responder(identity, self.measurements, name=name)

    def attach(self, doe: DoeDispatcher) -> None:
        """Register CMA/SPDM (0001:01) and Secured CMA/SPDM (0001:02) on *doe*."""
        doe.register(PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM, self.handle_spdm)
        doe.register(PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM, self.handle_secured)
        log.info("SPDM responder on DOE 0001:01 and 0001:02")

    def handle_spdm(self, payload: bytes) -> bytes:
        return pad_dw(self.responder.handle_spdm(payload))

    def handle_secured(self, payload: bytes) -> bytes | None:
        rsp = self.responder.handle_secured(payload)
        return None if rsp is None else pad_dw(rsp)


def from_options(identity_dir: Path | None,
                 firmware: Path | None) -> DeviceSecurityManager | None:
    """The DSM for ``--identity DIR`` and ``--firmware ELF``; None without an identity (the
    device then has no SPDM responder, but a given firmware image is still checked)."""
    if identity_dir is None:
        if firmware is not None:
            load_firmware(firmware)
            log.warning("--firmware without --identity: no SPDM responder, so nothing "
                        "reports these measurements")
        return None
    identity = load_or_provision_identity(identity_dir)
    _, measurements = load_firmware(firmware)
    return DeviceSecurityManager(identity, measurements, name="dsm")


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
    """Measure the firmware image *elf*; without one, the project's default image, which is
    built first if it is missing."""
    if elf is None:
        elf = DEFAULT_FIRMWARE
        if elf.exists():
            log.info("no --firmware given: using the default image %s", elf)
        else:
            log.warning("no --firmware given and %s is missing: building it", elf)
            try:
                firmware_build.build(elf)
            except firmware_build.FirmwareBuildError as exc:
                raise DsmSetupError(str(exc)) from None
            log.info("built the default firmware image %s", elf)
    try:
        measurements = measure_elf(elf)
    except (OSError, ValueError) as exc:   # FirmwareImageError is a ValueError
        raise DsmSetupError(f"firmware image {elf}: {exc}") from None
    for m in measurements:
        log.info("firmware measurement %d (%s): %d bytes%s", m.index, m.label, len(m.data),
                 "" if m.as_digest else f", {m.data.decode(errors='replace')!r}")
    return elf, measurements


__all__ = ["DEFAULT_FIRMWARE", "DeviceSecurityManager", "DsmSetupError", "from_options",
           "load_firmware", "load_or_provision_identity"]
