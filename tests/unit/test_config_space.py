"""PCI configuration space semantics (teeio/pcie/config.py) and the device layout
built by vfio_user_dev.config_space.build_config()."""

from __future__ import annotations

import pytest

from teeio.pcie.config import (
    CONFIG_SIZE,
    STATUS_RW1C,
    CapId,
    Command,
    ConfigSpace,
    ExtCapId,
    Reg,
    Status,
    bar_wmask,
    u16,
    u32,
)
from vfio_user_dev.config_space import (
    AER_CAP,
    DEVICE_ID,
    IDE_CAP,
    MSIX_CAP,
    PCIE_CAP,
    PM_CAP,
    VENDOR_ID,
    build_config,
    device_control_link,
)

SERIAL = 0x0123_4567_89AB_CDEF


@pytest.fixture
def cs() -> ConfigSpace:
    return build_config(SERIAL)


def r16(cs: ConfigSpace, off: int) -> int:
    return int.from_bytes(cs.read(off, 2), "little")


def r32(cs: ConfigSpace, off: int) -> int:
    return int.from_bytes(cs.read(off, 4), "little")


# --- generic byte semantics -------------------------------------------------------------


def test_ro_rw_rw1c_bits_in_one_byte() -> None:
    c = ConfigSpace(64)
    # bits 0-3 RW, bits 4-5 RW1C, bits 6-7 RO
    c.set(8, 1, 0b1111_0000, wmask=0x0F, w1c=0x30)
    c.write(8, b"\x00")                 # 0 to RW1C: no effect; RW bits take 0
    assert c.get(8, 1) == 0b1111_0000
    c.write(8, b"\x05")                 # RW bits take 0101
    assert c.get(8, 1) == 0b1111_0101
    c.write(8, b"\x10")                 # clear bit 4 only; RW bits take 0000
    assert c.get(8, 1) == 0b1110_0000
    c.write(8, b"\xFF")                 # clear bit 5, RW bits 1111, RO bits 6-7 stay
    assert c.get(8, 1) == 0b1100_1111
    c.write(8, b"\x00")
    assert c.get(8, 1) == 0b1100_0000   # RO bits never change


def test_ro_bytes_ignore_writes() -> None:
    c = ConfigSpace(64)
    c.set(0, 4, 0xDEADBEEF)
    c.write(0, b"\x00\x00\x00\x00")
    c.write(1, b"\xFF\xFF")
    assert c.get(0, 4) == 0xDEADBEEF


def test_poke_ignores_masks_and_write_is_bytewise() -> None:
    c = ConfigSpace(64)
    c.set(4, 2, 0, wmask=0x00FF)
    c.poke(4, 2, 0xAB00)          # device-side update of RO bits
    assert c.get(4, 2) == 0xAB00
    c.write(4, b"\x12\x34")       # only the low byte is writable
    assert c.get(4, 2) == 0xAB12
    c.write(5, b"\x00")
    assert c.get(4, 2) == 0xAB12


@pytest.mark.parametrize(("off", "width"), [(-1, 1), (63, 2), (64, 1), (0, 65), (0, -1)])
def test_out_of_range_access(off: int, width: int) -> None:
    c = ConfigSpace(64)
    with pytest.raises(ValueError):
        c.read(off, width)
    with pytest.raises(ValueError):
        c.get(off, width)


def test_out_of_range_write() -> None:
    c = ConfigSpace(64)
    with pytest.raises(ValueError):
        c.write(62, b"\0\0\0")
    with pytest.raises(ValueError):
        c.set(64, 1, 0)


def test_helpers() -> None:
    assert u16(0x1234) == b"\x34\x12"
    assert u32(0x12345678) == b"\x78\x56\x34\x12"


@pytest.mark.parametrize(("size", "is_64", "prefetch", "low", "mask"), [
    (4096, False, False, 0x0, 0xFFFFF000),
    (16, False, False, 0x0, 0xFFFFFFF0),
    (1 << 20, True, False, 0x4, 0xFFF00000),
    (1 << 20, True, True, 0xC, 0xFFF00000),
    (256, False, True, 0x8, 0xFFFFFF00),
])
def test_bar_wmask(size: int, is_64: bool, prefetch: bool, low: int, mask: int) -> None:
    assert bar_wmask(size, is_64, prefetch) == (low, mask)


@pytest.mark.parametrize("size", [0, 8, 3000, 4097])
def test_bar_wmask_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        bar_wmask(size)


# --- device header ----------------------------------------------------------------------


def test_identity(cs: ConfigSpace) -> None:
    assert r16(cs, Reg.VENDOR_ID) == VENDOR_ID == 0x1234
    assert r16(cs, Reg.DEVICE_ID) == DEVICE_ID == 0x7E10
    assert int.from_bytes(cs.read(Reg.CLASS_CODE, 3), "little") == 0x120000
    assert cs.read(Reg.HEADER_TYPE, 1) == b"\x00"
    assert cs.read(Reg.INTERRUPT_PIN, 1) == b"\x01"
    assert cs.size == CONFIG_SIZE == 4096


def test_identity_is_read_only(cs: ConfigSpace) -> None:
    before = cs.read(0, 4)
    cs.write(Reg.VENDOR_ID, b"\xFF\xFF\xFF\xFF")
    assert cs.read(0, 4) == before
    cs.write(Reg.REVISION_ID, b"\xFF\xFF\xFF\xFF")
    assert r32(cs, Reg.REVISION_ID) == 0x12000001
    cs.write(Reg.INTERRUPT_PIN, b"\x04")
    assert cs.read(Reg.INTERRUPT_PIN, 1) == b"\x01"


def test_rw_scratch_registers(cs: ConfigSpace) -> None:
    cs.write(Reg.INTERRUPT_LINE, b"\x0B")
    assert cs.read(Reg.INTERRUPT_LINE, 1) == b"\x0B"
    cs.write(Reg.CACHE_LINE_SIZE, b"\x10")
    assert cs.read(Reg.CACHE_LINE_SIZE, 1) == b"\x10"


@pytest.mark.parametrize("bar", [0, 1])
def test_bar_sizing(cs: ConfigSpace, bar: int) -> None:
    off = Reg.BAR0 + 4 * bar
    assert r32(cs, off) == 0                    # 32-bit, non-prefetchable memory BAR
    cs.write(off, u32(0xFFFFFFFF))
    sized = r32(cs, off)
    assert sized == 0xFFFFF000
    assert (~sized & 0xFFFFFFFF) + 1 == 4096    # the size software computes
    cs.write(off, u32(0xFEB0_1000 + bar * 0x1000))
    assert r32(cs, off) == 0xFEB0_1000 + bar * 0x1000
    cs.write(off, u32(0xFEB0_2ABC))             # low 12 bits are not writable
    assert r32(cs, off) == 0xFEB0_2000


def test_unimplemented_bars_read_zero(cs: ConfigSpace) -> None:
    for bar in range(2, 6):
        off = Reg.BAR0 + 4 * bar
        cs.write(off, u32(0xFFFFFFFF))
        assert r32(cs, off) == 0
    cs.write(Reg.ROM_ADDRESS, u32(0xFFFFFFFF))
    assert r32(cs, Reg.ROM_ADDRESS) == 0


def test_command_register_mask(cs: ConfigSpace) -> None:
    assert r16(cs, Reg.COMMAND) == 0
    cs.write(Reg.COMMAND, u16(0xFFFF))
    cmd = r16(cs, Reg.COMMAND)
    assert cmd & Command.INTERRUPT_DISABLE          # bit 10 writable
    assert cmd & (1 << 10)
    assert not cmd & Command.IO_SPACE               # bit 0: no I/O BARs
    assert not cmd & 1
    assert cmd == (Command.MEMORY_SPACE | Command.BUS_MASTER | Command.PARITY_ERROR_RESPONSE
                   | Command.SERR_ENABLE | Command.INTERRUPT_DISABLE)
    cs.write(Reg.COMMAND, u16(Command.MEMORY_SPACE))
    assert r16(cs, Reg.COMMAND) == Command.MEMORY_SPACE


def test_status_capabilities_list_and_rw1c(cs: ConfigSpace) -> None:
    status = r16(cs, Reg.STATUS)
    assert status & Status.CAPABILITIES_LIST
    assert status & (1 << 4)
    # Device sets error bits and Interrupt Status.
    cs.poke(Reg.STATUS, 2, status | STATUS_RW1C | Status.INTERRUPT_STATUS)
    cs.write(Reg.STATUS, u16(0))                     # writing 0 changes nothing
    assert r16(cs, Reg.STATUS) == status | STATUS_RW1C | Status.INTERRUPT_STATUS
    cs.write(Reg.STATUS, u16(Status.RECEIVED_MASTER_ABORT))   # clears just that bit
    assert r16(cs, Reg.STATUS) == ((status | STATUS_RW1C | Status.INTERRUPT_STATUS)
                                   & ~Status.RECEIVED_MASTER_ABORT & 0xFFFF)
    cs.write(Reg.STATUS, u16(0xFFFF))
    # RO bits (Capabilities List, Interrupt Status) survive all-ones.
    assert r16(cs, Reg.STATUS) == Status.CAPABILITIES_LIST | Status.INTERRUPT_STATUS


def test_dword_write_to_command_does_not_clear_status(cs: ConfigSpace) -> None:
    cs.poke(Reg.STATUS, 2, r16(cs, Reg.STATUS) | Status.DETECTED_PARITY_ERROR)
    cs.write(Reg.COMMAND, u32(Command.BUS_MASTER))
    assert r16(cs, Reg.COMMAND) == Command.BUS_MASTER
    assert r16(cs, Reg.STATUS) & Status.DETECTED_PARITY_ERROR


# --- capability walk --------------------------------------------------------------------


def walk(cs: ConfigSpace) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    ptr = cs.read(Reg.CAPABILITIES_POINTER, 1)[0]
    while ptr:
        assert ptr >= 0x40 and ptr % 4 == 0
        assert ptr not in [o for o, _ in out], "capability list loops"
        out.append((ptr, cs.read(ptr, 1)[0]))
        ptr = cs.read(ptr + 1, 1)[0]
    return out


def test_capability_list(cs: ConfigSpace) -> None:
    assert walk(cs) == [(0x40, CapId.POWER_MANAGEMENT), (0x50, CapId.MSIX),
                        (0x60, CapId.PCI_EXPRESS)]
    assert (PM_CAP, MSIX_CAP, PCIE_CAP) == (0x40, 0x50, 0x60)
    assert cs.find_capability(CapId.POWER_MANAGEMENT) == 0x40
    assert cs.find_capability(CapId.MSIX) == 0x50
    assert cs.find_capability(CapId.PCI_EXPRESS) == 0x60
    assert cs.find_capability(CapId.MSI) is None


def test_capability_pointer_read_only(cs: ConfigSpace) -> None:
    cs.write(Reg.CAPABILITIES_POINTER, b"\x00")
    cs.write(0x41, b"\x00")
    assert walk(cs)[0] == (0x40, CapId.POWER_MANAGEMENT)
    assert len(walk(cs)) == 3


def test_power_management(cs: ConfigSpace) -> None:
    pmc = r16(cs, 0x42)
    assert pmc & 0x7 == 3                        # PM spec version 1.2
    pmcsr = r16(cs, 0x44)
    assert pmcsr & 0x3 == 0                      # D0
    assert pmcsr & 0x8                           # No_Soft_Reset
    cs.write(0x44, u16(0xFFFF))
    assert r16(cs, 0x44) == 0x000B               # only PowerState is RW
    cs.write(0x44, u16(0))
    assert r16(cs, 0x44) == 0x0008


def test_msix(cs: ConfigSpace) -> None:
    mc = r16(cs, 0x52)
    assert mc & 0x7FF == 3                       # table size N-1 for 4 vectors
    assert not mc & 0xC000
    table = r32(cs, 0x54)
    pba = r32(cs, 0x58)
    assert table & 0x7 == 1 and table & ~0x7 == 0       # BIR 1, offset 0
    assert pba & 0x7 == 1 and pba & ~0x7 == 0x800       # BIR 1, offset 0x800
    cs.write(0x52, u16(0xFFFF))                  # Enable and Function Mask are RW
    assert r16(cs, 0x52) == 0xC003
    cs.write(0x52, u16(0))
    assert r16(cs, 0x52) == 0x0003
    cs.write(0x54, u32(0xFFFFFFFF))
    cs.write(0x58, u32(0xFFFFFFFF))
    assert (r32(cs, 0x54), r32(cs, 0x58)) == (table, pba)


def test_pcie_capability(cs: ConfigSpace) -> None:
    caps = r16(cs, 0x62)
    assert caps & 0xF == 2                       # capability version 2
    assert (caps >> 4) & 0xF == 0                # PCI Express Endpoint
    devcap = r32(cs, 0x64)
    assert devcap & (1 << 30)                    # TEE-IO Supported
    assert devcap & (1 << 28)                    # Function Level Reset Capability
    assert devcap & (1 << 5)                     # Extended Tag Field Supported
    assert devcap & 0x7 == 1                     # Max_Payload_Size Supported: 256 B
    cs.write(0x64, u32(0))
    assert r32(cs, 0x64) == devcap               # Device Capabilities is RO
    assert r16(cs, 0x72) == 0x0011               # Link Status 2.5 GT/s x1


def test_pcie_device_control_and_status(cs: ConfigSpace) -> None:
    # After reset: Relaxed Ordering, Extended Tag, No Snoop; MPS 128 B, MRRS 512 B.
    assert r16(cs, 0x68) == 0x2910
    cs.write(0x68, u16(0xFFFF))
    assert r16(cs, 0x68) == 0x7DFF               # Phantom Functions RO 0, FLR reads 0
    assert not r16(cs, 0x68) & 0x8000
    cs.poke(0x6A, 2, 0x002F)                     # error bits + Transactions Pending
    cs.write(0x6A, u16(0x0005))
    assert r16(cs, 0x6A) == 0x002A
    cs.write(0x6A, u16(0xFFFF))
    assert r16(cs, 0x6A) == 0x0020               # bit 5 is RO


def test_dsn_extended_capability(cs: ConfigSpace) -> None:
    hdr = r32(cs, 0x100)
    assert hdr & 0xFFFF == 3 == int(ExtCapId.DEVICE_SERIAL_NUMBER)
    assert (hdr >> 16) & 0xF == 1                # version
    assert hdr >> 20 == 0x110                    # next: DOE (tests/unit/test_doe_mailbox.py)
    assert int.from_bytes(cs.read(0x104, 8), "little") == SERIAL
    assert cs.find_ext_capability(ExtCapId.DEVICE_SERIAL_NUMBER) == 0x100
    assert cs.find_ext_capability(ExtCapId.DOE) == 0x110
    cs.write(0x100, u32(0))
    cs.write(0x104, bytes(8))
    assert r32(cs, 0x100) == hdr
    assert int.from_bytes(cs.read(0x104, 8), "little") == SERIAL


def test_ide_extended_capability_follows_doe(cs: ConfigSpace) -> None:
    """IDE (0x30) at the first free DW after DOE, last in the list: one Link block, two
    Selective blocks with one Address Association block each (0x54 bytes)."""
    assert r32(cs, 0x110) >> 20 == IDE_CAP == 0x128
    hdr = r32(cs, IDE_CAP)
    assert hdr & 0xFFFF == 0x30 and (hdr >> 16) & 0xF == 1 and hdr >> 20 == AER_CAP
    assert cs.find_ext_capability(ExtCapId.IDE) == IDE_CAP
    cap = r32(cs, IDE_CAP + 4)
    assert cap & 0b1000011 == 0b1000011                  # Link, Selective, IDE_KM
    assert (cap >> 16) & 0xFF == 1 and cap >> 24 & 1     # 2 selective streams, TEE-Limited
    for i in range(2):
        block = IDE_CAP + 0x14 + 0x20 * i
        assert r32(cs, block) == 1                       # one Address Association block
        cs.write(block + 4, u32(0xFFFF_FFFF))            # Control: PHE, PCRC, aggregation RO
        assert r32(cs, block + 4) == 0xFFFF_FFFF & ~0x3FFE
    assert IDE_CAP + 0x54 <= 0x1000


def test_serial_differs_per_device() -> None:
    a, b = build_config(1), build_config(2)
    assert a.read(0x104, 8) != b.read(0x104, 8)
    assert a.read(0, 0x100) == b.read(0, 0x100)


# --- building capability lists ----------------------------------------------------------


def test_add_capability_links_in_order() -> None:
    c = ConfigSpace()
    assert not c.get(Reg.STATUS, 2) & Status.CAPABILITIES_LIST
    c.add_capability(0x48, 0x01, b"\xAA\xBB")
    assert c.get(Reg.STATUS, 2) & Status.CAPABILITIES_LIST
    c.add_capability(0xF0, 0x11, bytes(2))
    c.add_capability(0x80, 0x10, bytes(4))
    assert walk(c) == [(0x48, 0x01), (0xF0, 0x11), (0x80, 0x10)]
    assert c.read(0x4A, 2) == b"\xAA\xBB"
    assert c.find_capability(0x10) == 0x80


@pytest.mark.parametrize(("off", "body_len"), [
    (0x3C, 2),       # inside the header
    (0x00, 0),
    (0x42, 2),       # not dword aligned
    (0x41, 0),
    (0xFC, 4),       # runs past 0xFF
    (0x100, 0),      # extended space
    (0xF8, 7),       # 0xF8 + 2 + 7 = 0x101: one byte too many
])
def test_add_capability_rejects_bad_offsets(off: int, body_len: int) -> None:
    c = ConfigSpace()
    before = bytes(c.data)
    with pytest.raises(ValueError):
        c.add_capability(off, 0x01, bytes(body_len))
    assert bytes(c.data) == before


def test_add_capability_last_byte_fits() -> None:
    c = ConfigSpace()
    c.add_capability(0xF8, 0x09, bytes(6))       # ends exactly at 0xFF
    assert c.find_capability(0x09) == 0xF8


def test_add_ext_capability_links() -> None:
    c = ConfigSpace()
    c.add_ext_capability(0x100, 0x0003, 1, bytes(8))
    c.add_ext_capability(0x200, 0x002E, 1, bytes(16))
    c.add_ext_capability(0x180, 0x0030, 2, bytes(4))
    assert c.get(0x100, 4) == 0x0003 | 1 << 16 | 0x200 << 20
    assert c.get(0x200, 4) == 0x002E | 1 << 16 | 0x180 << 20
    assert c.get(0x180, 4) == 0x0030 | 2 << 16
    assert c.find_ext_capability(0x0030) == 0x180
    assert c.find_ext_capability(0x002E) == 0x200
    assert c.find_ext_capability(0x0001) is None


@pytest.mark.parametrize(("off", "body_len"), [
    (0xFC, 0),       # legacy space
    (0x40, 0),
    (0x102, 0),      # misaligned
    (0xFFC, 4),      # runs past 4 KiB
    (0x104, 0),      # the first one must be at 0x100
    (0x200, 0),
])
def test_add_ext_capability_rejects_bad_offsets(off: int, body_len: int) -> None:
    c = ConfigSpace()
    before = bytes(c.data)
    with pytest.raises(ValueError):
        c.add_ext_capability(off, 0x0003, 1, bytes(body_len))
    assert bytes(c.data) == before               # nothing written on refusal


def test_add_ext_capability_rejects_bad_offsets_after_first() -> None:
    c = ConfigSpace()
    c.add_ext_capability(0x100, 0x0003, 1, bytes(8))
    before = bytes(c.data)
    for off in (0xF0, 0x10A, 0xFFC + 4):
        with pytest.raises(ValueError):
            c.add_ext_capability(off, 0x002E, 1, b"")
    assert bytes(c.data) == before
    assert c.get(0x100, 4) >> 20 == 0


def test_find_capability_survives_a_loop() -> None:
    c = ConfigSpace()
    c.add_capability(0x40, 0x01, bytes(2))
    c.add_capability(0x50, 0x05, bytes(2))
    c.poke(0x51, 1, 0x40)                        # corrupt: 0x50 -> 0x40
    assert c.find_capability(0x11) is None
    c.add_ext_capability(0x100, 0x0003, 1, bytes(8))
    c.poke(0x100, 4, 0x0003 | 1 << 16 | 0x100 << 20)
    assert c.find_ext_capability(0x002E) is None


# --- Device Capabilities / Control: payload sizes (PCIe 6.x §7.5.3.3-4) -------------------

@pytest.mark.parametrize("mps", [128, 256, 512, 1024, 2048, 4096])
def test_mps_supported_is_the_option(mps: int) -> None:
    cs = build_config(SERIAL, mps_supported=mps)
    assert 128 << (r32(cs, PCIE_CAP + 4) & 0x7) == mps
    assert device_control_link(cs) == (128, 512, True)      # Device Control says 128


@pytest.mark.parametrize("mps", [0, 64, 100, 384, 8192])
def test_mps_the_field_cannot_encode_is_refused(mps: int) -> None:
    with pytest.raises(ValueError, match="3-bit"):
        build_config(SERIAL, mps_supported=mps)


@pytest.mark.parametrize(("supported", "code", "want"), [
    (256, 0, 128), (256, 1, 256), (256, 2, 256), (256, 5, 256), (256, 6, 256),
    (4096, 5, 4096), (4096, 3, 1024), (128, 1, 128),
])
def test_effective_mps_is_capped_by_the_capability(supported: int, code: int,
                                                   want: int) -> None:
    cs = build_config(SERIAL, mps_supported=supported)
    devctl = PCIE_CAP + 8
    cs.write(devctl, u16(r16(cs, devctl) & ~0xE0 | code << 5))
    assert device_control_link(cs)[0] == want


@pytest.mark.parametrize(("code", "want"), [(0, 128), (2, 512), (5, 4096), (7, 4096)])
def test_effective_mrrs_is_device_control(code: int, want: int) -> None:
    cs = build_config(SERIAL, mrrs=1024)
    devctl = PCIE_CAP + 8
    assert (r16(cs, devctl) >> 12) & 7 == 3              # the option: reset value 1024
    cs.write(devctl, u16(r16(cs, devctl) & ~0x7000 | code << 12))
    assert device_control_link(cs)[1] == want


def test_extended_tag_field_enable_is_rw(cs: ConfigSpace) -> None:
    devctl = PCIE_CAP + 8
    cs.write(devctl, u16(r16(cs, devctl) & ~0x100))
    assert device_control_link(cs)[2] is False
    cs.write(devctl, u16(r16(cs, devctl) | 0x100))
    assert device_control_link(cs)[2] is True


# --- Advanced Error Reporting (PCIe 6.x §7.8.4) ----------------------------------------------

def test_aer_capability_follows_ide_and_ends_the_list(cs: ConfigSpace) -> None:
    assert AER_CAP == IDE_CAP + 0x54 == 0x17C
    assert cs.find_ext_capability(ExtCapId.ADVANCED_ERROR_REPORTING) == AER_CAP
    hdr = r32(cs, AER_CAP)
    assert hdr & 0xFFFF == 0x0001 and (hdr >> 16) & 0xF == 2 and hdr >> 20 == 0
    # every earlier capability kept its place
    assert [cs.find_ext_capability(c) for c in (ExtCapId.DEVICE_SERIAL_NUMBER, ExtCapId.DOE,
                                                ExtCapId.IDE)] == [0x100, 0x110, 0x128]
