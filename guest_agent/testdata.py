"""Test data derived from the seed the host chooses; the host recomputes the same.

Stdlib only: imported by the guest agent and by the host's e2e tests.
"""

from __future__ import annotations

import hashlib


def stream(seed: int, label: str, n: int) -> bytes:
    """n pseudo-random bytes: SHA-256 in counter mode over (seed, label, counter)."""
    out = bytearray()
    counter = 0
    key = seed.to_bytes(16, "little") + label.encode()
    while len(out) < n:
        out += hashlib.sha256(key + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:n])


def job_plan(seed: int, rounds: int) -> list[dict[str, int]]:
    """Sizes and patterns of each round (odd sizes on purpose: no 4-byte alignment)."""
    plan = []
    for i in range(rounds):
        r = stream(seed, f"plan{i}", 12)
        plan.append({
            "round": i,
            "fill_len": 1 + int.from_bytes(r[0:4], "little") % (64 * 1024),
            "fill_pattern": int.from_bytes(r[4:8], "little"),
            "copy_len": 1 + int.from_bytes(r[8:12], "little") % (192 * 1024),
        })
    return plan


def fill_bytes(pattern: int, n: int) -> bytes:
    pat = pattern.to_bytes(4, "little")
    return (pat * (n // 4 + 1))[:n]


def expected_sha256(seed: int, rounds: int) -> list[str]:
    return [hashlib.sha256(stream(seed, f"src{p['round']}", p["copy_len"])).hexdigest()
            for p in job_plan(seed, rounds)]
