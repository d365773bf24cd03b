"""The vfio-user message handling without a socket (vfio_user_dev/session.py): a decoded
command in, the reply (or none) out; and the operations it shares with the libvfio-user
callbacks (vfio_user_dev/operations.py)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os

import pytest

from teeio.device_regs import R
from teeio.pcie.config import Command as PciCommand
from teeio.pcie.config import Reg
from vfio_user_dev import libvfio_user as lvu
from vfio_user_dev import protocol as p
from vfio_user_dev.config_space import DEVICE_ID, VENDOR_ID
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.loglimit import LogLimiter
from vfio_user_dev.operations import DeviceOperations
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import Command, Flags, Header, IrqSetFlags, PciIrq, PciRegion
from vfio_user_dev.session import Reply, Session

RW = p.DmaFlags.READ | p.DmaFlags.WRITE


@pytest.fixture
def session(machine: Platform) -> Session:
    s = Session(machine)
    hdr, payload = cmd(Command.VERSION, p.Version(0, 0, {"max_data_xfer_size": 4096,
                                                         "pad": "x" * 200}).encode())
    reply = s.handle(hdr, payload, [])
    assert reply is not None and s.negotiated
    return s


def cmd(command: int, payload: bytes = b"", flags: int = 0,
        msg_id: int = 7) -> tuple[Header, bytes]:
    return Header(msg_id, command, p.HEADER_SIZE + len(payload), flags), payload


def decoded(reply: Reply | None) -> tuple[Header, bytes]:
    assert reply is not None
    return Header.decode(reply.data), reply.data[p.HEADER_SIZE:]


def error_of(reply: Reply | None) -> int:
    h, _ = decoded(reply)
    assert h.is_reply and h.is_error
    return h.error


def test_version_must_come_first(machine: Platform) -> None:
    s = Session(machine)
    hdr, payload = cmd(Command.REGION_READ, p.RegionAccess(0, PciRegion.CONFIG, 4).encode())
    assert error_of(s.handle(hdr, payload, [])) == errno.EINVAL
    assert s.counters["errors"] == 1 and not s.negotiated


def test_version_reply_fits_the_request_and_caps_the_transfer_size(machine: Platform) -> None:
    s = Session(machine)
    request = p.Version(0, 0, {"max_data_xfer_size": 4096}).encode()
    h, body = decoded(s.handle(*cmd(Command.VERSION, request), []))
    assert (h.msg_id, h.command, h.is_error) == (7, Command.VERSION, False)
    assert len(body) <= len(request)
    assert s.negotiated and s.client_max_xfer == 4096
    assert error_of(s.handle(*cmd(Command.VERSION, p.Version(1, 0).encode()), [])) == \
        errno.ENOTSUP


def test_region_read_and_write(session: Session, machine: Platform) -> None:
    h, body = decoded(session.handle(
        *cmd(Command.REGION_READ, p.RegionAccess(0, PciRegion.CONFIG, 4).encode()), []))
    got = p.RegionAccess.decode(body, with_data=True)
    assert got.data == (VENDOR_ID | DEVICE_ID << 16).to_bytes(4, "little")
    value = (PciCommand.MEMORY_SPACE).to_bytes(2, "little")
    write = p.RegionAccess(Reg.COMMAND, PciRegion.CONFIG, 2, value).encode()
    h, body = decoded(session.handle(*cmd(Command.REGION_WRITE, write), []))
    assert not h.is_error and p.RegionAccess.decode(body, with_data=False).count == 2
    assert machine.device.config.get(Reg.COMMAND, 2) == PciCommand.MEMORY_SPACE
    # posted: applied, never answered
    scratch = p.RegionAccess(R.SCRATCH, PciRegion.BAR0, 4, b"\x78\x56\x34\x12").encode()
    assert session.handle(*cmd(Command.REGION_WRITE, scratch, Flags.NO_REPLY), []) is None
    assert machine.device.r[R.SCRATCH] == 0x12345678


@pytest.mark.parametrize("header,err", [
    (Header(7, 0x4242, p.HEADER_SIZE, 0), errno.ENOSYS),
    (Header(7, Command.DEVICE_GET_INFO, p.HEADER_SIZE, 0x3), errno.EINVAL),   # message type
    (Header(7, Command.DEVICE_GET_INFO, 8, 0), errno.EINVAL),                 # size < 16
], ids=["unknown-command", "unknown-type", "short-size"])
def test_malformed_headers_are_refused(session: Session, header: Header, err: int) -> None:
    assert error_of(session.handle(header, b"", [])) == err
    assert session.counters["errors"] == 1


def test_a_posted_refusal_is_counted_but_not_answered(session: Session) -> None:
    assert session.handle(Header(7, 0x4242, p.HEADER_SIZE, Flags.NO_REPLY), b"", []) is None
    assert session.counters["errors"] == 1


def test_unforeseen_exception_is_eio_once_logged(session: Session, machine: Platform,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: object, **_kw: object) -> bytes:
        raise RuntimeError("a bug no check foresaw")

    monkeypatch.setattr(machine, "region_read", broken)
    read = p.RegionAccess(0, PciRegion.CONFIG, 4).encode()
    with caplog.at_level(logging.ERROR):
        assert error_of(session.handle(*cmd(Command.REGION_READ, read), [])) == errno.EIO
        assert session.handle(*cmd(Command.REGION_READ, read, Flags.NO_REPLY), []) is None
    assert session.counters["internal_errors"] == 2
    assert len([r for r in caplog.records if r.exc_info is not None]) == 1


def test_dma_fault_is_efault(session: Session, machine: Platform,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    def fault(*_args: object, **_kw: object) -> None:
        raise DmaFault("no map")

    monkeypatch.setattr(machine, "region_write", fault)
    write = p.RegionAccess(0, PciRegion.CONFIG, 1, b"\0").encode()
    assert error_of(session.handle(*cmd(Command.REGION_WRITE, write), [])) == errno.EFAULT


def test_dma_map_takes_its_fd_and_leaves_refused_ones(session: Session,
                                                      machine: Platform) -> None:
    fd = os.memfd_create("session-dma")
    os.ftruncate(fd, 0x1000)
    fds = [fd]
    h, _ = decoded(session.handle(*cmd(Command.DMA_MAP, p.DmaMap(RW, 0, 0x10000, 0x1000)
                                       .encode()), fds))
    assert not h.is_error and fds == []             # the map set owns it now
    assert machine.dma.snapshot() == [(0x10000, 0x1000, RW, True)]
    two = [os.memfd_create("session-dma"), os.memfd_create("session-dma")]
    try:
        assert error_of(session.handle(*cmd(Command.DMA_MAP, p.DmaMap(
            RW, 0, 0x20000, 0x1000).encode()), two)) == errno.EINVAL
        assert len(two) == 2                        # still the caller's to close
    finally:
        for f in two:
            os.close(f)
    unmap = p.DmaUnmap(p.DMA_UNMAP.size, 0, 0x10000, 0x1000).encode()
    h, body = decoded(session.handle(*cmd(Command.DMA_UNMAP, unmap), []))
    assert not h.is_error and body == unmap and machine.dma.snapshot() == []


def test_set_irqs_keeps_an_eventfd_and_refuses_a_pipe(session: Session,
                                                      machine: Platform) -> None:
    trigger = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    efd = os.eventfd(0)
    fds = [efd]
    h, _ = decoded(session.handle(*cmd(Command.DEVICE_SET_IRQS, p.IrqSet(
        trigger, PciIrq.MSIX, 0, 1).encode()), fds))
    assert not h.is_error and fds == []
    assert machine.device.irq.trigger[PciIrq.MSIX][0] is not None
    r, w = os.pipe()
    fds = [w]
    try:
        assert error_of(session.handle(*cmd(Command.DEVICE_SET_IRQS, p.IrqSet(
            trigger, PciIrq.MSIX, 1, 1).encode()), fds)) == errno.EINVAL
        assert fds == [w]
    finally:
        os.close(r)
        os.close(w)


def test_reset(session: Session, machine: Platform) -> None:
    generation = machine.device.generation
    assert error_of(session.handle(*cmd(Command.DEVICE_RESET, b"x"), [])) == errno.EINVAL
    assert machine.device.generation == generation
    h, _ = decoded(session.handle(*cmd(Command.DEVICE_RESET), []))
    assert not h.is_error and machine.device.generation == generation + 1


def test_info_commands(session: Session) -> None:
    _, body = decoded(session.handle(*cmd(Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(
        p.DEVICE_INFO.size, 0, 0, 0)), []))
    assert p.DEVICE_INFO.unpack(body)[2] == 9
    region = p.REGION_INFO.pack(p.REGION_INFO.size, 0, PciRegion.CONFIG, 0, 0, 0)
    _, body = decoded(session.handle(*cmd(Command.DEVICE_GET_REGION_INFO, region), []))
    assert p.REGION_INFO.unpack(body)[4] == 4096
    bad = p.REGION_INFO.pack(p.REGION_INFO.size, 0, 9, 0, 0, 0)
    assert error_of(session.handle(*cmd(Command.DEVICE_GET_REGION_INFO, bad), [])) == \
        errno.EINVAL


def test_rejections_are_rate_limited_by_kind(machine: Platform,
                                             caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logger = logging.getLogger("test.session")
    s = Session(machine, refusals=LogLimiter(logger, first=2, interval=10,
                                             clock=lambda: now[0]))
    with caplog.at_level(logging.WARNING, logger="test.session"):
        for _ in range(5):
            s.handle(Header(1, 0x4242, p.HEADER_SIZE, Flags.NO_REPLY), b"", [])
        assert len(caplog.records) == 2
        now[0] = 11.0
        s.handle(Header(1, 0x4242, p.HEADER_SIZE, Flags.NO_REPLY), b"", [])
    assert len(caplog.records) == 3 and "3 more suppressed" in caplog.records[-1].getMessage()
    assert s.refusals.counts["UNKNOWN:ENOSYS"] == 6


def test_stray_reply_and_reject_of_a_reply_send_nothing(session: Session) -> None:
    reply = Header(3, Command.DMA_READ, p.HEADER_SIZE, Flags.REPLY)
    session.stray_reply(reply)
    assert session.reject(reply, errno.EINVAL, "a reply") is None
    assert session.counters["errors"] == 2


def test_server_dma_is_chunked_by_the_client_transfer_size(session: Session) -> None:
    assert session.client_max_xfer == 4096
    memory = bytearray(range(256)) * 40
    sent: list[tuple[int, int]] = []

    def request(command: Command, payload: bytes) -> tuple[Header, bytes]:
        address, count, data = p.decode_dma_rw(payload, with_data=command == Command.DMA_WRITE)
        sent.append((address, count))
        if command == Command.DMA_WRITE:
            memory[address:address + count] = data
            return Header(0, command, p.HEADER_SIZE, Flags.REPLY), b""
        body = p.encode_dma_rw(address, count, bytes(memory[address:address + count]))
        return Header(0, command, p.HEADER_SIZE + len(body), Flags.REPLY), body

    assert session.dma_read(request, 100, 9000) == bytes(memory[100:9100])
    assert sent == [(100, 4096), (4196, 4096), (8292, 808)]
    sent.clear()
    session.dma_write(request, 0, b"\xAA" * 5000)
    assert sent == [(0, 4096), (4096, 904)] and memory[:5000] == b"\xAA" * 5000

    def short(command: Command, payload: bytes) -> tuple[Header, bytes]:
        return Header(0, command, 0, Flags.REPLY), p.encode_dma_rw(0, 1, b"\0")

    with pytest.raises(DmaFault, match="count 1 != 16"):
        session.dma_read(short, 0, 16)


def test_both_transports_go_through_the_same_operations(
        session: Session, machine: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    real_read = DeviceOperations.region_read

    def region_read(self: DeviceOperations, index: int, offset: int, count: int) -> bytes:
        calls.append(("read", index, offset))
        return real_read(self, index, offset, count)

    def reset(self: DeviceOperations, reason: str) -> None:
        calls.append((reason, 0, 0))

    monkeypatch.setattr(DeviceOperations, "region_read", region_read)
    monkeypatch.setattr(DeviceOperations, "reset", reset)
    session.handle(*cmd(Command.REGION_READ, p.RegionAccess(8, PciRegion.CONFIG, 4).encode()),
                   [])
    session.handle(*cmd(Command.DEVICE_RESET), [])
    callbacks = lvu.DeviceCallbacks(machine, on_lost_client=lambda: None)
    buf = ctypes.create_string_buffer(4)
    assert callbacks.region[PciRegion.CONFIG](None, ctypes.addressof(buf), 4, 8, False) == 4
    assert callbacks.reset(None, lvu.VfuResetType.VFU_RESET_PCI_FLR) == 0
    assert calls == [("read", PciRegion.CONFIG, 8), ("client_reset", 0, 0),
                     ("read", PciRegion.CONFIG, 8), ("flr", 0, 0)]


# -- the hot path (Session.region_access) answers as handle() does ---------------------------

def _fresh() -> tuple[Platform, Session]:
    m = Platform()
    s = Session(m)
    s.negotiated = True
    return m, s


REGION_CASES = [
    ("read BAR0", Command.REGION_READ, p.REGION_RW.pack(R.SCRATCH, PciRegion.BAR0, 4)),
    ("read BAR0 two bytes", Command.REGION_READ, p.REGION_RW.pack(R.ID + 1, PciRegion.BAR0, 2)),
    ("read config", Command.REGION_READ, p.REGION_RW.pack(0, PciRegion.CONFIG, 8)),
    ("write BAR0", Command.REGION_WRITE, p.REGION_RW.pack(R.SCRATCH, PciRegion.BAR0, 4)
     + b"\x01\x02\x03\x04"),
    ("write BAR0 byte", Command.REGION_WRITE, p.REGION_RW.pack(R.SCRATCH + 3, 0, 1) + b"\x7f"),
    ("write config", Command.REGION_WRITE, p.REGION_RW.pack(Reg.COMMAND, PciRegion.CONFIG, 2)
     + b"\x06\x00"),
    ("outside BAR0", Command.REGION_READ, p.REGION_RW.pack(0xFFFE, PciRegion.BAR0, 4)),
    ("count 0", Command.REGION_READ, p.REGION_RW.pack(0, PciRegion.BAR0, 0)),
    ("no such region", Command.REGION_READ, p.REGION_RW.pack(0, 5, 4)),
    ("region beyond the enum", Command.REGION_WRITE, p.REGION_RW.pack(0, 99, 1) + b"\0"),
    ("read with data", Command.REGION_READ, p.REGION_RW.pack(0, 0, 4) + b"\0\0\0\0"),
    ("write short of count", Command.REGION_WRITE, p.REGION_RW.pack(0, 0, 4) + b"\0"),
    ("short payload", Command.REGION_READ, p.REGION_RW.pack(0, 0, 4)[:10]),
    ("no payload", Command.REGION_WRITE, b""),
    ("count beyond max_data_xfer", Command.REGION_READ,
     p.REGION_RW.pack(0, 0, p.MAX_DATA_XFER + 1)),
]


#: every case as sent, and each write also posted (No_reply, QEMU's default for BAR writes)
HOT_PATH_CASES = [(*c, False) for c in REGION_CASES] + [
    (*c, True) for c in REGION_CASES if c[1] == Command.REGION_WRITE]


@pytest.mark.parametrize(("name", "command", "payload", "posted"), HOT_PATH_CASES,
                         ids=[c[0] + (" posted" if c[3] else "") for c in HOT_PATH_CASES])
def test_region_access_answers_as_handle_does(name: str, command: int, payload: bytes,
                                              posted: bool) -> None:
    """The same reply, device state and counters; a posted write (spec "Header": No_reply)
    gets no reply, an error neither."""
    hdr, _ = cmd(command, payload, Flags.NO_REPLY if posted else 0, msg_id=0x1234)
    raw = hdr.encode() + payload
    m1, general = _fresh()
    m2, fast = _fresh()
    try:
        expected = general.handle(hdr, payload, [])
        assert (expected is None) == posted
        buf = memoryview(bytearray(b"\xee" * 8 + raw + b"\xee" * 64))   # not alone in it
        got = fast.region_access(0x1234, command, buf, 8, len(raw), posted)
        assert got == (None if expected is None else expected.data)
        assert fast.counters == general.counters
        assert m2.device.r == m1.device.r and bytes(m2.device.config.data) == bytes(
            m1.device.config.data)
    finally:
        m1.close()
        m2.close()


def test_region_access_answers_eio_for_an_unforeseen_failure(
        session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: DeviceOperations, index: int, offset: int, count: int) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(DeviceOperations, "region_read", broken)
    raw = p.message(9, Command.REGION_READ, p.REGION_RW.pack(0, 0, 4))
    out = session.region_access(9, Command.REGION_READ, memoryview(raw), 0, len(raw))
    assert out is not None and Header.decode(out).error == errno.EIO
    assert session.counters["internal_errors"] == 1
