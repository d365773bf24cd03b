"""A real device-server process on temporary sockets, for integration tests.

:class:`ServerProcess` runs ``python -m vfio_user_dev`` with any options;
:class:`DeviceProcess` is the device server the tests talk to: vfio-user on
``tmp/vfio-user.sock`` plus the side sockets a test asks for (DOE, platform, host access),
each at a fixed path under *tmp*, with a client for each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from teeio.platform_channel import PlatformClient, read_credential
from tsm.doe_client import DoeClient
from vfio_user_dev.client import Client
from vfio_user_dev.host_access import HostAccessClient

PROJECT = Path(__file__).resolve().parents[2]
STARTUP = 15.0

P = TypeVar("P", bound="ServerProcess")


class ServerProcess:
    """`python -m vfio_user_dev` with *options*; waits until every path in *wait_for* exists."""

    def __init__(self, log: Path, options: Sequence[str], wait_for: Sequence[Path]) -> None:
        self.log = log
        self.cmd = [sys.executable, "-m", "vfio_user_dev", *options]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=PROJECT,
                                         env=dict(os.environ, PYTHONPATH=str(PROJECT)))
        deadline = time.monotonic() + STARTUP
        while not all(p.exists() for p in wait_for):
            assert self.proc.poll() is None, f"device server exited:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"no sockets after {STARTUP}s:\n{self.log_text()}"
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class DeviceProcess(ServerProcess):
    """The device server on ``tmp/vfio-user.sock`` with, as asked: the DOE socket and the
    stats file (*doe*, on by default), the device identity it provisions on first start
    (*identity*), a *firmware* image, the platform socket and its credential (*platform*),
    the link capture (*capture*) and the host access socket (*host*); *args* go last."""

    def __init__(self, tmp: Path, *args: str, doe: bool = True, identity: bool = False,
                 firmware: Path | None = None, platform: bool = False, capture: bool = False,
                 host: bool = False) -> None:
        self.sock = tmp / "vfio-user.sock"
        self.doe = tmp / "doe.sock"
        self.stats = tmp / "stats.json"
        self.identity = tmp / "identity"
        self.plat = tmp / "platform.sock"
        self.cred = tmp / "platform.cred"
        self.capture = tmp / "link.pcap"
        self.host = tmp / "host.sock"
        options, wait_for = ["--socket", str(self.sock)], [self.sock]
        if doe:
            options += ["--doe-socket", str(self.doe), "--stats-file", str(self.stats)]
            wait_for.append(self.doe)
        if identity:
            options += ["--identity", str(self.identity)]
        if firmware is not None:
            options += ["--firmware", str(firmware)]
        if platform:
            options += ["--platform-socket", str(self.plat),
                        "--platform-credential", str(self.cred)]
            wait_for.append(self.plat)
        if capture:
            options += ["--link-capture", str(self.capture)]
        if host:
            options += ["--host-socket", str(self.host)]
            wait_for.append(self.host)
        super().__init__(tmp / "device.log", [*options, *args], wait_for)

    # -- clients ---------------------------------------------------------------------------------
    def client(self) -> DoeClient:
        """A client of the DOE socket (the spdm-emu platform socket protocol)."""
        return DoeClient.connect_unix(str(self.doe))

    def vfio(self) -> Client:
        """A negotiated vfio-user client (QEMU's part)."""
        c = Client.connect(str(self.sock))
        c.version()
        return c

    def token(self) -> bytes:
        return read_credential(self.cred)

    def platform(self, token: bytes | None = None) -> PlatformClient:
        return PlatformClient(str(self.plat), self.token() if token is None else token)

    def host_client(self) -> HostAccessClient:
        return HostAccessClient(str(self.host))

    # -- what the device says ----------------------------------------------------------------------
    def tsm_args(self, *extra: str | Path) -> list[str]:
        """The options by which the TSM's commands reach this device (DOE socket, trust
        anchor, platform socket), then *extra*."""
        return ["--doe-socket", str(self.doe), "--trust-anchor",
                str(self.identity / "trust-anchor.pem"), "--platform-socket", str(self.plat),
                "--platform-credential", str(self.cred), *map(str, extra)]

    def connect_request(self) -> dict[str, Any]:
        """The TSM daemon's ``connect`` request for this device, as dev0 on stream 3."""
        return {"device": "dev0", "doe_socket": str(self.doe),
                "trust_anchor": str(self.identity / "trust-anchor.pem"),
                "platform_socket": str(self.plat), "platform_credential": str(self.cred),
                "stream_id": 3}

    def stats_doc(self) -> dict[str, Any]:
        doc = json.loads(self.stats.read_text())
        assert isinstance(doc, dict)
        return doc

    def ide_tlps(self, more_than: int = 0) -> int:
        """The endpoint's IDE TLP count once it exceeds *more_than* (the stats file is
        written just after a job's status is)."""
        deadline = time.monotonic() + 5
        while True:
            n = int(self.stats_doc()["link_endpoint"]["ide_tlps_tx"])
            if n > more_than or time.monotonic() > deadline:
                return n
            time.sleep(0.02)

    def root_port(self) -> dict[str, Any]:
        """The root port's status on the platform socket."""
        with self.platform() as rp:
            st = rp.call("status")["root_port"]
            assert isinstance(st, dict)
            return st

    def host_call(self, op: str, **args: Any) -> dict[str, Any]:
        with self.host_client() as c:
            reply = c.request(op, **args)
        assert reply.get("ok"), reply
        result = reply.get("result", {})
        assert isinstance(result, dict)
        return result

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def fds_settle(self, at_most: int, within: float = 2.0) -> int:
        """The open fds once at most *at_most* (the server closes a finished host or
        platform connection on its own thread, a moment after the client did)."""
        deadline = time.monotonic() + within
        while (n := self.fds()) > at_most and time.monotonic() < deadline:
            time.sleep(0.02)
        return n


#: The ``start_device`` fixture: ``start_device(*options, **features)``.
StartDevice = Callable[..., DeviceProcess]


def started(factory: Callable[..., P]) -> Iterator[Callable[..., P]]:
    """Fixture body: yields a starter; stops every process it started and prints its log."""
    procs: list[P] = []

    def _start(*args: str, **kwargs: Any) -> P:
        dev = factory(*args, **kwargs)
        procs.append(dev)
        return dev

    yield _start
    for dev in procs:
        dev.stop()
        print(f"--- device log ({' '.join(dev.cmd)}) ---\n{dev.log_text()}")
