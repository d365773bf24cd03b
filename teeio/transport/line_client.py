"""The JSON-lines client side: a connection that sends request bytes and reads one reply
line, and :class:`LineClient`, the client of the ``{"op", "args"}`` →
``{"ok", "result" | "error"}`` protocols (host access, the TSM's control socket).
"""

from __future__ import annotations

import json
import socket
from typing import Any, Self

__all__ = ["LineClient", "LineConnection"]


class LineConnection:
    """A connected UNIX stream socket carrying one JSON object per line."""

    def __init__(self, path: str, timeout: float, max_line: int) -> None:
        self.max_line = max_line
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._rfile = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_line(self) -> bytes:
        """The next line (at most ``max_line`` + 1 bytes); ``b""`` once the peer closed."""
        return self._rfile.readline(self.max_line + 1)

    def close(self) -> None:
        self._rfile.close()
        self.sock.close()


class LineClient:
    """The client side of the ``{"op", "args"}`` → ``{"ok", "result" | "error"}``
    protocols (host access, the TSM's control socket).  Subclasses name the peer for
    messages and give their protocol's error type (:meth:`error`)."""

    peer = "the server"
    max_reply = 64 * 1024

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.conn = LineConnection(path, timeout, self.max_reply)
        self.sock = self.conn.sock

    def error(self, code: str, message: str) -> Exception:
        """The protocol's exception for an error reply (or a malformed one)."""
        raise NotImplementedError

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> dict[str, Any]:
        """Send *data* as it is (tests: malformed requests); the reply object."""
        self.conn.send(data)
        line = self.conn.recv_line()
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
