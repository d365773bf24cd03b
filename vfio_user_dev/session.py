"""vfio-user message handling without I/O: one client session as a state machine.

:meth:`Session.handle` takes one decoded client command (header, payload, the fds that
came with it) and returns the reply to send, or None (spec "Message Format": a command
with No_reply set is never answered, not even with an error).  Commands: spec
"VFIO_USER_VERSION" (first), "VFIO_USER_DMA_MAP/UNMAP", "VFIO_USER_DEVICE_GET_INFO",
"..._GET_REGION_INFO", "..._GET_IRQ_INFO", "..._SET_IRQS", "VFIO_USER_REGION_READ/WRITE",
"VFIO_USER_DEVICE_RESET"; errors per spec "Error Handling".  The socket is the
transport's (``server.py``); so are replies to the server's own DMA_READ/DMA_WRITE.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vfio_user_dev import protocol as p
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.loglimit import LogLimiter
from vfio_user_dev.operations import DeviceOperations
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import Command, Header, ProtocolError

log = logging.getLogger(__name__)

#: what a handler returns: the reply payload, with fds to pass along or not
HandlerResult = bytes | tuple[bytes, list[int]]
#: the transport's blocking round trip for a server -> client request: (reply header, payload)
Request = Callable[[Command, bytes], tuple[Header, bytes]]

# The hot path's constants as plain ints and bound methods, looked up once (spec
# "VFIO_USER_REGION_READ/WRITE").
REGION_READ, REGION_WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
_ACCESS = p.REGION_MSG.size           # header + offset, region, count: 32 bytes
_HEADER_SIZE = p.HEADER_SIZE
_MAX_DATA_XFER = p.MAX_DATA_XFER
_REPLY = int(p.Flags.REPLY)
_access_fields = p.REGION_RW.unpack_from
_pack_reply = p.REGION_MSG.pack
_pack_reply4 = struct.Struct(p.REGION_MSG.format + "4s").pack   # with a register's data
_data4 = struct.Struct("4s").unpack_from     # a register's worth, copied out in one call


@dataclass(frozen=True)
class Reply:
    """One message for the transport to send (a whole message, header included)."""

    data: bytes
    fds: list[int] | None = None


class Session:
    """One vfio-user client session.  ``counters``: ``rx``/``tx`` (the transport's),
    ``errors`` (refused messages), ``internal_errors`` (last-resort handler)."""

    def __init__(self, platform: Platform, refusals: LogLimiter | None = None,
                 internal: LogLimiter | None = None) -> None:
        self.platform = platform
        self.device = platform.device
        self.ops = DeviceOperations(platform)
        self.negotiated = False
        self.client_max_xfer = p.MAX_DATA_XFER
        self.counters = {"rx": 0, "tx": 0, "errors": 0, "internal_errors": 0}
        # Shared by a server's sessions, so that reconnecting does not reset them.
        self.refusals = refusals if refusals is not None else LogLimiter(log)
        self.internal = internal if internal is not None else LogLimiter(log, first=1)

    # -- client commands --------------------------------------------------------------------
    def handle(self, hdr: Header, payload: bytes, fds: list[int]) -> Reply | None:
        """The reply to one client command (not a reply: those are the transport's).
        The fds a handler keeps are removed from *fds*; the caller closes the rest."""
        if hdr.flags & p.TYPE_MASK != 0:
            return self.reject(hdr, errno.EINVAL, f"unknown message type {hdr.flags & p.TYPE_MASK}")
        if hdr.size < p.HEADER_SIZE:
            return self.reject(hdr, errno.EINVAL, f"message size {hdr.size} < 16")
        handler = self.HANDLERS.get(hdr.command)
        if handler is None:
            return self.reject(hdr, errno.ENOSYS, "command not supported")
        if not self.negotiated and hdr.command != Command.VERSION:
            return self.reject(hdr, errno.EINVAL, "VERSION must come first")
        try:
            out = handler(self, hdr, payload, fds)
        except ProtocolError as exc:
            return self.reject(hdr, exc.errno, str(exc))
        except DmaFault as exc:
            return self.reject(hdr, errno.EFAULT, str(exc))
        except Exception as exc:
            return self.internal_error(hdr, exc)
        if hdr.no_reply:
            return None
        body, reply_fds = out if isinstance(out, tuple) else (out, None)
        return Reply(p.reply(hdr, body), reply_fds)

    def region_access(self, msg_id: int, command: int, buf: memoryview, at: int, size: int,
                      posted: bool = False) -> bytes | None:
        """:meth:`handle` for a REGION_READ or REGION_WRITE (*command*; a write may be
        *posted*: then no reply is made, nor one on an error) that came
        without fds from a negotiated client, and whose *size* bytes are
        at *at* in *buf* (at least a header's): decoded in place with the precompiled
        structs and answered without message objects (the hot path).  Anything malformed
        takes :meth:`handle`, which says why."""
        if size >= _ACCESS:
            offset, region, count = _access_fields(buf, at + _HEADER_SIZE)
            if count <= _MAX_DATA_XFER and size == _ACCESS + (
                    count if command == REGION_WRITE else 0):
                try:
                    if command == REGION_READ:
                        data = self.ops.region_read(region, offset, count)
                        if len(data) == 4:
                            return _pack_reply4(msg_id, command, _ACCESS + 4, _REPLY, 0,
                                                offset, region, count, data)
                        return _pack_reply(msg_id, command, _ACCESS + len(data), _REPLY, 0,
                                           offset, region, count) + data
                    self.ops.region_write(region, offset, _data4(buf, at + _ACCESS)[0]
                                          if count == 4 else bytes(buf[at + _ACCESS:at + size]))
                    if posted:
                        return None
                    return _pack_reply(msg_id, command, _ACCESS, _REPLY, 0, offset, region,
                                       count)
                except ProtocolError as exc:
                    out = self.reject(Header.decode(buf[at:]), exc.errno, str(exc))
                except DmaFault as exc:
                    out = self.reject(Header.decode(buf[at:]), errno.EFAULT, str(exc))
                except Exception as exc:
                    out = self.internal_error(Header.decode(buf[at:]), exc)
                return None if out is None else out.data
        out = self.handle(Header.decode(buf[at:]),
                          bytes(buf[at + p.HEADER_SIZE:at + max(size, p.HEADER_SIZE)]), [])
        return None if out is None else out.data

    def reject(self, hdr: Header, err: int, why: str) -> Reply | None:
        """A refused message: counted, logged (rate-limited by kind), answered with *err*
        unless it takes no reply."""
        self.counters["errors"] += 1
        name = hdr.command_name().partition("(")[0]     # one kind for all unknown commands
        self.refusals(f"{name}:{errno.errorcode.get(err, err)}", logging.WARNING,
                      "%s id=%d rejected (%s): %s", hdr.command_name(), hdr.msg_id,
                      errno.errorcode.get(err, err), why)
        if hdr.no_reply or hdr.is_reply:
            return None
        return Reply(p.error_reply(hdr, err))

    def internal_error(self, hdr: Header, exc: Exception) -> Reply | None:
        """Last resort for one message: what its handler raised that no check foresaw.
        A message that expects a reply gets EIO (spec "Error Handling"); the session
        goes on.  Logged with its traceback, rate-limited by kind."""
        self.counters["errors"] += 1
        self.counters["internal_errors"] += 1
        self.internal(f"{hdr.command_name()}:{type(exc).__name__}", logging.ERROR,
                      "%s id=%d: internal error, answered EIO: %r", hdr.command_name(),
                      hdr.msg_id, exc, exc_info=exc)
        return None if hdr.no_reply else Reply(p.error_reply(hdr, errno.EIO))

    def stray_reply(self, hdr: Header) -> None:
        """A reply to no request of ours: counted and logged (rate-limited)."""
        self.counters["errors"] += 1
        self.refusals("reply:unexpected", logging.WARNING, "unexpected reply id=%d to %s",
                      hdr.msg_id, hdr.command_name())

    # -- server -> client DMA (spec "VFIO_USER_DMA_READ/WRITE"), chunked by the client's
    #    max_data_xfer_size; *request* is the transport's round trip ------------------------
    def dma_read(self, request: Request, address: int, count: int) -> bytes:
        out = bytearray()
        while count:
            n = min(count, self.client_max_xfer)
            _, payload = request(Command.DMA_READ, p.encode_dma_rw(address, n))
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

    def dma_write(self, request: Request, address: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            chunk = data[pos:pos + self.client_max_xfer]
            request(Command.DMA_WRITE, p.encode_dma_rw(address + pos, len(chunk), chunk))
            pos += len(chunk)

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
        self.ops.dma_map(m.address, m.size, m.flags, m.offset, fd)
        return b""

    def _dma_unmap(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        u = p.DmaUnmap.decode(payload)
        self.ops.dma_unmap(u.address, u.size)
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
        self.ops.set_irqs(p.IrqSet.decode(payload), fds)
        return b""

    def _region_read(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        a = p.RegionAccess.decode(payload, with_data=False)
        data = self.ops.region_read(a.region, a.offset, a.count)
        return p.RegionAccess(a.offset, a.region, a.count, data).encode()

    def _region_write(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        a = p.RegionAccess.decode(payload, with_data=True)
        self.ops.region_write(a.region, a.offset, a.data)
        return p.RegionAccess(a.offset, a.region, a.count).encode()

    def _reset(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes:
        if payload:
            raise ProtocolError(errno.EINVAL, "DEVICE_RESET takes no payload")
        self.ops.reset("client_reset")
        return b""

    HANDLERS: dict[int, Callable[[Session, Header, bytes, list[int]], HandlerResult]] = {
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
