"""DOE through the vfio-user server: config-region reads and writes drive the mailbox,
as Linux's drivers/pci/doe.c (and QEMU relaying a guest's config accesses) would."""

from __future__ import annotations

import os
import struct
import time

import pytest

from guest_agent.doe import DoeMailboxClient, DoeMailboxError, find_ext_capabilities
from teeio.doe import (
    DOE_CAP_SIZE,
    DOE_EXT_CAP_ID,
    PCI_SIG_VENDOR_ID,
    DataObjectType,
    DiscoveryRequest,
    DiscoveryResponse,
    DoeControl,
    DoeObject,
    DoeReg,
    DoeStatus,
)
from teeio.pcie.config import ExtCapId
from tests.support.linux_doe import CTRL, RMB, STATUS, WMB, LinuxDoe, VfioConfig
from tests.support.lockstep import (
    CONFIG,
    MEM_BM,
    event_fired,
    ok,
    read_id,
    region_read_payload,
    region_write_payload,
)
from tests.support.servers import RunningServer
from vfio_user_dev import protocol as p
from vfio_user_dev.client import Client
from vfio_user_dev.device import DOE_CAP, DOE_MSIX_VECTOR, DSN_CAP, IDE_CAP, MSIX_CAP
from vfio_user_dev.protocol import Command, IrqSetFlags, PciIrq

pytestmark = pytest.mark.timeout(20)

SPDM = (PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM)


def echo(payload: bytes) -> bytes:
    return payload


# -- layout -------------------------------------------------------------------------------------

def test_doe_capability_follows_dsn_in_the_extended_list(c: Client) -> None:
    dsn = c.read32(CONFIG, DSN_CAP)
    assert dsn & 0xFFFF == ExtCapId.DEVICE_SERIAL_NUMBER and dsn >> 20 == DOE_CAP
    hdr = c.read32(CONFIG, DOE_CAP)
    assert hdr & 0xFFFF == DOE_EXT_CAP_ID == ExtCapId.DOE
    assert (hdr >> 16) & 0xF == 2 and hdr >> 20 == IDE_CAP      # next: IDE
    assert find_ext_capabilities(VfioConfig(c), DOE_EXT_CAP_ID) == [DOE_CAP]
    caps = c.read32(CONFIG, DOE_CAP + DoeReg.CAPABILITIES)
    assert caps == 1 | DOE_MSIX_VECTOR << 1          # Interrupt Support, message number 1
    assert c.read32(CONFIG, STATUS) == 0 and c.read32(CONFIG, CTRL) == 0
    # the header is read-only
    c.write32(CONFIG, DOE_CAP, 0)
    assert c.read32(CONFIG, DOE_CAP) == hdr


def test_linux_style_discovery_lists_only_registered_protocols(server: RunningServer,
                                                               c: Client) -> None:
    linux = LinuxDoe(c, DOE_CAP)
    linux.abort()
    assert linux.cache_features() == [(1, 0)]        # nothing registered: Discovery only
    server.device.doe.register(*SPDM, echo)
    server.device.doe.register(PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM, echo)
    assert linux.cache_features() == [(1, 0), (1, 1), (1, 2)]
    # index past the table: vendor FFFFh
    rsp = DiscoveryResponse.decode(linux.doe(1, 0, DiscoveryRequest(7).encode(), 4))
    assert rsp.vendor_id == 0xFFFF
    assert server.machine.stats()["doe_objects"] == 5


def test_linux_reads_a_short_buffer_and_flushes_the_rest(server: RunningServer,
                                                         c: Client) -> None:
    server.device.doe.register(*SPDM, echo)
    linux = LinuxDoe(c, DOE_CAP)
    data = bytes(range(64))
    assert linux.doe(*SPDM, data, 8) == data[:8]     # excess DWs drained
    assert c.read32(CONFIG, STATUS) & ~DoeStatus.INTERRUPT_STATUS == 0
    assert linux.doe(*SPDM, data, 64) == data


def test_guest_client_round_trips_through_config_space(server: RunningServer,
                                                       c: Client) -> None:
    server.device.doe.register(*SPDM, echo)
    mb = DoeMailboxClient.find(VfioConfig(c))
    assert (mb.cap, mb.version) == (DOE_CAP, 2)
    mb.abort()
    assert mb.discover() == [(1, 0), SPDM]
    for n in (0, 4, 1000, 4096):
        req = DoeObject(*SPDM, bytes(i & 0xFF for i in range(n)))
        assert mb.exchange_object(req) == req


def test_guest_client_reports_error_and_aborts(c: Client) -> None:
    mb = DoeMailboxClient(VfioConfig(c), DOE_CAP)
    with pytest.raises(DoeMailboxError, match="Error after Go"):
        mb.exchange_object(DoeObject(*SPDM, b"abcd"))  # nothing registered for 0001:01
    assert c.read32(CONFIG, STATUS) & DoeStatus.ERROR == 0   # the client aborted


def test_guest_client_times_out_on_a_silent_handler(server: RunningServer, c: Client) -> None:
    server.device.doe.register(*SPDM, lambda _p: None)
    mb = DoeMailboxClient(VfioConfig(c), DOE_CAP, timeout=0.2)
    t0 = time.monotonic()
    assert mb.exchange_object(DoeObject(*SPDM, b"abcd")) is None
    assert 0.2 <= time.monotonic() - t0 < 2
    assert mb.discover() == [(1, 0), SPDM]


# -- access widths ------------------------------------------------------------------------------

def test_sub_dword_accesses(server: RunningServer, c: Client) -> None:
    server.device.doe.register(*SPDM, echo)
    req = DoeObject(*SPDM, b"WXYZ").encode()
    for i in range(0, len(req), 4):
        c.write32(CONFIG, WMB, int.from_bytes(req[i:i + 4], "little"))
    c.region_write(CONFIG, CTRL + 3, b"\x80")          # byte write of Go (bit 31)
    assert c.region_read(CONFIG, STATUS + 3, 1) == b"\x80"       # Ready, byte read
    assert c.region_read(CONFIG, STATUS, 2) == b"\x00\x00"       # no Interrupt Status:
    # interrupts are disabled (§7.9.24.4), word read
    assert c.region_read(CONFIG, RMB + 1, 2) == req[1:3]          # reads never advance
    assert c.read32(CONFIG, RMB) == int.from_bytes(req[:4], "little")
    c.region_write(CONFIG, RMB, b"\0\0")               # a 2-byte ack: DOE Error (§6.30.2)
    assert c.read32(CONFIG, STATUS) & DoeStatus.ERROR
    c.region_write(CONFIG, CTRL, b"\x01")              # byte write of Abort
    assert c.read32(CONFIG, STATUS) & (DoeStatus.ERROR | DoeStatus.DATA_OBJECT_READY) == 0
    c.region_write(CONFIG, WMB + 2, b"\x01\x00")       # partial write mailbox: Error
    assert c.read32(CONFIG, STATUS) & DoeStatus.ERROR


def test_one_access_across_dsn_and_the_whole_doe_capability(server: RunningServer,
                                                            c: Client) -> None:
    server.device.doe.register(*SPDM, echo)
    before = c.region_read(CONFIG, DSN_CAP, 0x40)
    assert before[0x10:0x14] == c.region_read(CONFIG, DOE_CAP, 4)
    # One write covering DSN, the DOE header and every DOE register: the read-only parts
    # keep their values, a 0 to the Write Data Mailbox appends one DW, nothing else starts.
    c.region_write(CONFIG, DSN_CAP, bytes(0x40))
    after = c.region_read(CONFIG, DSN_CAP, 0x40)
    assert after[:0x14] == before[:0x14]
    assert after[0x14:0x14 + DOE_CAP_SIZE - 4] == struct.pack("<IIIII", 3, 0, 0, 0, 0)
    assert server.device.doe_mailbox.state.name == "RECEIVING"
    assert server.device.doe.objects == 0


def test_raw_lockstep_messages(c: Client) -> None:
    """The exact REGION_WRITE/READ replies for a Discovery exchange."""
    req = DoeObject(PCI_SIG_VENDOR_ID, 0, DiscoveryRequest(0).encode()).encode()
    for i in range(0, len(req), 4):
        body = ok(c, Command.REGION_WRITE, region_write_payload(CONFIG, WMB, req[i:i + 4]))
        assert p.RegionAccess.decode(body, with_data=False) == p.RegionAccess(WMB, CONFIG, 4)
    ok(c, Command.REGION_WRITE, region_write_payload(CONFIG, CTRL, struct.pack("<I", 1 << 31)))
    body = ok(c, Command.REGION_READ, region_read_payload(CONFIG, STATUS, 4))
    # Data Object Ready; no Interrupt Status: interrupts are disabled (§7.9.24.4)
    assert p.RegionAccess.decode(body, with_data=True).data == struct.pack("<I", 0x80000000)
    words = []
    for _ in range(3):
        body = ok(c, Command.REGION_READ, region_read_payload(CONFIG, RMB, 4))
        words.append(p.RegionAccess.decode(body, with_data=True).data)
        ok(c, Command.REGION_WRITE, region_write_payload(CONFIG, RMB, bytes(4)))
    assert b"".join(words) == DoeObject(1, 0, DiscoveryResponse(1, 0, 0).encode()).encode()
    read_id(c)


# -- reset, disconnect, interrupts --------------------------------------------------------------

def test_device_reset_aborts_the_mailbox(server: RunningServer, c: Client) -> None:
    mb = DoeMailboxClient(VfioConfig(c), DOE_CAP)
    mb.exchange(DoeObject(1, 0, DiscoveryRequest(0).encode()).encode()[:8])  # partial: none
    req = DoeObject(1, 0, DiscoveryRequest(0).encode()).encode()
    for i in range(0, len(req), 4):
        c.write32(CONFIG, WMB, int.from_bytes(req[i:i + 4], "little"))
    c.write32(CONFIG, CTRL, DoeControl.GO | DoeControl.INTERRUPT_ENABLE)
    assert c.read32(CONFIG, STATUS) & DoeStatus.DATA_OBJECT_READY
    c.reset()
    assert c.read32(CONFIG, STATUS) == 0 and c.read32(CONFIG, CTRL) == 0
    assert c.read32(CONFIG, RMB) == 0
    assert mb.discover() == [(1, 0)]


def test_client_disconnect_resets_the_mailbox(server: RunningServer) -> None:
    first = server.client()
    first.write32(CONFIG, WMB, 0x00000001)
    first.write32(CONFIG, WMB, 0x00000003)
    assert server.device.doe_mailbox.state.name == "RECEIVING"
    first.close()
    second = server.client()
    try:
        assert DoeMailboxClient(VfioConfig(second), DOE_CAP).discover() == [(1, 0)]
    finally:
        second.close()


def test_doe_interrupt_on_msix_vector_1(server: RunningServer, c: Client) -> None:
    fds = [os.eventfd(0) for _ in range(4)]
    try:
        c.region_write(CONFIG, 0x04, MEM_BM.to_bytes(2, "little"))
        c.region_write(CONFIG, MSIX_CAP + 2, (1 << 15).to_bytes(2, "little"))
        c.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 0, 4,
                   fds)
        c.write32(CONFIG, CTRL, DoeControl.INTERRUPT_ENABLE)
        req = DoeObject(1, 0, DiscoveryRequest(0).encode()).encode()
        for i in range(0, len(req), 4):
            c.write32(CONFIG, WMB, int.from_bytes(req[i:i + 4], "little"))
        c.write32(CONFIG, CTRL, DoeControl.GO | DoeControl.INTERRUPT_ENABLE)
        assert event_fired(fds[DOE_MSIX_VECTOR], 2.0) == 1
        assert event_fired(fds[0], 0) == 0
        st = c.read32(CONFIG, STATUS)
        assert st == DoeStatus.DATA_OBJECT_READY | DoeStatus.INTERRUPT_STATUS
        c.write32(CONFIG, STATUS, DoeStatus.INTERRUPT_STATUS)      # RW1C
        assert c.read32(CONFIG, STATUS) == DoeStatus.DATA_OBJECT_READY
    finally:
        for fd in fds:
            os.close(fd)
