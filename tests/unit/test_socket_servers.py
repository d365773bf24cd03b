"""The device server's line servers: a path that is not a socket is never deleted; silent
clients cannot hold the slots (platform: an authentication deadline; host access: an idle
timeout)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from teeio.platform_channel import PlatformClient
from vfio_user_dev import host_access, platform_ctl
from vfio_user_dev.host_access import HostAccessClient, HostAccessServer
from vfio_user_dev.platform import Platform
from vfio_user_dev.platform_ctl import PlatformControlServer


def test_a_regular_file_at_the_socket_path_is_not_deleted(tmp_path: Path,
                                                          machine: Platform) -> None:
    f = tmp_path / "precious.txt"
    f.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        HostAccessServer(str(f), machine)
    with pytest.raises(OSError, match="not a socket"):
        PlatformControlServer(str(f), b"t" * 32, machine.root_port, machine.link)
    assert f.read_text() == "keep me"


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


def test_platform_connection_must_authenticate_in_time(tmp_path: Path, machine: Platform,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform_ctl, "AUTH_DEADLINE", 0.3)
    token = b"k" * 32
    srv = PlatformControlServer(str(tmp_path / "p.sock"), token, machine.root_port,
                                machine.link).start()
    try:
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        squatter.connect(str(tmp_path / "p.sock"))
        assert _closed_within(squatter, 5.0)        # dropped after the deadline
        squatter.close()
        with PlatformClient(str(tmp_path / "p.sock"), token) as c:
            c.call("status")
            time.sleep(0.6)                          # authenticated: no deadline
            assert c.call("status")["server"]["connections"] == 2
    finally:
        srv.close()


def test_host_access_idle_connection_is_closed(tmp_path: Path, machine: Platform,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_access, "IDLE_TIMEOUT", 0.3)
    srv = HostAccessServer(str(tmp_path / "h.sock"), machine).start()
    try:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(str(tmp_path / "h.sock"))
        assert _closed_within(idle, 5.0)
        idle.close()
    finally:
        srv.close()


def test_an_unforeseen_error_closes_only_that_connection(tmp_path: Path, machine: Platform,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A bug answering one line (not the peer's fault) closes that connection, is
    counted, and the server serves the next client."""
    srv = HostAccessServer(str(tmp_path / "h.sock"), machine).start()
    try:
        real = HostAccessServer.answer
        calls = {"n": 0}

        def flaky(self: HostAccessServer, state: Any, conn: socket.socket,
                  line: bytes) -> dict[str, Any]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug")
            return real(self, state, conn, line)

        monkeypatch.setattr(HostAccessServer, "answer", flaky)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(tmp_path / "h.sock"))
        s.sendall(b'{"op": "stats"}\n')
        s.settimeout(5)
        assert s.recv(100) == b""                      # closed, no answer
        s.close()
        with HostAccessClient(str(tmp_path / "h.sock")) as c:
            assert c.request("stats")["ok"]
        assert srv.unforeseen == 1
    finally:
        srv.close()
