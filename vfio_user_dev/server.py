"""vfio-user server transport: one client at a time on a UNIX socket (the vfio-user
protocol spec, QEMU docs/interop/vfio-user.rst, "Socket" and "Message Format").

The socket side only: accepting clients, reading messages with their SCM_RIGHTS fds
(bounded: spec "Version" max_msg_fds, our MAX_MESSAGE), sending, and the replies to the
server's own DMA_READ/DMA_WRITE.  Handling a client command is :class:`~vfio_user_dev.
session.Session`'s, without I/O.  Threads and hostile input: docs/device-internals.md.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import logging
import os
import socket
import threading
from dataclasses import dataclass, field

from teeio.transport import remove_stale_socket
from vfio_user_dev import protocol as p
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.loglimit import LogLimiter
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import Command, Header
from vfio_user_dev.session import Reply, Session

log = logging.getLogger(__name__)
msglog = logging.getLogger("vfio_user_dev.msg")

DMA_REPLY_TIMEOUT = 10.0
CHUNK = 1 << 20         # largest single read from the socket


class Disconnected(Exception):
    pass


def recv_exact(sock: socket.socket, n: int, fds: list[int],
               max_fds: int | None = None) -> bytes:
    """Read exactly *n* bytes, collecting SCM_RIGHTS fds that arrive with them.

    With *max_fds*, at most one fd beyond it is kept (the others are closed at once), and
    fds the kernel had to discard (MSG_CTRUNC) count as one more (a -1): the caller sees
    ``len(fds) > max_fds`` and refuses the message, while a sender cannot pile up fds in
    this process by spreading a message over many small writes."""
    buf = bytearray()
    anc = socket.CMSG_SPACE(p.MAX_MSG_FDS * 4)
    while len(buf) < n:
        data, ancdata, flags, _addr = sock.recvmsg(min(n - len(buf), CHUNK), anc)
        for level, typ, cdata in ancdata:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        if max_fds is not None:
            if flags & socket.MSG_CTRUNC and len(fds) <= max_fds:
                fds.append(-1)
            while len(fds) > max_fds + 1:
                fd = fds.pop()
                if fd >= 0:
                    os.close(fd)
        if not data:
            raise Disconnected("peer closed the connection")
        buf += data
    return bytes(buf)


def send_all(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    header: Header | None = None
    payload: bytes = b""


class Connection:
    """One vfio-user client on its socket: the receive loop, sending, and the server's
    own requests waiting for their replies.  What a client command means is the
    :class:`Session`'s."""

    def __init__(self, sock: socket.socket, platform: Platform,
                 refusals: LogLimiter | None = None,
                 internal: LogLimiter | None = None) -> None:
        self.sock = sock
        self.platform = platform
        self.device = platform.device
        # Shared by the server's connections, so that reconnecting does not reset them.
        self.session = Session(platform, refusals if refusals is not None else LogLimiter(log),
                               internal if internal is not None else LogLimiter(log, first=1))
        self.counters = self.session.counters
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.closed = threading.Event()
        self.close_reason = "closed"

    # -- sending ------------------------------------------------------------------------
    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if msglog.isEnabledFor(logging.DEBUG):
            h = Header.decode(data)
            kind = "reply" if h.is_reply else "cmd"
            err = f" error={h.error}" if h.is_error else ""
            msglog.debug("--> %s %s id=%d size=%d%s", kind, h.command_name(), h.msg_id,
                         h.size, err)
        with self._send_lock:
            send_all(self.sock, data, fds)
        self.counters["tx"] += 1

    def _send_reply(self, reply: Reply | None) -> None:
        if reply is not None:
            self.send(reply.data, reply.fds)

    # -- server -> client requests (DMA fallback) -------------------------------------------
    def request(self, command: Command, payload: bytes) -> tuple[Header, bytes]:
        if self.closed.is_set():
            raise DmaFault("client is gone")
        msg_id = next(self._ids) & 0xFFFF
        pend = _Pending()
        with self._pending_lock:
            self._pending[msg_id] = pend
        try:
            try:
                self.send(p.message(msg_id, command, payload))
            except OSError as exc:
                # Client gone before the reader noticed (EPIPE, EBADF): a DMA fault for
                # this job, not an exception that would kill the DMA engine thread.
                raise DmaFault(f"{command.name} id={msg_id}: cannot send: {exc}") from None
            if not pend.event.wait(DMA_REPLY_TIMEOUT) or pend.header is None:
                raise DmaFault(f"{command.name} id={msg_id}: no reply from the client")
        finally:
            with self._pending_lock:
                self._pending.pop(msg_id, None)
        if pend.header.is_error:
            raise DmaFault(f"{command.name}: client answered errno {pend.header.error} "
                           f"({os.strerror(pend.header.error) if pend.header.error else '?'})")
        return pend.header, pend.payload

    def dma_read(self, address: int, count: int) -> bytes:
        return self.session.dma_read(self.request, address, count)

    def dma_write(self, address: int, data: bytes) -> None:
        self.session.dma_write(self.request, address, data)

    # -- receive loop -------------------------------------------------------------------------
    def serve(self) -> None:
        self.platform.dma.remote_read = self.dma_read
        self.platform.dma.remote_write = self.dma_write
        try:
            while True:
                fds: list[int] = []
                try:
                    raw = recv_exact(self.sock, p.HEADER_SIZE, fds, p.MAX_MSG_FDS)
                    hdr = Header.decode(raw)
                    payload = b""
                    if hdr.size > p.MAX_MESSAGE:
                        # Skipped in bounded chunks, never buffered whole.
                        self._drain(hdr.size - p.HEADER_SIZE, fds)
                        self._send_reply(self.session.reject(
                            hdr, errno.E2BIG, f"message of {hdr.size} bytes is too big"))
                        continue
                    if hdr.size > p.HEADER_SIZE:
                        payload = recv_exact(self.sock, hdr.size - p.HEADER_SIZE, fds,
                                             p.MAX_MSG_FDS)
                    self.counters["rx"] += 1
                    if len(fds) > p.MAX_MSG_FDS:
                        # Spec "Version": max_msg_fds is what we receive in one message.
                        self._send_reply(self.session.reject(
                            hdr, errno.EINVAL, f"more than {p.MAX_MSG_FDS} fds"))
                        continue
                    self._dispatch(hdr, payload, fds)
                finally:
                    # Whatever no handler took: the fds of messages that take none too.
                    for fd in fds:
                        if fd >= 0:
                            os.close(fd)
        except (Disconnected, ConnectionError, OSError) as exc:
            self.close_reason = str(exc) or type(exc).__name__
            log.info("client disconnected: %s", exc)
        except Exception as exc:
            # Last resort: an unforeseen failure outside any one message's handling.  The
            # connection is closed (by the caller); the server serves the next client.
            self.close_reason = f"internal error: {exc!r}"
            self.session.internal(f"connection:{type(exc).__name__}", logging.ERROR,
                                  "connection dropped after an internal error: %r", exc,
                                  exc_info=exc)
        finally:
            self.closed.set()
            with self._pending_lock:
                for pend in self._pending.values():
                    pend.event.set()
            self.platform.dma.remote_read = None
            self.platform.dma.remote_write = None

    def _drain(self, n: int, fds: list[int]) -> None:
        while n:
            n -= len(recv_exact(self.sock, min(n, CHUNK), fds, p.MAX_MSG_FDS))

    def _dispatch(self, hdr: Header, payload: bytes, fds: list[int]) -> None:
        """A reply goes to the request waiting for it; a command to the session, whose
        reply (if any) is sent."""
        if msglog.isEnabledFor(logging.DEBUG):
            kind = "reply" if hdr.is_reply else "cmd"
            msglog.debug("<-- %s %s id=%d size=%d fds=%d%s", kind, hdr.command_name(),
                         hdr.msg_id, hdr.size, len(fds), " no_reply" if hdr.no_reply else "")
        if hdr.is_reply:
            with self._pending_lock:
                pend = self._pending.get(hdr.msg_id)
            if pend is None:
                self.session.stray_reply(hdr)
                return
            pend.header, pend.payload = hdr, payload
            pend.event.set()
            return
        self._send_reply(self.session.handle(hdr, payload, fds))


class Server:
    """Accepts clients one after the other on a listening UNIX socket."""

    def __init__(self, path: str, platform: Platform) -> None:
        self.path = path
        self.platform = platform
        remove_stale_socket(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self._stop = threading.Event()
        self.clients = 0
        self.connection: Connection | None = None
        self.refusals = LogLimiter(log)
        self.internal = LogLimiter(log, first=1)

    def serve_one(self, sock: socket.socket) -> None:
        self.clients += 1
        conn = Connection(sock, self.platform, self.refusals, self.internal)
        self.connection = conn
        self.platform.events.emit("client_connected", client=self.clients,
                                  transport="vfio-user")
        try:
            conn.serve()
        finally:
            sock.close()
            # Client gone (the VMM exited or was killed): Platform.client_gone.
            self.platform.client_gone(conn.close_reason, self.clients)
            self.connection = None

    def serve_forever(self, max_clients: int | None = None) -> None:
        log.info("listening on %s", self.path)
        try:
            while not self._stop.is_set():
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                log.info("client connected")
                try:
                    self.serve_one(sock)
                except Exception as exc:
                    # Last resort: whatever failed with this client, serve the next one.
                    self.internal(f"client:{type(exc).__name__}", logging.ERROR,
                                  "client session failed: %r", exc, exc_info=exc)
                if max_clients is not None and self.clients >= max_clients:
                    break
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        conn = self.connection
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
