"""Advanced Error Reporting extended capability of an Endpoint (PCIe 6.x §7.8.4).

The 0x2C bytes a non-Root-Port function has, with status bits for the errors it can detect
(§6.2.7); :func:`report_uncorrectable` / :func:`report_correctable` log per §6.2.4-§6.2.5,
and :func:`carry_sticky` keeps the sticky bits across a reset (§7.4).  The register layout:
docs/ide-and-link.md, "Errors: the AER capability".
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from teeio.pcie.config import ConfigSpace, ExtCapId

AER_CAP_VERSION = 2
AER_CAP_SIZE = 0x2C


class AerReg(IntEnum):
    """Register offsets inside the AER capability (§7.8.4)."""

    CAP_HEADER = 0x00
    UNCOR_STATUS = 0x04
    UNCOR_MASK = 0x08
    UNCOR_SEVERITY = 0x0C
    COR_STATUS = 0x10
    COR_MASK = 0x14
    CAP_CONTROL = 0x18
    HEADER_LOG = 0x1C


class Uncorrectable(IntFlag):
    """Uncorrectable Error Status / Mask / Severity bits (§7.8.4.2-4)."""

    DATA_LINK_PROTOCOL = 1 << 4
    SURPRISE_DOWN = 1 << 5
    POISONED_TLP_RECEIVED = 1 << 12
    FLOW_CONTROL_PROTOCOL = 1 << 13
    COMPLETION_TIMEOUT = 1 << 14
    COMPLETER_ABORT = 1 << 15
    UNEXPECTED_COMPLETION = 1 << 16
    RECEIVER_OVERFLOW = 1 << 17
    MALFORMED_TLP = 1 << 18
    ECRC = 1 << 19
    UNSUPPORTED_REQUEST = 1 << 20
    ACS_VIOLATION = 1 << 21
    INTERNAL = 1 << 22
    MC_BLOCKED_TLP = 1 << 23
    ATOMICOP_EGRESS_BLOCKED = 1 << 24
    TLP_PREFIX_BLOCKED = 1 << 25
    POISONED_TLP_EGRESS_BLOCKED = 1 << 26


class Correctable(IntFlag):
    """Correctable Error Status / Mask bits (§7.8.4.5-6)."""

    RECEIVER = 1 << 0
    BAD_TLP = 1 << 6
    BAD_DLLP = 1 << 7
    REPLAY_NUM_ROLLOVER = 1 << 8
    REPLAY_TIMER_TIMEOUT = 1 << 12
    ADVISORY_NON_FATAL = 1 << 13
    CORRECTED_INTERNAL = 1 << 14
    HEADER_LOG_OVERFLOW = 1 << 15


U, C = Uncorrectable, Correctable
UNCOR_IMPLEMENTED = (U.DATA_LINK_PROTOCOL | U.POISONED_TLP_RECEIVED | U.FLOW_CONTROL_PROTOCOL
                     | U.COMPLETION_TIMEOUT | U.COMPLETER_ABORT | U.UNEXPECTED_COMPLETION
                     | U.RECEIVER_OVERFLOW | U.MALFORMED_TLP | U.UNSUPPORTED_REQUEST
                     | U.INTERNAL)
COR_IMPLEMENTED = (C.RECEIVER | C.BAD_TLP | C.BAD_DLLP | C.REPLAY_NUM_ROLLOVER
                   | C.REPLAY_TIMER_TIMEOUT | C.ADVISORY_NON_FATAL)
# Defaults (§7.8.4.3-4, §7.8.4.6): Uncorrectable Internal Error masked; Data Link Protocol,
# Flow Control Protocol, Receiver Overflow, Malformed TLP and Uncorrectable Internal Error
# Fatal; Advisory Non-Fatal Error masked.
UNCOR_MASK_DEFAULT = U.INTERNAL
UNCOR_SEVERITY_DEFAULT = (U.DATA_LINK_PROTOCOL | U.FLOW_CONTROL_PROTOCOL | U.RECEIVER_OVERFLOW
                          | U.MALFORMED_TLP | U.INTERNAL)
COR_MASK_DEFAULT = C.ADVISORY_NON_FATAL
FIRST_ERROR_POINTER = 0x1F

# Device Status (PCI Express capability +0x0A, §7.5.3.5): the "Detected" bits.
DEVSTA_CORRECTABLE = 1 << 0
DEVSTA_NON_FATAL = 1 << 1
DEVSTA_FATAL = 1 << 2
DEVSTA_UNSUPPORTED_REQUEST = 1 << 3


def build(cs: ConfigSpace, offset: int) -> None:
    """Place the AER capability at *offset* and link it into the extended list."""
    cs.add_ext_capability(offset, ExtCapId.ADVANCED_ERROR_REPORTING, AER_CAP_VERSION,
                          bytes(AER_CAP_SIZE - 4))
    cs.set(offset + AerReg.UNCOR_STATUS, 4, 0, w1c=UNCOR_IMPLEMENTED)
    cs.set(offset + AerReg.UNCOR_MASK, 4, UNCOR_MASK_DEFAULT, wmask=UNCOR_IMPLEMENTED)
    cs.set(offset + AerReg.UNCOR_SEVERITY, 4, UNCOR_SEVERITY_DEFAULT, wmask=UNCOR_IMPLEMENTED)
    cs.set(offset + AerReg.COR_STATUS, 4, 0, w1c=COR_IMPLEMENTED)
    cs.set(offset + AerReg.COR_MASK, 4, COR_MASK_DEFAULT, wmask=COR_IMPLEMENTED)
    cs.set(offset + AerReg.CAP_CONTROL, 4, 0)       # all RO: nothing optional implemented
    cs.set(offset + AerReg.HEADER_LOG, 16, 0)


def carry_sticky(old: ConfigSpace, new: ConfigSpace, offset: int) -> None:
    """Copy the sticky registers (all of +0x04..+0x2B) from *old* into *new* (§7.4: an FLR
    leaves sticky bits as they were)."""
    span = slice(offset + AerReg.UNCOR_STATUS, offset + AER_CAP_SIZE)
    new.data[span] = old.data[span]


def report_uncorrectable(cs: ConfigSpace, offset: int, error: Uncorrectable,
                         header: bytes = b"", devsta: int | None = None) -> bool:
    """Log *error* (one bit).  *header*: the first 16 bytes of the TLP that caused it (for
    the Header Log); *devsta*: where the Device Status register is, to set its Detected
    bits.  True if the error is unmasked (would be signalled)."""
    if bin(int(error)).count("1") != 1 or not error & UNCOR_IMPLEMENTED:
        raise ValueError(f"not one implemented uncorrectable error: {error!r}")
    status = cs.get(offset + AerReg.UNCOR_STATUS, 4)
    masked = bool(cs.get(offset + AerReg.UNCOR_MASK, 4) & error)
    fatal = bool(cs.get(offset + AerReg.UNCOR_SEVERITY, 4) & error)
    ctl = cs.get(offset + AerReg.CAP_CONTROL, 4)
    if not masked and not status & (1 << (ctl & FIRST_ERROR_POINTER)):
        # §7.8.4.7: the First Error Pointer names the first unmasked error while its status
        # bit is set; the Header Log holds that error's TLP header (§7.8.4.8).
        cs.poke(offset + AerReg.CAP_CONTROL, 4,
                (ctl & ~FIRST_ERROR_POINTER) | int(error).bit_length() - 1)
        hdr = header[:16].ljust(16, b"\0")
        for i in range(4):      # header byte 0 in bits 31:24 of the first DW, and so on
            cs.poke(offset + AerReg.HEADER_LOG + 4 * i, 4,
                    int.from_bytes(hdr[4 * i:4 * i + 4], "big"))
    cs.poke(offset + AerReg.UNCOR_STATUS, 4, status | error)
    if devsta is not None:
        bits = DEVSTA_FATAL if fatal else DEVSTA_NON_FATAL
        if error == U.UNSUPPORTED_REQUEST:
            bits |= DEVSTA_UNSUPPORTED_REQUEST
        cs.poke(devsta, 2, cs.get(devsta, 2) | bits)
    return not masked


def report_correctable(cs: ConfigSpace, offset: int, error: Correctable,
                       devsta: int | None = None) -> bool:
    """Log a correctable *error* (one bit); True if it is unmasked."""
    if bin(int(error)).count("1") != 1 or not error & COR_IMPLEMENTED:
        raise ValueError(f"not one implemented correctable error: {error!r}")
    cs.poke(offset + AerReg.COR_STATUS, 4, cs.get(offset + AerReg.COR_STATUS, 4) | error)
    if devsta is not None:
        cs.poke(devsta, 2, cs.get(devsta, 2) | DEVSTA_CORRECTABLE)
    return not cs.get(offset + AerReg.COR_MASK, 4) & error


def header_log(cs: ConfigSpace, offset: int) -> bytes:
    """The Header Log as the TLP header bytes it holds (§7.8.4.8)."""
    return b"".join(cs.get(offset + AerReg.HEADER_LOG + 4 * i, 4).to_bytes(4, "big")
                    for i in range(4))
