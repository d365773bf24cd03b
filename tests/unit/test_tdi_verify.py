"""The guest's verification of a locked TDI (teeio.tdi_verify), on evidence produced by our
SPDM requester and responder in process: the happy path, then one failure per check."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from teeio import pki
from teeio.measurements import REFERENCE_FORMAT, DmtfValueType, MeasurementSource
from teeio.spdm import Requester, Responder, ResponderConfig
from teeio.spdm.defs import MEAS_OP_ALL
from teeio.tdi_verify import Evidence, GuestPolicy, digests, policy_from_doc, verify
from teeio.tdisp.defs import InterfaceInfo, LockInterfaceFlags, MmioRangeAttributes
from teeio.tdisp.report import DeviceInterfaceReport, MmioRange, page_number
from tests.support.pki import shared_identity as ident
from tests.support.spdm_pair import Link

SOURCES = (MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"firmware .text"),
           MeasurementSource(2, DmtfValueType.VERSION, b"1.0", as_digest=False))
BARS = [(0, 0xFE000000, 0x1000), (1, 0xFE001000, 0x1000)]
MSIX = {1}                       # the accelerator's MSI-X table and PBA: BAR1
#: the NVMe personality: 64-bit BAR0 (16 KiB, registers and doorbells), MSI-X in BAR2
NVME_BARS = [(0, 0xFE000000, 0x4000), (2, 0xFE004000, 0x1000)]
NVME_MSIX = {2}
OFFSET = 0x10_0000_0000


def refs(sources: tuple[MeasurementSource, ...] = SOURCES) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sources:
        entry: dict[str, Any] = {"value_type": s.value_type}
        if s.as_digest:
            entry["sha384"] = hashlib.sha384(s.data).hexdigest()
        else:
            entry["raw"] = s.data.hex()
        out[str(s.index)] = entry
    return {"format": REFERENCE_FORMAT, "measurements": out}


def policy(anchor_pem: bytes | None = None, **dev: Any) -> GuestPolicy:
    pem = anchor_pem or ident().root.public_bytes(Encoding.PEM)
    return policy_from_doc({"format": "teeio-guest-policy/1",
                            "trust_anchors_pem": pem.decode(),
                            "reference_values": refs(),
                            "device": {"vendor_id": "0x1234", "device_id": "0x7e10", **dev}})


def report(offset: int = OFFSET, bars: list[tuple[int, int, int]] = BARS,
           non_tee: frozenset[int] = frozenset(MSIX)) -> bytes:
    ranges = tuple(MmioRange(page_number(base, offset), size >> 12,
                             MmioRangeAttributes.IS_NON_TEE_MEM if i in non_tee
                             else MmioRangeAttributes(0), i) for i, base, size in bars)
    return DeviceInterfaceReport(InterfaceInfo.DMA_WITHOUT_PASID
                                 | InterfaceInfo.NO_UPDATE_AFTER_LOCK,
                                 mmio_ranges=ranges).encode()


def evidence(nonce: bytes, sources: tuple[MeasurementSource, ...] = SOURCES,
             rep: bytes | None = None) -> Evidence:
    rsp = Responder(ident(), sources, ResponderConfig(versions=(0x12,)), name="dev")
    req = Requester(Link(rsp), [ident().root], name="tsm")
    req.init_connection()
    req.get_digests()
    chain = req.get_certificate(0)
    m = req.get_measurements(MEAS_OP_ALL, nonce=nonce)
    return Evidence(chain, m.vca, m.transcript, report() if rep is None else rep)


def info(ev: Evidence, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"state": "CONFIG_LOCKED", "lock_epoch": 1,
                            "lock_flags": int(LockInterfaceFlags.NO_FW_UPDATE),
                            "mmio_reporting_offset": OFFSET,
                            "stream": {"id": 1, "state": "secure"}, "digests": digests(ev)}
    base.update(over)
    return base


def failed(v: Any) -> set[str]:
    return {c.name for c in v.checks if not c.ok}


def test_happy_path_passes_every_check() -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce)
    v = verify(policy(leaf_subject=ident().leaf.subject.rfc4514_string()), ev, info(ev),
               nonce, BARS, MSIX)
    assert v.ok, v.first_failure()
    names = {c.name for c in v.checks}
    assert {"chain", "signature", "nonce", "measurements", "report_ranges", "device_identity",
            "digest_cert_chain", "digest_transcript", "digest_report"} <= names
    assert [m["status"] for m in v.measurements] == ["match", "match"]


def test_rogue_anchor_is_refused() -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce)
    rogue = pki.generate_chain("P-384").root.public_bytes(Encoding.PEM)
    v = verify(policy(rogue), ev, info(ev), nonce, BARS, MSIX)
    assert not v.ok and "chain" in failed(v)


def test_tampered_firmware_fails_measurements() -> None:
    nonce = os.urandom(32)
    patched = (MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"firmware .text!"),
               SOURCES[1])
    ev = evidence(nonce, patched)
    v = verify(policy(), ev, info(ev), nonce, BARS, MSIX)
    assert failed(v) == {"measurements"}
    assert v.measurements[0]["status"] == "MISMATCH"


def test_stale_nonce_is_refused() -> None:
    ev = evidence(os.urandom(32))
    v = verify(policy(), ev, info(ev), os.urandom(32), BARS, MSIX)
    assert failed(v) == {"nonce"}


def test_altered_response_breaks_the_signature_and_the_digest() -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce)
    q, r = ev.measurements[-1]
    r2 = bytearray(r)
    r2[12] ^= 1                     # inside the measurement record
    bad = replace(ev, measurements=(*ev.measurements[:-1], (q, bytes(r2))))
    v = verify(policy(), bad, info(ev), nonce, BARS, MSIX)
    assert {"signature", "digest_transcript"} <= failed(v)


def test_report_must_match_the_bars_the_guest_sees() -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce)
    moved = [(0, 0xFE100000, 0x1000), (1, 0xFE001000, 0x1000)]
    v = verify(policy(), ev, info(ev), nonce, moved, MSIX)
    assert failed(v) == {"report_ranges"}
    v = verify(policy(), ev, info(ev, mmio_reporting_offset=0), nonce, BARS, MSIX)
    assert failed(v) == {"report_ranges"}


def test_msix_bar_reported_as_tee_is_refused() -> None:
    nonce = os.urandom(32)
    ranges = tuple(MmioRange(page_number(b, OFFSET), 1, MmioRangeAttributes(0), i)
                   for i, b, _ in BARS)
    rep = DeviceInterfaceReport(InterfaceInfo.DMA_WITHOUT_PASID
                                | InterfaceInfo.NO_UPDATE_AFTER_LOCK,
                                mmio_ranges=ranges).encode()
    ev = evidence(nonce, rep=rep)
    v = verify(policy(), ev, info(ev), nonce, BARS, MSIX)
    assert failed(v) == {"report_ranges"}


def test_nvme_layout_is_derived_from_the_bars_the_guest_sees() -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce, rep=report(bars=NVME_BARS, non_tee=frozenset(NVME_MSIX)))
    v = verify(policy(), ev, info(ev), nonce, NVME_BARS, NVME_MSIX)
    assert v.ok, v.first_failure()
    assert [r["pages"] for r in v.report["mmio_ranges"]] == [4, 1]
    assert [r["range_id"] for r in v.report["mmio_ranges"]] == [0, 2]
    # the same report against the accelerator's layout (MSI-X in BAR1): refused
    assert failed(verify(policy(), ev, info(ev), nonce, BARS, MSIX)) == {"report_ranges"}
    # BAR0 seen 4 KiB long while the report says 16 KiB: refused
    short = [(0, 0xFE000000, 0x1000), NVME_BARS[1]]
    v = verify(policy(), ev, info(ev), nonce, short, NVME_MSIX)
    assert "BAR0: 4 pages for 4096 bytes" in v.first_failure()


@pytest.mark.parametrize("non_tee,problem", [
    (frozenset(), "BAR2: the MSI-X BAR is reported as TEE memory"),
    (frozenset({0, 2}), "BAR0: a register BAR is reported non-TEE"),
])
def test_nvme_ranges_must_say_which_bar_is_tee(non_tee: frozenset[int], problem: str) -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce, rep=report(bars=NVME_BARS, non_tee=non_tee))
    v = verify(policy(), ev, info(ev), nonce, NVME_BARS, NVME_MSIX)
    assert failed(v) == {"report_ranges"} and problem in v.first_failure()


def test_a_device_with_only_msix_bars_has_no_tee_range() -> None:
    nonce = os.urandom(32)
    only = [(2, 0xFE004000, 0x1000)]
    ev = evidence(nonce, rep=report(bars=only, non_tee=frozenset({2})))
    v = verify(policy(), ev, info(ev), nonce, only, {2})
    assert "no TEE MMIO range" in v.first_failure()


@pytest.mark.parametrize("over,check", [
    ({"state": "RUN"}, "tdi_state"),
    ({"lock_flags": 0}, "lock_flags"),
    ({"stream": {"id": 1, "state": "insecure"}}, "stream"),
])
def test_tdi_info_must_say_locked_secure_no_fw_update(over: dict[str, Any], check: str) -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce)
    assert failed(verify(policy(), ev, info(ev, **over), nonce, BARS, MSIX)) == {check}


def test_digest_mismatch_is_refused() -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce)
    d = digests(ev)
    d["report"] = hashlib.sha384(b"another report").hexdigest()
    assert failed(verify(policy(), ev, info(ev, digests=d), nonce, BARS, MSIX)) == {"digest_report"}


def test_wrong_leaf_subject_is_refused() -> None:
    nonce = os.urandom(32)
    ev = evidence(nonce)
    v = verify(policy(leaf_subject="CN=someone else"), ev, info(ev), nonce, BARS, MSIX)
    assert failed(v) == {"device_identity"}


def test_malformed_evidence_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="malformed evidence"):
        Evidence.from_payload({"cert_chain": "zz"})
