"""Host-side DOE transport: the device's DOE dispatcher behind the spdm-emu platform socket.

Framing of DMTF spdm-emu (``spdm_emu_common/command.h``); a NORMAL payload is one whole DOE
object (PCIe 6.x §6.30.1).  One reply per message, bounded payloads, a thread per client
(at most :data:`MAX_CONNECTIONS`) and idle/message timeouts: docs/attestation.md, "The DOE
socket, message by message".
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
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
from teeio.transport.unix import listen_private

log = logging.getLogger(__name__)

#: TCP_QUICKACK (linux/tcp.h); the socket module exposes it on Linux only.
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)
#: Clients served at once; one more is closed as soon as it is accepted.
MAX_CONNECTIONS = 8
#: Seconds a new connection has to complete its first message; also how long an
#: established connection must have been idle before a new client may take its slot.
IDLE_TIMEOUT = 30.0
#: Seconds a client has to send the rest of a message once its first byte arrived.
MESSAGE_TIMEOUT = 10.0
#: The largest payload read off the stream and discarded (above SOCKET_MAX_PAYLOAD); a
#: larger one closes the connection.
MAX_DISCARD = 4 * SOCKET_MAX_PAYLOAD

__all__ = ["IDLE_TIMEOUT", "MAX_CONNECTIONS", "MAX_DISCARD", "MESSAGE_TIMEOUT",
           "DoeSocketServer"]


class _Closed(Exception):
    pass


class _Deadline:
    """Receives from one connection: its first message's first byte within *idle*
    seconds of connecting (later ones whenever they come), the rest of any message
    within *message* seconds of its first byte.  Also what the accepting thread needs to
    pick an idle connection to close."""

    def __init__(self, sock: socket.socket, idle: float, message: float) -> None:
        self.sock = sock
        self.idle = idle
        self.message = message
        self.quickack = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.until: float | None = None    # the current message's deadline, once begun
        self.answered = False              # a whole message has been received
        self.last = time.monotonic()       # when the last message ended (or it connected)

    def next_message(self) -> None:
        """The previous message was handled; wait for the next one."""
        if self.until is not None:
            self.answered = True
        self.until = None
        self.last = time.monotonic()

    def idle_for(self, now: float) -> float | None:
        """Seconds this established connection has been waiting for a message, or None
        if it is new or in the middle of one."""
        if not self.answered or self.until is not None:
            return None
        return now - self.last

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.until is None:
                self.sock.settimeout(None if self.answered else self.idle)
            else:
                left = self.until - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            if self.quickack:
                # A peer that writes one message in several segments without TCP_NODELAY
                # (spdm-emu does) waits on Nagle for our delayed ACK of the first: ACK at
                # once.  Linux clears the flag after use, so it is set before each read.
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            chunk = self.sock.recv(min(n - len(buf), 1 << 16))
            if not chunk:
                raise _Closed("peer closed the connection")
            if self.until is None:
                self.until = time.monotonic() + self.message
            buf += chunk
        return bytes(buf)

    def drain(self, n: int) -> None:
        while n:
            n -= len(self.recv_exact(min(n, 1 << 16)))


class DoeSocketServer:
    """Serves one DOE socket (UNIX *path*, or TCP *port* on *host*): an accepting thread
    and a thread per connection, at most *max_connections* at once."""

    def __init__(self, dispatcher: DoeDispatcher, *, path: str | None = None,
                 port: int | None = None, host: str = "127.0.0.1",
                 exit_on_shutdown: bool = False,
                 on_shutdown: Callable[[], None] | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        if (path is None) == (port is None):
            raise ValueError("give exactly one of a UNIX socket path and a TCP port")
        self.dispatcher = dispatcher
        self.exit_on_shutdown = exit_on_shutdown
        self.on_shutdown = on_shutdown
        self.max_connections = max_connections
        self.path = path
        self.clients = 0          # connections accepted and served
        self.refused = 0          # connections closed because every slot was taken
        self.internal_errors = 0  # messages a handler failed on unexpectedly
        self._stop = threading.Event()
        self._conns: dict[socket.socket, _Deadline] = {}
        self._lock = threading.Lock()
        if path is not None:
            # Never deletes anything but a stale socket (OSError EEXIST otherwise).
            self.listener = listen_private(path, max_connections)
            self.address = path
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.listener.bind((host, port))
                self.listener.listen(max_connections)
            except OSError:
                self.listener.close()
                raise
            bound_host, bound_port = self.listener.getsockname()[:2]
            self.address = f"{bound_host}:{bound_port}"
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
                except OSError as exc:
                    if self._stop.is_set():
                        break
                    # e.g. EMFILE: the listener stays; the client may retry
                    log.warning("DOE socket: accept failed: %s", exc)
                    self._stop.wait(0.1)
                    continue
                rx = _Deadline(conn, IDLE_TIMEOUT, MESSAGE_TIMEOUT)
                with self._lock:
                    if len(self._conns) >= self.max_connections and not self._evict_idle():
                        self.refused += 1
                        log.warning("DOE socket: %d clients already, refusing one",
                                    len(self._conns))
                        conn.close()
                        continue
                    self._conns[conn] = rx
                    self.clients += 1
                threading.Thread(target=self._connection, args=(conn, rx),
                                 name="doe-socket-conn", daemon=True).start()
        finally:
            self.close()

    def _evict_idle(self) -> bool:
        """Every slot is taken (lock held): close the connection idle longest, if it has
        been idle for more than IDLE_TIMEOUT; whether a slot was freed."""
        now = time.monotonic()
        idle = [(t, c) for c, rx in self._conns.items()
                if (t := rx.idle_for(now)) is not None and t > IDLE_TIMEOUT]
        if not idle:
            return False
        t, conn = max(idle, key=lambda e: e[0])
        del self._conns[conn]
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        log.info("DOE socket: every slot taken: closing a connection idle for %.0f s", t)
        return True

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- one connection -------------------------------------------------------------------------
    def _connection(self, conn: socket.socket, rx: _Deadline) -> None:
        try:
            if self.port is not None:
                # Small request/response messages: no reply may wait in Nagle's
                # buffer for the peer's (delayed) ACK of an earlier segment.
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keep = self._serve(conn, rx)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()
        if not keep and not self._stop.is_set():
            log.info("DOE socket: SHUTDOWN with exit-on-shutdown, stopping")
            self.close()
            if self.on_shutdown is not None:
                self.on_shutdown()

    def _serve(self, conn: socket.socket, rx: _Deadline) -> bool:
        """Serve *conn* until it ends; False if the whole server must stop."""
        log.info("DOE socket: client connected")
        try:
            while True:
                rx.next_message()
                hdr = SocketHeader.decode(rx.recv_exact(SOCKET_HEADER.size))
                log.debug("<-- %s transport=%d size=%d", hdr.command_name(), hdr.transport,
                          hdr.size)
                if hdr.size > MAX_DISCARD:
                    log.warning("DOE socket: %s payload of %d bytes exceeds %d: closing",
                                hdr.command_name(), hdr.size, MAX_DISCARD)
                    return True
                if hdr.size > SOCKET_MAX_PAYLOAD:
                    log.warning("DOE socket: %s payload of %d bytes exceeds %d: discarded",
                                hdr.command_name(), hdr.size, SOCKET_MAX_PAYLOAD)
                    rx.drain(hdr.size)
                    payload = None
                else:
                    payload = rx.recv_exact(hdr.size)
                conn.settimeout(IDLE_TIMEOUT)    # for the reply
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
        except TimeoutError:
            why = (f"a message not completed within {MESSAGE_TIMEOUT:g} s"
                   if rx.until is not None
                   else f"no message within {IDLE_TIMEOUT:g} s of connecting")
            log.info("DOE socket: connection timed out (%s): closed", why)
        except OSError as exc:
            log.info("DOE socket: connection ended: %s", exc)
        except Exception:   # a bug of this server's own: say so loudly, drop this client
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
        except Exception as exc:   # last resort: a device bug must not end the server
            with self._lock:
                self.internal_errors += 1
                first = self.internal_errors == 1
            if first:
                log.exception("DOE socket: the device failed on an object (answered as no "
                              "response; later failures are logged in one line)")
            else:
                log.error("DOE socket: the device failed on an object (%d so far): %s: %s",
                          self.internal_errors, type(exc).__name__, exc)
            return b""
        return b"" if rsp is None else rsp

    def _send(self, conn: socket.socket, command: SocketCommand, payload: bytes = b"") -> None:
        log.debug("--> %s size=%d", command.name, len(payload))
        conn.sendall(SocketHeader(command, SocketTransport.PCI_DOE, len(payload)).encode()
                     + payload)
