"""GHCx end to end in-process: the guest's GhcxClient over a socketpair, a threaded TSM loop
on TsmChannel, and between them a man-in-the-middle relay without the secret that replays,
alters, reorders, drops and injects frames (docs/ghcx.md "Receiver rules").  Every attack
is rejected and counted, and the next calls succeed; non-idempotent requests are served
once however often the guest had to retry.  Also: port and fw_cfg discovery on a fake
sysfs."""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent.ghcx_client import (
    FdTransport,
    GhcxCallError,
    GhcxClient,
    GhcxSetupError,
    GhcxTimeout,
    SocketTransport,
    find_port,
    read_fw_cfg,
    read_launch_config,
)
from teeio.ghcx import (
    FW_CFG_SECRET,
    FW_CFG_VM_ID,
    MAX_BODY,
    MAX_PENDING,
    PORT_NAME,
    REQUESTS,
    RESPONSES,
    FrameDecoder,
    GhcxReject,
    GuestChannel,
    Header,
    MsgType,
    Request,
    TsmChannel,
    encode_frame,
    vm_id_bytes,
)

SECRET = os.urandom(32)
TIMEOUT = 0.3          # per call attempt; the relay's attacks cost at most a few of these


class TsmServer:
    """A per-VM GHCx server loop, as the TSM daemon runs one (minus the device)."""

    def __init__(self, sock: socket.socket, vm: str = "vm0") -> None:
        self.sock, self.vm = sock, vm
        self.channel = TsmChannel(SECRET, vm, os.urandom(16))
        self.served: collections.Counter[MsgType] = collections.Counter()
        self.epoch = 0
        self.windows: dict[int, dict[str, Any]] = {}
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def restart(self) -> None:
        """A new TSM process: new boot id, no sessions, no cache."""
        self.channel = TsmChannel(SECRET, self.vm, os.urandom(16))

    def handle(self, ch: TsmChannel, req: Request) -> bytes:
        self.served[req.mtype] += 1
        if req.mtype == MsgType.TDI_LOCK:
            self.epoch += 1
            return ch.respond(req, {"state": "CONFIG_LOCKED", "lock_epoch": self.epoch})
        if req.mtype == MsgType.DMA_ACCEPT:
            wid = len(self.windows) + 1
            self.windows[wid] = req.payload
            return ch.respond(req, {"window_id": wid})
        if req.mtype == MsgType.TDI_STOP and not self.epoch:
            return ch.respond(req, error="state", message="TDI is not locked")
        if req.mtype == MsgType.STATUS:
            return ch.respond(req, {"boot_id": ch.boot_id.hex(), "vm_id": self.vm,
                                    "windows": sorted(self.windows)})
        return ch.respond(req, error="unknown_request", message=req.mtype.name)

    def run(self) -> None:
        dec = FrameDecoder()
        while True:
            try:
                data = self.sock.recv(MAX_BODY)
            except OSError:
                return
            if not data:
                return
            for body in dec.feed(data):
                ch = self.channel
                try:
                    incoming = ch.receive(body)
                except GhcxReject:
                    continue            # counted by the channel; keep serving
                out = self.handle(ch, incoming) if isinstance(incoming, Request) \
                    else incoming.frame
                self.sock.sendall(out)


Hook = Callable[[bytes], bytes]


class Relay:
    """The untrusted VMM between guest and TSM.  It sees frame boundaries (framing is
    clear) but holds no secret.  One-shot hooks replace what it forwards."""

    def __init__(self, guest_side: socket.socket, tsm_side: socket.socket) -> None:
        self.out = {"g2t": tsm_side, "t2g": guest_side}
        self.src = {guest_side: "g2t", tsm_side: "t2g"}
        self.dec = {"g2t": FrameDecoder(), "t2g": FrameDecoder()}
        self.seen: dict[str, list[bytes]] = {"g2t": [], "t2g": []}
        self.hooks: dict[str, collections.deque[tuple[Callable[[Header], bool], Hook]]] = {
            "g2t": collections.deque(), "t2g": collections.deque()}
        self.held: list[bytes] = []
        self.lock = threading.Lock()
        self.send_lock = {"g2t": threading.Lock(), "t2g": threading.Lock()}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def once(self, direction: str, action: Hook,
             when: Callable[[Header], bool] = lambda h: h.mtype in REQUESTS | RESPONSES) -> None:
        with self.lock:
            self.hooks[direction].append((when, action))

    def inject(self, direction: str, data: bytes) -> None:
        with self.send_lock[direction]:
            self.out[direction].sendall(data)

    def run(self) -> None:
        while not self.stop:
            ready, _, _ = select.select(list(self.src), [], [], 0.05)
            for s in ready:
                d = self.src[s]
                try:
                    data = s.recv(MAX_BODY)
                except OSError:
                    return
                if not data:
                    return
                for body in self.dec[d].feed(data):
                    h = Header.decode(body)
                    with self.lock:
                        self.seen[d].append(body)
                        hook = None
                        if self.hooks[d] and self.hooks[d][0][0](h):
                            hook = self.hooks[d].popleft()[1]
                    self.inject(d, hook(body) if hook else encode_frame(body))


@pytest.fixture
def world() -> Iterator[tuple[GhcxClient, TsmServer, Relay]]:
    guest, relay_g = socket.socketpair()
    relay_t, tsm = socket.socketpair()
    server = TsmServer(tsm)
    relay = Relay(relay_g, relay_t)
    client = GhcxClient(FdTransport(guest.fileno()), SECRET, "vm0", handshake_timeout=TIMEOUT)
    yield client, server, relay
    relay.stop = True
    for s in (guest, relay_g, relay_t, tsm):
        s.close()
    relay.thread.join(2)
    server.thread.join(2)


def flip(body: bytes, at: int) -> bytes:
    b = bytearray(body)
    b[at] ^= 0x01
    return encode_frame(bytes(b))


def call(client: GhcxClient, mtype: MsgType, payload: dict[str, Any] | None = None,
         retries: int = 3) -> dict[str, Any]:
    return client.call(mtype, payload, timeout=TIMEOUT, retries=retries)


def other_vm_frames() -> tuple[bytes, bytes]:
    """A genuine request and response of another VM (vm1), same secret."""
    g, t = GuestChannel(SECRET, "vm1"), TsmChannel(SECRET, "vm1", os.urandom(16))
    ack = t.receive(FrameDecoder().feed(g.hello())[0])
    assert not isinstance(ack, Request)
    g.accept_hello_ack(FrameDecoder().feed(ack.frame)[0])
    _, f = g.request(MsgType.STATUS, {})
    req = t.receive(FrameDecoder().feed(f)[0])
    assert isinstance(req, Request)
    return f, t.respond(req, {"vm_id": "vm1"})


# -- honest relay -----------------------------------------------------------------------------

def test_calls_through_an_honest_relay(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, _ = world
    boot = client.handshake()
    assert boot == server.channel.boot_id and not client.tsm_restarted
    assert call(client, MsgType.TDI_LOCK) == {"state": "CONFIG_LOCKED", "lock_epoch": 1}
    assert call(client, MsgType.DMA_ACCEPT, {"base": 0x1000, "size": 4096,
                                             "access": "rw"}) == {"window_id": 1}
    status = call(client, MsgType.STATUS)
    assert status == {"boot_id": boot.hex(), "vm_id": "vm0", "windows": [1]}
    with pytest.raises(GhcxCallError) as e:
        call(client, MsgType.GET_EVIDENCE, {"nonce": "00" * 32})
    assert e.value.code == "unknown_request"
    rejected = {k: v for k, v in client.counters.items() if v and k not in
                ("frames", "handshakes_ok")}
    assert rejected == {} and sum(server.channel.counters.values()) == 0


def test_error_response_raises(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, _, _ = world
    with pytest.raises(GhcxCallError) as e:
        call(client, MsgType.TDI_STOP)
    assert (e.value.code, e.value.message) == ("state", "TDI is not locked")
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1     # the channel goes on


def test_socket_transport() -> None:
    """The client over a socket object, straight to a server."""
    a, b = socket.socketpair()
    direct = TsmServer(b)
    client = GhcxClient(a, SECRET, "vm0")
    assert isinstance(client.transport, SocketTransport)
    assert call(client, MsgType.STATUS)["vm_id"] == "vm0"
    client.close()
    direct.thread.join(2)
    b.close()


# -- attacks ----------------------------------------------------------------------------------

def test_replayed_frames(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    call(client, MsgType.DMA_ACCEPT, {"base": 0, "size": 4096, "access": "rw"})
    old_req, old_rsp = relay.seen["g2t"][-1], relay.seen["t2g"][-1]
    # before the next request reaches the TSM, replay the old one; before the next
    # response reaches the guest, replay the old one
    relay.once("g2t", lambda b: encode_frame(old_req) + encode_frame(b))
    relay.once("t2g", lambda b: encode_frame(old_rsp) + encode_frame(b))
    assert call(client, MsgType.STATUS)["windows"] == [1]
    assert server.channel.counters["replay"] == 1
    assert client.counters["replay"] == 1
    assert server.served[MsgType.DMA_ACCEPT] == 1                  # not served again
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1


def test_altered_response_is_retried_from_the_cache(
        world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    client.handshake()
    relay.once("t2g", lambda b: flip(b, len(b) - 3))              # ciphertext/tag
    assert call(client, MsgType.DMA_ACCEPT, {"base": 0, "size": 4096,
                                             "access": "rw"}) == {"window_id": 1}
    assert client.counters["forged"] == 1 and client.counters["retries"] == 1
    assert client.counters["timeouts"] == 0      # retried at once, not after a timeout
    assert server.served[MsgType.DMA_ACCEPT] == 1                  # answered from the cache
    relay.once("t2g", lambda b: flip(b, 20))                       # header: seq
    assert call(client, MsgType.TDI_LOCK) == {"state": "CONFIG_LOCKED", "lock_epoch": 1}
    assert client.counters["forged"] == 2 and server.served[MsgType.TDI_LOCK] == 1
    assert call(client, MsgType.STATUS)["windows"] == [1]


def test_altered_request(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    call(client, MsgType.STATUS)
    relay.once("g2t", lambda b: flip(b, 40))
    relay.once("g2t", lambda b: flip(b, 2))                        # flags (associated data)
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1
    assert server.channel.counters["forged"] == 2
    assert server.served[MsgType.TDI_LOCK] == 1


def test_reordered_frames(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    call(client, MsgType.STATUS)

    def hold(b: bytes) -> bytes:
        relay.held.append(b)
        return b""

    # guest → TSM: hold the request; when the guest's retry comes, deliver it first, then
    # the held original (now older than the last accepted sequence number)
    relay.once("g2t", hold)
    relay.once("g2t", lambda b: encode_frame(b) + encode_frame(relay.held.pop()))
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1
    # the guest has its answer (to the retry) before the TSM reads the late original
    deadline = time.monotonic() + 5
    while server.channel.counters["replay"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.channel.counters["replay"] == 1
    assert server.served[MsgType.TDI_LOCK] == 1
    # TSM → guest: hold the response; deliver the cached re-send first, then the original
    relay.once("t2g", hold)
    relay.once("t2g", lambda b: encode_frame(b) + encode_frame(relay.held.pop()))
    assert call(client, MsgType.DMA_ACCEPT, {"base": 0, "size": 1,
                                             "access": "rw"}) == {"window_id": 1}
    # the late original is rejected on arrival; the next call drains it
    assert call(client, MsgType.STATUS)["windows"] == [1]
    assert client.counters["replay"] == 1
    assert server.served[MsgType.DMA_ACCEPT] == 1


def test_cross_vm_injection(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    call(client, MsgType.STATUS)
    req1, rsp1 = other_vm_frames()
    relay.once("g2t", lambda b: req1 + encode_frame(b))
    relay.once("t2g", lambda b: rsp1 + encode_frame(b))
    assert call(client, MsgType.STATUS)["vm_id"] == "vm0"
    assert server.channel.counters["cross_vm"] == 1
    assert client.counters["cross_vm"] == 1
    relay.inject("g2t", GuestChannel(SECRET, "vm1").hello())      # another VM's HELLO
    assert call(client, MsgType.STATUS)["vm_id"] == "vm0"
    assert server.channel.counters["cross_vm"] == 2


def test_garbage_resync(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    call(client, MsgType.STATUS)
    garbage = b"\x00\xffnoise" + b"GHCX" + (7).to_bytes(4, "little") + b"GHC"
    relay.once("g2t", lambda b: garbage + encode_frame(b) + b"trailing junk")
    relay.once("t2g", lambda b: garbage + encode_frame(b))
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1
    assert client.counters["bad_length"] == 1 and client.counters["dropped_bytes"] > 0
    assert call(client, MsgType.STATUS)["vm_id"] == "vm0"
    # garbage that frames correctly but is no GHCx frame at all
    relay.once("g2t", lambda b: encode_frame(b"\x01\x17" + bytes(60)) + encode_frame(b))
    assert call(client, MsgType.STATUS)["vm_id"] == "vm0"
    assert server.channel.counters["cross_vm"] == 1


def test_forged_length_does_not_stall(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, _, relay = world
    call(client, MsgType.STATUS)
    # a valid-looking header claiming MAX_BODY bytes swallows the response
    relay.once("t2g", lambda b: b"GHCX" + MAX_BODY.to_bytes(4, "little") + encode_frame(b))
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1
    assert client.counters["timeouts"] == 1


def test_forged_rehello_keeps_non_idempotent_requests_safe(
        world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    boot = client.handshake()
    rehello = Header(1, MsgType.REHELLO, 0, vm_id_bytes("vm0"), 0, 0).encode()
    relay.once("t2g", lambda b: encode_frame(rehello))            # response dropped
    assert call(client, MsgType.DMA_ACCEPT, {"base": 0, "size": 4096,
                                             "access": "rw"}) == {"window_id": 1}
    assert client.counters["rehello"] == 1 and client.counters["handshakes_ok"] == 2
    assert server.served[MsgType.DMA_ACCEPT] == 1                 # from the cache
    assert client.boot_id == boot and not client.tsm_restarted


def test_tsm_restart(world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, _ = world
    call(client, MsgType.TDI_LOCK)
    old_boot = client.boot_id
    server.restart()
    status = call(client, MsgType.STATUS)
    assert client.tsm_restarted and client.boot_id != old_boot
    assert status["boot_id"] == server.channel.boot_id.hex()
    assert client.counters["rehello"] == 1
    assert server.channel.counters["no_session"] == 1


def test_dropped_rehello_falls_back_to_a_handshake(
        world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    call(client, MsgType.STATUS)
    server.restart()

    def is_rehello(h: Header) -> bool:
        return h.mtype == MsgType.REHELLO

    relay.once("t2g", lambda b: b"", when=is_rehello)
    relay.once("t2g", lambda b: b"", when=is_rehello)
    assert call(client, MsgType.STATUS)["vm_id"] == "vm0"
    assert client.tsm_restarted and client.counters["timeouts"] == 2


def test_injected_hello_does_not_cut_the_session(
        world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    client, server, relay = world
    call(client, MsgType.STATUS)
    relay.once("g2t", lambda b: GuestChannel(os.urandom(32), "vm0").hello() + encode_frame(b))
    assert call(client, MsgType.STATUS)["vm_id"] == "vm0"
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1
    assert client.counters["timeouts"] == 0 and client.counters["handshakes_ok"] == 1


def test_wrong_secret_and_dead_relay_time_out() -> None:
    guest, relay_g = socket.socketpair()
    a, b = socket.socketpair()
    direct = TsmServer(b)
    liar = GhcxClient(a, os.urandom(32), "vm0", handshake_timeout=0.1)
    with pytest.raises(GhcxTimeout):
        liar.handshake(retries=1)
    assert liar.counters["handshake"] == 2
    # a relay that drops everything: the call gives up with a clear error
    client = GhcxClient(FdTransport(guest.fileno()), SECRET, "vm0", handshake_timeout=0.1)
    with pytest.raises(GhcxTimeout) as e:
        client.call(MsgType.STATUS, timeout=0.1, retries=1)
    assert e.value.code == "timeout"
    for s in (guest, relay_g, a, b):
        s.close()
    direct.thread.join(2)


# -- discovery on a fake sysfs (the guest has no udev) -----------------------------------------

def test_find_port(tmp_path: Path) -> None:
    sys_root, dev = tmp_path / "virtio-ports", tmp_path / "dev"
    for port, name in (("vport0p0", "org.qemu.guest_agent.0"), ("vport1p1", PORT_NAME)):
        (sys_root / port).mkdir(parents=True)
        (sys_root / port / "name").write_text(name + "\n")
    (sys_root / "vport2p0").mkdir()                   # a port without a name
    assert find_port(PORT_NAME, sys_root, dev) == dev / "vport1p1"
    with pytest.raises(GhcxSetupError, match="vport0p0=org.qemu.guest_agent.0"):
        find_port("org.teeio.other", sys_root, dev)
    with pytest.raises(GhcxSetupError, match="ports: none"):
        find_port(PORT_NAME, tmp_path / "missing", dev)


def test_connect_closes_the_port_when_nobody_answers(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A port with no TSM behind it (the host unbound the VM): the handshake gives up and
    the port's fd is closed, not left open in a process that goes on without GHCx."""
    fw = tmp_path / "fw_cfg" / "by_name"
    for name, raw in ((FW_CFG_SECRET, SECRET), (FW_CFG_VM_ID, b"vm0")):
        (fw / name).mkdir(parents=True)
        (fw / name / "raw").write_bytes(raw)
    sys_root, dev = tmp_path / "virtio-ports", tmp_path / "dev"
    (sys_root / "vport1p1").mkdir(parents=True)
    (sys_root / "vport1p1" / "name").write_text(PORT_NAME + "\n")
    dev.mkdir()
    (dev / "vport1p1").write_bytes(b"")

    def silent(self: GhcxClient, *, timeout: float | None = None, retries: int = 3) -> bytes:
        raise GhcxTimeout(f"no valid HELLO_ACK after {retries + 1} attempts")

    monkeypatch.setattr(GhcxClient, "handshake", silent)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(GhcxTimeout):
        GhcxClient.connect(sys_root=sys_root, dev_root=dev, fw_cfg_root=fw.parent)
    assert set(os.listdir("/proc/self/fd")) == before


def test_fw_cfg(tmp_path: Path) -> None:
    root = tmp_path / "qemu_fw_cfg"
    calls: list[str] = []

    def modprobe(module: str) -> None:
        calls.append(module)
        for name, data in ((FW_CFG_SECRET, SECRET), (FW_CFG_VM_ID, b"vm7")):
            (root / "by_name" / name).mkdir(parents=True)
            (root / "by_name" / name / "raw").write_bytes(data)

    assert read_launch_config(root, modprobe) == (SECRET, "vm7")
    assert calls == ["qemu_fw_cfg"]                    # loaded once, when missing
    assert read_fw_cfg(FW_CFG_VM_ID, root, modprobe) == b"vm7" and len(calls) == 1
    (root / "by_name" / FW_CFG_VM_ID / "raw").write_bytes(b"vm 7\n")
    with pytest.raises(GhcxSetupError, match="bad VM id"):
        read_launch_config(root, modprobe)
    (root / "by_name" / FW_CFG_SECRET / "raw").write_bytes(SECRET[:16])
    with pytest.raises(GhcxSetupError, match="16 bytes"):
        read_launch_config(root, modprobe)
    with pytest.raises(GhcxSetupError, match="not found"):
        read_fw_cfg("opt/org.teeio/nope", root, modprobe)
    with pytest.raises(GhcxSetupError, match="modprobe qemu_fw_cfg"):
        read_fw_cfg(FW_CFG_SECRET, tmp_path / "none", lambda m: None)


def test_hello_flood_does_not_block_the_guests_handshake(
        world: tuple[GhcxClient, TsmServer, Relay]) -> None:
    """Finding: every forged HELLO got a HELLO_ACK and replaced the pending handshake, so
    a relay flooding HELLOs behind the guest's own kept it from ever completing."""
    client, _server, relay = world
    flood = b"".join(GuestChannel(os.urandom(32), "vm0").hello() for _ in range(1000))
    for _ in range(6):           # every HELLO of the guest, however often it retries
        relay.once("g2t", lambda b: encode_frame(b) + flood,
                   when=lambda h: h.mtype == MsgType.HELLO)
    assert call(client, MsgType.STATUS, retries=4)["vm_id"] == "vm0"
    assert client.counters["handshakes_ok"] == 1 and client.counters["timeouts"] == 0
    with relay.lock:
        acks = [b for b in relay.seen["t2g"] if Header.decode(b).mtype == MsgType.HELLO_ACK]
    assert len(acks) <= MAX_PENDING            # not one per forged HELLO
    assert call(client, MsgType.TDI_LOCK)["lock_epoch"] == 1
