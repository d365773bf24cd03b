"""The function's configuration space (PCIe 6.x §7): its layout, its build, and the routing
of accesses (the DOE registers to the mailbox, Device Control to the link).

Capabilities: Power Management (PCI PM 1.2 §3.2), MSI-X (§7.7.2), PCI Express (§7.5.3),
Device Serial Number (§7.9.3), DOE (§7.9.24), IDE (§7.9.26), AER (§7.8.4).  The layout
table is in docs/device-internals.md.  The identity and the BAR/MSI-X layout depend on
the personality (:class:`FunctionLayout`; docs/nvme.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from teeio import device_regs as regs
from teeio import personality as personalities
from teeio.doe import DOE_CAP_SIZE, DOE_CAP_VERSION, DoeMailbox
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
    bar_wmask,
    payload_size,
    payload_size_code,
)
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.interfaces import DEFAULT_MPS, DEFAULT_MRRS

VENDOR_ID = personalities.VENDOR_ID
DEVICE_ID = personalities.ACCELERATOR.device_id
CONFIG_SIZE = 4096
MSIX_VECTORS = 4
BAR1_SIZE = 4096
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
# (RO 0); Initiate FLR (bit 15) always reads 0 (its write is acted on, see tee.py).
DEVCTL_RESET = DevCtl.RELAXED_ORDERING | DevCtl.EXTENDED_TAG_FIELD | DevCtl.NO_SNOOP
DEVCTL_WMASK = 0x7DFF


@dataclass(frozen=True)
class FunctionLayout:
    """What a personality changes in config space: its identity (§7.5.1), BAR0 (size,
    64-bit or not), the BAR of the MSI-X table and PBA (the BAR after BAR0's registers)
    and the MSI-X vectors, the DOE interrupt's among them (§6.30.3)."""

    info: personalities.PersonalityInfo
    bar0_size: int
    bar0_64bit: bool
    msix_vectors: int
    doe_vector: int

    @property
    def msix_bar(self) -> int:
        return 2 if self.bar0_64bit else 1


ACCELERATOR_LAYOUT = FunctionLayout(personalities.ACCELERATOR, regs.BAR0_SIZE, False,
                                    MSIX_VECTORS, DOE_MSIX_VECTOR)


def build_config(serial: int, *, mps_supported: int = DEFAULT_MPS, mrrs: int = DEFAULT_MRRS,
                 layout: FunctionLayout = ACCELERATOR_LAYOUT) -> ConfigSpace:
    return build_config_and_ide(serial, mps_supported=mps_supported, mrrs=mrrs,
                                layout=layout)[0]


def build_config_and_ide(serial: int, *, mps_supported: int = DEFAULT_MPS,
                         mrrs: int = DEFAULT_MRRS, layout: FunctionLayout = ACCELERATOR_LAYOUT
                         ) -> tuple[ConfigSpace, ide_cap.IdeCapability]:
    """The function's config space and the model of its IDE capability in it.
    *mps_supported*: Device Capabilities Max_Payload_Size Supported; *mrrs*: the Device
    Control Max_Read_Request_Size after reset (ValueError unless 128..4096, a power of
    two: what the 3-bit fields encode); *layout*: the personality's."""
    devcap = (DevCap.TEE_IO_SUPPORTED | DevCap.FUNCTION_LEVEL_RESET
              | DevCap.ROLE_BASED_ERROR_REPORTING | DevCap.EXTENDED_TAG_FIELD_SUPPORTED
              | payload_size_code(mps_supported))
    devctl = DEVCTL_RESET | payload_size_code(mrrs) << DEVCTL_MRRS_SHIFT
    cs = ConfigSpace()
    cs.set(Reg.VENDOR_ID, 2, VENDOR_ID)
    cs.set(Reg.DEVICE_ID, 2, layout.info.device_id)
    cs.set(Reg.COMMAND, 2, 0, wmask=Command.MEMORY_SPACE | Command.BUS_MASTER
           | Command.PARITY_ERROR_RESPONSE | Command.SERR_ENABLE | Command.INTERRUPT_DISABLE)
    cs.set(Reg.STATUS, 2, 0, w1c=STATUS_RW1C)
    cs.set(Reg.REVISION_ID, 1, 0x01)
    cs.set(Reg.CLASS_CODE, 3, layout.info.class_code)
    cs.set(Reg.CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
    cs.set(Reg.HEADER_TYPE, 1, 0x00)
    for bar, size, is_64 in ((0, layout.bar0_size, layout.bar0_64bit),
                             (layout.msix_bar, BAR1_SIZE, False)):
        value, mask = bar_wmask(size, is_64)
        cs.set(Reg.BAR0 + 4 * bar, 4, value, wmask=mask)
        if is_64:                        # the upper half of the address (§7.5.1.2.1)
            cs.set(Reg.BAR0 + 4 * bar + 4, 4, 0, wmask=0xFFFFFFFF)
    cs.set(Reg.SUBSYSTEM_VENDOR_ID, 2, VENDOR_ID)
    cs.set(Reg.SUBSYSTEM_ID, 2, layout.info.subsystem_id)
    cs.set(Reg.INTERRUPT_LINE, 1, 0, wmask=0xFF)
    cs.set(Reg.INTERRUPT_PIN, 1, 1)  # INTA#

    # Power Management (PCI PM 1.2 §3.2): PMC version 3; PMCSR bits 1:0 RW, No_Soft_Reset.
    cs.add_capability(PM_CAP, CapId.POWER_MANAGEMENT, bytes(6))
    cs.set(PM_CAP + 2, 2, 0x0003)
    cs.set(PM_CAP + 4, 2, 0x0008, wmask=0x0003)

    # MSI-X (PCIe 6.x §7.7.2): Message Control, Table Offset/BIR, PBA Offset/BIR.
    cs.add_capability(MSIX_CAP, CapId.MSIX, bytes(10))
    cs.set(MSIX_CAP + 2, 2, layout.msix_vectors - 1, wmask=0xC000)
    cs.set(MSIX_CAP + 4, 4, MSIX_TABLE_OFF | layout.msix_bar)
    cs.set(MSIX_CAP + 8, 4, MSIX_PBA_OFF | layout.msix_bar)

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


def bar_address(cs: ConfigSpace, bar: int) -> int:
    """The memory address BAR *bar* holds now, both halves of a 64-bit BAR (§7.5.1.2.1)."""
    low = cs.get(Reg.BAR0 + 4 * bar, 4)
    address = low & ~0xF & 0xFFFFFFFF
    if low & 0b110 == 0b100:
        address |= cs.get(Reg.BAR0 + 4 * bar + 4, 4) << 32
    return address


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


# -- accesses: ConfigSpace, with the DOE registers routed to the mailbox (§6.30) -------------

def config_read(cs: ConfigSpace, mailbox: DoeMailbox, offset: int,
                count: int) -> tuple[bytes, bool]:
    """The bytes at *offset*, and whether the read reached the DOE registers (the
    caller then looks for a DOE interrupt)."""
    data = bytearray(cs.read(offset, count))
    end = offset + count
    if end <= DOE_REGS.start or offset >= DOE_REGS.stop:
        return bytes(data), False
    now = time.monotonic()
    for base in range(max(offset & ~3, DOE_REGS.start), min(end, DOE_REGS.stop), 4):
        word = mailbox.read(base - DOE_CAP, now).to_bytes(4, "little")
        for i in range(4):
            if offset <= base + i < end:
                data[base + i - offset] = word[i]
    return bytes(data), True


def config_write(cs: ConfigSpace, ide: ide_cap.IdeCapability, mailbox: DoeMailbox,
                 endpoint: LinkEndpoint, offset: int, data: bytes) -> bool:
    """Write *data* at *offset*: Device Control drives the link (§7.5.3.4), the IDE
    capability reacts to its registers (§7.9.26), the DOE registers go to the mailbox.
    Whether the write reached the DOE registers.  (Initiate FLR is the caller's.)"""
    end = offset + len(data)
    if offset < DEVCTL + 2 and end > DEVCTL:
        cs.write(offset, data[:DEVCTL + 2 - offset])
        apply_device_control(cs, endpoint)
        if end <= DEVCTL + 2:
            return False
        data, offset = data[DEVCTL + 2 - offset:], DEVCTL + 2
    if end <= DOE_REGS.start or offset >= DOE_REGS.stop:
        cs.write(offset, data)
        ide.after_write(offset, len(data))     # a no-op outside its window
        return False
    if offset < DOE_REGS.start:
        cs.write(offset, data[:DOE_REGS.start - offset])
    now = time.monotonic()
    for base in range(max(offset & ~3, DOE_REGS.start), min(end, DOE_REGS.stop), 4):
        value, enable = 0, 0
        for i in range(4):
            if offset <= base + i < end:
                value |= data[base + i - offset] << (8 * i)
                enable |= 1 << i
        mailbox.write(base - DOE_CAP, value, now, enable)
    if end > DOE_REGS.stop:
        cs.write(DOE_REGS.stop, data[DOE_REGS.stop - offset:])
        ide.after_write(DOE_REGS.stop, end - DOE_REGS.stop)
    return True
