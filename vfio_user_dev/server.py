"""vfio-user server transport: one client at a time on a UNIX socket.

Threads: the *connection* thread reads every message; client commands are handled
right there (none of them blocks on the client), replies to our own DMA_READ /
DMA_WRITE are handed to the waiting engine thread.  So the server keeps serving
the client while a DMA reply is outstanding, and a DMA reply can always be
routed, which is what keeps QEMU and us out of a deadlock.

Errors: a malformed message gets an error reply with its errno and the
connection goes on; an unknown command gets ENOSYS; posted writes (No_reply)
are never answered, not even with an error.  A client that disconnects has its
DMA maps and eventfds dropped and the device reset; the next client is accepted.

Hostile input: every length, count and nesting depth is bounded before use (a message
over MAX_MESSAGE is drained in bounded chunks without being buffered, a message with
more fds than our max_msg_fds is refused, fds that come with a message that takes none
are closed).  Anything a handler raises that no check foresaw is a last resort: the
message gets EIO (spec "Error Handling": an error reply with an errno), the traceback is
logged, and the server serves on; an unforeseen failure of the connection itself closes
that connection and the next client is accepted.  Refusals are logged through
:class:`LogLimiter`, so a stream of garbage cannot flood the log.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from teeio.transport import remove_stale_socket
from vfio_user_dev import protocol as p
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.enforcement import LOG_FIRST
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import Command, Header, ProtocolError

log = logging.getLogger(__name__)
msglog = logging.getLogger("vfio_user_dev.msg")

DMA_REPLY_TIMEOUT = 10.0
LOG_INTERVAL = 10.0     # seconds: after LOG_FIRST lines of a kind, at most one per interval
CHUNK = 1 << 20         # largest single read from the socket


class Disconnected(Exception):
    pass


class LogLimiter:
    """Log lines by kind that a client can provoke at will, without letting it flood the
    log: the first *first* of each kind (LOG_FIRST, as TDISP refusals are logged), then at
    most one per *interval* seconds, saying how many of that kind were suppressed since
    the previous line.  ``counts`` keeps every occurrence by kind."""

    def __init__(self, logger: logging.Logger, first: int = LOG_FIRST,
                 interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.first = first
        self.interval = interval
        self.clock = clock
        self.counts: collections.Counter[str] = collections.Counter()
        self.suppressed: collections.Counter[str] = collections.Counter()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, level: int, msg: str, *args: object,
                 exc_info: BaseException | bool = False) -> bool:
        """Count one *kind* and log *msg* unless rate-limited; whether it was logged."""
        with self._lock:
            self.counts[kind] += 1
            now = self.clock()
            last = self._last.get(kind)
            if self.counts[kind] > self.first and last is not None \
                    and now - last < self.interval:
                self.suppressed[kind] += 1
                return False
            self._last[kind] = now
            dropped = self.suppressed.pop(kind, 0)
        if dropped:
            msg += " (%d more suppressed since the previous line)"
            args += (dropped,)
        self.log.log(level, msg, *args, exc_info=exc_info)
        return True


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
    """One vfio-user client session."""

    def __init__(self, sock: socket.socket, platform: Platform,
                 refusals: LogLimiter | None = None,
                 internal: LogLimiter | None = None) -> None:
        self.sock = sock
        self.platform = platform
        self.device = platform.device
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.negotiated = False
        self.client_max_xfer = p.MAX_DATA_XFER
        self.closed = threading.Event()
        self.counters = {"rx": 0, "tx": 0, "errors": 0, "internal_errors": 0}
        self.close_reason = "closed"
        # Shared by the server's connections, so that reconnecting does not reset them.
        self.refusals = refusals if refusals is not None else LogLimiter(log)
        self.internal = internal if internal is not None else LogLimiter(log, first=1)

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
        out = bytearray()
        while count:
            n = min(count, self.client_max_xfer)
            _, payload = self.request(Command.DMA_READ, p.encode_dma_rw(address, n))
            try:
                _, got, data = p.decode_dma_rw(payload, with_data=True)
            except ProtocolError as exc:
                raise DmaFault(f"DMA_READ reply: {exc}") from None
            if got != n:
                raise DmaFault(f"DMA_READ reply count {got} != {n}")
            out += data
            address += n
            count -= n
        return bytes(out)

    def dma_write(self, address: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            chunk = data[pos:pos + self.client_max_xfer]
            self.request(Command.DMA_WRITE, p.encode_dma_rw(address + pos, len(chunk), chunk))
            pos += len(chunk)

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
                        self._reject(hdr, errno.E2BIG, f"message of {hdr.size} bytes is too big")
                        continue
                    if hdr.size > p.HEADER_SIZE:
                        payload = recv_exact(self.sock, hdr.size - p.HEADER_SIZE, fds,
                                             p.MAX_MSG_FDS)
                    self.counters["rx"] += 1
                    if len(fds) > p.MAX_MSG_FDS:
                        # Spec "Version": max_msg_fds is what we receive in one message.
                        self._reject(hdr, errno.EINVAL, f"more than {p.MAX_MSG_FDS} fds")
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
            self.internal(f"connection:{type(exc).__name__}", logging.ERROR,
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

    def _reject(self, hdr: Header, err: int, why: str) -> None:
        self.counters["errors"] += 1
        name = hdr.command_name().partition("(")[0]     # one kind for all unknown commands
        self.refusals(f"{name}:{errno.errorcode.get(err, err)}", logging.WARNING,
                      "%s id=%d rejected (%s): %s", hdr.command_name(), hdr.msg_id,
                      errno.errorcode.get(err, err), why)
        if not hdr.no_reply and not hdr.is_reply:
            self.send(p.error_reply(hdr, err))

    def _internal_error(self, hdr: Header, exc: Exception) -> None:
        """Last resort for one message: what its handler raised that no check foresaw.
        A message that expects a reply gets EIO (spec "Error Handling"); the server
        serves on.  Logged with its traceback, rate-limited by kind."""
        self.counters["errors"] += 1
        self.counters["internal_errors"] += 1
        self.internal(f"{hdr.command_name()}:{type(exc).__name__}", logging.ERROR,
                      "%s id=%d: internal error, answered EIO: %r", hdr.command_name(),
                      hdr.msg_id, exc, exc_info=exc)
        if not hdr.no_reply:
            self.send(p.error_reply(hdr, errno.EIO))

    def _dispatch(self, hdr: Header, payload: bytes, fds: list[int]) -> None:
        if msglog.isEnabledFor(logging.DEBUG):
            kind = "reply" if hdr.is_reply else "cmd"
            msglog.debug("<-- %s %s id=%d size=%d fds=%d%s", kind, hdr.command_name(),
                         hdr.msg_id, hdr.size, len(fds), " no_reply" if hdr.no_reply else "")
        if hdr.is_reply:
            with self._pending_lock:
                pend = self._pending.get(hdr.msg_id)
            if pend is None:
                self.counters["errors"] += 1
                self.refusals("reply:unexpected", logging.WARNING, "unexpected reply id=%d to %s",
                              hdr.msg_id, hdr.command_name())
                return
            pend.header, pend.payload = hdr, payload
            pend.event.set()
            return
        if hdr.flags & p.TYPE_MASK != 0:
            self._reject(hdr, errno.EINVAL, f"unknown message type {hdr.flags & p.TYPE_MASK}")
            return
        if hdr.size < p.HEADER_SIZE:
            self._reject(hdr, errno.EINVAL, f"message size {hdr.size} < 16")
            return
        handler = self.HANDLERS.get(hdr.command)
        if handler is None:
            self._reject(hdr, errno.ENOSYS, "command not supported")
            return
        if not self.negotiated and hdr.command != Command.VERSION:
            self._reject(hdr, errno.EINVAL, "VERSION must come first")
            return
        try:
            out = handler(self, hdr, payload, fds)
        except ProtocolError as exc:
            self._reject(hdr, exc.errno, str(exc))
            return
        except DmaFault as exc:
            self._reject(hdr, errno.EFAULT, str(exc))
            return
        except Exception as exc:
            self._internal_error(hdr, exc)
            return
        if hdr.no_reply:
            return
        body, reply_fds = out if isinstance(out, tuple) else (out, None)
        self.send(p.reply(hdr, body), reply_fds)

    # -- command handlers -----------------------------------------------------------------
    def _version(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        v = p.Version.decode(payload)
        if v.major != 0:
            raise ProtocolError(errno.ENOTSUP, f"unsupported major version {v.major}")
        xfer = v.capabilities.get("max_data_xfer_size", p.MAX_DATA_XFER)
        if not isinstance(xfer, int) or isinstance(xfer, bool) or xfer <= 0:
            raise ProtocolError(errno.EINVAL, f"bad max_data_xfer_size {xfer!r}")
        self.client_max_xfer = min(xfer, p.MAX_DATA_XFER)
        # QEMU receives the reply into a buffer the size of its own request: stay shorter,
        # dropping capabilities from the end (spec "Version": each one has a default).
        caps: dict[str, object] = {"max_msg_fds": p.MAX_MSG_FDS,
                                   "max_data_xfer_size": p.MAX_DATA_XFER,
                                   "max_dma_maps": self.platform.dma.max_maps}
        body = p.Version(0, 0, caps).encode()
        while len(body) > len(payload):
            caps.popitem()
            body = p.Version(0, 0, caps).encode()
        self.negotiated = True
        names = sorted(v.capabilities)     # the client's: at most a few shown
        log.info("client version %d.%d caps=%.200s%s", v.major, v.minor, names[:16],
                 f" and {len(names) - 16} more" if len(names) > 16 else "")
        return body

    def _dma_map(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        m = p.DmaMap.decode(payload)
        if len(fds) > 1:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP with {len(fds)} fds")
        fd = fds.pop() if fds else None
        self.platform.dma.map(m.address, m.size, m.flags, m.offset, fd)
        log.debug("DMA_MAP %#x+%#x flags=%d %s", m.address, m.size, m.flags,
                  "fd" if fd is not None else "no-fd")
        return b""

    def _dma_unmap(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        u = p.DmaUnmap.decode(payload)
        self.platform.dma.unmap(u.address, u.size)
        return payload  # the reply echoes the original entry

    def _get_info(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        p.decode_argsz(payload, p.DEVICE_INFO.size, "DEVICE_GET_INFO")
        return p.DEVICE_INFO.pack(p.DEVICE_INFO.size, p.DeviceFlags.RESET | p.DeviceFlags.PCI,
                                  self.device.NUM_REGIONS, len(self.device.irq.counts))

    def _region_info(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        req = p.RegionInfoRequest.decode(payload)
        if req.index >= self.device.NUM_REGIONS:
            raise ProtocolError(errno.EINVAL, f"no region {req.index}")
        spec = self.device.REGIONS.get(p.PciRegion(req.index))
        size, flags = (spec.size, spec.flags) if spec else (0, 0)
        return p.REGION_INFO.pack(p.REGION_INFO.size, flags, req.index, 0, size, 0)

    def _irq_info(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        req = p.IrqInfoRequest.decode(payload)
        if req.index not in self.device.irq.counts:
            raise ProtocolError(errno.EINVAL, f"no IRQ index {req.index}")
        return p.IRQ_INFO.pack(p.IRQ_INFO.size, self.device.irq.info_flags(req.index),
                               req.index, self.device.irq.counts[req.index])

    def _set_irqs(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        req = p.IrqSet.decode(payload)
        with self.device._lock:
            leftover = self.device.irq.set_irqs(req, list(fds))
            kept = [fd for fd in fds if fd not in leftover]
            for fd in kept:
                fds.remove(fd)  # now owned by the IRQ controller
        return b""

    def _region_read(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        a = p.RegionAccess.decode(payload, with_data=False)
        data = self.platform.region_read(a.region, a.offset, a.count)
        return p.RegionAccess(a.offset, a.region, a.count, data).encode()

    def _region_write(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        a = p.RegionAccess.decode(payload, with_data=True)
        self.platform.region_write(a.region, a.offset, a.data)
        return p.RegionAccess(a.offset, a.region, a.count).encode()

    def _reset(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        if payload:
            raise ProtocolError(errno.EINVAL, "DEVICE_RESET takes no payload")
        self.platform.reset("client_reset")
        return b""

    HANDLERS: dict[int, Callable[[Connection, Header, bytes, list[int]],
                                 bytes | tuple[bytes, list[int]]]] = {
        Command.VERSION: _version,
        Command.DMA_MAP: _dma_map,
        Command.DMA_UNMAP: _dma_unmap,
        Command.DEVICE_GET_INFO: _get_info,
        Command.DEVICE_GET_REGION_INFO: _region_info,
        Command.DEVICE_GET_IRQ_INFO: _irq_info,
        Command.DEVICE_SET_IRQS: _set_irqs,
        Command.REGION_READ: _region_read,
        Command.REGION_WRITE: _region_write,
        Command.DEVICE_RESET: _reset,
    }


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
