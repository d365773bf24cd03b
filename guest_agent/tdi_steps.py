"""The steps every personality's ``accept`` shares: timed steps, the host's pause points,
the guest's own attestation of a locked TDI and the TDI_ACCEPT it sends (PCIe 6.x §11.2.7).

Over GHCx (docs/ghcx.md); the flow around them: docs/tdisp-and-tsm.md, "The guest's accept
flow".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from guest_agent.ghcx_client import GhcxCallError, GhcxClient, ask
from teeio import tdi_verify
from teeio.ghcx.messages import (
    Digests,
    GetEvidence,
    TdiAccept,
    TdiInfo,
    TdiInfoResponse,
    TdiLock,
    TdiStop,
)

PAUSE_POINTS = ("before-accept", "in-run")
PAUSE_TIMEOUT = 90.0

T = TypeVar("T")


class Steps:
    """Each step with its wall time (the LOCK -> RUN latency split the benchmark reports)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def run(self, name: str, fn: Callable[[], T]) -> T:
        t = time.monotonic()
        try:
            out = fn()
        except Exception as exc:
            self.items.append({"step": name, "ok": False, "seconds": since(t),
                               "error": f"{type(exc).__name__}: {exc}"})
            raise
        self.items.append({"step": name, "ok": True, "seconds": since(t)})
        return out


def since(t: float) -> float:
    return round(time.monotonic() - t, 4)


def pause(sync_dir: Path, point: str) -> float:
    """Wait for ``resume-<point>`` from the host (tests); the seconds waited."""
    t = time.monotonic()
    (sync_dir / f"paused-{point}").write_text(str(os.getpid()))
    resume = sync_dir / f"resume-{point}"
    while not resume.exists():
        if time.monotonic() - t > PAUSE_TIMEOUT:
            raise TimeoutError(f"no {resume.name} from the host within {PAUSE_TIMEOUT:.0f} s")
        time.sleep(0.05)
    return since(t)


def attest(steps: Steps, client: GhcxClient, policy: tdi_verify.GuestPolicy,
           bars: list[tuple[int, int, int]], msix_bars: Collection[int],
           ) -> tuple[tdi_verify.Evidence, TdiInfoResponse, tdi_verify.Verdict]:
    """GET_EVIDENCE with a fresh nonce of the guest's, TDI_INFO, and the guest's own
    verification of both (:func:`teeio.tdi_verify.verify`) against the BARs it sees."""
    nonce = os.urandom(32)
    got = steps.run("get_evidence", lambda: ask(client, GetEvidence(nonce=nonce)))
    info = steps.run("tdi_info", lambda: ask(client, TdiInfo()))
    ev = tdi_verify.Evidence(got.cert_chain, got.vca, got.measurements, got.report)
    verdict = steps.run("verify", lambda: tdi_verify.verify(policy, ev, info.encode(), nonce,
                                                            bars, msix_bars))
    return ev, info, verdict


def accept_request(ev: tdi_verify.Evidence, info: TdiInfoResponse) -> TdiAccept:
    """TDI_ACCEPT: the digests and lock epoch the guest verified (docs/ghcx.md)."""
    return TdiAccept(digests=Digests(**tdi_verify.digests(ev)), lock_epoch=info.lock_epoch)


def ghcx_failed(report: dict[str, Any], checks: Any, exc: GhcxCallError) -> None:
    """The TSM answered a call with an error: the flow ends there, and says why."""
    report["error"] = f"GHCx {exc.code}: {exc.message}"
    checks.add("ghcx_error", False, error=report["error"])


def channel_record(report: dict[str, Any], client: GhcxClient) -> None:
    """What the channel saw (retries, REHELLOs …), whatever became of the flow."""
    report["ghcx"] = client.counters
    report["tsm_restarted"] = client.tsm_restarted


def verdict(report: dict[str, Any], checks: Any, expect: str) -> dict[str, Any]:
    """``ok``: accepted with every check passed, or (``expect == "refuse"``) refused."""
    if expect == "refuse":
        report["ok"] = not report["accepted"] and bool(report.get("refusal"))
    else:
        report["ok"] = bool(report["accepted"]) and checks.ok
    return report


def lock_and_accept(report: dict[str, Any], steps: Steps, client: GhcxClient,
                    policy: tdi_verify.GuestPolicy,
                    layout: tuple[list[tuple[int, int, int]], frozenset[int]],
                    pause_at: str, sync_dir: Path, check_locked: Callable[[], None]) -> bool:
    """LOCK, the guest's own attestation, then ACCEPT (PCIe 6.x §11.2.7): True once
    accepted.  *check_locked* looks at the TEE range in CONFIG_LOCKED, where it answers
    nobody (§11.2.1).  A failed verdict STOPs the TDI; a refusal is in ``report``."""
    report["lock"] = steps.run("tdi_lock", lambda: ask(client, TdiLock()).encode())
    check_locked()
    evidence, info, verdict = attest(steps, client, policy, *layout)
    report["info"] = info.encode()
    report["verdict"] = verdict.as_dict()
    if not verdict.ok:
        report["refusal"] = verdict.first_failure()
        steps.run("tdi_stop", lambda: ask(client, TdiStop()))
        return False
    if pause_at == "before-accept":
        report["paused_seconds"] = pause(sync_dir, "before-accept")
    try:
        report["accept"] = steps.run("tdi_accept", lambda: ask(
            client, accept_request(evidence, info)).encode())
    except GhcxCallError as exc:
        report["refusal"] = f"TDI_ACCEPT refused: {exc.code}: {exc.message}"
        return False
    report["accepted"] = True
    return True
