"""Lock-step tests of the vfio-user server over a real UNIX socket: negotiation, device
information, malformed and posted messages, message logging."""

from __future__ import annotations

import errno
import logging
import os
import struct

import pytest

from teeio.device_regs import CMD_GO, Op, R, St
from tests.support.lockstep import (
    BAR0,
    BAR1,
    CONFIG,
    expect_error,
    fds_named,
    memfd,
    nothing_pending,
    ok,
    read_id,
    recv,
    region_read_payload,
    region_write_payload,
    send,
    wait_until,
)
from tests.support.servers import RunningServer, both_backends
from vfio_user_dev import protocol as p
from vfio_user_dev.client import Client
from vfio_user_dev.protocol import (
    Command,
    DeviceFlags,
    Flags,
    IrqInfoFlags,
    IrqSetFlags,
    PciIrq,
    PciRegion,
    RegionFlags,
)

pytestmark = [pytest.mark.timeout(10), both_backends]

QEMU_CAPS = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "pgsizes": 4096,
             "max_dma_maps": 65535}
# Why some tests are python-only: libvfio-user negotiates VERSION itself, inside
# vfu_attach_ctx, before the device sees anything, and drops a client whose first message
# it refuses; and it validates headers its own way (one errno, EINVAL, for most refusals).
NEGOTIATES = "libvfio-user negotiates VERSION itself and drops a client it refuses"


# -- VERSION ------------------------------------------------------------------------------------

def test_version_reply_major0_with_capabilities_no_longer_than_request(
        server: RunningServer) -> None:
    c = server.client(negotiate=False)
    req = p.Version(0, 0, QEMU_CAPS).encode()
    body = ok(c, Command.VERSION, req)
    assert len(body) <= len(req)
    v = p.Version.decode(body)
    assert (v.major, v.minor) == (0, 0)
    assert v.capabilities["max_msg_fds"] == p.MAX_MSG_FDS
    assert v.capabilities["max_data_xfer_size"] == p.MAX_DATA_XFER
    assert body.endswith(b"\0")  # the JSON string is NUL-terminated
    read_id(c)


@pytest.mark.python_only(NEGOTIATES)
def test_version_short_request_gets_reply_without_json(server: RunningServer) -> None:
    # QEMU receives the reply into a buffer the size of its request: a 4-byte request
    # (no JSON) must get a 4-byte reply.
    c = server.client(negotiate=False)
    body = ok(c, Command.VERSION, struct.pack("<HH", 0, 0))
    assert body == struct.pack("<HH", 0, 0)
    read_id(c)  # and the session is negotiated


@pytest.mark.python_only(NEGOTIATES)
def test_version_major_not_zero_is_enotsup_and_not_negotiated(server: RunningServer) -> None:
    c = server.client(negotiate=False)
    expect_error(c, Command.VERSION, p.Version(1, 0, QEMU_CAPS).encode(), errno.ENOTSUP)
    # Still not negotiated: other commands are refused ...
    expect_error(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4), errno.EINVAL)
    # ... until a good VERSION arrives.
    ok(c, Command.VERSION, p.Version(0, 0, QEMU_CAPS).encode())
    read_id(c)


@pytest.mark.python_only(NEGOTIATES)
def test_version_bad_json_is_einval(server: RunningServer) -> None:
    c = server.client(negotiate=False)
    expect_error(c, Command.VERSION, struct.pack("<HH", 0, 0) + b"{not json\0", errno.EINVAL)
    expect_error(c, Command.VERSION,
                 p.Version(0, 0, {"max_data_xfer_size": 0}).encode(), errno.EINVAL)
    ok(c, Command.VERSION, p.Version(0, 0, QEMU_CAPS).encode())
    read_id(c)


@pytest.mark.python_only(NEGOTIATES)
@pytest.mark.parametrize("command,payload", [
    (Command.REGION_READ, region_read_payload(BAR0, R.ID, 4)),
    (Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\1\2\3\4")),
    (Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0)),
    (Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 0, 0, 0, 0)),
    (Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x1000, 0x1000).encode()),
    (Command.DEVICE_RESET, b""),
], ids=lambda v: v.name if isinstance(v, Command) else "")
def test_command_before_version_is_einval(server: RunningServer, command: Command,
                                          payload: bytes) -> None:
    c = server.client(negotiate=False)
    expect_error(c, command, payload, errno.EINVAL)
    assert server.device.r[R.SCRATCH] == 0  # the refused write had no effect
    ok(c, Command.VERSION, p.Version(0, 0, QEMU_CAPS).encode())
    read_id(c)


# -- device, region and IRQ information ------------------------------------------------------

def test_device_get_info(server: RunningServer) -> None:
    c = server.client()
    body = ok(c, Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(p.DEVICE_INFO.size, 0, 0, 0))
    argsz, flags, num_regions, num_irqs = p.DEVICE_INFO.unpack(body)
    assert argsz == p.DEVICE_INFO.size
    assert flags == DeviceFlags.RESET | DeviceFlags.PCI
    assert num_regions == 9
    assert num_irqs == 5


def region_info(c: Client, index: int) -> tuple[int, int, int, int, int, int]:
    body = ok(c, Command.DEVICE_GET_REGION_INFO,
              p.REGION_INFO.pack(p.REGION_INFO.size, 0, index, 0, 0, 0))
    assert len(body) == p.REGION_INFO.size
    return p.REGION_INFO.unpack(body)


@pytest.mark.parametrize("index", [PciRegion.BAR0, PciRegion.BAR1, PciRegion.CONFIG])
def test_region_info_implemented(server: RunningServer, index: int) -> None:
    c = server.client()
    argsz, flags, idx, cap_offset, size, offset = region_info(c, index)
    assert (argsz, idx, cap_offset, offset) == (p.REGION_INFO.size, index, 0, 0)
    assert size == 4096
    assert flags == RegionFlags.READ | RegionFlags.WRITE
    assert not flags & RegionFlags.MMAP  # every access traps (no mmap, no sparse areas)


@pytest.mark.parametrize("index", [2, 3, 4, 5, 6, 8])
def test_region_info_unused_has_size_zero(server: RunningServer, index: int) -> None:
    c = server.client()
    _, flags, idx, _, size, _ = region_info(c, index)
    assert (idx, size, flags) == (index, 0, 0)


def test_region_info_out_of_range_is_einval(server: RunningServer) -> None:
    c = server.client()
    expect_error(c, Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 9, 0, 0, 0),
                 errno.EINVAL)
    expect_error(c, Command.DEVICE_GET_REGION_INFO,
                 p.REGION_INFO.pack(32, 0, 0xFFFFFFFF, 0, 0, 0), errno.EINVAL)
    read_id(c)


EVENTFD_ONLY = pytest.mark.python_only("libvfio-user reports the EVENTFD flag only")


@pytest.mark.parametrize("index,count,flags", [
    pytest.param(PciIrq.INTX, 1,
                 IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED,
                 marks=EVENTFD_ONLY),
    (PciIrq.MSI, 0, IrqInfoFlags.EVENTFD),
    pytest.param(PciIrq.MSIX, 4,
                 IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.NORESIZE,
                 marks=EVENTFD_ONLY),
])
def test_irq_info(server: RunningServer, index: int, count: int, flags: int) -> None:
    c = server.client()
    body = ok(c, Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(p.IRQ_INFO.size, 0, index, 0))
    assert p.IRQ_INFO.unpack(body) == (p.IRQ_INFO.size, flags, index, count)


def test_irq_info_out_of_range_is_einval(server: RunningServer) -> None:
    c = server.client()
    expect_error(c, Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, 5, 0), errno.EINVAL)
    read_id(c)


def test_region_read_write_roundtrip(server: RunningServer) -> None:
    c = server.client()
    body = ok(c, Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\x78\x56\x34\x12"))
    assert p.RegionAccess.decode(body, with_data=False) == p.RegionAccess(R.SCRATCH, BAR0, 4)
    body = ok(c, Command.REGION_READ, region_read_payload(BAR0, R.SCRATCH, 4))
    assert p.RegionAccess.decode(body, with_data=True).data == b"\x78\x56\x34\x12"
    # config space: vendor/device ID
    body = ok(c, Command.REGION_READ, region_read_payload(CONFIG, 0, 4))
    assert p.RegionAccess.decode(body, with_data=True).data == bytes.fromhex("3412107e")


# -- malformed messages: error reply, the server keeps serving ---------------------------------

TRUNCATED = [
    (Command.VERSION, b"\0\0"),
    (Command.VERSION, b""),
    (Command.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0x1000).encode()[:-1]),
    (Command.DMA_MAP, b""),
    (Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x1000, 0x1000).encode()[:-1]),
    (Command.DMA_UNMAP, b""),
    (Command.DEVICE_GET_INFO, b"\x10\0"),
    (Command.DEVICE_GET_INFO, b""),
    (Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(8, 0, 0, 0)),          # argsz too small
    (Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 0, 0, 0, 0)[:-1]),
    (Command.DEVICE_GET_REGION_INFO, b""),
    (Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, 0, 0)[:-1]),
    (Command.DEVICE_GET_IRQ_INFO, b""),
    (Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 2, 0, 1)[:-1]),
    (Command.DEVICE_SET_IRQS, b""),
    (Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(24, 0x24, 2, 0, 1)),         # argsz > payload
    (Command.REGION_READ, region_read_payload(BAR0, 0, 4)[:-1]),
    (Command.REGION_READ, b""),
    (Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\1\2\3\4")[:-2]),
    (Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\1\2\3\4")[:15]),
    (Command.REGION_WRITE, b""),
    (Command.DEVICE_RESET, b"\0\0\0\0"),                                   # takes none
]


# libvfio-user applies these two: it does not check DEVICE_SET_IRQS's argsz against the
# payload, and it ignores a DEVICE_RESET payload.
TRUNCATED_APPLIED_BY_LIBVFIO_USER = {(Command.DEVICE_SET_IRQS, 20), (Command.DEVICE_RESET, 4)}


@pytest.mark.parametrize("command,payload", [
    pytest.param(c, b, id=f"{c.name}-{len(b)}",
                 marks=[pytest.mark.python_only("libvfio-user applies it")]
                 if (c, len(b)) in TRUNCATED_APPLIED_BY_LIBVFIO_USER else [])
    for c, b in TRUNCATED])
def test_truncated_payload_is_einval(server: RunningServer, command: Command,
                                     payload: bytes) -> None:
    c = server.client()
    c.write32(BAR0, R.SCRATCH, 0x5A5A5A5A)
    expect_error(c, command, payload, errno.EINVAL)
    read_id(c)
    assert c.read32(BAR0, R.SCRATCH) == 0x5A5A5A5A  # nothing was applied (no reset either)


@pytest.mark.python_only("libvfio-user does not read the body of a message whose header "
                         "it refuses: the stream is lost")
def test_oversized_message_is_drained_and_e2big(server: RunningServer) -> None:
    c = server.client()
    size = p.MAX_MESSAGE + 1
    # A payload that would be a valid REGION_WRITE prefix, to catch a server that
    # interprets (instead of skipping) the bytes of the refused message.
    junk = region_write_payload(BAR0, R.SCRATCH, b"\xEE" * 4)
    junk += b"\xAB" * (size - p.HEADER_SIZE - len(junk))
    msg_id = 0x4242
    hdr = p.Header(msg_id, Command.REGION_WRITE, size, 0).encode()
    c.send_raw(hdr + junk)
    rh, body = recv(c)
    assert rh.is_reply and rh.is_error
    assert (rh.msg_id, rh.command, rh.error) == (msg_id, Command.REGION_WRITE, errno.E2BIG)
    assert body == b""
    # The stream is still in sync: the next lock-step exchange works.
    read_id(c)
    assert c.read32(BAR0, R.SCRATCH) == 0
    assert server.server.connection.counters["errors"] == 1


@pytest.mark.python_only("libvfio-user does not read the body of a message whose header "
                         "it refuses: the stream is lost")
def test_oversized_posted_message_is_drained_silently(server: RunningServer) -> None:
    c = server.client()
    size = p.MAX_MESSAGE + 4096
    send(c, Command.REGION_WRITE, b"\0" * (size - p.HEADER_SIZE), flags=Flags.NO_REPLY)
    read_id(c)  # the very next message is the REGION_READ reply


@pytest.mark.python_only("libvfio-user answers an unknown command with EINVAL")
def test_unknown_command_is_enosys(server: RunningServer) -> None:
    c = server.client()
    expect_error(c, 99, b"\1\2\3", errno.ENOSYS)
    expect_error(c, Command.DEVICE_GET_REGION_IO_FDS, p.REGION_INFO.pack(32, 0, 0, 0, 0, 0),
                 errno.ENOSYS)
    read_id(c)


def test_region_read_out_of_bounds_is_einval(server: RunningServer) -> None:
    c = server.client()
    cases = [(BAR0, 4096, 4), (BAR0, 4094, 4), (BAR1, 0, 4097), (CONFIG, 0xFFFFFFFF, 1),
             (PciRegion.BAR2, 0, 4), (PciRegion.VGA, 0, 4), (42, 0, 4)]
    if server.backend == "python":
        cases.append((BAR0, 0, 0))     # libvfio-user answers a 0-byte access with success
    for region, offset, count in cases:
        expect_error(c, Command.REGION_READ, region_read_payload(region, offset, count),
                     errno.EINVAL)
    read_id(c)


def test_region_write_out_of_bounds_is_einval(server: RunningServer) -> None:
    c = server.client()
    expect_error(c, Command.REGION_WRITE, region_write_payload(BAR0, 4093, b"\1\2\3\4"),
                 errno.EINVAL)
    expect_error(c, Command.REGION_WRITE, region_write_payload(PciRegion.ROM, 0, b"\1"),
                 errno.EINVAL)
    read_id(c)


@pytest.mark.python_only("libvfio-user refuses it with EINVAL")
def test_region_read_count_over_max_xfer_is_e2big(server: RunningServer) -> None:
    c = server.client()
    expect_error(c, Command.REGION_READ, region_read_payload(BAR0, 0, p.MAX_DATA_XFER + 1),
                 errno.E2BIG)
    read_id(c)


@pytest.mark.python_only("libvfio-user does not read the body of a message whose header "
                         "it refuses: the stream is lost")
@pytest.mark.parametrize("type_bits", [2, 0xF])
def test_bad_message_type_is_einval(server: RunningServer, type_bits: int) -> None:
    c = server.client()
    expect_error(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4), errno.EINVAL,
                 flags=type_bits)
    read_id(c)


def test_header_size_below_16_is_einval(server: RunningServer) -> None:
    c = server.client()
    msg_id = 0x777
    c.send_raw(p.Header(msg_id, Command.DEVICE_GET_INFO, 8, 0).encode())
    hdr, body = recv(c)
    assert (hdr.msg_id, hdr.is_error, hdr.error) == (msg_id, True, errno.EINVAL)
    read_id(c)


@pytest.mark.python_only("libvfio-user answers a stray reply with an error")
def test_stray_reply_from_client_is_ignored(server: RunningServer) -> None:
    c = server.client()
    send(c, Command.DMA_READ, p.encode_dma_rw(0x1000, 4, b"abcd"), flags=Flags.REPLY,
         msg_id=0x9999)
    read_id(c)  # the very next message is the REGION_READ reply


def test_dma_map_truncated_with_fd_closes_it(server: RunningServer) -> None:
    c = server.client()
    name = "lockstep-trunc-map"
    fd = memfd(name, 4096)
    try:
        expect_error(c, Command.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0x1000).encode()[:-4],
                     errno.EINVAL, fds=[fd])
    finally:
        os.close(fd)
    wait_until(lambda: fds_named(name) == 0, "the server to close the refused fd")
    assert server.machine.dma.snapshot() == []
    read_id(c)


# -- posted writes: never answered, not even with an error ---------------------------------------

POSTED_INVALID = [
    (Command.REGION_WRITE, region_write_payload(BAR0, 4096, b"\1\2\3\4")),      # out of bounds
    (Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\1\2")[:-1]),  # truncated
    (Command.REGION_WRITE, region_write_payload(PciRegion.BAR3, 0, b"\1")),      # no region
    (99, b"whatever"),                                                            # ENOSYS
    (Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0xFF, 2, 0, 1)),                 # bad flags
]


@pytest.mark.parametrize("command,payload", POSTED_INVALID,
                         ids=["oob", "truncated", "no-region", "enosys", "bad-irq-flags"])
def test_posted_invalid_message_is_never_answered(server: RunningServer, command: int,
                                                  payload: bytes) -> None:
    c = server.client()
    counters = server.server.connection.counters if server.backend == "python" else None
    errors = counters["errors"] if counters is not None else 0
    posted = send(c, command, payload, flags=Flags.NO_REPLY)
    read_id_msg = send(c, Command.REGION_READ, region_read_payload(BAR0, R.ID, 4))
    hdr, body = recv(c)
    assert hdr.is_reply and not hdr.is_error
    assert hdr.msg_id == read_id_msg != posted
    assert hdr.command == Command.REGION_READ
    assert p.RegionAccess.decode(body, with_data=True).data == (0x7E101234).to_bytes(4, "little")
    assert nothing_pending(c)
    # The posted message was processed (and refused), not lost (counted by the Python
    # server; libvfio-user keeps no such count).
    if counters is not None:
        assert counters["errors"] == errors + 1


def test_posted_valid_writes_apply_in_order(server: RunningServer) -> None:
    c = server.client()
    for v in range(1, 21):
        c.write32(BAR0, R.SCRATCH, v, posted=True)
    assert c.read32(BAR0, R.SCRATCH) == 20
    assert nothing_pending(c)


@pytest.mark.python_only(NEGOTIATES)
def test_posted_write_before_version_is_not_answered(server: RunningServer) -> None:
    c = server.client(negotiate=False)
    send(c, Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\1\1\1\1"),
         flags=Flags.NO_REPLY)
    ok(c, Command.VERSION, p.Version(0, 0, QEMU_CAPS).encode())  # next message is this reply
    assert c.read32(BAR0, R.SCRATCH) == 0


# -- message logging (-v) ----------------------------------------------------------------------

@pytest.mark.python_only("the pure-Python server's message log (libvfio-user logs its own)")
def test_verbose_logging_shows_direction_command_and_id(server: RunningServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vfio_user_dev.msg")
    c = server.client(negotiate=False)
    ok(c, Command.VERSION, p.Version(0, 0, QEMU_CAPS).encode())   # id 1
    read_id(c)                                                     # id 2
    expect_error(c, 99, b"", errno.ENOSYS)                          # id 3
    send(c, Command.REGION_WRITE, region_write_payload(BAR0, R.SCRATCH, b"\0" * 4),
         flags=Flags.NO_REPLY)                                     # id 4
    read_id(c)                                                     # id 5
    msgs = [r.getMessage() for r in caplog.records if r.name == "vfio_user_dev.msg"]
    text = "\n".join(msgs)
    assert "<-- cmd VERSION id=1" in text
    assert "--> reply VERSION id=1" in text
    assert "<-- cmd REGION_READ id=2" in text
    assert "--> reply REGION_READ id=2" in text
    assert "<-- cmd UNKNOWN(99) id=3" in text
    assert f"--> reply UNKNOWN(99) id=3 size=16 error={errno.ENOSYS}" in text
    assert any(m.startswith("<-- cmd REGION_WRITE id=4") and m.endswith("no_reply")
               for m in msgs)
    assert not any(m.startswith("--> reply REGION_WRITE id=4") for m in msgs)
    assert all(m.startswith(("<-- ", "--> ")) for m in msgs)


@pytest.mark.python_only("the pure-Python server's message log (libvfio-user logs its own)")
def test_verbose_logging_shows_server_dma_requests(server: RunningServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vfio_user_dev.msg")
    c = server.client()
    mem = c.map_local(0x10000, 0x1000)
    c.region_write(CONFIG, 4, b"\x06\x00")  # Memory Space + Bus Master
    for reg, value in ((R.DMA_SRC_LO, 0x10000), (R.DMA_DST_LO, 0x10800), (R.DMA_LEN, 16)):
        c.write32(BAR0, reg, value)
    c.write32(BAR0, R.DMA_CMD, CMD_GO | Op.COPY)
    wait_until(lambda: c.read32(BAR0, R.STATUS) == St.DONE, "the COPY")
    assert (mem.reads, mem.writes) == (1, 1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "vfio_user_dev.msg"]
    # the server's own requests have their own id space, starting at 1
    assert "--> cmd DMA_READ id=1 size=32" in msgs
    assert any(m.startswith("<-- reply DMA_READ id=1 size=48") for m in msgs)
    assert "--> cmd DMA_WRITE id=2 size=48" in msgs
    assert any(m.startswith("<-- reply DMA_WRITE id=2 size=32") for m in msgs)


@pytest.mark.python_only("the pure-Python server's message log (libvfio-user logs its own)")
def test_message_logging_is_quiet_without_debug(server: RunningServer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vfio_user_dev.msg")
    c = server.client()
    read_id(c)
    assert not [r for r in caplog.records if r.name == "vfio_user_dev.msg"]


def test_set_irqs_rejects_bad_requests(server: RunningServer) -> None:
    c = server.client()
    trig_none = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
    # vectors outside the index
    expect_error(c, Command.DEVICE_SET_IRQS, p.IrqSet(trig_none, PciIrq.MSIX, 3, 2).encode(),
                 errno.EINVAL)
    # MSI has no vectors
    expect_error(c, Command.DEVICE_SET_IRQS, p.IrqSet(trig_none, PciIrq.MSI, 0, 1).encode(),
                 errno.EINVAL)
    # no such index
    expect_error(c, Command.DEVICE_SET_IRQS, p.IrqSet(trig_none, 7, 0, 1).encode(),
                 errno.EINVAL)
    # two data types
    expect_error(c, Command.DEVICE_SET_IRQS,
                 p.IrqSet(trig_none | IrqSetFlags.DATA_BOOL, PciIrq.MSIX, 0, 1, b"\1").encode(),
                 errno.EINVAL)
    read_id(c)
