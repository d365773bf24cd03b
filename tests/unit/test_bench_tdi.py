"""bench_tdi's summary of the guest's step timings (the boot itself runs under make bench)."""

from __future__ import annotations

import pytest

from bench.bench_tdi import LOCK_TO_RUN, summarise


def cycle(scale: float) -> list[dict[str, object]]:
    return [{"step": "tdi_stop", "seconds": 0.5 * scale, "ok": True}] + [
        {"step": name, "seconds": scale * (i + 1) / 10, "ok": True}
        for i, name in enumerate(LOCK_TO_RUN)]


def test_summary_medians_and_shares() -> None:
    out = summarise([cycle(1.0), cycle(2.0), cycle(3.0)])
    total = sum((i + 1) / 10 for i in range(len(LOCK_TO_RUN))) * 2.0      # median cycle
    assert out["lock_to_run_ms"]["median"] == pytest.approx(total * 1000)
    assert out["lock_to_run_ms"]["min"] == pytest.approx(total / 2 * 1000)
    steps = out["steps"]
    assert steps["tdi_stop"]["share_of_lock_to_run"] is None      # not part of LOCK -> RUN
    shares = [steps[n]["share_of_lock_to_run"] for n in LOCK_TO_RUN]
    assert sum(shares) == pytest.approx(1.0, abs=0.01)
    assert steps["tdi_accept"]["median_ms"] == pytest.approx(1000.0)
    assert steps["tdi_lock"]["n"] == 3
