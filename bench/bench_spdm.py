"""Benchmark: full SPDM connects per second, against the bare cryptography they contain.

Run as ``python -m bench.bench_spdm [--out FILE] [--quick] [--iterations N] [--cpu C]``.
One connect is VCA, certificate, signed measurements, KEY_EXCHANGE, FINISH and END_SESSION
(DSP0274), in-process and over the DOE socket, P-384 and P-256; what is timed as
crypto-only: docs/benchmarks.md.  The result is printed as JSON and, with ``--out``,
written to a file.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import TypedDict

import cryptography
from cryptography import x509
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend

from bench.bench import (
    Budget,
    BudgetSettings,
    HostMeta,
    all_threads_on,
    emit_report,
    gc_paused,
    host_meta,
    pin_process,
    restore_affinity,
)
from bench.common import positive
from teeio import pki
from teeio.doe import PCI_SIG_VENDOR_ID, DoeDispatcher, DoeObject, pad_dw
from teeio.measurements import DmtfValueType, FirmwareManifest, MeasurementSource
from teeio.spdm import Requester, RequesterConfig, Responder, codec, crypto
from teeio.spdm import key_schedule as ks
from teeio.spdm.defs import (
    DOE_TYPE_SECURED_SPDM,
    DOE_TYPE_SPDM,
    KEY_EXCHANGE_RSP_SIGN_CONTEXT,
    MEAS_OP_ALL,
    MEASUREMENTS_SIGN_CONTEXT,
    AeadSuite,
    BaseAsymAlgo,
    BaseHashAlgo,
    DheGroup,
    RequestCode,
    ResponseCode,
)
from teeio.spdm.secured import SecureChannel, session_id_of
from tsm.doe_client import DoeClient
from vfio_user_dev.doe_socket import DoeSocketServer

KEY_ALGORITHMS = ("P-384", "P-256")
PATHS = ("in-process", "socket")


def device_measurements() -> tuple[MeasurementSource, ...]:
    """Four blocks shaped like measure_elf()'s of the device firmware (fixed, synthetic)."""
    code = bytes(range(256)) * 24                       # 6 KiB of "code"
    rodata = b"teeio-fw configuration\0" * 20
    manifest = FirmwareManifest(0x01_00_00, b"bench-spdm".ljust(16, b"\0")).encode()
    return (
        MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, code, label="firmware code"),
        MeasurementSource(2, DmtfValueType.FIRMWARE_CONFIG, rodata, label="firmware config"),
        MeasurementSource(3, DmtfValueType.VERSION, b"teeio-fw 1.0.0", as_digest=False,
                          label="firmware version"),
        MeasurementSource(4, DmtfValueType.MEASUREMENT_MANIFEST, manifest,
                          label="firmware manifest"),
    )


MEASUREMENTS = device_measurements()


# -- result types -----------------------------------------------------------------------------
class Stats(TypedDict):
    n: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float


class ConnectResult(TypedDict):
    algorithm: str                 # e.g. "P-384/SHA-384"
    key: str
    path: str                      # "in-process" | "socket"
    transport: str
    spdm_version: str
    base_asym: str
    base_hash: str
    dhe: str
    aead: str
    connects: int
    warmup: int
    elapsed_s: float
    connects_per_s: float
    ms_per_connect: Stats
    crypto_ms_per_connect: float   # median of the crypto-only run of this algorithm
    protocol_ms_per_connect: float
    overhead_ratio: float          # ms_per_connect.median_ms / crypto_ms_per_connect
    doe_objects_per_connect: int
    doe_bytes_per_connect: int


class CryptoOp(TypedDict):
    op: str
    side: str
    count: int                     # how many of these one connect contains
    what: str
    median_ms: float               # all *count* of them, per connect
    us_per_op: float


class CryptoResult(TypedDict):
    algorithm: str
    key: str
    n: int
    warmup: int
    ms_per_connect: Stats          # the whole sequence, timed per iteration
    ops: list[CryptoOp]


class Meta(HostMeta):
    cryptography: str
    openssl: str
    date: str
    quick: bool
    iterations: int | None
    budget_s: float | None
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    results: list[ConnectResult]
    crypto: list[CryptoResult]
    notes: str


class Settings(BudgetSettings):
    QUICK = Budget(500_000_000, 5, 500, 2)
    FULL = Budget(4_000_000_000, 20, 5_000, 5)


# -- statistics ---------------------------------------------------------------------------------
def ms_stats(samples_ns: Sequence[int]) -> Stats:
    if len(samples_ns) < 2:
        raise ValueError("need at least two samples")
    ms = [s / 1e6 for s in samples_ns]
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return Stats(n=len(ms), median_ms=round(statistics.median(ms), 4),
                 p10_ms=round(deciles[0], 4), p90_ms=round(deciles[8], 4),
                 mean_ms=round(statistics.fmean(ms), 4))


def timed_samples(fn: Callable[[], object], s: Settings) -> tuple[list[int], int]:
    """Run *fn* (after warm-up) for the configured count or time budget, timing each call;
    (per-call ns, wall ns of the whole loop)."""
    for _ in range(s.warmup):
        fn()
    now = time.perf_counter_ns
    samples: list[int] = []
    with gc_paused():
        start = now()
        elapsed = 0
        while len(samples) < s.min_reps or (elapsed < s.budget_ns and len(samples) < s.max_reps):
            t0 = now()
            fn()
            t1 = now()
            samples.append(t1 - t0)
            elapsed = t1 - start
    return samples, elapsed


# -- the device and the two paths ---------------------------------------------------------------
class Device:
    """One identity's SPDM responder behind a DOE dispatcher, as the emulated device has it."""

    def __init__(self, key_alg: str) -> None:
        self.key_alg = key_alg
        self.identity = pki.generate_chain(key_alg, f"bench-spdm {key_alg} device")
        self.anchors = [self.identity.root]
        self.responder = Responder(self.identity, MEASUREMENTS, name=f"bench-{key_alg}")
        self.dispatcher = DoeDispatcher(name=f"bench-spdm-{key_alg}")
        self.dispatcher.register(PCI_SIG_VENDOR_ID, DOE_TYPE_SPDM, self.responder.handle_spdm)
        self.dispatcher.register(PCI_SIG_VENDOR_ID, DOE_TYPE_SECURED_SPDM,
                                 self.responder.handle_secured)


class DoeTransport:
    """The requester's ``send``: one SPDM payload in a whole DOE object each way; counts
    the objects and their bytes (headers and DW padding included)."""

    def __init__(self, exchange: Callable[[bytes], bytes | None]) -> None:
        self.exchange = exchange
        self.objects = 0
        self.bytes = 0

    def __call__(self, doe_type: int, payload: bytes) -> bytes:
        obj = DoeObject(PCI_SIG_VENDOR_ID, doe_type, pad_dw(payload)).encode()
        rsp = self.exchange(obj)
        self.objects += 1
        self.bytes += len(obj)
        if rsp is None:
            return b""
        self.bytes += len(rsp)
        out = DoeObject.decode(rsp)
        if out.protocol != (PCI_SIG_VENDOR_ID, doe_type):
            raise RuntimeError(f"DOE response for {out.protocol}, sent type {doe_type}")
        return out.payload


@contextmanager
def socket_path(dev: Device) -> Iterator[DoeTransport]:
    """A DOE socket server thread for *dev* on a fresh UNIX socket, and a connected client."""
    with tempfile.TemporaryDirectory(prefix="teeio-bench-spdm-") as tmp:
        server = DoeSocketServer(dev.dispatcher, path=os.path.join(tmp, "doe.sock")).start()
        try:
            client = DoeClient.connect_unix(os.path.join(tmp, "doe.sock"))
            try:
                client.hello()
                yield DoeTransport(client.exchange)
                client.shutdown()   # SHUTDOWN answered, connection closed; listener stays
            finally:
                client.close()
        finally:
            server.close()
            server.join(timeout=5)


def connect(send: DoeTransport, anchors: list[x509.Certificate]) -> Requester:
    """One full connect from a fresh requester; checks what it got."""
    req = Requester(send, anchors, RequesterConfig())
    req.init_connection()
    req.get_digests()
    req.get_certificate(0)
    meas = req.get_measurements(MEAS_OP_ALL, signed=True)
    if len(meas.blocks) != len(MEASUREMENTS) or not meas.signed:
        raise RuntimeError(f"MEASUREMENTS: {len(meas.blocks)} blocks, signed={meas.signed}")
    sid = req.start_session(0)
    req.end_session(sid)
    return req


def _flag(kind: type[IntFlag], value: int) -> str:
    return kind(value).name or f"0x{value:x}"


def algorithm_name(neg: codec.Negotiated, key_alg: str) -> str:
    return f"{key_alg}/{_flag(BaseHashAlgo, neg.base_hash).replace('_', '-')}"


def bench_connects(dev: Device, path: str, send: DoeTransport, crypto_ms: float,
                   s: Settings) -> ConnectResult:
    # Correctness, and the per-connect DOE traffic, from one connect before timing.
    objects0, bytes0 = send.objects, send.bytes
    req = connect(send, dev.anchors)
    objects, nbytes = send.objects - objects0, send.bytes - bytes0
    if dev.responder.sessions:
        raise RuntimeError("the responder still holds a session after END_SESSION")
    neg = req.negotiated

    samples, wall = timed_samples(lambda: connect(send, dev.anchors), s)
    if dev.responder.sessions:
        raise RuntimeError("the responder still holds a session after END_SESSION")
    stats = ms_stats(samples)
    return ConnectResult(
        algorithm=algorithm_name(neg, dev.key_alg), key=dev.key_alg, path=path,
        transport=("DoeObject -> DoeDispatcher.handle_object, direct call" if path == "in-process"
                   else "DoeClient -> UNIX socket (spdm-emu framing) -> DoeSocketServer thread"),
        spdm_version=f"{neg.version >> 4}.{neg.version & 0xF}",
        base_asym=_flag(BaseAsymAlgo, neg.base_asym), base_hash=_flag(BaseHashAlgo, neg.base_hash),
        dhe=_flag(DheGroup, neg.dhe), aead=_flag(AeadSuite, neg.aead),
        connects=len(samples), warmup=s.warmup, elapsed_s=round(wall / 1e9, 3),
        connects_per_s=round(len(samples) * 1e9 / wall, 2) if wall else 0.0,
        ms_per_connect=stats, crypto_ms_per_connect=round(crypto_ms, 4),
        protocol_ms_per_connect=round(stats["median_ms"] - crypto_ms, 4),
        overhead_ratio=round(stats["median_ms"] / crypto_ms, 3) if crypto_ms > 0 else 0.0,
        doe_objects_per_connect=objects, doe_bytes_per_connect=nbytes)


# -- crypto only ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpSpec:
    op: str
    side: str
    count: int
    what: str


class CryptoConnect:
    """The cryptographic operations of one connect, with the device's keys and the
    negotiated algorithms, and nothing else; :meth:`run` times them group by group."""

    def __init__(self, dev: Device, req: Requester) -> None:
        neg = req.negotiated
        self.version, self.asym, self.hash = neg.version, neg.base_asym, neg.base_hash
        self.dhe, self.aead = neg.dhe, neg.aead
        self.key = dev.identity.leaf_key
        self.pub: crypto.PublicKey = self.key.public_key()
        root, inter, leaf = dev.identity.certs
        self.root, self.inter, self.leaf = root, inter, leaf
        hname = crypto.hash_name(self.hash)
        self.chain = pki.spdm_cert_chain(list(dev.identity.certs), hname)
        self.root_der = dev.identity.ders()[0]
        portions = math.ceil(len(self.chain) / req.config.cert_portion)
        self.meas_data = [m.data for m in MEASUREMENTS if m.as_digest]
        self.meas_hash = neg.meas_hash
        # Transcripts of about the real sizes: the real VCA plus message-sized filler.
        vca = req.vca
        hsize = crypto.hash_size(self.hash)
        self.l1 = vca + os.urandom(37 + 300)                 # GET_MEASUREMENTS + MEASUREMENTS
        self.th_ke = vca + os.urandom(hsize + 300 + 300)     # CT hash + KEY_EXCHANGE(_RSP)
        self.finish = bytes((self.version, RequestCode.FINISH, 0, 0)) + os.urandom(hsize)
        self.finish_rsp = bytes((self.version, ResponseCode.FINISH_RSP, 0, 0))
        self.end = bytes((self.version, RequestCode.END_SESSION, 0, 0))
        self.end_ack = bytes((self.version, ResponseCode.END_SESSION_ACK, 0, 0))
        # Hash(TH1), Hash(TH for FINISH), Hash(TH2): inputs here; their cost is in "hash".
        self.th1, self.th_f, self.th2 = (crypto.digest(self.hash, self.th_ke + tag)
                                         for tag in (b"th1", b"finish", b"th2"))
        root_hashes = 1 + portions + 1 + 1   # responder: DIGESTS, each portion, KEY_EXCHANGE;
        #                                      requester: parse_spdm_cert_chain
        self.n_root_hashes = root_hashes
        self.ops = (
            OpSpec("sign", "responder", 2, "SPDM signature of MEASUREMENTS and "
                   "KEY_EXCHANGE_RSP (combined prefix || Hash(transcript))"),
            OpSpec("cert_signature_verify", "requester", 2,
                   "certificate signatures pki.verify_chain checks: intermediate by root, "
                   "leaf by intermediate (the root is the trust anchor itself)"),
            OpSpec("signature_verify", "requester", 2,
                   "SPDM signature of MEASUREMENTS and KEY_EXCHANGE_RSP"),
            OpSpec("ecdh_keygen", "both", 2, "ephemeral key pair and its X||Y ExchangeData"),
            OpSpec("ecdh_exchange", "both", 2,
                   "peer point decoded and validated, shared secret"),
            OpSpec("kdf_hmac", "both", 8, "2 handshake + 2 data key schedules "
                   "(HKDF-Extract/Expand, traffic keys and IVs, finished keys) and 4 HMACs "
                   "(ResponderVerifyData and RequesterVerifyData, made and checked)"),
            OpSpec("hash", "both", 4 + 6 + root_hashes + len(self.meas_data),
                   f"4 certificate-chain hashes, 6 TH transcript hashes, {root_hashes} "
                   f"RootHash of the root certificate, {len(self.meas_data)} measurement "
                   "digests"),
            OpSpec("aead", "both", 8, "FINISH, FINISH_RSP, END_SESSION, END_SESSION_ACK: "
                   "each sealed and opened (AES-GCM record layer)"),
        )

    def run(self) -> list[int]:
        """One connect's crypto; ns per group, in the order of :attr:`ops`."""
        now = time.perf_counter_ns
        v, asym, h, key, pub = self.version, self.asym, self.hash, self.key, self.pub
        t0 = now()
        sig_m = crypto.spdm_sign(key, v, asym, h, MEASUREMENTS_SIGN_CONTEXT, self.l1)
        sig_k = crypto.spdm_sign(key, v, asym, h, KEY_EXCHANGE_RSP_SIGN_CONTEXT, self.th_ke)
        t1 = now()
        self.inter.verify_directly_issued_by(self.root)
        self.leaf.verify_directly_issued_by(self.inter)
        t2 = now()
        crypto.spdm_verify(pub, v, asym, h, MEASUREMENTS_SIGN_CONTEXT, self.l1, sig_m)
        crypto.spdm_verify(pub, v, asym, h, KEY_EXCHANGE_RSP_SIGN_CONTEXT, self.th_ke, sig_k)
        t3 = now()
        req_dhe = crypto.DheKeyPair.generate(self.dhe)
        req_pub = req_dhe.public_bytes()
        rsp_dhe = crypto.DheKeyPair.generate(self.dhe)
        rsp_pub = rsp_dhe.public_bytes()
        t4 = now()
        rsp_shared = rsp_dhe.shared_secret(req_pub)
        req_shared = req_dhe.shared_secret(rsp_pub)
        t5 = now()
        # Key schedule and HMACs, responder then requester (TH hashes are in "hash").
        th1, th_f, th2, aead = self.th1, self.th_f, self.th2, self.aead
        hs_r = ks.derive_handshake(h, v, aead, rsp_shared, th1)
        vd_r = crypto.hmac(h, hs_r.response_finished_key, th1)
        hs_q = ks.derive_handshake(h, v, aead, req_shared, th1)
        vd_q = crypto.hmac(h, hs_q.response_finished_key, th1)
        fin_q = crypto.hmac(h, hs_q.request_finished_key, th_f)
        fin_r = crypto.hmac(h, hs_r.request_finished_key, th_f)
        data_r = ks.derive_data(h, v, aead, hs_r.handshake_secret, th2)
        data_q = ks.derive_data(h, v, aead, hs_q.handshake_secret, th2)
        t6 = now()
        for _ in range(4):
            crypto.digest(h, self.chain)
        for _ in range(6):
            crypto.digest(h, self.th_ke)
        for _ in range(self.n_root_hashes):
            crypto.digest(h, self.root_der)
        for data in self.meas_data:
            crypto.meas_digest(self.meas_hash, data)
        t7 = now()
        sid = session_id_of(0xFFFE, 1)
        q = SecureChannel(sid, True, h, v, aead, hs_q)
        r = SecureChannel(sid, False, h, v, aead, hs_r)
        got_fin = r.open(q.seal(self.finish))
        got_fin_rsp = q.open(r.seal(self.finish_rsp))
        q.establish(data_q)
        r.establish(data_r)
        got_end = r.open(q.seal(self.end))
        got_ack = q.open(r.seal(self.end_ack))
        t8 = now()
        if (rsp_shared != req_shared or vd_r != vd_q or fin_q != fin_r
                or (got_fin, got_fin_rsp, got_end, got_ack)
                != (self.finish, self.finish_rsp, self.end, self.end_ack)):
            raise RuntimeError("crypto-only sequence: the two sides disagree")
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7]


def bench_crypto(dev: Device, req: Requester, s: Settings) -> CryptoResult:
    cc = CryptoConnect(dev, req)
    groups: list[list[int]] = []

    def once() -> None:
        groups.append(cc.run())

    samples, _ = timed_samples(once, s)
    groups = groups[s.warmup:]
    ops: list[CryptoOp] = []
    for i, spec in enumerate(cc.ops):
        med = statistics.median(g[i] for g in groups) / 1e6
        ops.append(CryptoOp(op=spec.op, side=spec.side, count=spec.count, what=spec.what,
                            median_ms=round(med, 4), us_per_op=round(med * 1000 / spec.count, 2)))
    return CryptoResult(algorithm=algorithm_name(req.negotiated, dev.key_alg), key=dev.key_alg,
                        n=len(samples), warmup=s.warmup, ms_per_connect=ms_stats(samples),
                        ops=ops)


# -- driver ---------------------------------------------------------------------------------------
NOTES = (
    "A connect = a fresh teeio.spdm.Requester doing GET_VERSION, GET_CAPABILITIES, "
    "NEGOTIATE_ALGORITHMS, GET_DIGESTS, GET_CERTIFICATE (1024-byte portions, chain verified "
    "to the root anchor), GET_MEASUREMENTS of all blocks with a signature (verified), "
    "KEY_EXCHANGE, FINISH (in the session) and END_SESSION, against one long-lived Responder "
    "(4 measurement blocks, slot 0) registered for DOE 0001:01 and 0001:02 on a DoeDispatcher. "
    "in-process: each message is framed as a whole DoeObject and passed to "
    "DoeDispatcher.handle_object by direct call. socket: the same objects go through "
    "tsm.doe_client.DoeClient over a UNIX socket to a DoeSocketServer thread of this process "
    "(one client connection, opened before timing). All threads are pinned to "
    "meta.cpu_pinned and share the GIL. Each connect is timed with perf_counter_ns (GC "
    "paused, after warm-up); connects_per_s = connects / wall time of the timed loop; "
    "ms_per_connect is per-connect statistics. crypto-only (list 'crypto', same keys and "
    "negotiated algorithms, same run) times only the cryptographic operations one connect "
    "contains, in groups (ops: count per connect, median ms of the group, us per op): "
    "2 responder signatures, 2 certificate signature checks (pki.verify_chain checks the "
    "intermediate and the leaf; the root is the anchor and its self-signature is not "
    "checked), 2 SPDM signature checks, 2 ECDHE key pairs and 2 shared secrets, the key "
    "schedules and HMACs of both sides, the hashes (chain, TH transcripts of about the real "
    "size, RootHash, measurement digests) and the 4 AEAD records each sealed and opened. "
    "crypto_ms_per_connect = median of that whole sequence; overhead_ratio = "
    "ms_per_connect.median_ms / crypto_ms_per_connect; protocol_ms_per_connect = their "
    "difference (encoding/decoding, checks, transcripts, X.509 parsing, DOE framing and, "
    "for socket, the socket round trips and thread switches). doe_objects/bytes_per_connect: "
    "DOE objects sent (each answered) and the bytes of both directions, headers and DW "
    "padding included."
)


def run(s: Settings, cpu: int | None) -> Report:
    started = time.perf_counter()
    before = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = before[0]
    elif cpu not in before:
        raise SystemExit(f"cpu {cpu} is not in this process's affinity {before}")
    saved = pin_process(cpu)   # before any thread is started, so they all inherit it
    results: list[ConnectResult] = []
    crypto_results: list[CryptoResult] = []
    verified = True
    try:
        for key_alg in KEY_ALGORITHMS:
            dev = Device(key_alg)
            direct = DoeTransport(dev.dispatcher.handle_object)
            req = connect(direct, dev.anchors)   # warm-up, and the negotiated algorithms
            c = bench_crypto(dev, req, s)
            crypto_results.append(c)
            crypto_ms = c["ms_per_connect"]["median_ms"]
            results.append(bench_connects(dev, "in-process", direct, crypto_ms, s))
            with socket_path(dev) as send:
                verified &= all_threads_on(cpu)
                results.append(bench_connects(dev, "socket", send, crypto_ms, s))
        verified &= all_threads_on(cpu)
    finally:
        restore_affinity(saved)
    meta = Meta(
        **host_meta(cpu, before, len(saved), verified), cryptography=cryptography.__version__,
        openssl=openssl_backend.openssl_version_text(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=s.quick, iterations=s.fixed,
        budget_s=None if s.fixed is not None else s.budget_ns / 1e9,
        elapsed_s=round(time.perf_counter() - started, 3))
    return Report(meta=meta, results=results, crypto=crypto_results, notes=NOTES)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_spdm",
        description="full SPDM connects per second (P-384 and P-256, in-process and over "
                    "the DOE socket) against the cryptography they contain")
    ap.add_argument("--out", type=Path, help="also write the JSON here (parent dirs are created)")
    ap.add_argument("--quick", action="store_true",
                    help="a shorter time budget per measurement (a few seconds in all)")
    ap.add_argument("--iterations", type=positive, metavar="N",
                    help="exact count of connects (and crypto-only sequences) per measurement, "
                         "overriding the time budget")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the lowest allowed one)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(Settings.from_args(args.quick, args.iterations), args.cpu)
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
