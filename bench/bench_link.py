"""Benchmark: DMA throughput through the PCIe link, IDE on and off, against the bounce
buffers TEE-IO replaces and against raw AES-GCM, in one process; and the IDE legs (PCIe
6.x §6.33: aggregation on and off, C accelerator and pure Python) each timed alternately
with raw AES-GCM, against the target ratio.

Run as ``python -m bench.bench_link [--out FILE] [--quick] [--iterations N] [--cpu C]
[--mps 256,1024,4096] [--sizes 4096,65536,1048576] [--mrrs 4096]``.  What each way
measures, the ratios and the goal: docs/benchmarks.md.  The result is printed as JSON and,
with ``--out``, written to a file.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import link_legs
from bench.bench import (
    Budget,
    BudgetSettings,
    HostMeta,
    all_threads_on,
    emit_report,
    host_meta,
    mbps,
    pin_process,
    restore_affinity,
    timed,
)
from teeio import ide_accel
from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.tlp import TLP_SIZES, count_pieces, count_read_tlps
from vfio_user_dev.dma import DmaMapSet
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.interfaces import DEFAULT_REQUESTER_ID
from vfio_user_dev.link.streams import IdeStreamEnd
from vfio_user_dev.link.wire import Link
from vfio_user_dev.protocol import DmaFlags
from vfio_user_dev.root_port import RootPort

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_MPS = (256, 1024, 4096)
DEFAULT_SIZES = (4 * KiB, 64 * KiB, 1 * MiB)
DEFAULT_MRRS = 4096
TARGET_RATIO = 0.5
GUEST_BASE = 0x1_0000_0000      # above 4 GiB: 64-bit-address TLPs, as for most guest RAM
STREAM_ID = 1
RID = DEFAULT_REQUESTER_ID
NONCE_LEN = 12
TAG_LEN = 16
RAW_BATCH = 256 * KiB           # payload bytes per raw AES-GCM measurement call
MODELS = ("ide_off", "ide_on", "bounce", "bounce_aes_gcm")
DIRECTIONS = ("write", "read")


# -- result types -----------------------------------------------------------------------------
class RawResult(TypedDict):
    payload: int
    MBps: float
    us_per_payload: float           # one encrypt + one decrypt
    reps: int


class Point(TypedDict):
    MBps: float
    us_per_transfer: float
    reps: int


class LinkResult(TypedDict):
    mps: int
    mrrs: int
    size: int
    direction: str
    tlps: int                       # TLPs that cross the link per transfer with IDE on
    ide_off: Point
    ide_on: Point
    bounce: Point
    bounce_aes_gcm: Point
    raw_aes_gcm_MBps: float
    ratio: float                    # ide_on.MBps / raw_aes_gcm_MBps
    target_met: bool
    ide_on_us_per_tlp: float


class TargetSummary(TypedDict):
    mps: int
    size: int
    backend: str
    aggregation: int
    raw_aes_gcm_MBps: float         # CPU-time median of the write leg's raw runs
    write_ratio: float
    read_ratio: float
    met: bool


class Goal(TypedDict):
    target_ratio: float
    backend: str                    # the configuration judged: the best this host has
    aggregation: int
    met: bool                       # every MPS, write and read
    met_by_path: dict[str, bool]    # "<backend>, aggregation <n>": every MPS, both ways


class Accelerator(TypedDict):
    available: bool
    openssl: str | None


class Meta(HostMeta):
    cryptography: str
    openssl: str
    date: str
    quick: bool
    iterations: int | None
    budget_s: float | None
    mps: list[int]
    sizes: list[int]
    mrrs: int
    target_ratio: float
    accelerator: Accelerator
    timer: str
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    raw_aes_gcm: list[RawResult]
    results: list[LinkResult]
    ide_legs: list[link_legs.LegResult]
    target: list[TargetSummary]
    goal: Goal
    notes: str


class Settings(BudgetSettings):
    QUICK = Budget(40_000_000, 2, 10_000, 1)
    FULL = Budget(400_000_000, 3, 200_000, 2)


def point(nbytes: int, reps: int, ns: int) -> Point:
    return Point(MBps=round(mbps(nbytes * reps, ns), 2),
                 us_per_transfer=round(ns / 1000 / reps, 3), reps=reps)


# -- software AES-GCM in MPS-sized chunks (the encrypted bounce buffer) ------------------------
def sealed_length(size: int, mps: int) -> int:
    return size + -(-size // mps) * TAG_LEN


class ChunkCipher:
    """AES-GCM-256 over MPS-sized chunks with a 96-bit counter nonce, as a guest and a
    device sharing a software key would protect a bounce buffer."""

    def __init__(self, mps: int) -> None:
        self.mps = mps
        self.aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self.counter = 0

    def seal_into(self, data: bytes | memoryview, out: memoryview) -> int:
        """Encrypt *data* chunk by chunk into *out*; returns the bytes written."""
        enc, mps = self.aead.encrypt_into, self.mps
        src = memoryview(data)
        pos = 0
        ctr = self.counter
        for off in range(0, len(src), mps):
            chunk = src[off:off + mps]
            n = len(chunk) + TAG_LEN
            enc(ctr.to_bytes(NONCE_LEN, "big"), chunk, None, out[pos:pos + n])
            pos += n
            ctr += 1
        self.counter = ctr
        return pos

    def open_into(self, sealed: bytes | memoryview, out: memoryview, first: int) -> None:
        """Decrypt what :meth:`seal_into` wrote (counter from *first*) into *out*."""
        dec, step = self.aead.decrypt_into, self.mps + TAG_LEN
        src = memoryview(sealed)
        ctr = first
        pos = 0
        for off in range(0, len(src), step):
            chunk = src[off:off + step]
            n = len(chunk) - TAG_LEN
            dec(ctr.to_bytes(NONCE_LEN, "big"), chunk, None, out[pos:pos + n])
            pos += n
            ctr += 1


# -- the rig ------------------------------------------------------------------------------------
class Rig:
    """One guest memfd (source, destination and bounce areas), its root port, and two device
    endpoints on their own links: one without IDE, one on a Secure stream."""

    def __init__(self, mps: int, mrrs: int, max_size: int) -> None:
        self.mps = mps
        span = -(-sealed_length(max_size, min(TLP_SIZES)) // MiB) * MiB
        self.src_off, self.dst_off, self.bounce_off = 0, span, 2 * span
        self.guest_size = 3 * span
        self.fd = os.memfd_create("teeio-bench-link", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.guest_size)
        # sealed against resizing, as QEMU's memory-backend-memfd passes guest RAM
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        self.mm = mmap.mmap(self.fd, self.guest_size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        self.dma = DmaMapSet()
        self.dma.map(GUEST_BASE, self.guest_size, DmaFlags.READ | DmaFlags.WRITE, 0,
                     os.dup(self.fd))
        self.rp_clear = RootPort(self.dma, name="bench-clear")
        self.clear = LinkEndpoint(RID)
        self.link_clear = Link(self.clear, self.rp_clear, mps=mps, mrrs=mrrs)
        self.rp_ide = RootPort(self.dma, name="bench-ide")
        self.ide = LinkEndpoint(RID)
        self.link_ide = Link(self.ide, self.rp_ide, mps=mps, mrrs=mrrs)
        self.stream = self._secure()
        self.mm[self.src_off:self.src_off + max_size] = os.urandom(max_size)

    def _secure(self) -> IdeStreamEnd:
        """Key stream STREAM_ID at both ends (Rx GO first, then Tx, then Enable), as the
        link tests and the TSM do; both ends support aggregation (off until
        :meth:`aggregate`)."""
        dev = IdeStreamEnd(STREAM_ID, aggregation=True)
        rp = self.rp_ide
        rp.setup_stream(STREAM_ID, RID, RID)
        for s in SubStream:
            up, down = IdeKey.generate(), IdeKey.generate()
            dev.tx.program(KeySet.K0, s, up)
            rp.program_key(STREAM_ID, KeySet.K0, Direction.RX, s, up)
            dev.rx.program(KeySet.K0, s, down)
            rp.program_key(STREAM_ID, KeySet.K0, Direction.TX, s, down)
        dev.rx.go(KeySet.K0)
        rp.key_set_go(STREAM_ID, KeySet.K0, Direction.RX)
        dev.tx.go(KeySet.K0)
        rp.key_set_go(STREAM_ID, KeySet.K0, Direction.TX)
        dev.enabled = True
        if rp.enable_stream(STREAM_ID) != "secure" or not dev.is_secure():
            raise RuntimeError("IDE stream did not become Secure")
        self.ide.attach_stream(dev, threading.Lock())
        return dev

    def aggregate(self, unit_tlps: int) -> None:
        """Tx Aggregation Mode *unit_tlps* (1: off) on every sub-stream at both ends, set
        while the root port's end is disabled, as §6.33.6 asks."""
        modes = dict.fromkeys(SubStream, unit_tlps)
        self.rp_ide.enable_stream(STREAM_ID, False)
        self.rp_ide.set_aggregation(STREAM_ID, modes)
        self.stream.set_aggregation(modes)
        if self.rp_ide.enable_stream(STREAM_ID) != "secure":
            raise RuntimeError("IDE stream did not become Secure again")

    def gcm_invocations(self) -> int:
        """AES-GCM invocations both ends' transmitters made so far (one per unit)."""
        rp = self.rp_ide.streams[STREAM_ID]
        return sum(tx.counter(s) for tx in (self.stream.tx, rp.tx) for s in SubStream)

    def guest(self, off: int) -> int:
        return GUEST_BASE + off

    def close(self) -> None:
        self.view.release()
        self.mm.close()
        self.dma.clear()
        os.close(self.fd)


# -- the measurements -------------------------------------------------------------------------
def bench_raw(mps: int, s: Settings) -> RawResult:
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    payload = os.urandom(mps)
    count = max(1, RAW_BATCH // mps)
    nonces = [i.to_bytes(NONCE_LEN, "big") for i in range(count)]
    enc, dec = aead.encrypt, aead.decrypt
    if dec(nonces[0], enc(nonces[0], payload, None), None) != payload:
        raise RuntimeError("AES-GCM round trip failed")

    def batch() -> None:
        for nonce in nonces:
            dec(nonce, enc(nonce, payload, None), None)

    reps, ns = timed(batch, s)
    return RawResult(payload=mps, MBps=round(mbps(mps * count * reps, ns), 2),
                     us_per_payload=round(ns / 1000 / (reps * count), 4), reps=reps)


def _check(what: str, got: bytes | memoryview, want: bytes | memoryview) -> None:
    if bytes(got) != bytes(want):
        raise RuntimeError(f"{what}: data differs")


def write_jobs(rig: Rig, size: int) -> dict[str, Callable[[], object]]:
    """Device -> guest private memory at dst, each model; checked once here."""
    data = os.urandom(size)
    dst, bounce = rig.dst_off, rig.bounce_off
    view, mm = rig.view, rig.mm
    dev_cipher = ChunkCipher(rig.mps)
    guest_cipher = ChunkCipher(rig.mps)
    guest_cipher.aead = dev_cipher.aead                  # one shared software key
    sealed_buf = memoryview(bytearray(sealed_length(size, rig.mps)))

    def ide_off() -> None:
        rig.clear.write(rig.guest(dst), data)

    def ide_on() -> None:
        rig.ide.write(rig.guest(dst), data)

    def bounce_copy() -> None:
        rig.clear.write(rig.guest(bounce), data)          # device -> shared bounce buffer
        view[dst:dst + size] = view[bounce:bounce + size]  # guest: bounce -> private

    def bounce_aes_gcm() -> None:
        first = dev_cipher.counter
        n = dev_cipher.seal_into(data, sealed_buf)         # device encrypts
        rig.clear.write(rig.guest(bounce), bytes(sealed_buf[:n]))
        guest_cipher.open_into(view[bounce:bounce + n], view[dst:dst + size], first)

    jobs: dict[str, Callable[[], object]] = {
        "ide_off": ide_off, "ide_on": ide_on, "bounce": bounce_copy,
        "bounce_aes_gcm": bounce_aes_gcm}
    for name, job in jobs.items():
        mm[dst:dst + size] = bytes(size)
        job()
        _check(f"write {size} B, {name}", mm[dst:dst + size], data)
    return jobs


def read_jobs(rig: Rig, size: int) -> dict[str, Callable[[], object]]:
    """Guest private memory at src -> device, each model; checked once here."""
    src, bounce = rig.src_off, rig.bounce_off
    view, mm = rig.view, rig.mm
    want = bytes(mm[src:src + size])
    guest_cipher = ChunkCipher(rig.mps)
    dev_cipher = ChunkCipher(rig.mps)
    dev_cipher.aead = guest_cipher.aead
    sealed_n = sealed_length(size, rig.mps)
    out = memoryview(bytearray(size))                      # the device's buffer
    got: list[bytes] = [b""]

    def ide_off() -> None:
        got[0] = rig.clear.read(rig.guest(src), size)

    def ide_on() -> None:
        got[0] = rig.ide.read(rig.guest(src), size)

    def bounce_copy() -> None:
        view[bounce:bounce + size] = view[src:src + size]  # guest: private -> bounce
        got[0] = rig.clear.read(rig.guest(bounce), size)   # device DMA from bounce

    def bounce_aes_gcm() -> None:
        first = guest_cipher.counter
        guest_cipher.seal_into(view[src:src + size], view[bounce:bounce + sealed_n])
        sealed = rig.clear.read(rig.guest(bounce), sealed_n)
        dev_cipher.open_into(sealed, out, first)           # device decrypts
        got[0] = b""

    jobs: dict[str, Callable[[], object]] = {
        "ide_off": ide_off, "ide_on": ide_on, "bounce": bounce_copy,
        "bounce_aes_gcm": bounce_aes_gcm}
    for name, job in jobs.items():
        out[:] = bytes(size)
        job()
        _check(f"read {size} B, {name}", out if name == "bounce_aes_gcm" else got[0], want)
    return jobs


def bench_mps(mps: int, mrrs: int, sizes: Sequence[int], raw: RawResult,
              s: Settings) -> tuple[list[LinkResult], list[link_legs.LegResult]]:
    """Every way at every size (IDE on: the best path here, aggregation on), then the IDE
    legs at the largest size."""
    rig = Rig(mps, mrrs, max(sizes))
    out: list[LinkResult] = []
    try:
        rig.aggregate(link_legs.AGGREGATION_ON)
        with link_legs.backend(default_backend()):
            for size in sizes:
                for direction in DIRECTIONS:
                    jobs = (write_jobs if direction == "write" else read_jobs)(rig, size)
                    points = {name: point(size, *timed(job, s)) for name, job in jobs.items()}
                    if not rig.stream.is_secure():
                        raise RuntimeError("IDE stream went Insecure during the benchmark")
                    tlps = tlp_count(direction, size, mps, mrrs)
                    ratio = points["ide_on"]["MBps"] / raw["MBps"] if raw["MBps"] else 0.0
                    out.append(LinkResult(
                        mps=mps, mrrs=mrrs, size=size, direction=direction, tlps=tlps,
                        ide_off=points["ide_off"], ide_on=points["ide_on"],
                        bounce=points["bounce"], bounce_aes_gcm=points["bounce_aes_gcm"],
                        raw_aes_gcm_MBps=raw["MBps"], ratio=round(ratio, 4),
                        target_met=ratio >= TARGET_RATIO,
                        ide_on_us_per_tlp=round(points["ide_on"]["us_per_transfer"] / tlps, 4)))
        legs = bench_legs(rig, mps, mrrs, max(sizes), s)
    finally:
        rig.close()
    return out, legs


def tlp_count(direction: str, size: int, mps: int, mrrs: int) -> int:
    """TLPs that cross the link for one transfer of *size* bytes."""
    if direction == "write":
        return count_pieces(GUEST_BASE, size, mps)
    mrd, cpl = count_read_tlps(GUEST_BASE, size, mrrs, mps)
    return mrd + cpl


def default_backend() -> str:
    """The best path this host has: the C accelerator if it was built."""
    return link_legs.backends()[0]


def bench_legs(rig: Rig, mps: int, mrrs: int, size: int,
               s: Settings) -> list[link_legs.LegResult]:
    """IDE on at *size*, every path and aggregation on and off, each direction, each
    alternating with raw AES-GCM of the same payload bytes at this MPS."""
    out: list[link_legs.LegResult] = []
    raw = link_legs.raw_job(mps, size)
    for name in link_legs.backends():
        with link_legs.backend(name):
            for unit_tlps in (1, link_legs.AGGREGATION_ON):
                rig.aggregate(unit_tlps)
                for direction in DIRECTIONS:
                    job = (write_jobs if direction == "write" else read_jobs)(rig, size)["ide_on"]
                    before = rig.gcm_invocations()
                    job()
                    invocations = rig.gcm_invocations() - before
                    pairs = link_legs.alternate(job, raw, s)
                    if not rig.stream.is_secure():
                        raise RuntimeError("IDE stream went Insecure during the benchmark")
                    fig = link_legs.summarise(size, pairs)
                    out.append(link_legs.LegResult(
                        mps=mps, size=size, direction=direction, backend=name,
                        aggregation=unit_tlps, tlps=tlp_count(direction, size, mps, mrrs),
                        gcm_invocations=invocations, pairs=len(pairs),
                        ide_MBps=fig["ide_MBps"], raw_MBps=fig["raw_MBps"],
                        ratio=fig["ratio"], ide_MBps_wall=fig["ide_MBps_wall"],
                        raw_MBps_wall=fig["raw_MBps_wall"], ratio_wall=fig["ratio_wall"],
                        met=fig["ratio"] >= TARGET_RATIO))
    return out


def summarise(legs: Sequence[link_legs.LegResult]) -> tuple[list[TargetSummary], Goal]:
    """Per MPS, the best path with aggregation on; and the goal, overall and by path."""
    best, agg = default_backend(), link_legs.AGGREGATION_ON
    target = []
    for mps in dict.fromkeys(g["mps"] for g in legs):
        at = {g["direction"]: g for g in legs
              if g["mps"] == mps and g["backend"] == best and g["aggregation"] == agg}
        w, rd = at["write"], at["read"]
        target.append(TargetSummary(mps=mps, size=w["size"], backend=best, aggregation=agg,
                                    raw_aes_gcm_MBps=w["raw_MBps"], write_ratio=w["ratio"],
                                    read_ratio=rd["ratio"], met=w["met"] and rd["met"]))
    by_path: dict[str, bool] = {}
    for g in legs:
        key = f"{g['backend']}, aggregation {g['aggregation']}"
        by_path[key] = by_path.get(key, True) and g["met"]
    return target, Goal(target_ratio=TARGET_RATIO, backend=best, aggregation=agg,
                        met=bool(target) and all(t["met"] for t in target),
                        met_by_path=by_path)


NOTES = (
    "One process, every thread pinned to meta.cpu_pinned. Guest memory: a memfd mapped "
    "fd-backed into a DmaMapSet at 4 GiB (64-bit-address TLPs); transfers start 4 KiB "
    "aligned. write = device -> guest (LinkEndpoint.write, posted MWr TLPs of <= MPS "
    "bytes), read = guest -> device (LinkEndpoint.read: MRd TLPs of <= MRRS bytes, CplD "
    "completions of <= MPS bytes, every one checked by the requester). ide_off: no IDE "
    "stream, no tap: the link's clear fast path. ide_on: a Secure Selective IDE stream "
    "(AES-GCM-256, 96-bit MAC, implicit counters) keyed at both ends, T=0, no windows; "
    "every TLP protected by its sender and checked by its receiver before delivery; in "
    "results with the best path here (goal.backend) and aggregation on (up to 8 TLPs and "
    "256 DW of payload per MAC, PCIe 6.x 6.33.6). bounce: swiotlb-style, a clear DMA into "
    "a shared bounce area of the same memfd plus a guest CPU copy between it and the "
    "private area. bounce_aes_gcm: bounce plus software AES-GCM-256 (cryptography AESGCM, "
    "12-byte counter nonce, 16-byte tag) in MPS-sized chunks. raw_aes_gcm: one core, "
    "AESGCM.encrypt then .decrypt of an MPS-byte payload, no AAD, MB/s of payload. "
    "results: MB/s = transfer size / wall time, 1 MB = 1e6 bytes, ratio = ide_on / "
    "raw_aes_gcm (measured before). ide_legs: at the largest size, every path (c: the "
    "teeio._ide_accel extension on libcrypto; python: the reference) with aggregation off "
    "(1) and on (8), each transfer alternating with raw AES-GCM of the same bytes at the "
    "same MPS; ratio = median over the pairs of raw time / leg time by thread CPU time "
    "(ratio_wall: by wall time; a shared host stretches the longer leg's wall time). "
    "target and goal: the best path with aggregation on, ratio >= target_ratio for every "
    "MPS, write and read; goal.met_by_path for each path. GC paused in timed loops; each "
    "job is checked for correct data once before timing."
)


def run(s: Settings, cpu: int | None, mps_list: Sequence[int], sizes: Sequence[int],
        mrrs: int) -> Report:
    started = time.perf_counter()
    before = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = before[0]
    elif cpu not in before:
        raise SystemExit(f"cpu {cpu} is not in this process's affinity {before}")
    saved = pin_process(cpu)
    try:
        verified = all_threads_on(cpu)
        raws = [bench_raw(mps, s) for mps in mps_list]
        results: list[LinkResult] = []
        legs: list[link_legs.LegResult] = []
        for mps, raw in zip(mps_list, raws, strict=True):
            r, g = bench_mps(mps, mrrs, sizes, raw, s)
            results += r
            legs += g
        verified &= all_threads_on(cpu)
    finally:
        restore_affinity(saved)
    meta = Meta(
        **host_meta(cpu, before, len(saved), verified), cryptography=cryptography.__version__,
        openssl=openssl_backend.openssl_version_text(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=s.quick, iterations=s.fixed,
        budget_s=None if s.fixed is not None else s.budget_ns / 1e9,
        mps=list(mps_list), sizes=list(sizes), mrrs=mrrs, target_ratio=TARGET_RATIO,
        accelerator=Accelerator(available=ide_accel.available(),
                                openssl=ide_accel.openssl_version()),
        timer="ide_legs: thread CPU time (ratio) and wall time (ratio_wall)",
        elapsed_s=round(time.perf_counter() - started, 3))
    target, goal = summarise(legs)
    return Report(meta=meta, raw_aes_gcm=raws, results=results, ide_legs=legs,
                  target=target, goal=goal, notes=NOTES)


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def _tlp_size(text: str) -> int:
    v = int(text)
    if v not in TLP_SIZES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, TLP_SIZES))}")
    return v


def _int_list(item: Callable[[str], int]) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        values = [item(t.strip()) for t in text.split(",") if t.strip()]
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return list(dict.fromkeys(values))
    return parse


def _size(text: str) -> int:
    v = int(text, 0)
    if not 1 <= v <= 64 * MiB:
        raise argparse.ArgumentTypeError("transfer sizes are 1 byte .. 64 MiB")
    return v


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_link",
        description="DMA throughput through the PCIe link: IDE on/off, bounce buffers, "
                    "raw AES-GCM")
    ap.add_argument("--out", type=Path, help="also write the JSON here (parent dirs are created)")
    ap.add_argument("--quick", action="store_true", help="a short time budget per point")
    ap.add_argument("--iterations", type=_positive, metavar="N",
                    help="exact count of transfers per point (no time budget)")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the lowest allowed one)")
    ap.add_argument("--mps", type=_int_list(_tlp_size), default=list(DEFAULT_MPS),
                    metavar="LIST", help="Max_Payload_Size values, comma-separated "
                    f"(default {','.join(map(str, DEFAULT_MPS))})")
    ap.add_argument("--sizes", type=_int_list(_size), default=list(DEFAULT_SIZES),
                    metavar="LIST", help="transfer sizes in bytes, comma-separated "
                    f"(default {','.join(map(str, DEFAULT_SIZES))})")
    ap.add_argument("--mrrs", type=_tlp_size, default=DEFAULT_MRRS,
                    help=f"Max_Read_Request_Size for reads (default {DEFAULT_MRRS})")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(Settings.from_args(args.quick, args.iterations), args.cpu, args.mps,
                 args.sizes, args.mrrs)
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
