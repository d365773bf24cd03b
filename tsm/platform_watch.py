"""The TSM's ear on a device's platform: the platform events, in order, as they happen.

One thread per connected device keeps its own authenticated connection to the device
server's platform control socket and long-polls ``events`` (``teeio/platform_channel.py``)
with the last ``seq`` it handed on, so every event reaches the daemon once, in order,
within milliseconds -- the way a host TSM hears IDE Fail Messages, AER/DPC, hot-plug and
reset notifications from real hardware.  A dropped stretch (``lost``) or a new ``boot``
of the platform's log (the device server restarted) is handed on as such: the daemon
must then re-read the truth instead of trusting the gap.  A connection that breaks is
opened again after :data:`RETRY` seconds, until :meth:`PlatformWatch.stop`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teeio.platform_channel import PlatformClient, PlatformCtlError, read_credential

log = logging.getLogger(__name__)

WAIT = 10.0          # seconds one long poll waits for an event
RETRY = 1.0          # seconds between attempts to (re)open the connection

#: (events, lost, boot_changed) -> None; called on the watch thread, in order.
Sink = Callable[[list[dict[str, Any]], bool, bool], None]


class PlatformWatch:
    def __init__(self, name: str, socket_path: str, credential: str, sink: Sink) -> None:
        self.name = name
        self.socket_path = socket_path
        self.credential = credential
        self.sink = sink
        self.boot: str | None = None
        self.last = 0
        self.delivered = 0
        self.connected = False
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._client: PlatformClient | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"platform-watch-{name}",
                                        daemon=True)

    def __repr__(self) -> str:
        return f"PlatformWatch({self.name!r}, last={self.last})"

    def start(self) -> PlatformWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            client = self._client
        if client is not None:
            with contextlib.suppress(OSError):     # wakes the long poll at once
                client.conn.sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "boot": self.boot, "last_seq": self.last,
                "events_handled": self.delivered, "last_error": self.last_error}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                client = PlatformClient(self.socket_path,
                                        read_credential(Path(self.credential)),
                                        timeout=WAIT + 10)
            except (OSError, PlatformCtlError, ValueError) as exc:
                self._failed(exc)
                continue
            with self._lock:
                self._client = client
            self.connected = True
            try:
                self._poll(client)
            except (OSError, PlatformCtlError, ValueError, KeyError, TypeError) as exc:
                self._failed(exc)
            finally:
                self.connected = False
                with self._lock:
                    self._client = None
                with contextlib.suppress(OSError):
                    client.close()

    def _failed(self, exc: BaseException) -> None:
        if self._stop.is_set():
            return
        text = f"{type(exc).__name__}: {exc}"
        if text != self.last_error:
            log.warning("device %s: platform events: %s (retrying every %g s)", self.name,
                        text, RETRY)
        self.last_error = text
        self._stop.wait(RETRY)

    def _poll(self, client: PlatformClient) -> None:
        while not self._stop.is_set():
            reply = client.call("events", since=self.last, wait=WAIT)
            boot = str(reply["boot"])
            events = list(reply["events"])
            lost = bool(reply["lost"])
            changed = self.boot is not None and boot != self.boot
            if changed:
                # A new device server: its numbering starts again; read it all.
                self.boot, self.last = boot, 0
                reply = client.call("events", since=0)
                events, lost = list(reply["events"]), bool(reply["lost"])
            self.boot = boot
            self.last_error = None
            if events or lost or changed:
                self.sink(events, lost, changed)
                self.delivered += len(events)
            if events:
                self.last = max(int(e["seq"]) for e in events)
            elif lost:
                self.last = int(reply["last"])
