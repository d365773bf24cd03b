"""``teeio-tsm attest``: attest a device over its DOE transport with the TSM's SPDM requester.

DOE Discovery, the VCA, the certificate chain to ``--trust-anchor``, CHALLENGE, signed
GET_MEASUREMENTS with a fresh nonce against ``--reference-values``, and with ``--session``
a secured session (DSP0274 §10); each step is verified before the next, and the first
failure is one line on stderr (docs/attestation.md).  :func:`attested` and
:func:`add_device_arguments` are shared with ``teeio-tsm ide``; :class:`DoeDebug` (DOE
capture, session secrets for spdm_dump) with the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teeio.doe import (
    PCI_SIG_VENDOR_ID,
    DataObjectType,
    DoeError,
    DoeObject,
    pad_dw,
    protocol_name,
)
from teeio.doe_pcap import DoePcapWriter, SessionSecretLog
from teeio.lite_dataclass import dataclass
from teeio.refcheck import (
    Comparison,
    compare_measurements,
    parse_reference_values,
    value_type_name,
)
from tsm.doe_client import DoeClient, DoeTransportError

if TYPE_CHECKING:   # SPDM and X.509 are imported when the flow runs, not for --help
    from cryptography import x509

    from teeio.measurements import MeasurementBlock
    from teeio.spdm import Requester
    from teeio.spdm.defs import (
        AeadSuite,
        BaseAsymAlgo,
        BaseHashAlgo,
        DheGroup,
        MeasurementHashAlgo,
    )

log = logging.getLogger(__name__)

EVIDENCE_FORMAT = "teeio-attestation-evidence/1"
SPDM = (PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM)
SECURED_SPDM = (PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM)
#: DSP0274 §10.11 GET_MEASUREMENTS Nonce (= teeio.spdm.defs.NONCE_SIZE, which the options
#: cannot import without loading all of SPDM).
NONCE_SIZE = 32


class AttestError(Exception):
    """Attestation did not verify; the message is the one-line reason."""


# -- inputs -------------------------------------------------------------------------------------

def parse_nonce(text: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex: {text!r}") from None
    if len(nonce) != NONCE_SIZE:
        raise argparse.ArgumentTypeError(f"the nonce is {NONCE_SIZE} bytes ({2 * NONCE_SIZE} "
                                         f"hex digits), not {len(nonce)}")
    return nonce


def load_anchors(path: Path) -> list[x509.Certificate]:
    from teeio import pki
    try:
        return pki.load_anchors(path)
    except (OSError, ValueError) as exc:
        raise AttestError(f"trust anchor {path}: {exc}") from None


def load_reference_values(path: Path) -> dict[int, dict[str, Any]]:
    """``teeio-refvalues`` JSON -> {index: entry}."""
    import json  # only with --reference-values (or --json): not on the plain path
    try:
        return parse_reference_values(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise AttestError(f"reference values {path}: {exc}") from None


# -- the DOE transport for the requester --------------------------------------------------------

def doe_transport(client: DoeClient) -> Callable[[int, bytes], bytes]:
    """``send(doe_type, payload) -> payload`` over whole DOE objects (DW padding is the
    requester's and responder's business; nothing is stripped here)."""
    def send(doe_type: int, payload: bytes) -> bytes:
        req = DoeObject(PCI_SIG_VENDOR_ID, doe_type, pad_dw(payload))
        raw = client.exchange(req.encode())
        if raw is None:
            if req.protocol == SECURED_SPDM:
                return b""   # the requester reports "no response in session ..."
            raise AttestError(f"DOE: the device sent no response to a "
                              f"{protocol_name(*req.protocol)} object")
        try:
            rsp = DoeObject.decode(raw)
        except DoeError as exc:
            raise AttestError(f"DOE: malformed response object: {exc}") from None
        if rsp.protocol != req.protocol:
            raise AttestError(f"DOE: a {protocol_name(*req.protocol)} object was answered "
                              f"with {protocol_name(*rsp.protocol)}")
        return rsp.payload
    return send


# -- the flow -----------------------------------------------------------------------------------

@dataclass
class AttestOptions:
    trust_anchor: Path
    doe_socket: str | None = None
    doe_tcp_port: int | None = None
    host: str = "127.0.0.1"
    reference_values: Path | None = None
    nonce: bytes | None = None
    session: bool = False
    json_out: Path | None = None
    debug: DoeDebug | None = None


@dataclass
class DoeDebug:
    """Debugging taps on the TSM's DOE connections and SPDM sessions (module doc)."""

    capture: DoePcapWriter | None = None
    secrets: SessionSecretLog | None = None

    @classmethod
    def open(cls, capture: Path | None, secrets: Path | None, who: str) -> DoeDebug | None:
        """None when neither is asked for; AttestError (one line) if a file cannot be made."""
        if capture is None and secrets is None:
            return None
        out = cls()
        try:
            if capture is not None:
                out.capture = DoePcapWriter(capture)
            if secrets is not None:
                out.secrets = SessionSecretLog(secrets, who)
        except OSError as exc:
            out.close()
            raise AttestError(f"cannot create {exc.filename}: {exc.strerror or exc}") from None
        return out

    @classmethod
    def from_args(cls, ns: argparse.Namespace, who: str) -> DoeDebug | None:
        return cls.open(getattr(ns, "doe_capture", None),
                        getattr(ns, "export_session_secrets", None), who)

    def attach(self, requester: Requester) -> None:
        if self.secrets is not None:
            requester.on_session_secret = self.secrets.record

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        if self.secrets is not None:
            self.secrets.close()


@dataclass
class Attestation:
    """What a run established; ``evidence`` is the --json document."""

    out: Callable[[str], None]
    evidence: dict[str, Any] = field(default_factory=dict)


def _alg(enum: type[BaseAsymAlgo | BaseHashAlgo | MeasurementHashAlgo | DheGroup | AeadSuite],
         value: int) -> str:
    if not value:
        return "none"
    try:
        return str(enum(value).name)
    except ValueError:
        return f"0x{value:x}"


def _fingerprint(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import hashes
    return cert.fingerprint(hashes.SHA384()).hex(":").upper()


def connect(opts: AttestOptions) -> tuple[DoeClient, str]:
    """The DOE transport to the device, and a description of where it is."""
    if opts.doe_socket is not None:
        where = f"unix:{opts.doe_socket}"
    else:
        where = f"tcp:{opts.host}:{opts.doe_tcp_port}"
    try:
        if opts.doe_socket is not None:
            client = DoeClient.connect_unix(opts.doe_socket)
        else:
            assert opts.doe_tcp_port is not None
            client = DoeClient.connect_tcp(opts.doe_tcp_port, opts.host)
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise AttestError(f"DOE transport: cannot connect to {where}: "
                          f"{exc.strerror or exc}") from None
    if opts.debug is not None:
        client.capture = opts.debug.capture
    return client, where


def attest(opts: AttestOptions, run: Attestation) -> None:
    """Run the whole flow; raises AttestError, RequesterError or DoeTransportError."""
    with attested(opts, run) as (req, blocks):
        if opts.session:
            _session(req, run, blocks)


@contextlib.contextmanager
def attested(opts: AttestOptions, run: Attestation,
             ) -> Iterator[tuple[Requester, tuple[MeasurementBlock, ...]]]:
    """Steps 1-5: connect and attest the device; yields the SPDM requester (connection
    negotiated, device authenticated) and the signed measurements.  On the way out the
    DOE connection ends with CONTINUE, so the device keeps its state -- SPDM sessions
    included -- for the next requester."""
    anchors = load_anchors(opts.trust_anchor)
    references = (load_reference_values(opts.reference_values)
                  if opts.reference_values is not None else None)
    client, where = connect(opts)
    try:
        yield authenticate(opts, run, client, where, anchors, references)
    finally:
        with contextlib.suppress(DoeTransportError, OSError):
            client.end_session()   # CONTINUE: the device keeps listening and its state
        client.close()


def authenticate(opts: AttestOptions, run: Attestation, client: DoeClient, where: str,
                 anchors: list[x509.Certificate],
                 references: dict[int, dict[str, Any]] | None,
                 ) -> tuple[Requester, tuple[MeasurementBlock, ...]]:
    """Steps 1-5 over *client*; with ``opts.session`` the device must also offer
    Secured CMA/SPDM."""
    from teeio import pki
    from teeio.spdm import Requester
    from teeio.spdm import crypto as spdm_crypto
    from teeio.spdm.defs import (
        MEAS_OP_ALL,
        AeadSuite,
        BaseAsymAlgo,
        BaseHashAlgo,
        DheGroup,
        MeasurementHashAlgo,
        version_str,
    )
    out, ev = run.out, run.evidence
    client.hello()
    try:
        protocols = client.discover()
    except DoeError as exc:
        raise AttestError(f"DOE discovery: {exc}") from None
    out(f"DOE: {where}, protocols {' '.join(protocol_name(*p) for p in protocols)}")
    if SPDM not in protocols:
        raise AttestError("DOE discovery: the device does not list CMA/SPDM (0001:01)")
    if opts.session and SECURED_SPDM not in protocols:
        raise AttestError("DOE discovery: the device does not list Secured CMA/SPDM (0001:02), "
                          "which --session needs")

    req = Requester(doe_transport(client), anchors, name="attest")
    if opts.debug is not None:
        opts.debug.attach(req)
    neg = req.init_connection()
    hash_name = spdm_crypto.hash_name(neg.base_hash)
    algorithms = {"base_asym": _alg(BaseAsymAlgo, neg.base_asym),
                  "base_hash": _alg(BaseHashAlgo, neg.base_hash),
                  "measurement_hash": _alg(MeasurementHashAlgo, neg.meas_hash),
                  "dhe": _alg(DheGroup, neg.dhe), "aead": _alg(AeadSuite, neg.aead)}
    ev.update({"format": EVIDENCE_FORMAT, "spdm_version": version_str(neg.version),
               "algorithms": algorithms, "vca": req.vca.hex()})
    out(f"SPDM version: {version_str(neg.version)}")
    out("algorithms: " + " ".join(f"{k}={v}" for k, v in algorithms.items()))

    req.get_digests()
    chain = req.get_certificate(0)   # verified up to the anchors, RootHash and digest checked
    root_hash, certs = pki.parse_spdm_cert_chain(chain, hash_name)
    leaf = certs[-1]
    anchor = next((a for a in anchors if a == certs[0]), None) or next(
        (a for a in anchors if a.subject == certs[0].issuer), anchors[0])
    ev["certificate_chain"] = chain.hex()
    out("device identity (certificate slot 0, chain verified):")
    out(f"  leaf subject: {leaf.subject.rfc4514_string()}")
    out("  issuer chain:")
    for i, cert in enumerate(certs):
        issuer = ("self-signed" if cert.issuer == cert.subject
                  else f"issued by {cert.issuer.rfc4514_string()}")
        out(f"    [{i}] {cert.subject.rfc4514_string()} ({issuer})")
    out(f"  root hash ({algorithms['base_hash']}): {root_hash.hex()}")
    out(f"  leaf SHA-384 fingerprint: {_fingerprint(leaf)}")
    out(f"  trust anchor: {anchor.subject.rfc4514_string()} (SHA-384 {_fingerprint(anchor)})")

    req.challenge(0)
    out("CHALLENGE: CHALLENGE_AUTH signature verified")

    nonce = opts.nonce if opts.nonce is not None else os.urandom(NONCE_SIZE)
    result = req.get_measurements(MEAS_OP_ALL, nonce=nonce)   # signature over L1 verified
    ev.update({"nonce": nonce.hex(),
               "measurement_transcript": [{"request": q.hex(), "response": r.hex()}
                                          for q, r in result.transcript],
               "measurements": [{"index": b.index, "value_type": b.value_type,
                                 "value_type_name": value_type_name(b.value_type), "raw": b.raw,
                                 "value": b.value.hex()} for b in result.blocks]})
    meas_hash = spdm_crypto.meas_hash_name(neg.meas_hash)
    checks = ({c.index: c for c in compare_measurements(result.blocks, references, meas_hash)}
              if references is not None else {})
    out(f"measurements (GET_MEASUREMENTS all, signed, nonce {nonce.hex()}; "
        "signature verified):")
    for b in sorted(result.blocks, key=lambda b: b.index):
        verdict = f"  {checks[b.index].status}" if b.index in checks else ""
        kind = "raw" if b.raw else meas_hash
        text = (f" ({b.value.decode()!r})"
                if b.raw and b.value and all(0x20 <= c < 0x7F for c in b.value) else "")
        out(f"  {b.index:3d} {value_type_name(b.value_type):<22} {kind:<6} {b.value.hex()}{text}"
            f"{verdict}")
        if b.index in checks and checks[b.index].expected:
            out(f"  {'':3} {'':<22} {'':<6} {checks[b.index].expected}  (reference)")
    if references is not None:
        for c in checks.values():
            if c.status == "MISSING":
                out(f"  {c.index:3d} {'(not reported)':<22} {'':<6} {'':<8}  MISSING")
        ev["reference_check"] = [{"index": c.index, "status": c.status}
                                 for c in checks.values()]
        failed = [c for c in checks.values() if not c.ok]
        if failed:
            raise AttestError(failed[0].reason)
        out(f"reference values: all {len(checks)} measurements match")
    return req, result.blocks


def _session(req: Requester, run: Attestation, signed: tuple[MeasurementBlock, ...]) -> None:
    from teeio.spdm.defs import MEAS_OP_ALL, KeyUpdateOp, version_str
    out = run.out
    out("session:")
    sid = req.start_session(0)
    sess = req.sessions[sid]
    out(f"  KEY_EXCHANGE + FINISH: session 0x{sid:08x} established (secured messages "
        f"{version_str(sess.secured_version)}, heartbeat period {sess.heartbeat_period} s)")
    req.heartbeat(sid)
    out("  HEARTBEAT: acknowledged")
    req.key_update(sid, KeyUpdateOp.UpdateAllKeys)
    out("  KEY_UPDATE (UpdateAllKeys, VerifyNewKey): acknowledged under the new keys")
    inside = req.get_measurements(MEAS_OP_ALL, signed=False, session_id=sid)
    if sorted(inside.blocks, key=lambda b: b.index) != sorted(signed, key=lambda b: b.index):
        differ = sorted({b.index for b in set(inside.blocks) ^ set(signed)})
        raise AttestError(f"measurements inside the session differ from the signed ones "
                          f"(indices {differ})")
    out(f"  GET_MEASUREMENTS in the session: {len(inside.blocks)} blocks, the same as signed")
    req.end_session(sid)
    out("  END_SESSION: acknowledged")
    run.evidence["session"] = {"session_id": f"0x{sid:08x}", "ok": True}


# -- command line -------------------------------------------------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_device_arguments(ap)
    ap.add_argument("--session", action="store_true",
                    help="also KEY_EXCHANGE/FINISH, HEARTBEAT, KEY_UPDATE, measurements in "
                         "the session, END_SESSION")
    ap.add_argument("--json", type=Path, dest="json_out", metavar="OUT",
                    help="write the evidence (VCA, measurement transcript, nonce, chain)")


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    """Where the device is and what it is checked against (``attest`` and ``ide``)."""
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--doe-socket", metavar="PATH",
                       help="the device's DOE socket (teeio-device --doe-socket)")
    where.add_argument("--doe-tcp-port", type=int, metavar="N",
                       help="the device's DOE TCP port (teeio-device --doe-tcp-port)")
    ap.add_argument("--host", default="127.0.0.1", help="host of --doe-tcp-port")
    ap.add_argument("--trust-anchor", type=Path, required=True, metavar="PEM",
                    help="root certificate(s) the device chain must verify up to")
    ap.add_argument("--reference-values", type=Path, metavar="JSON",
                    help="teeio-refvalues output: every measurement must match it")
    ap.add_argument("--nonce", type=parse_nonce, metavar="HEX",
                    help=f"GET_MEASUREMENTS nonce, {NONCE_SIZE} bytes (default: random)")
    add_debug_arguments(ap)


def add_debug_arguments(ap: argparse.ArgumentParser) -> None:
    """``--doe-capture`` and ``--export-session-secrets`` (:class:`DoeDebug`)."""
    ap.add_argument("--doe-capture", type=Path, metavar="FILE",
                    help="record every DOE object sent to and received from the device as "
                         "a pcap of link type 292 PCI_DOE (decode: spdm_dump -r FILE)")
    ap.add_argument("--export-session-secrets", type=Path, metavar="FILE",
                    help="DEBUGGING ONLY, insecure: write each SPDM session's DHE secret "
                         "to FILE (0600) as spdm_dump --dhe_secret options, so the secured "
                         "messages in a --doe-capture can be decrypted")


def run_command(ns: argparse.Namespace) -> int:
    from teeio.spdm import RequesterError
    opts = AttestOptions(trust_anchor=ns.trust_anchor, doe_socket=ns.doe_socket,
                         doe_tcp_port=ns.doe_tcp_port, host=ns.host,
                         reference_values=ns.reference_values, nonce=ns.nonce,
                         session=ns.session, json_out=ns.json_out)
    run = Attestation(out=print)
    reason = ""
    try:
        opts.debug = DoeDebug.from_args(ns, "teeio-tsm attest")
        attest(opts, run)
    except (AttestError, RequesterError, DoeTransportError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    finally:
        if opts.debug is not None:
            opts.debug.close()
    if opts.json_out is not None and "measurement_transcript" in run.evidence:
        run.evidence.update({"verified": not reason, "reason": reason or None})
        try:
            opts.json_out.parent.mkdir(parents=True, exist_ok=True)
            import json
            opts.json_out.write_text(json.dumps(run.evidence, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            reason = reason or f"cannot write {opts.json_out}: {exc}"
    if reason:
        sys.stdout.flush()
        print(f"attestation FAILED: {reason}", file=sys.stderr)
        return 1
    if opts.json_out is not None:
        print(f"evidence: {opts.json_out}")
    print("attestation verified")
    return 0


__all__ = ["AttestError", "AttestOptions", "Attestation", "Comparison", "DoeDebug",
           "add_arguments", "add_debug_arguments", "add_device_arguments", "attest",
           "attested", "authenticate", "compare_measurements", "connect", "doe_transport",
           "load_reference_values", "run_command"]
