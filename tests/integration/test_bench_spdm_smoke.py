"""Smoke test of the SPDM connect benchmark: a tiny run in-process, JSON layout, sane numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import bench_spdm

STATS = ("median_ms", "p10_ms", "p90_ms", "mean_ms")


@pytest.mark.timeout(20)
def test_bench_spdm_quick_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "bench-spdm.json"
    affinity = os.sched_getaffinity(0)

    assert bench_spdm.main(["--quick", "--iterations", "2", "--out", str(out)]) == 0

    assert os.sched_getaffinity(0) == affinity  # the pinning is undone
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report) == {"meta", "results", "crypto", "notes"}

    meta = report["meta"]
    for key in ("python", "platform", "date", "quick", "cpu_pinned", "cryptography", "openssl"):
        assert key in meta
    assert meta["quick"] is True and meta["iterations"] == 2
    assert meta["cpu_pinned"] in affinity and meta["affinity_verified"] is True
    assert meta["elapsed_s"] > 0

    crypto = {c["algorithm"]: c for c in report["crypto"]}
    assert set(crypto) == {"P-384/SHA-384", "P-256/SHA-256"}
    for c in crypto.values():
        assert c["n"] == 2 and c["ms_per_connect"]["n"] == 2
        assert all(c["ms_per_connect"][k] > 0 for k in STATS)
        ops = {o["op"]: o for o in c["ops"]}
        assert {"sign", "cert_signature_verify", "signature_verify", "ecdh_keygen",
                "ecdh_exchange", "kdf_hmac", "hash", "aead"} <= set(ops)
        assert ops["sign"]["count"] == 2 and ops["signature_verify"]["count"] == 2
        assert ops["ecdh_keygen"]["count"] == 2 and ops["ecdh_exchange"]["count"] == 2
        for o in ops.values():
            assert o["count"] > 0 and o["median_ms"] > 0 and o["us_per_op"] > 0, o["op"]

    results = report["results"]
    assert [(r["algorithm"], r["path"]) for r in results] == [
        ("P-384/SHA-384", "in-process"), ("P-384/SHA-384", "socket"),
        ("P-256/SHA-256", "in-process"), ("P-256/SHA-256", "socket")]
    for r in results:
        where = (r["algorithm"], r["path"])
        assert r["connects"] == 2 and r["ms_per_connect"]["n"] == 2, where
        assert all(r["ms_per_connect"][k] > 0 for k in STATS), where
        for key in ("connects_per_s", "crypto_ms_per_connect", "overhead_ratio", "elapsed_s",
                    "doe_objects_per_connect", "doe_bytes_per_connect"):
            assert r[key] > 0, (where, key)
        assert r["crypto_ms_per_connect"] == crypto[r["algorithm"]]["ms_per_connect"]["median_ms"]
        assert r["overhead_ratio"] == pytest.approx(
            r["ms_per_connect"]["median_ms"] / r["crypto_ms_per_connect"], rel=1e-2)
        assert r["spdm_version"] in ("1.2", "1.3") and r["aead"] == "AES_256_GCM"
        # VERSION, CAPABILITIES, ALGORITHMS, DIGESTS, >= 1 CERTIFICATE, MEASUREMENTS,
        # KEY_EXCHANGE_RSP, FINISH_RSP, END_SESSION_ACK
        assert r["doe_objects_per_connect"] >= 9, where
    assert results[0]["base_asym"] == "ECDSA_P384" and results[2]["base_asym"] == "ECDSA_P256"
    assert isinstance(report["notes"], str) and report["notes"]


def test_iterations_must_allow_percentiles() -> None:
    with pytest.raises(SystemExit):
        bench_spdm.parse_args(["--iterations", "1"])
