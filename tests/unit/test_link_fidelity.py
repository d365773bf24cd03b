"""Link fidelity: payload sizes from Device Control (PCIe 6.x §7.5.3.3-4), real tags and
unexpected completions (§2.2.6.2, §2.3.2), Initiate FLR, AER logging (§7.8.4)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from teeio.pcie import aer
from teeio.pcie.config import ConfigSpace
from teeio.tlp import Tlp, TlpType
from tests.support.link_rig import GUEST, RID, SIZE, Rig
from vfio_user_dev.device import (
    AER_CAP,
    DEVCAP,
    DEVCTL,
    DEVSTA,
    TeeIoDevice,
)
from vfio_user_dev.link.capture import CaptureWriter, iter_tlps, read_capture
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection, LinkError, LinkFault, MmioRequest
from vfio_user_dev.link.tags import MAX_OUTSTANDING, TAGS_5BIT, TagAllocator, read_headers
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import DmaFlags, PciRegion

pytestmark = pytest.mark.timeout(30)


def tlps(r: Rig) -> list[Tlp]:
    assert r.capture_path is not None and r.link.capture is not None
    r.link.capture.flush()
    return list(iter_tlps(read_capture(r.capture_path)))


# -- tag allocation ---------------------------------------------------------------------------

def test_tags_round_robin_and_never_reused_while_outstanding() -> None:
    t = TagAllocator()
    a = t.allocate(3)
    assert a == [0, 1, 2]
    assert t.allocate(2) == [3, 4]
    t.free(a)
    assert t.allocate(1) == [5]                     # round-robin, not the lowest free
    assert t.outstanding == 3
    rest = t.allocate(MAX_OUTSTANDING - 3)
    assert set(rest) | {3, 4, 5} == set(range(MAX_OUTSTANDING))
    with pytest.raises(ValueError, match="free"):
        t.allocate(1)


def test_five_bit_tags() -> None:
    t = TagAllocator(TAGS_5BIT)
    assert t.allocate(TAGS_5BIT) == list(range(32))
    with pytest.raises(ValueError):
        t.allocate(1)
    with pytest.raises(ValueError, match="tag space"):
        TagAllocator(64)


def test_read_headers_wrap_around() -> None:
    pieces = [(0x1000 + 64 * i, 64) for i in range(4)]
    heads = read_headers(RID, pieces, [254, 255, 0, 1])
    assert [Tlp.decode(h).tag for h in heads] == [254, 255, 0, 1]
    assert [Tlp.decode(h).address for h in heads] == [a for a, _ in pieces]


# -- tags on the wire -------------------------------------------------------------------------

def test_successive_dma_reads_carry_different_tags(cap: Rig) -> None:
    cap.poke(0, bytes(range(256)) * 16)
    for i in range(5):
        assert cap.ep.read(GUEST + 64 * i, 64) == cap.mem(64 * i, 64)
    mrds = [t for t in tlps(cap) if t.type is TlpType.MRD32 or t.type is TlpType.MRD64]
    assert [t.tag for t in mrds] == [0, 1, 2, 3, 4]
    cpls = [t for t in tlps(cap) if t.type.is_completion]
    assert [t.tag for t in cpls] == [0, 1, 2, 3, 4]          # each echoes its request's
    assert cap.ep.tags.outstanding == 0


def test_a_long_read_uses_every_tag_then_wraps(tmp_path: Path) -> None:
    r = Rig(tmp_path, capture=True, mps=128, mrrs=128)
    try:
        r.poke(0, os.urandom(SIZE))
        n = SIZE // 128                                       # 512 MRds
        assert r.ep.read(GUEST, SIZE) == r.mem(0, SIZE)
        mrds = [t for t in tlps(r) if t.type.is_request]
        assert [t.tag for t in mrds] == [i % 256 for i in range(n)]
    finally:
        r.close()


def test_extended_tag_clear_limits_reads_to_5_bit_tags(cap: Rig) -> None:
    cap.ep.set_extended_tags(False)
    cap.poke(0, os.urandom(0x4000))
    assert cap.ep.read(GUEST, 0x4000) == cap.mem(0, 0x4000)   # 32 MRds of 512 B
    assert cap.ep.read(GUEST, 512) == cap.mem(0, 512)
    mrds = [t for t in tlps(cap) if t.type.is_request]
    assert [t.tag for t in mrds] == [*range(32), 0]
    assert cap.ep.status()["tag_space"] == TAGS_5BIT


def test_replayed_completion_is_unexpected_and_counted(cap: Rig) -> None:
    cap.poke(0, b"x" * 64)
    cap.link.inject(Fault(FaultKind.REPLAY, LinkDirection.DOWNSTREAM))
    assert cap.ep.read(GUEST, 64) == b"x" * 64                # the first copy completes it
    assert cap.ep.status()["unexpected_completions"] == 1    # the duplicate is refused


def test_completion_for_another_requester_is_refused(cap: Rig) -> None:
    cap.link.inject(Fault(FaultKind.FLIP_REQUESTER_ID, LinkDirection.DOWNSTREAM))
    with pytest.raises(LinkFault, match="completion timeout"):
        cap.ep.read(GUEST, 64)
    assert cap.ep.status()["unexpected_completions"] == 1
    assert cap.ep.tags.outstanding == 0                       # the tag was given back


# -- the root port as requester (MMIO) ------------------------------------------------------

class Completer:
    def __init__(self) -> None:
        self.mem = bytearray(os.urandom(4096))

    def mmio_request(self, req: MmioRequest) -> bytes | None:
        off = req.address - 0xFE00_0000
        if req.write:
            self.mem[off:off + req.length] = req.data
            return b""
        return bytes(self.mem[off:off + req.length])


def test_mmio_reads_carry_different_tags(cap: Rig) -> None:
    dev = Completer()
    cap.ep.mmio_completer = dev
    for i in range(3):
        assert cap.rp.mmio_read(RID, 0xFE00_0000 + 4 * i, 4) == bytes(dev.mem[4 * i:4 * i + 4])
    assert cap.rp.mmio_write(RID, 0xFE00_0100, b"abcd")
    assert cap.rp.mmio_read(RID, 0xFE00_0100, 4) == b"abcd"
    down = [t for t in tlps(cap) if t.type.is_request and t.requester_id == cap.rp.completer_id]
    assert [(t.type.has_data, t.tag) for t in down] == [
        (False, 0), (False, 1), (False, 2), (True, 0), (False, 4)]


def test_mmio_unexpected_completion_is_refused_and_counted(cap: Rig) -> None:
    dev = Completer()
    cap.ep.mmio_completer = dev
    cap.link.inject(Fault(FaultKind.REPLAY, LinkDirection.UPSTREAM))
    assert cap.rp.mmio_read(RID, 0xFE00_0000, 4) == bytes(dev.mem[:4])
    st = cap.rp.status()
    assert st["refusals"] == {"unexpected_completion": 1}
    assert st["mmio_completions_discarded"] == 1


# -- payload sizes ------------------------------------------------------------------------------

def test_set_payload_sizes_changes_the_split(cap: Rig) -> None:
    cap.link.set_payload_sizes(128, 256)
    cap.poke(0, os.urandom(1024))
    cap.ep.write(GUEST + 0x1000, b"w" * 512)
    assert cap.ep.read(GUEST, 1024) == cap.mem(0, 1024)
    out = tlps(cap)
    assert [len(t.payload_bytes()) for t in out if t.type.is_request and t.type.has_data] \
        == [128] * 4
    assert [t.request_byte_count for t in out if t.type.is_request and not t.type.has_data] \
        == [256] * 4
    assert all(len(t.payload_bytes()) <= 128 for t in out if t.type.is_completion)
    assert (cap.link.status()["mps"], cap.link.status()["mrrs"]) == (128, 256)
    assert cap.rp.mps == 128 and cap.rp.mrrs == 256
    with pytest.raises(ValueError, match="Max_Payload_Size"):
        cap.link.set_payload_sizes(100, 256)


# -- the device: Device Control drives the link, FLR, AER ---------------------------------------

@pytest.fixture
def machine() -> Iterator[Platform]:
    """The conftest's platform, with Max_Payload_Size 512 on its link."""
    m = Platform(mps=512)
    yield m
    m.close()


def cfg16(d: TeeIoDevice, off: int) -> int:
    return int.from_bytes(d.region_read(PciRegion.CONFIG, off, 2), "little")


def wr16(d: TeeIoDevice, off: int, value: int) -> None:
    d.region_write(PciRegion.CONFIG, off, value.to_bytes(2, "little"))


def test_device_control_drives_the_link(machine: Platform, device: TeeIoDevice) -> None:
    assert device.config.get(DEVCAP, 4) & 7 == 2             # --mps 512: MPS Supported
    st = machine.link.status()
    assert (st["mps"], st["mrrs"]) == (128, 512)              # Device Control after reset
    devctl = cfg16(device, DEVCTL)
    wr16(device, DEVCTL, devctl & ~0x70E0 | 2 << 5 | 5 << 12)  # MPS 512, MRRS 4096
    assert (machine.link.mps, machine.link.mrrs) == (512, 4096)
    wr16(device, DEVCTL, devctl & ~0x70E0 | 5 << 5 | 1 << 12)  # MPS 4096 > supported
    assert (machine.link.mps, machine.link.mrrs) == (512, 256)
    # a byte write of the high half (MRRS) alone
    device.region_write(PciRegion.CONFIG, DEVCTL + 1, bytes([(cfg16(device, DEVCTL) >> 8)
                                                              & ~0x70 | 0x30]))
    assert machine.link.mrrs == 1024
    wr16(device, DEVCTL, cfg16(device, DEVCTL) & ~0x100)      # Extended Tag cleared
    assert device.link_end.tags.space == TAGS_5BIT


def test_initiate_flr_resets_the_function_and_the_link_sizes(machine: Platform,
                                                            device: TeeIoDevice) -> None:
    wr16(device, DEVCTL, cfg16(device, DEVCTL) & ~0x100 | 1 << 5)     # MPS 256, 5-bit tags
    device.region_write(PciRegion.CONFIG, 0x04, b"\x06\x00")           # Memory, Bus Master
    assert machine.link.mps == 256 and device.link_end.tags.space == TAGS_5BIT
    generation = device.generation
    wr16(device, DEVCTL, cfg16(device, DEVCTL) | 1 << 15)             # Initiate FLR
    assert device.generation == generation + 1
    assert cfg16(device, DEVCTL) == 0x2910 and cfg16(device, 0x04) == 0
    assert (machine.link.mps, machine.link.mrrs) == (128, 512)
    assert device.link_end.tags.space == MAX_OUTSTANDING


def test_device_mps_option_is_checked() -> None:
    with pytest.raises(ValueError, match="Max_Payload_Size"):
        TeeIoDevice(mps=8192)


def test_unsupported_request_is_logged_in_aer(device: TeeIoDevice) -> None:
    req = Tlp.memory_read(0x0008, 7, 0xDEAD_0000, 4)            # outside BAR0
    cpls = device.link_end.receive_requests([req.encode()])
    assert Tlp.decode(cpls[0]).status.name == "UR"
    cs = device.config
    assert cs.get(AER_CAP + aer.AerReg.UNCOR_STATUS, 4) == aer.Uncorrectable.UNSUPPORTED_REQUEST
    assert cs.get(AER_CAP + aer.AerReg.CAP_CONTROL, 4) & 0x1F == 20      # First Error Pointer
    assert aer.header_log(cs, AER_CAP) == req.header().ljust(16, b"\0")
    assert cs.get(DEVSTA, 2) & (aer.DEVSTA_UNSUPPORTED_REQUEST | aer.DEVSTA_NON_FATAL) \
        == aer.DEVSTA_UNSUPPORTED_REQUEST | aer.DEVSTA_NON_FATAL
    # RW1C through config space; sticky across FLR until then
    device.reset()
    assert device.config.get(AER_CAP + aer.AerReg.UNCOR_STATUS, 4) != 0
    device.region_write(PciRegion.CONFIG, AER_CAP + aer.AerReg.UNCOR_STATUS,
                        (0xFFFF_FFFF).to_bytes(4, "little"))
    assert device.config.get(AER_CAP + aer.AerReg.UNCOR_STATUS, 4) == 0


def test_ide_check_failure_is_reported_for_aer(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        r.secure()
        seen: list[tuple[LinkError, bytes]] = []
        r.ep.on_error.append(lambda kind, header: seen.append((kind, header)))
        r.link.inject(Fault(FaultKind.FLIP_PAYLOAD, LinkDirection.DOWNSTREAM))
        with pytest.raises(LinkFault):
            r.ep.read(GUEST, 64)
        ((kind, header),) = seen
        assert kind is LinkError.IDE_CHECK_FAILED
        assert Tlp.decode(header[:12] + bytes(64)).type is TlpType.CPLD
    finally:
        r.close()


def test_device_logs_ide_check_failure_as_internal_error(device: TeeIoDevice) -> None:
    # The device's hook, as the endpoint calls it (above): Uncorrectable Internal Error is
    # masked by default, so the status bit is set but no First Error Pointer / Header Log.
    device.link_end.on_error[0](LinkError.IDE_CHECK_FAILED, b"\x4a" + bytes(15))
    cs = device.config
    assert cs.get(AER_CAP + aer.AerReg.UNCOR_STATUS, 4) == aer.Uncorrectable.INTERNAL
    assert cs.get(AER_CAP + aer.AerReg.CAP_CONTROL, 4) == 0
    assert aer.header_log(cs, AER_CAP) == bytes(16)


# -- the AER capability on its own ----------------------------------------------------------------

@pytest.fixture
def acs() -> ConfigSpace:
    cs = ConfigSpace()
    cs.add_ext_capability(0x100, 0x0003, 1, bytes(8))
    aer.build(cs, 0x10C)
    return cs


def r32(cs: ConfigSpace, off: int) -> int:
    return cs.get(off, 4)


def test_aer_defaults_and_masks(acs: ConfigSpace) -> None:
    b = 0x10C
    assert r32(acs, b) & 0xFFFF == 1 and r32(acs, b) >> 16 & 0xF == 2
    assert r32(acs, b + 0x08) == 1 << 22                     # Internal Error masked
    assert r32(acs, b + 0x0C) == 0x00462010                  # DLP FCP RO MTLP UIE Fatal
    assert r32(acs, b + 0x14) == 1 << 13                     # Advisory Non-Fatal masked
    for reg in (0x08, 0x0C, 0x14):
        acs.write(b + reg, (0xFFFF_FFFF).to_bytes(4, "little"))
    assert r32(acs, b + 0x08) == r32(acs, b + 0x0C) == int(aer.UNCOR_IMPLEMENTED)
    assert r32(acs, b + 0x14) == int(aer.COR_IMPLEMENTED)
    for reg in (0x04, 0x10, 0x18, 0x1C, 0x28):              # status RW1C, the rest RO
        acs.write(b + reg, (0xFFFF_FFFF).to_bytes(4, "little"))
        assert r32(acs, b + reg) == 0


def test_aer_first_error_pointer_and_header_log(acs: ConfigSpace) -> None:
    b = 0x10C
    h1, h2 = bytes(range(16)), bytes(range(16, 32))
    assert aer.report_uncorrectable(acs, b, aer.Uncorrectable.MALFORMED_TLP, h1)
    assert aer.report_uncorrectable(acs, b, aer.Uncorrectable.UNSUPPORTED_REQUEST, h2)
    assert r32(acs, b + 0x04) == (1 << 18) | (1 << 20)
    assert r32(acs, b + 0x18) & 0x1F == 18 and aer.header_log(acs, b) == h1
    assert r32(acs, b + 0x1C) == 0x00010203                  # header byte 0 in bits 31:24
    acs.write(b + 0x04, (1 << 18).to_bytes(4, "little"))     # software clears the first
    assert aer.report_uncorrectable(acs, b, aer.Uncorrectable.COMPLETION_TIMEOUT, h2)
    assert r32(acs, b + 0x18) & 0x1F == 14 and aer.header_log(acs, b) == h2
    assert not aer.report_correctable(acs, b, aer.Correctable.ADVISORY_NON_FATAL)  # masked
    assert r32(acs, b + 0x10) == 1 << 13
    with pytest.raises(ValueError):
        aer.report_uncorrectable(acs, b, aer.Uncorrectable.ECRC)     # not implemented


def test_aer_sticky_registers_survive_a_rebuild(acs: ConfigSpace) -> None:
    aer.report_uncorrectable(acs, 0x10C, aer.Uncorrectable.UNEXPECTED_COMPLETION, b"\1" * 16)
    fresh = ConfigSpace()
    fresh.add_ext_capability(0x100, 0x0003, 1, bytes(8))
    aer.build(fresh, 0x10C)
    aer.carry_sticky(acs, fresh, 0x10C)
    assert fresh.read(0x10C, aer.AER_CAP_SIZE) == acs.read(0x10C, aer.AER_CAP_SIZE)


def test_capture_file_of_the_device_follows_device_control(tmp_path: Path) -> None:
    """Device Control says 128 B after reset: so do the TLPs (DMA writes split by MPS)."""
    fd = os.memfd_create("fidelity")
    os.ftruncate(fd, SIZE)
    d = Platform(capture=CaptureWriter(tmp_path / "c.pcap"))
    try:
        d.dma.map(GUEST, SIZE, DmaFlags.READ | DmaFlags.WRITE, 0, os.dup(fd))
        d.device.link_end.write(GUEST, b"z" * 1024)
        wr16(d.device, DEVCTL, cfg16(d.device, DEVCTL) | 1 << 5)    # MPS 256
        d.device.link_end.write(GUEST, b"z" * 1024)
        d.link.close()
        sizes = [len(t.payload_bytes()) for t in iter_tlps(read_capture(tmp_path / "c.pcap"))
                 if t.type.is_request]
        assert sizes == [128] * 8 + [256] * 4
    finally:
        d.close()
        d.dma.clear()
        os.close(fd)

