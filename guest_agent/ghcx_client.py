"""The guest's GHCx transport (docs/ghcx.md): the virtio-serial port, the fw_cfg launch
secret, calls with retries.

The channel state is :class:`teeio.ghcx.GuestChannel`; how the port and the secret are found
and when a call is retried: docs/tdisp-and-tsm.md, "The guest's end".  Stdlib and
cryptography only (it runs from the read-only project share in the guest).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from guest_agent.pci import AgentError
from teeio.ghcx import (
    FW_CFG_SECRET,
    FW_CFG_VM_ID,
    MAX_BODY,
    PORT_NAME,
    SECRET_SIZE,
    FrameDecoder,
    GhcxReject,
    GuestChannel,
    MessageError,
    MsgType,
    RequestBody,
    vm_id_bytes,
)
from teeio.ghcx.body import Body

log = logging.getLogger(__name__)

FW_CFG_ROOT = Path("/sys/firmware/qemu_fw_cfg")
VIRTIO_PORTS = Path("/sys/class/virtio-ports")
DEV = Path("/dev")
CALL_TIMEOUT = 10.0        # seconds for one attempt; the TSM may run SPDM with the device
CALL_RETRIES = 3
HANDSHAKE_TIMEOUT = 5.0
HUP_WAIT = 0.05            # a virtio port whose host side is not connected reads EOF


class GhcxError(AgentError):
    """Base of the GHCx client's errors."""


class GhcxSetupError(GhcxError):
    """No port, no fw_cfg, or a bad launch secret / VM id."""


class GhcxTransportError(GhcxError):
    """The transport is gone (a socket peer closed)."""


class GhcxCallError(GhcxError):
    """The TSM answered with an error response (docs/ghcx.md "Messages": ``code`` is one of
    bad_request, unknown_request, refused, state, mismatch, internal, device), or the call
    gave up (:class:`GhcxTimeout`)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"GHCx {code}: {message}")


class GhcxTimeout(GhcxCallError):
    """No valid answer after every retry."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class GhcxBadResponse(GhcxCallError):
    """A response whose payload is not its request's response body (docs/ghcx.md
    "Messages")."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_response", message)


class Caller(Protocol):
    """Anything that sends a request payload and returns the response payload."""

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None) -> dict[str, Any]: ...


R = TypeVar("R", bound=Body)


def ask(tsm: Caller, request: RequestBody[R]) -> R:
    """Send typed *request* through *tsm* and return its typed response.  Raises
    :class:`GhcxCallError` (an error response), :class:`GhcxTimeout` or
    :class:`GhcxBadResponse`."""
    payload = tsm.call(request.mtype, request.encode())
    try:
        return request.decode_response(payload)
    except MessageError as exc:
        raise GhcxBadResponse(str(exc)) from None


# -- transports --------------------------------------------------------------------------------

class Transport(Protocol):
    def read(self, timeout: float) -> bytes:
        """Some bytes, or b"" if none arrived within *timeout* seconds."""

    def write(self, data: bytes, timeout: float) -> None:
        """All of *data*; raises OSError (e.g. TimeoutError) if that is not possible."""


class FdTransport:
    """A file descriptor: the virtio-serial port in the guest (or any stream fd).

    Non-blocking with poll: a virtio port whose host side is not connected blocks writers
    and reads EOF (``drivers/char/virtio_console.c``), which here means "nothing yet"."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def _wait(self, event: int, timeout: float) -> int:
        p = select.poll()
        p.register(self.fd, event)
        events = p.poll(max(0, int(timeout * 1000)))
        return events[0][1] if events else 0

    def read(self, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        while (remaining := end - time.monotonic()) > 0:
            ev = self._wait(select.POLLIN, remaining)
            if not ev:
                return b""
            if ev & select.POLLIN:
                try:
                    data = os.read(self.fd, MAX_BODY)
                except (BlockingIOError, InterruptedError):
                    continue
                if data:
                    return data
            time.sleep(min(HUP_WAIT, max(0.0, end - time.monotonic())))
        return b""

    def write(self, data: bytes, timeout: float) -> None:
        end = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "GHCx port not writable")
            self._wait(select.POLLOUT, min(remaining, HUP_WAIT * 4))

    def close(self) -> None:
        os.close(self.fd)


class SocketTransport:
    """A connected stream socket (host-side tests, or a chardev socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, timeout: float) -> bytes:
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data = self.sock.recv(MAX_BODY)
        except TimeoutError:
            return b""
        if not data:
            raise GhcxTransportError("GHCx peer closed the socket")
        return data

    def write(self, data: bytes, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 1e-3))
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def as_transport(obj: int | socket.socket | Transport) -> Transport:
    """An fd → :class:`FdTransport`, a socket → :class:`SocketTransport`, else *obj*."""
    if isinstance(obj, int):
        return FdTransport(obj)
    if isinstance(obj, socket.socket):
        return SocketTransport(obj)
    return obj


# -- discovery in the guest ---------------------------------------------------------------------

def find_port(name: str = PORT_NAME, sys_root: Path = VIRTIO_PORTS,
              dev_root: Path = DEV) -> Path:
    """``/dev/vportNpM`` of the virtio-serial port named *name*."""
    seen = []
    if sys_root.is_dir():
        for entry in sorted(sys_root.iterdir()):
            try:
                port_name = (entry / "name").read_text().strip()
            except OSError:
                continue
            if port_name == name:
                return dev_root / entry.name
            seen.append(f"{entry.name}={port_name or '?'}")
    raise GhcxSetupError(f"no virtio-serial port named {name} in {sys_root} "
                         f"(ports: {', '.join(seen) or 'none'}); is the VM started with "
                         f"-device virtserialport,name={name}?")


def _modprobe(module: str) -> None:
    try:
        subprocess.run(["modprobe", module], check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("modprobe %s: %s", module, e)


def read_fw_cfg(name: str, root: Path = FW_CFG_ROOT,
                modprobe: Callable[[str], None] = _modprobe) -> bytes:
    """The contents of fw_cfg file *name* (docs/ghcx.md "Launch secret and VM id")."""
    by_name = root / "by_name"
    if not by_name.is_dir():
        modprobe("qemu_fw_cfg")
    if not by_name.is_dir():
        raise GhcxSetupError(f"{by_name} is missing even after 'modprobe qemu_fw_cfg': "
                             "no fw_cfg sysfs interface (CONFIG_FW_CFG_SYSFS) in this guest")
    path = by_name / name / "raw"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GhcxSetupError(f"fw_cfg entry {name} not found ({path}): is the VM started "
                             f"with -fw_cfg name={name},...?") from None


def read_launch_config(root: Path = FW_CFG_ROOT,
                       modprobe: Callable[[str], None] = _modprobe) -> tuple[bytes, str]:
    """(secret, VM id) from fw_cfg; the secret is never logged."""
    secret = read_fw_cfg(FW_CFG_SECRET, root, modprobe)
    if len(secret) != SECRET_SIZE:
        raise GhcxSetupError(f"fw_cfg {FW_CFG_SECRET}: {len(secret)} bytes, "
                             f"expected {SECRET_SIZE}")
    raw = read_fw_cfg(FW_CFG_VM_ID, root, modprobe).rstrip(b"\0\r\n")
    try:
        vm_id = raw.decode("ascii")
        vm_id_bytes(vm_id)
    except (UnicodeDecodeError, ValueError) as e:
        raise GhcxSetupError(f"fw_cfg {FW_CFG_VM_ID}: bad VM id {raw!r}") from e
    return secret, vm_id


# -- the client ---------------------------------------------------------------------------------

class GhcxClient:
    """Calls to the TSM over one transport.  ``counters`` holds the channel's rejections by
    reason (docs/ghcx.md "Receiver rules"), the frame decoder's counts and the client's own
    (timeouts, retries, rehello, handshakes_ok, write_errors)."""

    def __init__(self, transport: int | socket.socket | Transport, secret: bytes, vm_id: str,
                 *, rng: Callable[[int], bytes] = os.urandom,
                 clock: Callable[[], float] = time.monotonic,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.transport = as_transport(transport)
        self.channel = GuestChannel(secret, vm_id, rng)
        self.vm_id = vm_id
        self.boot_id: bytes | None = None
        self.tsm_restarted = False
        self.handshake_timeout = handshake_timeout
        self._clock = clock
        self._decoder = FrameDecoder()
        self._bodies: collections.deque[bytes] = collections.deque()
        self._events: dict[str, int] = dict.fromkeys(
            ("timeouts", "retries", "rehello", "handshakes_ok", "write_errors"), 0)

    @classmethod
    def connect(cls, *, port_name: str = PORT_NAME, sys_root: Path = VIRTIO_PORTS,
                dev_root: Path = DEV, fw_cfg_root: Path = FW_CFG_ROOT,
                handshake: bool = True, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                handshake_retries: int = CALL_RETRIES) -> GhcxClient:
        """In the guest: read the launch secret and VM id, open the port, handshake
        (each attempt waits up to *handshake_timeout* to send HELLO and as long for the
        HELLO_ACK)."""
        secret, vm_id = read_launch_config(fw_cfg_root)
        path = find_port(port_name, sys_root, dev_root)
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        client = cls(FdTransport(fd), secret, vm_id, handshake_timeout=handshake_timeout)
        log.info("GHCx: %s on %s", vm_id, path)
        if handshake:
            try:
                client.handshake(retries=handshake_retries)
            except BaseException:
                client.close()          # the port's fd with it: nobody else holds it
                raise
        return client

    def close(self) -> None:
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> GhcxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def counters(self) -> dict[str, int]:
        return {**self.channel.counters, **self._decoder.counters,
                "dropped_bytes": self._decoder.dropped_bytes, **self._events}

    @property
    def established(self) -> bool:
        return self.channel.established

    # -- I/O helpers -------------------------------------------------------------------------

    def _send(self, frame: bytes, timeout: float) -> None:
        try:
            self.transport.write(frame, timeout)
        except OSError as e:        # e.g. the TSM end is not connected yet: retried later
            self._events["write_errors"] += 1
            log.warning("GHCx write failed: %s", e)

    def _next_body(self, deadline: float) -> bytes | None:
        while not self._bodies:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            data = self.transport.read(remaining)
            if data:
                self._bodies.extend(self._decoder.feed(data))
        return self._bodies.popleft()

    def _timed_out(self) -> None:
        self._events["timeouts"] += 1
        if self._decoder.discard_partial():
            log.info("GHCx: dropped a partial frame after a timeout")

    # -- handshake and calls -----------------------------------------------------------------

    def handshake(self, *, timeout: float | None = None, retries: int = CALL_RETRIES) -> bytes:
        """Run the handshake (docs/ghcx.md "Handshake"); returns the TSM boot id and sets
        ``tsm_restarted`` when it differs from the previous one."""
        timeout = self.handshake_timeout if timeout is None else timeout
        for _attempt in range(retries + 1):
            self._send(self.channel.hello(), timeout)
            deadline = self._clock() + timeout
            while (body := self._next_body(deadline)) is not None:
                try:
                    boot_id = self.channel.accept_hello_ack(body)
                except GhcxReject:
                    continue            # counted by the channel
                if self.boot_id is not None and boot_id != self.boot_id:
                    self.tsm_restarted = True
                    log.warning("GHCx: the TSM restarted (boot id %s -> %s)",
                                self.boot_id.hex(), boot_id.hex())
                self.boot_id = boot_id
                self._events["handshakes_ok"] += 1
                return boot_id
            self._timed_out()
        raise GhcxTimeout(f"no valid HELLO_ACK after {retries + 1} attempts")

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None, *,
             timeout: float = CALL_TIMEOUT, retries: int = CALL_RETRIES) -> dict[str, Any]:
        """Send request *mtype* and return the response payload.  Raises
        :class:`GhcxCallError` on an error response, :class:`GhcxTimeout` when every retry
        went unanswered."""
        if not self.channel.established:
            self.handshake()
        rid, frame = self.channel.request(mtype, {} if payload is None else payload)
        self._send(frame, timeout)
        deadline = self._clock() + timeout
        timeouts = rehellos = forged = 0
        while True:
            body = self._next_body(deadline)
            if body is None:
                self._timed_out()
                timeouts += 1
                if timeouts > retries:
                    raise GhcxTimeout(f"{mtype.name}: no valid response after "
                                      f"{retries + 1} attempts")
                if timeouts >= 2:       # a REHELLO may have been dropped
                    self.handshake()
                self._events["retries"] += 1
                self._send(self.channel.retry(rid), timeout)
                deadline = self._clock() + timeout
                continue
            try:
                result = self.channel.open(body)
            except GhcxReject as exc:   # counted and logged by the channel
                if exc.reason == "forged" and forged < retries:
                    # An altered frame in place of the response: ask again at once (the
                    # TSM answers a retried request id from its cache, docs/ghcx.md)
                    # instead of waiting out the timeout; bounded by *retries*.
                    forged += 1
                    self._events["retries"] += 1
                    self._send(self.channel.retry(rid), timeout)
                    deadline = self._clock() + timeout
                continue
            if result is MsgType.REHELLO:
                self._events["rehello"] += 1
                rehellos += 1
                if rehellos > retries:
                    raise GhcxTimeout(f"{mtype.name}: REHELLO {rehellos} times")
                self.handshake()
                self._send(self.channel.retry(rid), timeout)
                deadline = self._clock() + timeout
                continue
            assert not isinstance(result, MsgType)
            if result.error is not None:
                raise GhcxCallError(result.error, result.message)
            return result.payload
