"""The device server's JSON-lines sockets: one listener, a thread per connection.

Shared by the platform control socket (:mod:`vfio_user_dev.platform_ctl`), the host
access socket (:mod:`vfio_user_dev.host_access`) and the TSM's control socket
(:mod:`tsm.ctl`): a 0600 UNIX socket (a stale socket at
the path is replaced, anything else refused), at most *max_connections* served at once
(more are closed at once), one request line in and one reply line out, a line longer than
*max_line* skipped to its end and answered by the protocol's own error
(:meth:`LineServer.refuse` may answer a refused one first), and the
connection kept serving after any error.  What a connection starts with (a hello, a
timeout), how a line is answered and how a reply is encoded are the protocol's
(:meth:`LineServer.opened`, :meth:`LineServer.answer`, :meth:`LineServer.too_long`,
:meth:`LineServer.encode`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from typing import Any, Generic, Self, TypeVar

from vfio_user_dev.server import remove_stale_socket

log = logging.getLogger(__name__)

S = TypeVar("S")     # what the protocol keeps per connection


class LineServer(Generic[S]):
    """Subclasses set ``counters`` (with a ``"connections"`` entry) before calling
    ``__init__`` and implement the four hooks."""

    #: Names the socket in logs and its threads.
    name = "line server"
    thread_name = "line-server"
    #: Whether a blank line is ignored (else it is answered like any other line).
    skip_blank_lines = False
    counters: dict[str, int]

    def __init__(self, path: str, max_line: int, max_connections: int) -> None:
        self.path = path
        self.max_line = max_line
        self.max_connections = max_connections
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        remove_stale_socket(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)          # 0600 from the start, not only after the chmod
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.listener.listen(max_connections)
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
            with conn:
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
                            reply = self.answer(state, conn, line)
                        conn.sendall(self.encode(reply) + b"\n")
        except TimeoutError:
            log.info("%s connection timed out: closed", self.name)
        except OSError as exc:
            log.info("%s connection ended: %s", self.name, exc)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)




class LineClient:
    """The client side of the ``{"op", "args"}`` → ``{"ok", "result" | "error"}``
    protocols served here (host access, the TSM's control socket).  Subclasses name the
    peer for messages and give their protocol's error type (:meth:`error`)."""

    peer = "the server"
    max_reply = 64 * 1024

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._rfile = self.sock.makefile("rb")

    def error(self, code: str, message: str) -> Exception:
        """The protocol's exception for an error reply (or a malformed one)."""
        raise NotImplementedError

    def close(self) -> None:
        self._rfile.close()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> dict[str, Any]:
        """Send *data* as it is (tests: malformed requests); the reply object."""
        self.sock.sendall(data)
        line = self._rfile.readline(self.max_reply + 1)
        if not line:
            raise ConnectionError(f"{self.peer} closed the connection")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise self.error("malformed", f"{self.peer}'s reply is not an object")
        return reply

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """The whole reply to *op*."""
        return self.send_raw(json.dumps({"op": op, "args": args}).encode() + b"\n")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """The result of *op*; the protocol's error for an error reply."""
        reply = self.request(op, **args)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise self.error(str(err.get("code", "malformed")), str(err.get("message", "")))
        result = reply.get("result")
        if not isinstance(result, dict):
            raise self.error("malformed", f"{self.peer}'s reply has no result object")
        return result


__all__ = ["LineClient", "LineServer"]
