"""The daemon's live link to one device: DOE connection, SPDM session, IDE stream, platform.

One lock serialises every SPDM and platform-socket use; HEARTBEAT every HeartbeatPeriod / 2
(DSP0274 §10.17).  How connect runs and why: docs/tdisp-and-tsm.md, "A device's live link".
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from teeio.ide_km import IdeKmError
from teeio.platform_channel import PlatformClient, PlatformCtlError, StreamState, read_credential
from teeio.spdm import Requester, RequesterError
from teeio.tdisp.codec import function_id
from teeio.tdisp.defs import LockInterfaceFlags
from tsm import attest, ide
from tsm.attest import Attestation, AttestError, AttestOptions
from tsm.doe_client import DoeClient, DoeTransportError
from tsm.tdisp import TdispClient, TdispClientError

log = logging.getLogger(__name__)

#: Everything that can go wrong talking to a device or its platform socket.
LINK_ERRORS = (AttestError, RequesterError, DoeTransportError, ide.IdeError, IdeKmError,
               TdispClientError, PlatformCtlError, OSError, ValueError)


class DeviceError(Exception):
    """A device operation failed; the message is the one-line reason."""


@dataclass(frozen=True)
class DeviceConfig:
    """How to reach and check one device (journaled as the ``device`` record: paths only)."""

    name: str
    trust_anchor: str
    platform_socket: str
    platform_credential: str
    doe_socket: str | None = None
    doe_tcp_port: int | None = None
    host: str = "127.0.0.1"
    reference_values: str | None = None
    stream_id: int = ide.DEFAULT_STREAM_ID
    block: int = 0

    def as_record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["device"] = rec.pop("name")
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> DeviceConfig:
        port = rec.get("doe_tcp_port")
        return cls(name=str(rec["device"]), trust_anchor=str(rec["trust_anchor"]),
                   platform_socket=str(rec["platform_socket"]),
                   platform_credential=str(rec["platform_credential"]),
                   doe_socket=rec.get("doe_socket"),
                   doe_tcp_port=int(port) if port is not None else None,
                   host=str(rec.get("host") or "127.0.0.1"),
                   reference_values=rec.get("reference_values"),
                   stream_id=int(rec.get("stream_id", ide.DEFAULT_STREAM_ID)),
                   block=int(rec.get("block", 0)))

    def where(self) -> str:
        return (f"unix:{self.doe_socket}" if self.doe_socket is not None
                else f"tcp:{self.host}:{self.doe_tcp_port}")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class DeviceLink:
    """The connection state of one device.  Build it, :meth:`open_platform`, then
    :meth:`connect`; :meth:`close` undoes both."""

    def __init__(self, config: DeviceConfig,
                 on_session_lost: Callable[[DeviceLink, str], None] | None = None,
                 heartbeat_interval: float | None = None,
                 debug: attest.DoeDebug | None = None) -> None:
        self.config = config
        self.heartbeat_interval = heartbeat_interval
        self.debug = debug
        self.lock = threading.RLock()
        self.log = log.getChild(config.name)
        self.on_session_lost = on_session_lost
        self.platform: PlatformClient | None = None
        self.doe: DoeClient | None = None
        self.requester: Requester | None = None
        self.session_id: int | None = None
        self.heartbeat_period = 0
        self.heartbeats = 0
        self.stream: ide.SelectiveStream | None = None
        self.requester_id: int | None = None
        self.cert_chain = b""
        self.tdisp: TdispClient | None = None
        self.lock_flags = LockInterfaceFlags(0)
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        sid = f"0x{self.session_id:08x}" if self.session_id is not None else None
        return f"DeviceLink({self.config.name!r}, session={sid})"

    @property
    def session_up(self) -> bool:
        # read once each: the status answers without the device lock
        req, sid = self.requester, self.session_id
        return req is not None and sid is not None and sid in req.sessions

    # -- the platform socket ------------------------------------------------------------
    def open_platform(self) -> PlatformClient:
        with self.lock:
            if self.platform is None:
                path = Path(self.config.platform_credential)
                try:
                    token = read_credential(path)
                except (OSError, ValueError) as exc:
                    raise DeviceError(f"platform credential {path}: {one_line(exc)}") from None
                try:
                    self.platform = PlatformClient(self.config.platform_socket, token)
                except (OSError, PlatformCtlError) as exc:
                    raise DeviceError(f"platform socket {self.config.platform_socket}: "
                                      f"cannot connect: {one_line(exc)}") from None
            return self.platform

    def platform_call(self, op: str, **args: Any) -> dict[str, Any]:
        """One platform operation; raises PlatformCtlError (its code) or DeviceError."""
        with self.lock:
            rp = self.open_platform()
            try:
                return rp.call(op, **args)
            except (OSError, ValueError) as exc:
                self.platform = None
                with contextlib.suppress(OSError):
                    rp.close()
                raise DeviceError(f"platform socket: {one_line(exc)}") from None

    # -- SPDM, IDE, TDISP ---------------------------------------------------------------
    def connect(self) -> None:
        """Attest, open the session, set the IDE stream up, learn TDISP's capabilities.
        On failure everything opened is closed again and DeviceError raised."""
        cfg = self.config
        with self.lock:
            if self.session_up:
                raise DeviceError(f"device {cfg.name} is already connected")
            opts = AttestOptions(trust_anchor=Path(cfg.trust_anchor),
                                 doe_socket=cfg.doe_socket, doe_tcp_port=cfg.doe_tcp_port,
                                 host=cfg.host, session=True, debug=self.debug,
                                 reference_values=(Path(cfg.reference_values)
                                                   if cfg.reference_values else None))
            run = Attestation(out=lambda line: self.log.info("%s", line))
            try:
                rp = self.open_platform()
                anchors = attest.load_anchors(opts.trust_anchor)
                refs = (attest.load_reference_values(opts.reference_values)
                        if opts.reference_values is not None else None)
                self.doe, where = attest.connect(opts)
                req, _blocks = attest.authenticate(opts, run, self.doe, where, anchors, refs)
                self.requester = req
                self.cert_chain = req.cert_chains[0]
                sid = req.start_session(0)
                self.session_id = sid
                self.heartbeat_period = req.sessions[sid].heartbeat_period
                self.log.info("SPDM session 0x%08x established (HeartbeatPeriod %d s)", sid,
                              self.heartbeat_period)
                self.stream = ide.SelectiveStream(rp, ide.ide_client(req, sid), cfg.stream_id,
                                                  cfg.block, run.out)
                self.stream.setup()
                assert self.stream.device_rid is not None
                self.requester_id = self.stream.device_rid
                self.tdisp = TdispClient(req, sid, function_id(self.requester_id))
                self.tdisp.get_version()
                caps = self.tdisp.get_capabilities()
                self.lock_flags = LockInterfaceFlags(caps.lock_interface_flags_supported)
            except LINK_ERRORS as exc:
                self._drop()
                raise DeviceError(f"connect {cfg.name}: {one_line(exc)}") from None
            except DeviceError:
                self._drop()
                raise
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        interval = (self.heartbeat_interval if self.heartbeat_interval is not None
                    else self.heartbeat_period / 2)
        if self.heartbeat_period <= 0 or interval <= 0:
            return
        self._hb_stop = threading.Event()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop,
                                           args=(self._hb_stop, max(interval, 0.1)),
                                           name=f"heartbeat-{self.config.name}", daemon=True)
        self._hb_thread.start()

    def _heartbeat_loop(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            with self.lock:
                if stop.is_set() or not self.session_up:
                    return
                assert self.requester is not None and self.session_id is not None
                try:
                    self.requester.heartbeat(self.session_id)
                    self.heartbeats += 1
                    continue
                except LINK_ERRORS as exc:
                    reason = f"SPDM heartbeat failed: {one_line(exc)}"
                    self.log.error("%s", reason)
                    self._drop()
            # Outside the device lock: the daemon takes its own lock first, then this one.
            if self.on_session_lost is not None:
                self.on_session_lost(self, reason)
            return

    def tdisp_client(self) -> TdispClient:
        if not self.session_up or self.tdisp is None:
            raise DeviceError(f"device {self.config.name} has no SPDM session")
        return self.tdisp

    def stream_state(self) -> StreamState:
        """The IDE stream as both ends say now: Secure only if the device (IDE_KM QUERY
        in the session) and the root port (platform socket) both say Secure."""
        with self.lock:
            if not self.session_up or self.stream is None:
                return StreamState.INSECURE
            try:
                st = self.stream.status(True)
            except LINK_ERRORS as exc:
                self.log.warning("IDE stream status: %s", one_line(exc))
                return StreamState.INSECURE
        rp = st.get("root_port") or {}
        secure = (st["device"]["state"] == StreamState.SECURE
                  and rp.get("state") == StreamState.SECURE)
        return StreamState.SECURE if secure else StreamState.INSECURE

    def ensure_stream(self) -> bool:
        """Before a LOCK: the stream must be Secure at both ends.  A reset of the device
        (the VMM resets it when the VM starts) invalidates its IDE keys (PCIe 6.x §6.33.6),
        so the stream is set up again, with fresh keys, in this same session -- LOCK needs
        keys programmed through the session that carries it (§11.3.6).  Returns True if it
        had to."""
        if self.stream_state() == StreamState.SECURE:
            return False
        with self.lock:
            if self.stream is None:
                raise DeviceError(f"device {self.config.name} has no IDE stream")
            self.log.warning("IDE stream %d is not Secure: setting it up again (fresh keys)",
                             self.config.stream_id)
            try:
                self.stream.setup()
            except LINK_ERRORS as exc:
                raise DeviceError(f"IDE stream re-establishment: {one_line(exc)}") from None
        return True

    def disconnect(self) -> None:
        """Stream teardown and END_SESSION (best effort, each step logged), then close."""
        with self.lock:
            self._hb_stop.set()
            if self.session_up and self.stream is not None:
                try:
                    self.stream.teardown()
                except LINK_ERRORS as exc:
                    self.log.warning("IDE stream teardown: %s", one_line(exc))
            if self.session_up:
                assert self.requester is not None and self.session_id is not None
                try:
                    self.requester.end_session(self.session_id)
                    self.log.info("END_SESSION 0x%08x acknowledged", self.session_id)
                except LINK_ERRORS as exc:
                    self.log.warning("END_SESSION: %s", one_line(exc))
            self._drop()

    def _drop(self) -> None:
        """Forget the session and close the DOE connection (CONTINUE: the device keeps its
        state for the next requester, whose GET_VERSION ends any session left)."""
        self._hb_stop.set()
        if self.doe is not None:
            with contextlib.suppress(DoeTransportError, OSError):
                self.doe.end_session()
            self.doe.close()
        self.doe = None
        self.requester = None
        self.session_id = None
        self.tdisp = None
        if self.stream is not None:
            self.stream.km = None

    def close(self) -> None:
        with self.lock:
            self._drop()
            if self.platform is not None:
                with contextlib.suppress(OSError):
                    self.platform.close()
                self.platform = None


__all__ = ["LINK_ERRORS", "DeviceConfig", "DeviceError", "DeviceLink", "one_line"]
