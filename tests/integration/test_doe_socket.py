"""The device server as a real process with ``--doe-socket``: the spdm-emu platform socket
protocol (TEST, NORMAL, CONTINUE, SHUTDOWN, UNKNOWN), and socket and mailbox used at once,
with the device's SPDM responder (``--identity``) behind the DOE objects.
The device log is printed at teardown, so a failing test shows it."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.doe import DoeMailboxClient
from teeio.doe import (
    CLIENT_HELLO,
    SERVER_HELLO,
    SOCKET_MAX_PAYLOAD,
    DataObjectType,
    DoeDispatcher,
    DoeObject,
    SocketCommand,
    SocketHeader,
    SocketTransport,
    pad_dw,
)
from tests.integration.device_process import PROJECT, STARTUP, StartDevice
from tsm.doe_client import DoeClient, DoeTransportError
from vfio_user_dev import doe_socket
from vfio_user_dev.client import Client
from vfio_user_dev.device import DOE_CAP, TeeIoDevice
from vfio_user_dev.doe_socket import DoeSocketServer
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(60)

SPDM = (1, DataObjectType.CMA_SPDM)
SECURED = (1, DataObjectType.SECURED_CMA_SPDM)
GET_VERSION = bytes.fromhex("10840000")
# VERSION: SPDM 1.0 header, reserved, two entries (1.2, 1.3), each u16 LE (DSP0274 §10.3)
VERSION = bytes.fromhex("10040000" "00" "02" "0012" "0013")


def raw_call(c: DoeClient, command: int, payload: bytes = b"",
             transport: int = SocketTransport.PCI_DOE) -> tuple[SocketHeader, bytes]:
    c.send(command, payload, transport)
    return c.receive()


def closed_by_peer(c: DoeClient) -> bool:
    c.sock.settimeout(5)
    try:
        return c.sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- the protocol -------------------------------------------------------------------------------

def test_hello_discovery_and_spdm(start_device: StartDevice) -> None:
    dev = start_device(identity=True)
    assert "provisioned a fresh P-384" in dev.log_text()
    with dev.client() as c:
        c.hello()
        assert c.discover() == [(1, 0), SPDM, SECURED]
        req = DoeObject(*SPDM, GET_VERSION).encode()
        assert c.exchange(req) == DoeObject(*SPDM, pad_dw(VERSION)).encode()
        # a whole 2^18-DW object crosses the socket; SPDM answers it with an ERROR
        big = DoeObject(*SPDM, GET_VERSION + bytes(SOCKET_MAX_PAYLOAD - 12)).encode()
        rsp = c.exchange_object(DoeObject.decode(big))
        assert rsp is not None and rsp.protocol == SPDM and rsp.payload[1] == 0x7F   # ERROR
        # no response object: an empty NORMAL reply, and the stream stays in step
        assert c.exchange(DoeObject(*SECURED).encode()) is None   # no session ID: dropped
        assert c.exchange(req[:-4]) is None                    # length mismatch
        assert c.exchange(b"") is None
        c.hello()
        assert c.exchange(req) == DoeObject(*SPDM, pad_dw(VERSION)).encode()


def test_product_device_lists_only_what_is_registered(
        start_device: StartDevice) -> None:
    dev = start_device()
    reference = TeeIoDevice()
    try:
        expected = reference.doe.protocols()
    finally:
        reference.close()
    with dev.client() as c:
        c.hello()
        assert c.discover() == expected == [(1, 0)]   # no --identity: no SPDM responder
        assert c.exchange(DoeObject(*SPDM, b"abcd").encode()) is None


def test_unknown_commands_get_unknown_and_the_connection_goes_on(
        start_device: StartDevice) -> None:
    dev = start_device()
    with dev.client() as c:
        for command in (0x1234, SocketCommand.OOB_ENCAP_KEY_UPDATE, SocketCommand.UNKNOWN):
            hdr, body = raw_call(c, command, b"xyz")
            assert (hdr.command, hdr.transport, body) == (SocketCommand.UNKNOWN, 2, b"")
        hdr, body = raw_call(c, SocketCommand.TEST, b"Client Hello!\0")
        assert (hdr.command, body) == (SocketCommand.TEST, SERVER_HELLO)


def test_wrong_transport_type_is_refused_and_closed(start_device: StartDevice) -> None:
    dev = start_device()
    with dev.client() as c:
        hdr, body = raw_call(c, SocketCommand.TEST, b"Client Hello!\0", SocketTransport.MCTP)
        assert (hdr.command, hdr.transport, body) == (SocketCommand.UNKNOWN, 2, b"")
        assert closed_by_peer(c)
    with dev.client() as c:   # the listener is still there
        c.hello()


def test_oversize_payload_is_drained_without_desync(start_device: StartDevice) -> None:
    dev = start_device(identity=True)
    with dev.client() as c:
        hdr, body = raw_call(c, SocketCommand.NORMAL, bytes(SOCKET_MAX_PAYLOAD + 4))
        assert (hdr.command, body) == (SocketCommand.NORMAL, b"")
        c.hello()
        assert c.discover() == [(1, 0), SPDM, SECURED]
    assert "exceeds" in dev.log_text()


def test_continue_ends_the_connection_only(start_device: StartDevice) -> None:
    dev = start_device()
    c = dev.client()
    c.hello()
    c.send(SocketCommand.CONTINUE)
    hdr, body = c.receive()
    assert (hdr.command, body) == (SocketCommand.CONTINUE, b"")
    assert closed_by_peer(c)
    c.close()
    with dev.client() as c2:
        c2.hello()
        c2.end_session()


def test_shutdown_keeps_the_listener_by_default(start_device: StartDevice) -> None:
    dev = start_device()
    c = dev.client()
    c.hello()
    c.send(SocketCommand.SHUTDOWN)
    hdr, body = c.receive()
    assert (hdr.command, body) == (SocketCommand.SHUTDOWN, b"")
    assert closed_by_peer(c)
    c.close()
    assert dev.proc.poll() is None
    with dev.client() as c2:
        c2.hello()
        c2.shutdown()
    assert dev.proc.poll() is None


def test_exit_on_shutdown_ends_the_device_server(start_device: StartDevice) -> None:
    dev = start_device("--doe-exit-on-shutdown")
    with dev.client() as c:
        c.hello()
        c.shutdown()
    assert dev.proc.wait(10) == 0
    assert not dev.doe.exists() and not dev.sock.exists()


def test_tcp_port(start_device: StartDevice) -> None:
    with socket.socket() as probe:          # a free port (the listener sets SO_REUSEADDR)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dev = start_device("--doe-tcp-port", str(port), identity=True)
    deadline = time.monotonic() + STARTUP
    while f"127.0.0.1:{port}" not in dev.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with DoeClient.connect_tcp(port) as c:
        c.hello()
        assert c.discover() == [(1, 0), SPDM, SECURED]
        assert c.exchange_object(DoeObject(*SPDM, GET_VERSION)) == DoeObject(*SPDM,
                                                                             pad_dw(VERSION))
    with dev.client() as c:                 # the UNIX socket serves at the same time
        c.hello()


def test_client_timeout_is_bounded(start_device: StartDevice) -> None:
    dev = start_device()
    c = DoeClient.connect_unix(str(dev.doe), timeout=0.3)
    try:
        c.sock.sendall(SocketHeader(SocketCommand.NORMAL, 2, 8).encode())  # payload never sent
        t0 = time.monotonic()
        with pytest.raises(DoeTransportError, match="in time"):
            c.receive()
        assert time.monotonic() - t0 < 3
    finally:
        c.close()


# -- socket and mailbox at once -----------------------------------------------------------------

class VfioConfig:
    def __init__(self, c: Client) -> None:
        self.c = c

    def read32(self, off: int) -> int:
        return self.c.read32(PciRegion.CONFIG, off)

    def write32(self, off: int, value: int) -> None:
        self.c.write32(PciRegion.CONFIG, off, value)


def test_socket_and_mailbox_at_the_same_time(start_device: StartDevice) -> None:
    dev = start_device(identity=True)
    errors: list[str] = []
    rounds = {"socket": 150, "mailbox": 60}
    # GET_VERSION is answered the same in any connection state, so the two requesters may
    # interleave freely on the one responder.
    req, expected = DoeObject(*SPDM, GET_VERSION), DoeObject(*SPDM, pad_dw(VERSION))

    def socket_side() -> None:
        try:
            with dev.client() as c:
                c.hello()
                for i in range(rounds["socket"]):
                    if c.exchange_object(req) != expected:
                        errors.append(f"socket {i}")
        except Exception as exc:   # reported below, with the device log
            errors.append(f"socket: {exc!r}")

    def mailbox_side() -> None:
        try:
            vc = Client.connect(str(dev.sock))
            vc.version()
            try:
                mb = DoeMailboxClient(VfioConfig(vc), DOE_CAP)
                mb.abort()
                for i in range(rounds["mailbox"]):
                    if mb.exchange_object(req) != expected:
                        errors.append(f"mailbox {i}")
                if mb.discover() != [(1, 0), SPDM, SECURED]:
                    errors.append("mailbox discovery")
            finally:
                vc.close()
        except Exception as exc:
            errors.append(f"mailbox: {exc!r}")

    threads = [threading.Thread(target=socket_side), threading.Thread(target=mailbox_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert dev.stop() == 0
    stats = json.loads(dev.stats.read_text())
    total = rounds["socket"] + rounds["mailbox"] + 3   # + the mailbox's discovery walk
    assert stats["doe_objects"] == stats["doe_responses"] == total


# -- several clients, timeouts, limits --------------------------------------------------------

def test_a_silent_client_does_not_block_the_tsm(start_device: StartDevice) -> None:
    """A local process that connects and says nothing must not hold the socket: the
    requester behind it is served at once."""
    dev = start_device(identity=True)
    squatters = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for s in squatters:
            s.connect(str(dev.doe))
        half = squatters[0]
        half.sendall(SocketHeader(SocketCommand.NORMAL, 2, 64).encode()[:5])   # half a header
        t0 = time.monotonic()
        with DoeClient.connect_unix(str(dev.doe), timeout=3) as c:
            c.hello()
            assert c.exchange_object(DoeObject(*SPDM, GET_VERSION)) == DoeObject(
                *SPDM, pad_dw(VERSION))
        assert time.monotonic() - t0 < 2
    finally:
        for s in squatters:
            s.close()


def test_non_socket_at_the_path_is_refused_and_kept(tmp_path: Path) -> None:
    precious = tmp_path / "doe.sock"
    precious.write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "vfio_user_dev", "--socket",
                           str(tmp_path / "vfio-user.sock"), "--doe-socket", str(precious)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--doe-socket" in errors[0], proc.stderr
    assert "not a socket" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert precious.read_text() == "keep me"
    assert not (tmp_path / "vfio-user.sock").exists()


class _Rig:
    """An in-process DOE socket server over a bare dispatcher, with a failing protocol."""

    BOOM = (1, 0x7E)

    def __init__(self, path: Path, max_connections: int | None = None) -> None:
        self.dispatcher = DoeDispatcher()
        self.dispatcher.register(*self.BOOM, self._boom)
        self.server = DoeSocketServer(
            self.dispatcher, path=str(path),
            max_connections=max_connections or doe_socket.MAX_CONNECTIONS).start()
        self.path = path

    @staticmethod
    def _boom(payload: bytes) -> bytes | None:
        raise RuntimeError("device bug")

    def client(self, timeout: float = 5.0) -> DoeClient:
        return DoeClient.connect_unix(str(self.path), timeout=timeout)

    def raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.path))
        return s


@pytest.fixture
def doe_rig(tmp_path: Path) -> Iterator[_Rig]:
    r = _Rig(tmp_path / "doe.sock")
    yield r
    r.server.close()
    r.server.join(5)


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_idle_and_trickling_connections_are_closed(doe_rig: _Rig,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doe_socket, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(doe_socket, "MESSAGE_TIMEOUT", 0.6)
    idle = doe_rig.raw()
    t0 = time.monotonic()
    assert _closed_within(idle, 5)
    assert time.monotonic() - t0 < 3
    idle.close()
    # a message begun must be finished in MESSAGE_TIMEOUT, however it trickles in
    trickle = doe_rig.raw()
    msg = SocketHeader(SocketCommand.TEST, 2, len(CLIENT_HELLO)).encode() + CLIENT_HELLO
    t0 = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for b in msg:
            trickle.sendall(bytes((b,)))
            time.sleep(0.1)
    assert time.monotonic() - t0 < 3
    trickle.close()
    # once it has exchanged a message, a client may stay idle (the TSM between heartbeats)
    with doe_rig.client() as c:
        c.hello()
        time.sleep(1.0)
        c.hello()


def test_an_idle_client_gives_its_slot_only_when_every_slot_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doe_socket, "IDLE_TIMEOUT", 0.3)
    r = _Rig(tmp_path / "doe.sock", max_connections=2)
    try:
        tsm, busy = r.client(), r.client()
        tsm.hello()
        busy.hello()
        time.sleep(0.6)                  # both idle past the timeout: neither is closed
        busy.hello()                     # busy has just spoken
        tsm.hello()
        time.sleep(0.5)
        busy.hello()
        newcomer = r.client()            # every slot taken: the one idle longest goes
        newcomer.hello()
        assert closed_by_peer(tsm)
        busy.hello()
        third = r.raw()                  # nobody idle long enough now: refused at once
        assert _closed_within(third, 5)
        third.close()
        assert r.server.refused == 1
        for c in (tsm, busy, newcomer):
            c.close()
    finally:
        r.server.close()


def test_connections_are_capped(tmp_path: Path) -> None:
    r = _Rig(tmp_path / "doe.sock", max_connections=2)
    try:
        a, b = r.client(), r.client()
        a.hello()
        b.hello()
        extra = r.raw()
        assert _closed_within(extra, 5)          # the third is closed at once
        extra.close()
        a.close()
        deadline = time.monotonic() + 5
        while True:                               # a freed slot serves the next one
            with r.client() as c:
                try:
                    c.hello()
                    break
                except (DoeTransportError, OSError):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        b.hello()
        b.close()
        assert r.server.refused >= 1
    finally:
        r.server.close()


def test_payload_beyond_the_discard_limit_closes_the_connection(doe_rig: _Rig) -> None:
    with doe_rig.client() as c:
        c.hello()
        c.send(SocketCommand.NORMAL, b"")   # header only would be a valid empty NORMAL
        assert c.receive() == (SocketHeader(SocketCommand.NORMAL, 2, 0), b"")
        c.sock.sendall(SocketHeader(SocketCommand.NORMAL, 2,
                                    doe_socket.MAX_DISCARD + 1).encode())
        assert closed_by_peer(c)
    with doe_rig.client() as c:
        c.hello()


def test_a_failing_handler_is_answered_and_the_server_serves_on(
        doe_rig: _Rig, caplog: pytest.LogCaptureFixture) -> None:
    boom = DoeObject(*_Rig.BOOM, b"\0\0\0\0").encode()
    with caplog.at_level(logging.INFO, logger="vfio_user_dev.doe_socket"):
        with doe_rig.client() as c:
            c.hello()
            assert c.exchange(boom) is None          # answered: "no response"
            assert c.exchange(boom) is None
            c.hello()                                # the connection goes on
        with doe_rig.client() as c:                      # and so does the server
            assert c.discover() == [(1, 0), _Rig.BOOM]
    failures = [r for r in caplog.records if "the device failed" in r.getMessage()]
    assert len(failures) == 2 and doe_rig.server.internal_errors == 2
    assert failures[0].exc_info is not None and failures[1].exc_info is None
