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
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from teeio.transport import remove_stale_socket
from vfio_user_dev import protocol as p
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.loglimit import LogLimiter
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import HEADER, Command, Header
from vfio_user_dev.session import REGION_READ, REGION_WRITE, Reply, Session

log = logging.getLogger(__name__)
msglog = logging.getLogger("vfio_user_dev.msg")

DMA_REPLY_TIMEOUT = 10.0
CHUNK = 1 << 20         # largest single read from the socket
_SIZE, _SIZE_OFFSET = struct.Struct("<I"), 4     # the header's size field
_MSG_CTRUNC = int(socket.MSG_CTRUNC)     # a plain int: IntFlag's & costs a call
_DEBUG = logging.DEBUG
_REGION_ACCESS = frozenset({REGION_READ, REGION_WRITE})     # Session.region_access's
_POSTED = int(p.Flags.NO_REPLY)     # a posted REGION_WRITE (QEMU's default for BAR writes)


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
            if flags & _MSG_CTRUNC and len(fds) <= max_fds:
                fds.append(-1)
            while len(fds) > max_fds + 1:
                fd = fds.pop()
                if fd >= 0:
                    os.close(fd)
        if not data:
            raise Disconnected("peer closed the connection")
        buf += data
    return bytes(buf)


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, typ, cdata in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    return fds


def _cap_fds(fds: list[int], max_fds: int) -> None:
    """Keep at most one fd beyond *max_fds*, closing the others at once."""
    while len(fds) > max_fds + 1:
        fd = fds.pop()
        if fd >= 0:
            os.close(fd)


class Inbox:
    """The client's messages, read ahead into one preallocated buffer: one
    ``recvmsg_into`` brings whatever has arrived, often a whole message or several.

    SCM_RIGHTS fds: the kernel ends a read right after the bytes that carried fds, so the
    fds of a read belong to the message that holds its last byte -- the one its sender
    sent them with (a sender sends each message with its fds in one sendmsg).  They are
    kept by message, at most ``max_fds`` + 1 each (fds the kernel had to discard,
    MSG_CTRUNC, count as one more: a -1), so that a sender cannot pile up fds in this
    process.  A message longer than ``MAX_MESSAGE`` is skipped in bounded chunks, never
    buffered whole."""

    def __init__(self, sock: socket.socket, max_fds: int = p.MAX_MSG_FDS,
                 capacity: int = p.MAX_MESSAGE) -> None:
        self.sock = sock
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self._whole = [self.view]     # recvmsg_into's buffers when buf is empty
        self.start = 0          # the next message's first byte in buf
        self.end = 0            # the end of the bytes read
        self._base = 0          # the stream offset of buf[0]
        self._max_fds = max_fds
        self._anc = socket.CMSG_SPACE(max_fds * 4)
        self._fds: dict[int, list[int]] = {}    # message (its stream offset) -> its fds

    def _size_at(self, at: int) -> int:
        size: int = _SIZE.unpack_from(self.buf, at + _SIZE_OFFSET)[0]
        return size if size > p.HEADER_SIZE else p.HEADER_SIZE

    def messages(self) -> Iterator[tuple[memoryview, int, int, list[int]]]:
        """The messages, each as (where, at, n, fds): *n* bytes (its size as its header
        claims, at least the header) at offset *at* in *where*, valid until the next one
        is asked for; *fds* are the caller's to close or keep.  One longer than
        ``MAX_MESSAGE`` comes once skipped, as its header alone.  Raises Disconnected at
        the end of the stream.  Positions live in locals between messages (the hot path);
        the attributes follow them where a read brought fds."""
        buf, view, whole, anc, fdmap = self.buf, self.view, self._whole, self._anc, self._fds
        recvmsg_into = self.sock.recvmsg_into
        header_size, max_message = p.HEADER_SIZE, p.MAX_MESSAGE
        at, end = self.start, self.end
        while True:
            if end - at >= header_size:
                n = _SIZE.unpack_from(buf, at + _SIZE_OFFSET)[0]
                if n < header_size:
                    n = header_size
                if end - at >= n:
                    yield view, at, n, fdmap.pop(self._base + at, []) if fdmap else []
                    at += n
                    continue
                if n > max_message:
                    header = memoryview(bytes(view[at:at + header_size]))
                    self.start, self.end = at, end
                    fds = self.skip(n)
                    yield header, 0, n, fds
                    at, end = self.start, self.end
                    continue
                need = n
            else:
                need = header_size
            # Read more, with room for *need* bytes from the message's start.
            if at == end:                       # all consumed: the usual case
                self._base += end
                at = end = 0
            elif len(buf) - at < need:
                buf[:end - at] = buf[at:end]
                self._base += at
                at, end = 0, end - at
            nbytes, ancdata, flags, _addr = recvmsg_into(
                whole if end == 0 else [view[end:]], anc)
            end += nbytes
            if ancdata or flags & _MSG_CTRUNC or not nbytes:
                self.start, self.end = at, end
                self._arrived(nbytes, ancdata, flags, None)

    def skip(self, n: int) -> list[int]:
        """Drop the next message (*n* bytes, more than fit), reading the rest of it in
        bounded chunks and nothing beyond; its fds."""
        owner = self._base + self.start
        take = min(n, self.end - self.start)
        self.start += take
        n -= take
        while n:
            self._base += self.end
            nbytes, ancdata, flags, _addr = self.sock.recvmsg_into(
                [self.view[:min(n, len(self.buf))]], self._anc)
            self.start = self.end = nbytes
            self._arrived(nbytes, ancdata, flags, owner)
            n -= nbytes
        return self._fds.pop(owner, [])

    def close(self) -> None:
        """Close the fds no message took (the client left halfway)."""
        for fds in self._fds.values():
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        self._fds.clear()

    def _arrived(self, nbytes: int, ancdata: list[tuple[int, int, bytes]], flags: int,
                 owner: int | None) -> None:
        """What came with a read of *nbytes* (now at the end of ``buf``): its fds, kept for
        *owner* (a message's stream offset; None: the message of the last byte read), or
        the end of the stream."""
        fds = _received_fds(ancdata)
        if not nbytes:
            for fd in fds:
                os.close(fd)
            raise Disconnected("peer closed the connection")
        if fds or flags & _MSG_CTRUNC:
            self._keep(self._owner() if owner is None else owner, fds,
                       bool(flags & _MSG_CTRUNC))

    def _keep(self, owner: int, got: list[int], truncated: bool) -> None:
        fds = self._fds.setdefault(owner, [])
        fds.extend(got)
        if truncated and len(fds) <= self._max_fds:
            fds.append(-1)
        _cap_fds(fds, self._max_fds)

    def _owner(self) -> int:
        """The stream offset of the message that holds the last byte read."""
        last, at = self.end - 1, self.start
        while self.end - at >= p.HEADER_SIZE and at + self._size_at(at) <= last:
            at += self._size_at(at)
        return self._base + at


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
        inbox = Inbox(self.sock)
        session, counters, sock, send_lock = self.session, self.counters, self.sock, \
            self._send_lock
        debugging = msglog.isEnabledFor
        # What isEnabledFor answers from (cleared whenever a level changes): a cached False
        # spares the hot path the call; anything else asks.
        debug_cache: dict[int, bool] = getattr(msglog, "_cache", {})
        max_message = p.MAX_MESSAGE
        try:
            for view, at, n, fds in inbox.messages():
                try:
                    msg_id, command, size, flags, _ = HEADER.unpack_from(view, at)
                    if size > max_message:
                        # Skipped in bounded chunks (Inbox), never buffered whole.
                        self._send_reply(session.reject(
                            Header.decode(view[at:]), errno.E2BIG,
                            f"message of {size} bytes is too big"))
                        continue
                    counters["rx"] += 1
                    if ((flags == 0 and command in _REGION_ACCESS
                         or flags == _POSTED and command == REGION_WRITE)
                            and not fds and session.negotiated
                            and (debug_cache.get(_DEBUG) is False or not debugging(_DEBUG))):
                        # The hot path (Session.region_access): a reply unless posted
                        # (an error too: a posted write takes none, spec "Header").
                        out = session.region_access(msg_id, command, view, at, size, flags != 0)
                        if out is not None:
                            send_lock.acquire()     # not "with": no bound methods made
                            try:
                                sock.sendall(out)
                            finally:
                                send_lock.release()
                            counters["tx"] += 1
                        continue
                    hdr = Header.decode(view[at:at + p.HEADER_SIZE])
                    if len(fds) > p.MAX_MSG_FDS:
                        # Spec "Version": max_msg_fds is what we receive in one message.
                        self._send_reply(session.reject(
                            hdr, errno.EINVAL, f"more than {p.MAX_MSG_FDS} fds"))
                        continue
                    payload = bytes(view[at + p.HEADER_SIZE:at + n]) if n > p.HEADER_SIZE \
                        else b""
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
            inbox.close()
            self.closed.set()
            with self._pending_lock:
                for pend in self._pending.values():
                    pend.event.set()
            self.platform.dma.remote_read = None
            self.platform.dma.remote_write = None

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
