"""DOE requester transport for the TSM: the spdm-emu platform socket, PCI_DOE framing.

Talks to the device server's ``--doe-socket`` / ``--doe-tcp-port`` (or to any
spdm_responder_emu started with ``--trans PCI_DOE``).  Each message is three
big-endian u32 (command, transport type 2, payload size) and a payload; NORMAL
payloads are whole DOE objects.  Every receive is bounded by *timeout*.

With :attr:`DoeClient.capture` set, every DOE object sent and every response received
is appended to that pcap file (:mod:`teeio.doe_pcap`, the form spdm_dump reads).
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType

from teeio.doe import (
    CLIENT_HELLO,
    SERVER_HELLO,
    SOCKET_DEFAULT_PORT,
    SOCKET_HEADER,
    SOCKET_MAX_PAYLOAD,
    DoeObject,
    SocketCommand,
    SocketHeader,
    SocketTransport,
)
from teeio.doe import discover as discovery_walk
from teeio.doe_pcap import DoeDirection, DoePcapWriter

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0   # the device answers within DOE's 1 s; the rest is transport slack
HELLO_TIMEOUT = 2.0     # the TEST hello is answered at once by any spdm-emu DOE peer


class DoeTransportError(RuntimeError):
    """The peer broke the socket protocol, went away, or did not answer in time."""


def tcp_connection(host: str, port: int, timeout: float) -> socket.socket:
    """``socket.create_connection``, except that an IP address literal is connected to
    directly: resolving it with getaddrinfo would load the IDNA codec and its stringprep
    tables, a noticeable share of a command-line tool's start-up."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect((host, port))
        except OSError:
            s.close()
            raise
        return s
    return socket.create_connection((host, port), timeout)


class DoeClient:
    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT,
                 capture: DoePcapWriter | None = None) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.capture = capture

    @classmethod
    def connect_unix(cls, path: str, timeout: float = DEFAULT_TIMEOUT) -> DoeClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(path)
        except OSError:
            s.close()
            raise
        return cls(s, timeout)

    @classmethod
    def connect_tcp(cls, port: int = SOCKET_DEFAULT_PORT, host: str = "127.0.0.1",
                    timeout: float = DEFAULT_TIMEOUT) -> DoeClient:
        return cls(tcp_connection(host, port, timeout), timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> DoeClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- messages -------------------------------------------------------------------------------
    def send(self, command: int, payload: bytes = b"",
             transport: int = SocketTransport.PCI_DOE) -> None:
        log.debug("--> %s size=%d", SocketHeader(command, transport, 0).command_name(),
                  len(payload))
        try:
            self.sock.sendall(SocketHeader(command, transport, len(payload)).encode() + payload)
        except OSError as exc:
            raise DoeTransportError(f"send failed: {exc}") from exc

    def receive(self) -> tuple[SocketHeader, bytes]:
        hdr = SocketHeader.decode(self._recv_exact(SOCKET_HEADER.size))
        if hdr.size > SOCKET_MAX_PAYLOAD:
            raise DoeTransportError(f"{hdr.command_name()} reply of {hdr.size} bytes is too big")
        payload = self._recv_exact(hdr.size)
        log.debug("<-- %s size=%d", hdr.command_name(), hdr.size)
        return hdr, payload

    def call(self, command: SocketCommand, payload: bytes = b"") -> bytes:
        """Send *command*; the reply must carry the same command and PCI_DOE."""
        self.send(command, payload)
        hdr, body = self.receive()
        if hdr.transport != SocketTransport.PCI_DOE:
            raise DoeTransportError(f"reply with transport type {hdr.transport}, not PCI_DOE")
        if hdr.command != command:
            raise DoeTransportError(f"{command.name} answered with {hdr.command_name()}")
        return body

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 16))
            except TimeoutError as exc:
                raise DoeTransportError("no answer from the DOE peer in time") from exc
            except OSError as exc:
                raise DoeTransportError(f"receive failed: {exc}") from exc
            if not chunk:
                raise DoeTransportError("the DOE peer closed the connection")
            buf += chunk
        return bytes(buf)

    # -- the session ----------------------------------------------------------------------------
    def hello(self, timeout: float = HELLO_TIMEOUT) -> None:
        """The TEST handshake that starts an spdm-emu session, answered within *timeout*:
        it checks that the peer speaks the spdm-emu DOE framing before anything else is
        sent (a socket of another protocol fails here, with a message that says so)."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(min(timeout, previous) if previous is not None else timeout)
        try:
            body = self.call(SocketCommand.TEST, CLIENT_HELLO)
        except (DoeTransportError, ValueError) as exc:
            raise DoeTransportError(f"the peer does not speak the spdm-emu DOE framing "
                                    f"(TEST hello: {exc})") from None
        finally:
            self.sock.settimeout(previous)
        if body != SERVER_HELLO:
            raise DoeTransportError("the peer does not speak the spdm-emu DOE framing "
                                    f"(TEST answered with {body[:32]!r})")

    def exchange(self, obj: bytes) -> bytes | None:
        """One whole DOE object out, the whole response object back (None: no response)."""
        if self.capture is not None:
            self.capture.write(DoeDirection.REQUEST, obj)
        rsp = self.call(SocketCommand.NORMAL, obj) or None
        if rsp is not None and self.capture is not None:
            self.capture.write(DoeDirection.RESPONSE, rsp)
        return rsp

    def exchange_object(self, obj: DoeObject) -> DoeObject | None:
        rsp = self.exchange(obj.encode())
        return None if rsp is None else DoeObject.decode(rsp)

    def discover(self) -> list[tuple[int, int]]:
        """DOE Discovery walk: (vendor, type) of every protocol, 0001:00 first."""
        return discovery_walk(self.exchange_object)

    def shutdown(self) -> None:
        """SHUTDOWN: the peer answers, then closes the connection."""
        self.call(SocketCommand.SHUTDOWN)
        self.close()

    def end_session(self) -> None:
        """CONTINUE: the peer closes this connection but keeps its state for the next one."""
        self.call(SocketCommand.CONTINUE)
        self.close()
