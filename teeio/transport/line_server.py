"""The JSON-lines server: one listener, a thread per connection.

Used by the device server's platform control and host access sockets and by the TSM's
control socket: a 0600 UNIX socket (a stale socket at the path is replaced, anything else
refused), at most *max_connections* served at once (more are closed at once), one request
line in and one reply line out, a line longer than *max_line* skipped to its end and
answered by the protocol's own error (:meth:`LineServer.refuse` may answer a refused one
first), and the connection kept serving after any error.  What a connection starts with
(a hello, a timeout), how a line is answered and how a reply is encoded are the
protocol's (:meth:`LineServer.opened`, :meth:`LineServer.answer`,
:meth:`LineServer.too_long`, :meth:`LineServer.encode`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import Any, Generic, TypeVar

from teeio.transport.unix import listen_private

__all__ = ["LineServer"]

log = logging.getLogger(__name__)

S = TypeVar("S")     # what the protocol keeps per connection
#: how many unforeseen errors are logged with their traceback (the rest only counted)
UNFORESEEN_LOGGED = 3


class LineServer(Generic[S]):
    """Subclasses set ``counters`` (with a ``"connections"`` entry) before calling
    ``__init__`` and implement the four hooks."""

    #: Names the socket in logs and its threads.
    name = "line server"
    thread_name = "line-server"
    #: Whether a blank line is ignored (else it is answered like any other line).
    skip_blank_lines = False
    counters: dict[str, int]

    #: unforeseen exceptions while answering (each closed its connection)
    unforeseen = 0

    def __init__(self, path: str, max_line: int, max_connections: int) -> None:
        self.path = path
        self.max_line = max_line
        self.max_connections = max_connections
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.listener = listen_private(path, max_connections)
        self._thread = threading.Thread(target=self._accept_loop, name=self.thread_name,
                                        daemon=True)

    # -- the protocol's hooks -----------------------------------------------------------------
    def opened(self, conn: socket.socket) -> S:
        """A connection was accepted: set it up (timeout, hello); its per-connection state."""
        raise NotImplementedError

    def answer(self, state: S, conn: socket.socket, line: bytes) -> dict[str, Any]:
        """The reply to one request line (never raises)."""
        raise NotImplementedError

    def too_long(self, state: S) -> dict[str, Any]:
        """The reply to a line longer than ``max_line`` (already skipped)."""
        raise NotImplementedError

    def encode(self, reply: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def refuse(self, conn: socket.socket) -> None:
        """Every slot is taken: by default the connection is closed at once."""
        log.warning("%s: too many connections, refusing one", self.name)
        conn.close()

    # -- the socket ---------------------------------------------------------------------------
    def start(self) -> LineServer[S]:
        self._thread.start()
        log.info("%s socket listening on %s", self.name, self.path)
        return self

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._conns_lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with self._conns_lock:
                if len(self._conns) >= self.max_connections:
                    self.refuse(conn)
                    continue
                self._conns.add(conn)
            self.counters["connections"] += 1
            threading.Thread(target=self._serve, args=(conn,),
                             name=f"{self.thread_name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_lines(conn)
        finally:
            # The slot is free before the peer sees the close: a client that reconnects
            # the moment it is closed is never told that every slot is taken.
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _serve_lines(self, conn: socket.socket) -> None:
        try:
            state = self.opened(conn)
            with conn.makefile("rb") as rfile:
                while True:
                    line = rfile.readline(self.max_line + 1)
                    if not line:
                        return
                    if len(line) > self.max_line and not line.endswith(b"\n"):
                        while line and not line.endswith(b"\n"):   # skip the rest of it
                            line = rfile.readline(self.max_line)
                        reply = self.too_long(state)
                    elif self.skip_blank_lines and not line.strip():
                        continue
                    else:
                        try:
                            reply = self.answer(state, conn, line)
                        except Exception:
                            # a bug, not the peer's fault: logged (a few times, with
                            # the traceback), this connection closed, the server on
                            self.unforeseen += 1
                            if self.unforeseen <= UNFORESEEN_LOGGED:
                                log.exception("%s: unforeseen error answering a line; "
                                              "connection closed", self.name)
                            return
                    conn.sendall(self.encode(reply) + b"\n")
        except TimeoutError:
            log.info("%s connection timed out: closed", self.name)
        except OSError as exc:
            log.info("%s connection ended: %s", self.name, exc)
