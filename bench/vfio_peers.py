"""The processes of ``bench/bench_vfio.py``: the servers under test and the one client.

``python -m bench.vfio_peers serve KIND PATH`` serves clients one after the other on the
UNIX socket PATH until terminated (KIND ``python``: this server; ``libvfio-user``: this
device model behind libvfio-user; ``echo``: the least a Python vfio-user server can do,
the floor).
``python -m bench.vfio_peers client PATH REGION OFFSET N WARMUP [SERVER_PID]`` negotiates
VERSION, then times N REGION_READ and N REGION_WRITE round trips of 4 bytes (vfio-user
spec "VFIO_USER_VERSION", "VFIO_USER_REGION_READ/WRITE") and prints them as JSON, with
the CPU time per round trip of the client and (given SERVER_PID) of the server.  The
client imports no project module: every leg gets the same one.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence

HEADER = struct.Struct("<HHIII")        # msg_id, command, size, flags, error
REGION_RW = struct.Struct("<QII")       # offset, region, count
VERSION, REGION_READ, REGION_WRITE = 1, 9, 10
REPLY, ERROR = 0x1, 0x20
CAPS = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "pgsizes": 4096}
CONNECT_TIMEOUT_S = 30.0
WRITE_VALUE = b"\x5a\xa5\x5a\xa5"


def message(msg_id: int, command: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, HEADER.size + len(payload), flags, 0) + payload


def version_payload() -> bytes:
    return struct.pack("<HH", 0, 0) + json.dumps({"capabilities": CAPS}).encode() + b"\0"


# -- the client ----------------------------------------------------------------------------
def connect(path: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """Connect once the server listens (it is a process starting up beside us)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def receive(sock: socket.socket, buf: bytearray, view: memoryview) -> int:
    """One reply into *buf*; its size."""
    got = sock.recv_into(buf)
    while got < HEADER.size or got < HEADER.unpack_from(buf)[2]:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("server closed the connection")
        got += n
    return got


def round_trips(sock: socket.socket, request: bytes, n: int) -> list[int]:
    """*n* round trips of *request*, each timed in ns; any error reply is fatal."""
    buf = bytearray(4096)
    view = memoryview(buf)
    send, clock = sock.send, time.perf_counter_ns
    out = [0] * n
    flags = 0
    for i in range(n):
        t0 = clock()
        send(request)
        receive(sock, buf, view)
        out[i] = clock() - t0
        flags |= buf[8]
    if n and (flags & ERROR or not flags & REPLY):
        raise RuntimeError(f"error reply: {bytes(buf[:HEADER.size]).hex()}")
    return out


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of process *pid* so far (ns; the scheduler's count)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass        # a thread that just exited
    return total


def affinities(pid: int) -> list[list[int]]:
    """The CPUs each thread of process *pid* may run on (taken while it serves us)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):      # a thread that just exited
            out.append(sorted(os.sched_getaffinity(int(tid))))
    return out


def measured(sock: socket.socket, request: bytes, n: int,
             server: int | None) -> tuple[list[int], float | None, float]:
    """The round trips, and the server's and this client's CPU time per round trip (µs;
    the server's when its pid is known)."""
    before = cpu_ns(server) if server is not None else 0
    mine = time.thread_time_ns()
    samples = round_trips(sock, request, n)
    mine = time.thread_time_ns() - mine
    spent = None if server is None else round((cpu_ns(server) - before) / n / 1000, 3)
    return samples, spent, round(mine / n / 1000, 3)


def client(path: str, region: int, offset: int, n: int, warmup: int,
           server: int | None = None) -> dict[str, object]:
    sock = connect(path)
    buf = bytearray(4096)
    sock.sendall(message(1, VERSION, version_payload()))
    receive(sock, buf, memoryview(buf))
    if buf[8] & ERROR:
        raise RuntimeError(f"VERSION refused: errno {HEADER.unpack_from(buf)[4]}")
    read = message(2, REGION_READ, REGION_RW.pack(offset, region, 4))
    write = message(3, REGION_WRITE, REGION_RW.pack(offset, region, 4) + WRITE_VALUE)
    gc.collect()
    gc.disable()
    try:
        round_trips(sock, read, warmup)
        reads, read_server, read_client = measured(sock, read, n, server)
        round_trips(sock, write, warmup)
        writes, write_server, write_client = measured(sock, write, n, server)
        server_threads = affinities(server) if server is not None else []
    finally:
        gc.enable()
        sock.close()
    return {"read_ns": reads, "write_ns": writes,
            "server_cpu_us": {"read": read_server, "write": write_server},
            "client_cpu_us": {"read": read_client, "write": write_client},
            "affinity": sorted(os.sched_getaffinity(0)), "server_threads": server_threads}


# -- the servers ---------------------------------------------------------------------------
def echo(path: str) -> None:
    """The floor: each message answered from the bytes received, no model (REGION_READ
    reads zeros, REGION_WRITE is dropped); clients one after the other.  The client never
    pipelines, so one message arrives at a time."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    version = version_payload()
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                got = conn.recv_into(buf)
                while got and (got < HEADER.size or got < HEADER.unpack_from(buf)[2]):
                    more = conn.recv_into(view[got:])
                    got = got + more if more else 0
                if not got:
                    break
                msg_id, command, _size, _flags, _err = HEADER.unpack_from(buf)
                if command == REGION_READ:
                    count = REGION_RW.unpack_from(buf, 16)[2]
                    conn.send(HEADER.pack(msg_id, command, 32 + count, REPLY, 0) + buf[16:32]
                              + bytes(count))
                elif command == REGION_WRITE:
                    conn.send(HEADER.pack(msg_id, command, 32, REPLY, 0) + buf[16:32])
                elif command == VERSION:
                    conn.send(message(msg_id, command, version, REPLY))
                else:
                    conn.send(HEADER.pack(msg_id, command, 16, REPLY | ERROR, errno.ENOSYS))


def serve(kind: str, path: str) -> None:
    """Serve clients one after the other until terminated."""
    if kind == "echo":
        echo(path)
        return
    from vfio_user_dev.platform import Platform

    platform = Platform()
    try:
        if kind == "python":
            from vfio_user_dev.server import Server

            Server(path, platform).serve_forever()
        elif kind == "libvfio-user":
            from vfio_user_dev.libvfio_user import LibVfioUserServer

            LibVfioUserServer(path, platform).serve_forever()
        else:
            raise SystemExit(f"unknown server kind {kind!r}")
    finally:
        platform.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"] and len(args) == 3:
        serve(args[1], args[2])
        return 0
    if args[:1] == ["client"] and len(args) in (6, 7):
        region, offset, n, warmup, *pid = (int(a, 0) for a in args[2:])
        print(json.dumps(client(args[1], region, offset, n, warmup, *pid)))
        return 0
    print("usage: python -m bench.vfio_peers serve python|libvfio-user|echo PATH\n"
          "       python -m bench.vfio_peers client PATH REGION OFFSET N WARMUP [SERVER_PID]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
