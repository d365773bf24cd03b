"""Host-side DOE transport: the device's DOE dispatcher behind the spdm-emu platform socket.

Framing ([spdm-emu] ``spdm_emu_common/command.h``): three big-endian u32 (command,
transport type, payload size), then the payload; for transport PCI_DOE (2) the payload
of a NORMAL message is one whole DOE object, header included.  So the TSM, and tools
such as spdm-emu's requester, reach the same dispatcher the guest reaches through the
config-space mailbox; the dispatcher's lock serialises the two.

What the server answers (one reply per message, so the stream never loses step):

* TEST: TEST ``"Server Hello!\\0"`` (the client sends ``"Client Hello!\\0"``).
* NORMAL: NORMAL with the response object.  When the device produces no response
  (malformed object, unsupported protocol, a handler that stays silent, or a payload
  over the limit) the reply is NORMAL with an *empty* payload.  spdm_responder_emu
  instead sends nothing and drops the connection; an explicit empty reply lets a
  requester tell "no response" from a dead peer without waiting for a timeout.
* CONTINUE: CONTINUE, then the connection is closed; the next client is accepted and
  the device keeps its state (as spdm_responder_emu does).
* SHUTDOWN: SHUTDOWN, then the connection is closed.  The listener stays unless the
  server was made with ``exit_on_shutdown`` (``--doe-exit-on-shutdown``), which ends it
  (and calls ``on_shutdown``) like spdm_responder_emu's exit.
* any other command (also the OOB_ENCAP ones, which need SPDM): UNKNOWN, empty payload.
* a transport type other than PCI_DOE: UNKNOWN, then the connection is closed.
* a handler that raises (a device bug): logged with its traceback, connection closed.

Payloads up to :data:`teeio.doe.SOCKET_MAX_PAYLOAD` (a whole 2^18-DW object, 1 MiB) are
accepted; a larger one is read off the stream and thrown away, then answered as above.
One client at a time is served, in a thread; UNIX socket, or TCP on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from teeio.doe import (
    SERVER_HELLO,
    SOCKET_HEADER,
    SOCKET_MAX_PAYLOAD,
    DoeDispatcher,
    DoeError,
    SocketCommand,
    SocketHeader,
    SocketTransport,
)

log = logging.getLogger(__name__)


class _Closed(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise _Closed("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _drain(sock: socket.socket, n: int) -> None:
    while n:
        n -= len(_recv_exact(sock, min(n, 1 << 16)))


class DoeSocketServer:
    """Serves one DOE socket (UNIX *path*, or TCP *port* on *host*) in a thread."""

    def __init__(self, dispatcher: DoeDispatcher, *, path: str | None = None,
                 port: int | None = None, host: str = "127.0.0.1",
                 exit_on_shutdown: bool = False,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        if (path is None) == (port is None):
            raise ValueError("give exactly one of a UNIX socket path and a TCP port")
        self.dispatcher = dispatcher
        self.exit_on_shutdown = exit_on_shutdown
        self.on_shutdown = on_shutdown
        self.path = path
        self.clients = 0
        self._stop = threading.Event()
        self._conn: socket.socket | None = None
        if path is not None:
            if os.path.exists(path):
                os.unlink(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.address = path
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            bound_host, bound_port = self.listener.getsockname()[:2]
            self.address = f"{bound_host}:{bound_port}"
        self.listener.listen(1)
        self.port: int | None = self.listener.getsockname()[1] if port is not None else None
        self._thread = threading.Thread(target=self.serve_forever, name="doe-socket",
                                        daemon=True)

    def start(self) -> DoeSocketServer:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        log.info("DOE socket listening on %s", self.address)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                if self.port is not None:
                    # Small request/response messages: no reply may wait in Nagle's
                    # buffer for the peer's (delayed) ACK of an earlier segment.
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.clients += 1
                self._conn = conn
                try:
                    keep = self._serve(conn)
                finally:
                    self._conn = None
                    conn.close()
                if not keep:
                    log.info("DOE socket: SHUTDOWN with exit-on-shutdown, stopping")
                    if self.on_shutdown is not None:
                        self.on_shutdown()
                    break
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- one connection -------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> bool:
        """Serve *conn* until it ends; False if the whole server must stop."""
        log.info("DOE socket: client connected")
        try:
            while True:
                hdr = SocketHeader.decode(_recv_exact(conn, SOCKET_HEADER.size))
                log.debug("<-- %s transport=%d size=%d", hdr.command_name(), hdr.transport,
                          hdr.size)
                if hdr.size > SOCKET_MAX_PAYLOAD:
                    log.warning("DOE socket: %s payload of %d bytes exceeds %d: discarded",
                                hdr.command_name(), hdr.size, SOCKET_MAX_PAYLOAD)
                    _drain(conn, hdr.size)
                    payload = None
                else:
                    payload = _recv_exact(conn, hdr.size)
                if hdr.transport != SocketTransport.PCI_DOE:
                    log.warning("DOE socket: transport type %d is not PCI_DOE (2): closing",
                                hdr.transport)
                    self._send(conn, SocketCommand.UNKNOWN)
                    return True
                if hdr.command == SocketCommand.TEST:
                    self._send(conn, SocketCommand.TEST, SERVER_HELLO)
                elif hdr.command == SocketCommand.NORMAL:
                    self._send(conn, SocketCommand.NORMAL, self._normal(payload))
                elif hdr.command == SocketCommand.CONTINUE:
                    self._send(conn, SocketCommand.CONTINUE)
                    return True
                elif hdr.command == SocketCommand.SHUTDOWN:
                    self._send(conn, SocketCommand.SHUTDOWN)
                    return not self.exit_on_shutdown
                else:
                    log.warning("DOE socket: unknown command %s", hdr.command_name())
                    self._send(conn, SocketCommand.UNKNOWN)
        except _Closed:
            log.info("DOE socket: client disconnected")
        except OSError as exc:
            log.info("DOE socket: connection ended: %s", exc)
        except Exception:   # a handler's bug: say so loudly, drop this client, keep listening
            log.exception("DOE socket: internal error, closing the connection")
        return True

    def _normal(self, payload: bytes | None) -> bytes:
        if payload is None:
            return b""
        try:
            rsp = self.dispatcher.handle_object(payload)
        except DoeError as exc:
            log.info("DOE socket: no response: %s", exc)
            return b""
        return b"" if rsp is None else rsp

    def _send(self, conn: socket.socket, command: SocketCommand, payload: bytes = b"") -> None:
        log.debug("--> %s size=%d", command.name, len(payload))
        conn.sendall(SocketHeader(command, SocketTransport.PCI_DOE, len(payload)).encode()
                     + payload)
