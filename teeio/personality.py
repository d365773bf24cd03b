"""The device personalities: what the emulated TDISP function presents itself as.

Shared by the device server (its config-space identity), the verifier's tools (the
reference values and the guest's policy, ``teeio-refvalues``/``teeio-guest-policy``) and
docs/nvme.md.  A personality other than the original accelerator reports one more
measurement beside the firmware's: the device's configuration, naming the personality
(DSP0274 §10.11 DMTF measurement, HARDWARE_CONFIG as a raw bit stream), so reference
values made for one personality do not verify the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from teeio.measurements import DmtfValueType, MeasurementSource

VENDOR_ID = 0x1234
#: The measurement index of the device's configuration (after the firmware's 1..5).
CONFIG_MEASUREMENT_INDEX = 6


@dataclass(frozen=True)
class PersonalityInfo:
    """A personality's identity in config space (PCIe 6.x §7.5.1) and its description."""

    name: str
    device_id: int
    class_code: int          # base class << 16 | sub-class << 8 | programming interface
    subsystem_id: int
    description: str
    #: whether the device reports a configuration measurement and names itself in the
    #: interface report's device-specific information (the accelerator, the original
    #: personality, reports only its firmware's measurements and b"teeio", as it did)
    measured: bool


ACCELERATOR = PersonalityInfo("accelerator", 0x7E10, 0x120000, 0x0001,
                              "processing accelerator: BAR0 register file and DMA engine",
                              measured=False)
NVME = PersonalityInfo("nvme", 0x7E11, 0x010802, 0x0002,
                       "NVMe 1.4 I/O controller (mass storage, NVM, NVMe)", measured=True)
PERSONALITIES: dict[str, PersonalityInfo] = {p.name: p for p in (ACCELERATOR, NVME)}
DEFAULT = ACCELERATOR.name


def personality(name: str) -> PersonalityInfo:
    """The personality called *name*; ValueError naming the choices otherwise."""
    try:
        return PERSONALITIES[name]
    except KeyError:
        raise ValueError(f"unknown personality {name!r} (choose from "
                         f"{', '.join(PERSONALITIES)})") from None


NAMESPACE_BLOCK = 512
DEFAULT_NAMESPACE_SIZE = "64M"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def namespace_size(text: str) -> int:
    """Bytes of an NVMe namespace from ``N`` or ``N`` with K, M, G or T (powers of 1024,
    an optional trailing B or iB); ValueError with one line saying what is wrong."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    number = t[:-1] if unit else t
    if not (number.isascii() and number.isdigit()):
        raise ValueError(f"{text!r} is not a size (e.g. 64M, 1G, 1048576)")
    size = int(number) * _UNITS[unit]
    if size <= 0 or size % NAMESPACE_BLOCK:
        raise ValueError(f"{text!r}: {size} bytes is not a positive multiple of "
                         f"{NAMESPACE_BLOCK}-byte blocks")
    return size


def configuration_text(info: PersonalityInfo) -> bytes:
    """The device's description of its configuration (the measured bytes)."""
    return (f"teeio-device personality={info.name} id={VENDOR_ID:04x}:{info.device_id:04x} "
            f"class={info.class_code:06x}").encode()


def configuration_measurements(name: str) -> tuple[MeasurementSource, ...]:
    """The measurements the device reports beside its firmware's, as personality *name*:
    none for the accelerator, the configuration (raw, index 6) for the others."""
    info = personality(name)
    if not info.measured:
        return ()
    return (MeasurementSource(CONFIG_MEASUREMENT_INDEX, DmtfValueType.HARDWARE_CONFIG,
                              configuration_text(info), as_digest=False,
                              label=f"device configuration ({info.name} personality)"),)


__all__ = ["ACCELERATOR", "CONFIG_MEASUREMENT_INDEX", "DEFAULT", "DEFAULT_NAMESPACE_SIZE",
           "NAMESPACE_BLOCK", "NVME", "PERSONALITIES", "VENDOR_ID", "PersonalityInfo",
           "configuration_measurements", "configuration_text", "namespace_size",
           "personality"]
