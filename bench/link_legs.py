"""The IDE legs of the link benchmark: each configuration of IDE-protected DMA (MPS,
direction, aggregation per PCIe 6.x §6.33.6 on or off, C accelerator or pure Python) timed
alternately with raw AES-GCM over the same payload bytes in the same run, so that both see
the same machine.  Method and figures: docs/benchmarks.md, "DMA through the link".
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypedDict

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.bench import TimeBudget, gc_paused
from teeio import ide_accel

NONCE_LEN = 12
AGGREGATION_ON = 8              # TLPs per unit when aggregation is on (Tx Aggregation Mode 11b)


class LegResult(TypedDict):
    mps: int
    size: int
    direction: str
    backend: str                    # "c" (teeio._ide_accel) or "python"
    aggregation: int                # TLPs per aggregated unit at both ends (1: off)
    tlps: int                       # TLPs crossing the link per transfer
    gcm_invocations: int            # AES-GCM invocations (one per unit) per transfer
    pairs: int                      # leg/raw alternations measured
    ide_MBps: float                 # by thread CPU time, median of the pairs
    raw_MBps: float
    ratio: float                    # median over the pairs of raw time / leg time (CPU)
    ide_MBps_wall: float            # the same by wall-clock time
    raw_MBps_wall: float
    ratio_wall: float
    met: bool                       # ratio >= the target


def raw_job(mps: int, size: int) -> Callable[[], None]:
    """AES-GCM-256 encrypt then decrypt of *size* bytes as MPS-byte payloads (no AAD,
    `cryptography` AESGCM, one nonce each): the reference a leg is compared with."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    payload = os.urandom(mps)
    nonces = [i.to_bytes(NONCE_LEN, "big") for i in range(max(1, size // mps))]
    enc, dec = aead.encrypt, aead.decrypt
    if dec(nonces[0], enc(nonces[0], payload, None), None) != payload:
        raise RuntimeError("AES-GCM round trip failed")

    def job() -> None:
        for nonce in nonces:
            dec(nonce, enc(nonce, payload, None), None)
    return job


def alternate(leg: Callable[[], object], raw: Callable[[], object],
              b: TimeBudget) -> list[tuple[int, int, int, int]]:
    """Leg, raw, leg, raw, ... (after warm-up) for the budget's count or time: per pair
    (leg CPU ns, leg wall ns, raw CPU ns, raw wall ns)."""
    cpu, wall = time.thread_time_ns, time.perf_counter_ns
    for _ in range(b.warmup):
        leg()
        raw()
    out: list[tuple[int, int, int, int]] = []
    with gc_paused():
        t_end = wall() + b.budget_ns
        while len(out) < b.min_reps or (wall() < t_end and len(out) < b.max_reps):
            c0, w0 = cpu(), wall()
            leg()
            c1, w1 = cpu(), wall()
            raw()
            c2, w2 = cpu(), wall()
            out.append((c1 - c0, w1 - w0, c2 - c1, w2 - w1))
    return out


def summarise(size: int, pairs: list[tuple[int, int, int, int]]) -> dict[str, float]:
    """MB/s (medians) and ratios (median of the per-pair ratios), CPU and wall time."""
    def mbps(ns: float) -> float:
        return round(size * 1000.0 / ns, 2) if ns > 0 else 0.0

    med = statistics.median
    return {
        "ide_MBps": mbps(med(p[0] for p in pairs)),
        "raw_MBps": mbps(med(p[2] for p in pairs)),
        "ratio": round(med(p[2] / p[0] for p in pairs if p[0] > 0), 4),
        "ide_MBps_wall": mbps(med(p[1] for p in pairs)),
        "raw_MBps_wall": mbps(med(p[3] for p in pairs)),
        "ratio_wall": round(med(p[3] / p[1] for p in pairs if p[1] > 0), 4),
    }


def backends() -> list[str]:
    """The implementations a leg can run on here: the C accelerator if it was built (and
    ``TEEIO_IDE_ACCEL=0`` does not leave it out), and always the pure-Python reference."""
    use_c = ide_accel.available() and os.environ.get("TEEIO_IDE_ACCEL", "1") != "0"
    return (["c"] if use_c else []) + ["python"]


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Runs of TLPs through *name* (``"c"`` or ``"python"``) inside the block."""
    before = ide_accel.set_enabled(name == "c")
    try:
        yield
    finally:
        ide_accel.set_enabled(before)
