"""The TVM's own verification of a locked TDI before it accepts it (PCIe 6.x §11.2.7).

Pure (bytes and dicts in, checks out): the guest agent runs it on what the TSM returned over
GHCx (docs/ghcx.md).  The checks, in order, and what each protects against are in
docs/tdisp-and-tsm.md, "What the guest verifies".
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from teeio import pki
from teeio.measurements import MeasurementDecodeError, parse_measurement_blocks
from teeio.refcheck import compare_measurements, parse_reference_values
from teeio.spdm import codec
from teeio.spdm import crypto as spdm_crypto
from teeio.spdm.errors import DecodeError
from teeio.spdm.requester import parse_vca, verify_measurement_transcript
from teeio.tdisp.codec import TdispDecodeError
from teeio.tdisp.defs import InterfaceInfo, LockInterfaceFlags, MmioRangeAttributes
from teeio.tdisp.report import DeviceInterfaceReport, page_number

__all__ = ["POLICY_FORMAT", "Check", "Evidence", "GuestPolicy", "PolicyError", "Verdict",
           "digests", "load_policy", "verify"]

POLICY_FORMAT = "teeio-guest-policy/1"
DIGEST_ALG = "sha384"


class PolicyError(ValueError):
    """The policy file cannot be used; the message says why."""


@dataclass(frozen=True)
class GuestPolicy:
    """What the guest trusts: its own anchors, reference values, the device it expects."""

    anchors: tuple[x509.Certificate, ...]
    references: dict[int, dict[str, Any]]
    vendor_id: int
    device_id: int
    leaf_subject: str | None = None     # RFC 4514; None: any leaf under the anchors


def load_policy(path: Path) -> GuestPolicy:
    """A ``teeio-guest-policy/1`` JSON file::

        {"format": "teeio-guest-policy/1",
         "trust_anchors_pem": "-----BEGIN CERTIFICATE-----...",
         "reference_values": { teeio-refvalues document },
         "device": {"vendor_id": "0x1234", "device_id": "0x7e10", "leaf_subject": "CN=..."}}
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyError(f"policy {path}: {exc}") from None
    return policy_from_doc(doc, str(path))


def policy_from_doc(doc: object, where: str = "policy") -> GuestPolicy:
    if not isinstance(doc, dict) or doc.get("format") != POLICY_FORMAT:
        raise PolicyError(f"{where}: not a {POLICY_FORMAT} document")
    pem = doc.get("trust_anchors_pem")
    if not isinstance(pem, str):
        raise PolicyError(f"{where}: no trust_anchors_pem")
    try:
        anchors = tuple(x509.load_pem_x509_certificates(pem.encode()))
    except ValueError as exc:
        raise PolicyError(f"{where}: trust anchors: {exc}") from None
    try:
        refs = parse_reference_values(doc.get("reference_values"))
    except ValueError as exc:
        raise PolicyError(f"{where}: reference values: {exc}") from None
    dev = doc.get("device")
    if not isinstance(dev, dict):
        raise PolicyError(f"{where}: no device object")
    try:
        vendor, device = int(str(dev["vendor_id"]), 0), int(str(dev["device_id"]), 0)
    except (KeyError, ValueError):
        raise PolicyError(f"{where}: device.vendor_id/device_id must be integers") from None
    subject = dev.get("leaf_subject")
    if subject is not None and not isinstance(subject, str):
        raise PolicyError(f"{where}: device.leaf_subject must be a string")
    return GuestPolicy(anchors, refs, vendor, device, subject)


@dataclass(frozen=True)
class Evidence:
    """GET_EVIDENCE's payload (docs/ghcx.md), decoded from hex."""

    cert_chain: bytes
    vca: bytes
    measurements: tuple[tuple[bytes, bytes], ...]
    report: bytes

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Evidence:
        try:
            pairs = tuple((bytes.fromhex(q), bytes.fromhex(r))
                          for q, r in payload["measurements"])
            return cls(bytes.fromhex(payload["cert_chain"]), bytes.fromhex(payload["vca"]),
                       pairs, bytes.fromhex(payload["report"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed evidence: {type(exc).__name__}: {exc}") from None

    @property
    def transcript(self) -> bytes:
        return self.vca + b"".join(q + r for q, r in self.measurements)


def digests(ev: Evidence) -> dict[str, str]:
    """The three digests TDI_INFO carries (docs/ghcx.md), recomputed from the blobs."""
    return {"cert_chain": hashlib.sha384(ev.cert_chain).hexdigest(),
            "transcript": hashlib.sha384(ev.transcript).hexdigest(),
            "report": hashlib.sha384(ev.report).hexdigest()}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Verdict:
    checks: list[Check] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return ok

    def first_failure(self) -> str:
        bad = next((c for c in self.checks if not c.ok), None)
        return "" if bad is None else f"{bad.name}: {bad.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [vars(c) for c in self.checks],
                "measurements": self.measurements, "report": self.report}


def verify(policy: GuestPolicy, ev: Evidence, info: dict[str, Any], nonce: bytes,
           bars: Sequence[tuple[int, int, int]], msix_bars: Collection[int]) -> Verdict:
    """All checks (module docstring); *bars* = (index, guest-physical base, size) of the
    device's memory BARs as the guest sees them, *msix_bars* the indices of those its
    MSI-X capability places the table and the PBA in (PCIe 6.x §7.7.2: Table BIR, PBA
    BIR).  Every check runs and is reported; the verdict is ok only if all pass."""
    v = Verdict()
    # 1. the blobs are the ones TDI_INFO names
    theirs = info.get("digests") or {}
    mine = digests(ev)
    for name, value in mine.items():
        other = theirs.get(name)
        v.add(f"digest_{name}", isinstance(other, str)
              and hmac.compare_digest(other.lower(), value),
              f"SHA-384 {value[:16]}… vs TDI_INFO {str(other)[:16]}…")
    # 2-5. chain, signature, nonce, measurements
    _check_chain_and_transcript(v, policy, ev, nonce)
    # 6. the TDI as TDI_INFO says it is
    state = info.get("state")
    v.add("tdi_state", state == "CONFIG_LOCKED", f"state {state}")
    flags = int(info.get("lock_flags", 0) or 0)
    v.add("lock_flags", bool(flags & LockInterfaceFlags.NO_FW_UPDATE),
          f"lock flags 0x{flags:04x} (NO_FW_UPDATE required)")
    stream = info.get("stream") or {}
    v.add("stream", stream.get("state") == "secure",
          f"IDE stream {stream.get('id')} {stream.get('state')}")
    # 7. the interface report against what the guest sees
    _check_report(v, ev.report, int(info.get("mmio_reporting_offset", 0) or 0), bars,
                  frozenset(msix_bars))
    return v


def _check_chain_and_transcript(v: Verdict, policy: GuestPolicy, ev: Evidence,
                                nonce: bytes) -> None:
    try:
        neg, _caps = parse_vca(ev.vca)
        hash_name = spdm_crypto.hash_name(neg.base_hash)
    except Exception as exc:  # MalformedResponse, unknown algorithm
        v.add("vca", False, f"VCA does not decode: {exc}")
        return
    v.add("vca", True, f"SPDM {neg.version >> 4}.{neg.version & 0xF}, {hash_name}")
    try:
        root_hash, certs = pki.parse_spdm_cert_chain(ev.cert_chain, hash_name)
        leaf_key = pki.verify_chain(certs, list(policy.anchors))
        if not hmac.compare_digest(root_hash, pki.HASHES[hash_name](
                certs[0].public_bytes(Encoding.DER)).digest()):
            raise pki.ChainError("RootHash is not the hash of the root certificate")
    except pki.ChainError as exc:
        v.add("chain", False, str(exc))
        return
    leaf = certs[-1].subject.rfc4514_string()
    v.add("chain", True, f"{len(certs)} certificates to the guest's anchor; leaf {leaf}")
    if policy.leaf_subject is not None:
        v.add("device_identity", leaf == policy.leaf_subject,
              f"leaf {leaf!r}, policy expects {policy.leaf_subject!r}")
    if not ev.measurements:
        v.add("signature", False, "no measurement transcript")
        return
    try:
        verify_measurement_transcript(ev.vca, ev.measurements, leaf_key, neg)
    except Exception as exc:  # SignatureError, MalformedResponse
        v.add("signature", False, f"{type(exc).__name__}: {exc}")
        return
    v.add("signature", True, "MEASUREMENTS signed by the leaf key over VCA + L1")
    req_raw, rsp_raw = ev.measurements[-1]
    try:
        req = codec.GetMeasurements.decode(req_raw)
        rsp = codec.Measurements.decode(rsp_raw, neg, signed=True)
        blocks = parse_measurement_blocks(rsp.record, rsp.number_of_blocks,
                                          spdm_crypto.meas_hash_name(neg.meas_hash))
    except (DecodeError, MeasurementDecodeError) as exc:
        v.add("measurements", False, f"does not decode: {exc}")
        return
    v.add("nonce", hmac.compare_digest(req.nonce, nonce),
          "the signed GET_MEASUREMENTS carries the guest's nonce"
          if req.nonce == nonce else "the signed request's nonce is not the guest's")
    meas_hash = spdm_crypto.meas_hash_name(neg.meas_hash)
    cmp = compare_measurements(blocks, policy.references, meas_hash)
    v.measurements = [{"index": c.index, "status": c.status, "reason": c.reason} for c in cmp]
    bad = [c for c in cmp if not c.ok]
    v.add("measurements", not bad and bool(cmp),
          bad[0].reason if bad else f"{len(cmp)} blocks match the reference values")


def _check_report(v: Verdict, raw: bytes, offset: int,
                  bars: Sequence[tuple[int, int, int]], msix_bars: frozenset[int]) -> None:
    """§11.3.11 against the guest's own view: one range per memory BAR in ascending order,
    Range ID = BAR index, first page from the BAR's address and the reporting offset, as
    many pages as the BAR is long; a BAR holding the MSI-X table or PBA is IS_NON_TEE_MEM
    (LOCK_MSIX is not asked for, so the VMM keeps them), every other BAR is TEE memory
    (its registers are what the guest protects), and there is at least one of those."""
    try:
        rep = DeviceInterfaceReport.decode(raw)
    except TdispDecodeError as exc:
        v.add("report", False, f"interface report does not decode: {exc}")
        return
    v.report = {"interface_info": int(rep.interface_info),
                "mmio_ranges": [{"first_page": hex(r.first_page), "pages": r.number_of_pages,
                                 "attributes": int(r.attributes), "range_id": r.range_id}
                                for r in rep.mmio_ranges]}
    want = InterfaceInfo.NO_UPDATE_AFTER_LOCK | InterfaceInfo.DMA_WITHOUT_PASID
    v.add("report_info", rep.interface_info & want == want,
          f"INTERFACE_INFO 0x{int(rep.interface_info):04x}")
    problems: list[str] = []
    ranges = list(rep.mmio_ranges)
    mine = sorted(bars)
    if len(ranges) != len(mine):
        problems.append(f"{len(ranges)} MMIO ranges for {len(mine)} BARs")
    for r, (index, base, size) in zip(ranges, mine, strict=False):
        where = f"BAR{index}"
        if r.range_id != index:
            problems.append(f"{where}: range ID {r.range_id}")
        if r.first_page != page_number(base, offset):
            problems.append(f"{where}: first page {r.first_page:#x}, the guest sees "
                            f"{page_number(base, offset):#x} (base {base:#x} + offset "
                            f"{offset:#x})")
        if r.number_of_pages != max(1, (size + 0xFFF) >> 12):
            problems.append(f"{where}: {r.number_of_pages} pages for {size} bytes")
        non_tee = bool(r.attributes & MmioRangeAttributes.IS_NON_TEE_MEM)
        if index not in msix_bars and non_tee:
            problems.append(f"{where}: a register BAR is reported non-TEE")
        if index in msix_bars and not non_tee:
            problems.append(f"{where}: the MSI-X BAR is reported as TEE memory, but the "
                            "table is not locked")
    if not [i for i, _b, _s in mine if i not in msix_bars]:
        problems.append("no TEE MMIO range: every BAR the guest sees holds MSI-X")
    v.add("report_ranges", not problems,
          "; ".join(problems) or f"{len(ranges)} MMIO ranges match the BARs "
                                  f"(reporting offset {offset:#x})")

