"""The TSM's GHCx server for one VM (docs/ghcx.md): the UNIX socket QEMU's virtio-serial
chardev connects to, relaying the guest's port ``org.teeio.ghcx.0``.

Transport and dispatch around the sans-IO :class:`teeio.ghcx.TsmChannel`; what goes where,
and why the channel outlives QEMU's connections: docs/tdisp-and-tsm.md, "The TSM's end".
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from teeio.ghcx import Cached, FrameDecoder, GhcxReject, Reply, Request, TsmChannel
from teeio.transport import listen_private

log = logging.getLogger(__name__)

#: How long a partial frame may wait for the rest before it is discarded (a forged length
#: must not stall the stream until MAX_BODY more bytes arrive).
PARTIAL_FRAME_TIMEOUT = 10.0


class GhcxFailure(Exception):
    """A request the TSM answers with an error response (docs/ghcx.md codes)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


Handler = Callable[[str, str, dict[str, Any]], dict[str, Any]]


class GhcxServer:
    def __init__(self, vm_id: str, path: str, secret: bytes, boot_id: bytes,
                 handler: Handler) -> None:
        self.vm_id = vm_id
        self.path = path
        self.channel = TsmChannel(secret, vm_id, boot_id)
        self.handler = handler
        self.counters: Counter[str] = Counter()
        self.log = log.getChild(vm_id)
        self._stop = threading.Event()
        self._conn: socket.socket | None = None
        self._conn_lock = threading.Lock()
        self._serve_lock = threading.Lock()     # one connection served at a time
        # 0600 from the start; a socket left behind is replaced, never another file.
        self.listener = listen_private(path, 2)
        self._thread = threading.Thread(target=self._accept_loop, name=f"ghcx-{vm_id}",
                                        daemon=True)

    #: when the last connection closed (UNIX time), None while one is open or before any
    closed_at: float | None = None

    def __repr__(self) -> str:      # no secret, no keys
        return f"GhcxServer({self.vm_id!r}, {self.path!r})"

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def status(self) -> dict[str, Any]:
        """``session``: ``open`` (handshake done, its connection up), ``closed`` (its
        connection closed: the relay or the VM went away), or ``none`` (no handshake)."""
        connected, established = self.connected, self.channel.established
        session = ("open" if connected and established else
                   "closed" if established or self.closed_at is not None else "none")
        return {"connected": connected, "established": connected and established,
                "session": session, "closed_at": self.closed_at,
                "counters": dict(sorted(self.counters.items())),
                "rejected": {k: v for k, v in sorted(self.channel.counters.items()) if v}}

    def start(self) -> GhcxServer:
        self._thread.start()
        self.log.info("GHCx for VM %s listening on %s (boot id %s)", self.vm_id, self.path,
                      self.channel.boot_id.hex())
        return self

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                self.log.exception("GHCx accept failed")
                return
            self.counters["connections"] += 1
            with self._conn_lock:           # the newest connection wins
                old, self._conn = self._conn, conn
                self.closed_at = None
            if old is not None:
                self.log.info("new GHCx connection replaces the previous one")
                with contextlib.suppress(OSError):
                    old.shutdown(socket.SHUT_RDWR)
            threading.Thread(target=self._serve, args=(conn,), name=f"ghcx-{self.vm_id}-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = FrameDecoder()
        with self._serve_lock:
            self.log.info("GHCx connection for VM %s", self.vm_id)
            conn.settimeout(PARTIAL_FRAME_TIMEOUT)
            try:
                while not self._stop.is_set():
                    try:
                        data = conn.recv(1 << 16)
                    except TimeoutError:
                        if decoder.pending:
                            n = decoder.discard_partial()
                            self.counters["partial_frames_discarded"] += 1
                            self.log.warning("discarded a partial frame of %d bytes", n)
                        continue
                    if not data:
                        break
                    dropped = decoder.dropped_bytes
                    bodies = decoder.feed(data)
                    if decoder.dropped_bytes != dropped:
                        self.counters["bytes_dropped"] += decoder.dropped_bytes - dropped
                        self.log.warning("dropped %d bytes of garbage (resynchronised)",
                                         decoder.dropped_bytes - dropped)
                    for body in bodies:
                        try:
                            out = self.frame(body)
                        except Exception:
                            # a bug, not the relay's fault: logged with its traceback the
                            # first time, counted, and the frame dropped; serving goes on
                            self.counters["unforeseen_errors"] += 1
                            if self.counters["unforeseen_errors"] == 1:
                                self.log.exception("unforeseen error on a GHCx frame: dropped")
                            continue
                        if out:
                            conn.sendall(out)
            except OSError as exc:
                self.log.info("GHCx connection ended: %s", exc)
            finally:
                with self._conn_lock:
                    if self._conn is conn:
                        self._conn = None
                        self.closed_at = time.time()
                conn.close()
                self.log.info("GHCx connection for VM %s closed", self.vm_id)

    def frame(self, body: bytes) -> bytes:
        """One frame body in, the frame to send back (b"" for none)."""
        self.counters["frames_in"] += 1
        try:
            incoming = self.channel.receive(body)
        except GhcxReject as exc:
            self.counters[f"rejected_{exc.reason}"] += 1
            return b""
        if isinstance(incoming, Reply):
            self.counters["handshake_replies"] += 1
            return incoming.frame
        if isinstance(incoming, Cached):
            self.counters["cached_responses"] += 1
            return incoming.frame
        assert isinstance(incoming, Request)
        return self._request(incoming)

    def _request(self, req: Request) -> bytes:
        name = req.mtype.name
        self.counters["requests"] += 1
        try:
            result = self.handler(self.vm_id, name, req.payload)
        except GhcxFailure as exc:
            self.counters["errors"] += 1
            self.counters[f"error_{exc.code}"] += 1
            self.log.warning("%s (request %d) refused: %s: %s", name, req.request_id,
                             exc.code, exc.message)
            return self._respond(req, None, exc.code, exc.message)
        except Exception:
            self.counters["errors"] += 1
            self.counters["error_internal"] += 1
            self.log.exception("%s (request %d) failed", name, req.request_id)
            return self._respond(req, None, "internal", "the TSM failed to serve the request")
        self.log.info("%s (request %d): ok", name, req.request_id)
        return self._respond(req, result)

    def _respond(self, req: Request, payload: dict[str, Any] | None, error: str | None = None,
                 message: str = "") -> bytes:
        try:
            if error is not None:
                return self.channel.respond(req, error=error, message=message)
            return self.channel.respond(req, payload)
        except GhcxReject as exc:
            self.counters[f"respond_{exc.reason}"] += 1
            self.log.warning("cannot answer %s: %s", req.mtype.name, exc)
            if exc.reason == "oversized" and error is None:
                return self._respond(req, None, "internal", "response too large")
            return b""
        except Exception:
            # e.g. a value that is not JSON: answer `internal`, or the request id would stay
            # "still being served" and every retry of it be refused as a replay
            self.counters["respond_failed"] += 1
            self.log.exception("cannot seal the response to %s (request %d)", req.mtype.name,
                               req.request_id)
            if error != "internal":
                return self._respond(req, None, "internal", "the TSM could not encode "
                                                            "its response")
            return b""


__all__ = ["GhcxFailure", "GhcxServer", "Handler"]
