"""tsm.ctl: the control socket (0600, JSON lines, every kind of bad input answered with a
clear error on a connection that stays usable), the CLI's one-line failures, the status
table; and tsm.ghcx_server: a GHCx server with a fake handler -- handshake, requests,
error responses, garbage resynchronised and forged frames counted while it keeps
serving, REHELLO for a session of another boot."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from teeio.ghcx import FrameDecoder, GuestChannel, MsgType, Response
from tsm.__main__ import main
from tsm.ctl import CtlClient, CtlError, CtlServer, format_status
from tsm.ghcx_server import GhcxFailure, GhcxServer

pytestmark = pytest.mark.timeout(30)


def dispatch(op: str, args: dict[str, Any]) -> dict[str, Any]:
    if op == "echo":
        return {"args": args}
    if op == "fail":
        raise CtlError("failed", "the device said no")
    if op == "bug":
        raise RuntimeError("oops")
    raise CtlError("unknown_op", f"no operation {op!r}")


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "ctl.sock")
    server = CtlServer(path, dispatch).start()
    yield path
    server.close()


def test_ctl_socket_errors_and_survival(ctl: str) -> None:
    assert os.stat(ctl).st_mode & 0o777 == 0o600
    with CtlClient(ctl) as c:
        for raw, code in ((b"not json\n", "malformed"), (b"[1]\n", "malformed"),
                          (b'{"op": 3}\n', "malformed"), (b'{"op": "x", "args": []}\n',
                                                          "malformed"),
                          (b"x" * 70000 + b"\n", "malformed")):
            reply = c.send_raw(raw)
            assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert c.call("echo", a=1) == {"args": {"a": 1}}
        with pytest.raises(CtlError, match="failed: the device said no"):
            c.call("fail")
        with pytest.raises(CtlError, match="internal: bug: RuntimeError: oops"):
            c.call("bug")
        with pytest.raises(CtlError, match="unknown_op"):
            c.call("nope")
        assert c.call("echo") == {"args": {}}             # still the same connection


def test_ctl_deep_nesting_idle_timeout_and_connection_bound(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    server = CtlServer(path, dispatch, idle_timeout=2.0, max_connections=2).start()
    try:
        with CtlClient(path) as c:
            for raw in (b"[" * 60000 + b"\n", b'{"op": ' + b"[" * 60000 + b"\n"):
                reply = c.send_raw(raw)                # RecursionError, not a dead socket
                assert reply["ok"] is False and reply["error"]["code"] == "malformed"
            assert c.call("echo", a=1) == {"args": {"a": 1}}
            # a silent client is closed after the idle timeout
            c.sock.settimeout(10)
            t0 = time.monotonic()
            assert c.sock.recv(1) == b""
            assert time.monotonic() - t0 < 8
        # at most 2 at once: the third is told "busy" and closed; a slot frees up again
        a, b = CtlClient(path), CtlClient(path)
        assert a.call("echo") == b.call("echo") == {"args": {}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as third:
            third.settimeout(5)
            third.connect(path)                        # told at once, then closed
            reply = json.loads(third.makefile("rb").readline())
            assert reply["error"]["code"] == "busy" and third.recv(1) == b""
        a.close()
        deadline = time.monotonic() + 5
        while True:                                    # the server sees a's end
            with CtlClient(path) as again:
                try:
                    assert again.call("echo") == {"args": {}}
                    break
                except (CtlError, ConnectionError):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        b.close()
        assert server.counters["busy"] >= 1
    finally:
        server.close()


def test_servers_replace_only_a_socket(tmp_path: Path) -> None:
    """A path that is not a socket is never deleted: one-line OSError."""
    victim = tmp_path / "important.txt"
    victim.write_text("keep me")
    with pytest.raises(OSError, match="exists and is not a socket"):
        CtlServer(str(victim), dispatch)
    with pytest.raises(OSError, match="exists and is not a socket"):
        GhcxServer("vm0", str(victim), SECRET, os.urandom(16), handler)
    assert victim.read_text() == "keep me"
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()                                          # left behind by a dead process
    CtlServer(str(stale), dispatch).close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    GhcxServer("vm0", str(stale), SECRET, os.urandom(16), handler).close()


def test_cli_failures_are_one_line(tmp_path: Path, ctl: str, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ctl", "--ctl-socket", str(tmp_path / "none.sock"), "status"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ctl status FAILED: control socket ")
    assert "is the daemon running?" in err[0]
    assert main(["ctl", "--ctl-socket", ctl, "stop", "--vm", "vm0"]) == 1
    assert capsys.readouterr().err == "ctl stop FAILED: no operation 'stop'\n"
    monkeypatch.delenv("TEEIO_TSM_CTL", raising=False)
    assert main(["status"]) == 1
    assert "give --ctl-socket or --state-dir" in capsys.readouterr().err


def test_status_table() -> None:
    doc = {"boot_id": "ab" * 16, "pid": 1, "state_dir": "/s", "counters": {"ghcx_state": 1},
           "devices": [{"name": "dev0", "doe": "unix:/d", "requester_id": "0x0100",
                        "session": {"id": "0x0001fffe", "heartbeat_period": 60,
                                    "heartbeats": 2},
                        "stream": {"id": 3, "state": "secure", "reason": None,
                                   "source": "device", "age_s": 0.25},
                        "vmm": {"connected": False, "at": 1.0, "reason": "closed"},
                        "last_error": None}],
           "tdis": [{"name": "dev0", "state": "ERROR", "lock_epoch": 3, "vm": "vm0",
                     "reason": "TSM restarted: SPDM session lost", "mmio_private": False,
                     "source": "platform", "age_s": 1.5}],
           "vms": [{"vm": "vm0", "device": "dev0", "ghcx_socket": "/g.sock",
                    "ghcx": {"connected": True, "established": True,
                             "counters": {"requests": 5, "errors": 1},
                             "rejected": {"forged": 2}},
                    "windows": [{"window_id": 4, "base": 0x1000, "size": 0x2000,
                                 "access": "rw"}]}]}
    text = format_status(doc)
    lines = text.splitlines()
    assert lines[0] == f"TSM boot id {'ab' * 16} (pid 1), state /s"
    assert any(line.split()[:5] == ["dev0", "ERROR", "platform", "1.5s", "3"] and
               line.endswith("TSM restarted: SPDM session lost") for line in lines)
    assert any(line.startswith("dev0") and "3 secure  device 0.2s  gone" in line
               for line in lines), text
    assert any("forged=2" in line and "4:0x1000+0x2000/rw" in line for line in lines)
    assert "counters: ghcx_state=1" in text


# -- the GHCx server --------------------------------------------------------------------------

SECRET = bytes(range(32))


def handler(vm: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    if op == "STATUS":
        return {"vm_id": vm, "echo": payload}
    if op == "TDI_LOCK":
        raise GhcxFailure("state", "not now")
    if op == "GET_EVIDENCE":
        return {"blob": b"bytes are not JSON"}
    raise ValueError("a bug in the handler")


class Peer:
    def __init__(self, path: str, secret: bytes = SECRET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.decoder = FrameDecoder()
        self.channel = GuestChannel(secret, "vm0")

    def body(self) -> bytes:
        while True:
            data = self.sock.recv(1 << 16)
            assert data
            bodies = self.decoder.feed(data)
            if bodies:
                assert len(bodies) == 1
                return bodies[0]

    def call(self, mtype: MsgType, payload: dict[str, Any]) -> Response | MsgType:
        self.sock.sendall(self.channel.request(mtype, payload)[1])
        return self.channel.open(self.body())


def test_ghcx_server(tmp_path: Path) -> None:
    path = str(tmp_path / "ghcx.sock")
    boot = os.urandom(16)
    server = GhcxServer("vm0", path, SECRET, boot, handler).start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert "000102" not in repr(server)
        g = Peer(path)
        g.sock.sendall(b"garbage!" + g.channel.hello())      # resynchronised
        assert g.channel.accept_hello_ack(g.body()) == boot
        rsp = g.call(MsgType.STATUS, {"x": 1})
        assert isinstance(rsp, Response) and rsp.payload == {"vm_id": "vm0", "echo": {"x": 1}}
        rsp = g.call(MsgType.TDI_LOCK, {})
        assert isinstance(rsp, Response) and (rsp.error, rsp.message) == ("state", "not now")
        rsp = g.call(MsgType.TDI_INFO, {})
        assert isinstance(rsp, Response) and rsp.error == "internal"
        # a response that cannot be sealed (not JSON) is answered `internal`, and its
        # request id is not left "being served" (nor the connection dead)
        rsp = g.call(MsgType.GET_EVIDENCE, {})
        assert isinstance(rsp, Response) and rsp.error == "internal"
        # a forged frame (a relay without the secret) is dropped, counted; serving goes on
        _rid, frame = g.channel.request(MsgType.STATUS, {})
        g.sock.sendall(frame[:-1] + bytes([frame[-1] ^ 1]))
        rsp = g.call(MsgType.STATUS, {})
        assert isinstance(rsp, Response) and rsp.error is None
        st = server.status()
        assert st["rejected"] == {"forged": 1} and st["counters"]["bytes_dropped"] == 8
        assert st["counters"]["requests"] == 5 and st["counters"]["error_state"] == 1
        assert st["counters"]["respond_failed"] == 1
        assert st["connected"] and st["established"]
    finally:
        server.close()
    # another boot of the TSM: the old session is unknown -> REHELLO, then a new handshake
    boot2 = os.urandom(16)
    server = GhcxServer("vm0", path, SECRET, boot2, handler).start()
    try:
        g.sock.close()
        old = g.channel
        g = Peer(path)
        g.channel = old
        assert g.call(MsgType.STATUS, {}) is MsgType.REHELLO
        g.sock.sendall(g.channel.hello())
        assert g.channel.accept_hello_ack(g.body()) == boot2
        rsp = g.call(MsgType.STATUS, {})
        assert isinstance(rsp, Response) and rsp.error is None
        g.sock.close()
    finally:
        server.close()
    assert not os.path.exists(path)


def test_a_client_closed_for_idleness_may_reconnect_at_once(tmp_path: Path) -> None:
    """The slot is released before the close reaches the client: reconnecting the moment
    the server hung up is served, never told "busy" (one slot, so any leak shows)."""
    path = str(tmp_path / "ctl.sock")
    server = CtlServer(path, dispatch, idle_timeout=0.05, max_connections=1).start()
    try:
        for _ in range(30):                             # each one reconnects at once
            with CtlClient(path) as c:
                assert c.call("echo") == {"args": {}}
                c.sock.settimeout(5)
                assert c.sock.recv(1) == b""            # closed for idleness
        assert server.counters["busy"] == 0
    finally:
        server.close()
