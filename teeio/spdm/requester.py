"""SPDM requester (the TSM side), sans-IO over a transport callable.

``send(doe_type, payload) -> response payload`` carries one DOE data object's
payload each way: an SPDM message for type 0001:01, a DSP0277 record for 0001:02.
Responses may carry DOE DW padding; the requester sizes every response from its own
fields (interop note: never trust the DOE length for a transcript).

Everything the responder says is checked: versions and codes, field consistency,
the certificate chain up to the configured trust anchors (teeio.pki.verify_chain)
and its RootHash, DIGESTS against the chain, CHALLENGE_AUTH / MEASUREMENTS /
KEY_EXCHANGE_RSP signatures (ECDSA P-256/P-384, RSASSA-2048/3072/4096), requester
context echo (1.3), ResponderVerifyData.  Each failure raises a precise
:class:`~teeio.spdm.errors.RequesterError` subclass.

For attestation evidence the requester keeps the exact VCA bytes and the exact
GET_MEASUREMENTS / MEASUREMENTS pairs a signature covers, so a third party can
re-check the signature with :func:`verify_measurement_transcript`.

Note on "nonce echo": in SPDM 1.2/1.3 neither CHALLENGE_AUTH nor MEASUREMENTS
echoes the requester's nonce -- both carry a fresh *responder* nonce; the
requester's nonce is bound because its request is part of the signed transcript
(M1/L1).  What is echoed (1.3) is the 8-byte RequesterContext, which we check.
"""

from __future__ import annotations

import hmac as _hmac
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509

from teeio import pki
from teeio.measurements import MeasurementBlock, MeasurementDecodeError, parse_measurement_blocks

from . import codec, crypto, opaque
from . import key_schedule as ks
from .defs import (
    CHALLENGE_AUTH_SIGN_CONTEXT,
    DOE_TYPE_SECURED_SPDM,
    DOE_TYPE_SPDM,
    KEY_EXCHANGE_RSP_SIGN_CONTEXT,
    MEAS_OP_ALL,
    MEAS_OP_COUNT,
    MEASUREMENT_SPECIFICATION_DMTF,
    MEASUREMENTS_SIGN_CONTEXT,
    NONCE_SIZE,
    RANDOM_DATA_SIZE,
    REQ_CONTEXT_SIZE,
    SECURED_VERSION_10,
    SECURED_VERSION_11,
    SECURED_VERSION_12,
    SPDM_VERSION_10,
    SPDM_VERSION_12,
    SPDM_VERSION_13,
    VENDOR_ID_LEN,
    AeadSuite,
    AlgType,
    BaseAsymAlgo,
    BaseHashAlgo,
    CapFlags,
    DheGroup,
    ErrorCode,
    KeySchedule,
    KeyUpdateOp,
    MeasRequestAttr,
    MeasSummaryHashType,
    OtherParams,
    RequestCode,
    ResponseCode,
    describe,
)
from .errors import (
    CertificateError,
    DecodeError,
    ErrorResponse,
    MalformedResponse,
    NegotiationError,
    RequesterError,
    SessionError,
    SignatureError,
    VerifyDataError,
)
from .secured import Phase, SecureChannel, SecuredMessageError, session_id_of
from .transcript import MessageLogs, l1, m1, th

log = logging.getLogger(__name__)

Transport = Callable[[int, bytes], bytes]
T = TypeVar("T")

DEFAULT_FLAGS = (CapFlags.CERT_CAP | CapFlags.CHAL_CAP | CapFlags.ENCRYPT_CAP
                 | CapFlags.MAC_CAP | CapFlags.KEY_EX_CAP | CapFlags.HBEAT_CAP
                 | CapFlags.KEY_UPD_CAP)


@dataclass(frozen=True)
class RequesterConfig:
    versions: tuple[int, ...] = (SPDM_VERSION_12, SPDM_VERSION_13)
    flags: int = DEFAULT_FLAGS
    ct_exponent: int = 0
    data_transfer_size: int = 4096
    max_spdm_msg_size: int = 4096
    # CMA (PCIe 6.x §6.31.3): requesters support RSASSA-3072, ECDSA P-256 and P-384.
    base_asym: int = (BaseAsymAlgo.ECDSA_P384 | BaseAsymAlgo.ECDSA_P256
                      | BaseAsymAlgo.RSASSA_3072)
    base_hash: int = BaseHashAlgo.SHA_384 | BaseHashAlgo.SHA_256
    dhe: int = DheGroup.SECP_384_R1 | DheGroup.SECP_256_R1
    aead: int = AeadSuite.AES_256_GCM
    secured_versions: tuple[int, ...] = (SECURED_VERSION_10, SECURED_VERSION_11,
                                         SECURED_VERSION_12)
    cert_portion: int = 1024   # GET_CERTIFICATE Length per request


@dataclass(frozen=True)
class MeasurementResult:
    """One GET_MEASUREMENTS exchange and the evidence a verifier needs to re-check it."""

    blocks: tuple[MeasurementBlock, ...]
    total: int                     # TotalNumberOfMeasurements (operation 0), else 0
    response: codec.Measurements
    nonce: bytes                   # the requester nonce sent (empty if unsigned)
    signed: bool
    vca: bytes                     # exact VCA (message A)
    transcript: tuple[tuple[bytes, bytes], ...]   # (request, response) pairs of L1 after VCA


@dataclass
class _Session:
    session_id: int
    channel: SecureChannel = field(repr=False)
    slot_id: int
    cert_chain_hash: bytes
    secured_version: int
    heartbeat_period: int
    k: bytes = field(default=b"", repr=False)
    f: bytes = field(default=b"", repr=False)
    m_pairs: list[tuple[bytes, bytes]] = field(default_factory=list, repr=False)

    @property
    def established(self) -> bool:
        return self.channel.phase is Phase.ESTABLISHED


class Requester:
    """One SPDM connection to one responder, driven over *send*."""

    def __init__(self, send: Transport, anchors: Sequence[x509.Certificate] = (),
                 config: RequesterConfig | None = None,
                 random: Callable[[int], bytes] = os.urandom, name: str = "") -> None:
        self.send = send
        self.anchors = list(anchors)
        self.config = config or RequesterConfig()
        self.random = random
        self.log = log.getChild(name) if name else log
        self.sessions: dict[int, _Session] = {}
        self._next_req_sid = 0xFFFE
        #: Debugging only: called with (session ID, DHE shared secret) for each session
        #: KEY_EXCHANGE establishes (:class:`teeio.doe_pcap.SessionSecretLog`).
        self.on_session_secret: Callable[[int, bytes], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.sessions.clear()
        self.version = 0
        self.logs = MessageLogs()
        self.m_pairs: list[tuple[bytes, bytes]] = []
        self.peer_flags = 0
        self.peer_dts = 0
        self.neg: codec.Negotiated | None = None
        self.other_params = 0
        self.digests: dict[int, bytes] = {}
        self.cert_chains: dict[int, bytes] = {}
        self.leaf_keys: dict[int, crypto.PublicKey] = {}
        self.authenticated = False

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def vca(self) -> bytes:
        """The exact VCA (GET_VERSION .. ALGORITHMS) of this connection."""
        return bytes(self.logs.a)

    @property
    def negotiated(self) -> codec.Negotiated:
        if self.neg is None:
            raise RequesterError("algorithms not negotiated yet (call negotiate_algorithms)")
        return self.neg

    def _both(self, cap: int) -> bool:
        return bool(self.config.flags & cap) and bool(self.peer_flags & cap)

    def _exchange(self, name: str, request: bytes, expected: int,
                  sess: _Session | None = None) -> bytes:
        """Send one request; return the exact response bytes (DOE pad still attached in the
        clear; decoders trim it).  An ERROR response raises ErrorResponse."""
        if sess is None:
            self.log.debug("--> %s", request.hex())
            response = self.send(DOE_TYPE_SPDM, request)
        else:
            record = sess.channel.seal(request)
            # Only name and size in a session: KEY_PROG carries IDE keys.
            self.log.debug("session 0x%08x --> %s", sess.session_id, describe(request))
            reply = self.send(DOE_TYPE_SECURED_SPDM, record)
            if not reply:
                raise SessionError(f"{name}: no response in session 0x{sess.session_id:08x}")
            try:
                response = sess.channel.open(reply)
            except SecuredMessageError as exc:
                self.sessions.pop(sess.session_id, None)
                raise SessionError(f"{name}: response in session 0x{sess.session_id:08x} "
                                   f"does not decrypt: {exc}") from None
        self.log.debug("<-- %s", response.hex() if sess is None else describe(response))
        try:
            version, code, p1, p2 = codec.peek_header(response)
        except DecodeError as exc:
            raise MalformedResponse(f"{name}: {exc}") from None
        if code == ResponseCode.ERROR:
            if sess is not None and p1 == ErrorCode.DecryptError:
                self.sessions.pop(sess.session_id, None)   # the responder ended it
            raise ErrorResponse(name, p1, p2, response[4:])
        if code != expected:
            raise MalformedResponse(f"{name}: response code 0x{code:02x}, expected "
                                    f"{ResponseCode(expected).name} (0x{expected:02x})")
        want = SPDM_VERSION_10 if expected == ResponseCode.VERSION else self.version
        if version != want:
            raise MalformedResponse(f"{name}: response version 0x{version:02x}, expected "
                                    f"0x{want:02x}")
        return response

    @staticmethod
    def _decode(name: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DecodeError as exc:
            raise MalformedResponse(f"{name}: {exc}") from None

    def _session(self, session_id: int) -> _Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionError(f"no session 0x{session_id:08x}") from None

    def _on_success(self, code: int, sess: _Session | None) -> None:
        """The transcript resets the responder applied for this request (mirror)."""
        scratch = bytearray()
        self.logs.on_request(code, scratch if sess is not None else None, self.authenticated)
        if code != RequestCode.GET_MEASUREMENTS:
            if sess is not None:
                sess.m_pairs.clear()
            else:
                self.m_pairs.clear()

    # --- VCA -----------------------------------------------------------------------------------

    def init_connection(self) -> codec.Negotiated:
        self.get_version()
        self.get_capabilities()
        return self.negotiate_algorithms()

    def get_version(self) -> int:
        self._reset()
        req = codec.GetVersion().encode()
        raw = self._exchange("GET_VERSION", req, ResponseCode.VERSION)
        rsp = self._decode("VERSION", lambda: codec.Version.decode(raw, pad=True))
        offered = {e >> 8 for e in rsp.entries}
        common = [v for v in self.config.versions if v in offered]
        if not common:
            raise NegotiationError(
                "no common SPDM version: responder offers "
                f"{', '.join(f'{v >> 4}.{v & 0xF}' for v in sorted(offered)) or 'none'}")
        self.logs.a += req + rsp.raw
        self.version = max(common)
        return self.version

    def get_capabilities(self) -> int:
        cfg = self.config
        req = codec.GetCapabilities(self.version, cfg.ct_exponent, cfg.flags,
                                    cfg.data_transfer_size, cfg.max_spdm_msg_size).encode()
        raw = self._exchange("GET_CAPABILITIES", req, ResponseCode.CAPABILITIES)
        rsp = self._decode("CAPABILITIES", lambda: codec.Capabilities.decode(raw, pad=True))
        if rsp.data_transfer_size < 42 or rsp.data_transfer_size > rsp.max_spdm_msg_size:
            raise MalformedResponse(f"CAPABILITIES: DataTransferSize {rsp.data_transfer_size}, "
                                    f"MaxSPDMmsgSize {rsp.max_spdm_msg_size}")
        if rsp.flags & CapFlags.KEY_EX_CAP and not rsp.flags & (CapFlags.MAC_CAP
                                                                 | CapFlags.ENCRYPT_CAP):
            raise MalformedResponse("CAPABILITIES: KEY_EX_CAP without MAC_CAP/ENCRYPT_CAP")
        self.logs.a += req + rsp.raw
        self.peer_flags, self.peer_dts = rsp.flags, rsp.data_transfer_size
        return rsp.flags

    def negotiate_algorithms(self) -> codec.Negotiated:
        cfg = self.config
        structs = (codec.AlgStruct(AlgType.DHE, cfg.dhe), codec.AlgStruct(AlgType.AEAD, cfg.aead),
                   codec.AlgStruct(AlgType.KEY_SCHEDULE, KeySchedule.SPDM))
        req = codec.NegotiateAlgorithms(
            self.version, MEASUREMENT_SPECIFICATION_DMTF, OtherParams.OPAQUE_DATA_FMT1,
            cfg.base_asym, cfg.base_hash, alg_structs=structs).encode()
        raw = self._exchange("NEGOTIATE_ALGORITHMS", req, ResponseCode.ALGORITHMS)
        rsp = self._decode("ALGORITHMS", lambda: codec.Algorithms.decode(raw, pad=True))
        neg = _check_algorithms(rsp, cfg, self.peer_flags)
        self.logs.a += req + rsp.raw
        self.neg = neg
        self.other_params = rsp.other_params_sel
        self.log.info("negotiated SPDM %x.%x, %s, %s", self.version >> 4, self.version & 0xF,
                      BaseAsymAlgo(neg.base_asym).name, BaseHashAlgo(neg.base_hash).name)
        return neg

    # --- §10.6/10.7 digests and certificate ----------------------------------------------------

    def get_digests(self) -> dict[int, bytes]:
        neg = self.negotiated
        req = codec.GetDigests(self.version).encode()
        raw = self._exchange("GET_DIGESTS", req, ResponseCode.DIGESTS)
        rsp = self._decode("DIGESTS", lambda: codec.Digests.decode(raw, neg.hash_size, pad=True))
        if not rsp.slot_mask:
            raise MalformedResponse("DIGESTS: no certificate slot provisioned")
        self._on_success(RequestCode.GET_DIGESTS, None)
        self.logs.b += req + rsp.raw
        slots = [s for s in range(8) if rsp.slot_mask >> s & 1]
        self.digests = dict(zip(slots, rsp.digests, strict=True))
        return dict(self.digests)

    def get_certificate(self, slot: int = 0) -> bytes:
        """Fetch slot *slot*'s SPDM certificate chain and verify it; returns the chain."""
        self.negotiated  # noqa: B018 - raises if not negotiated
        chain = b""
        total: int | None = None
        while True:
            req = codec.GetCertificate(self.version, slot, len(chain),
                                       self.config.cert_portion).encode()
            raw = self._exchange("GET_CERTIFICATE", req, ResponseCode.CERTIFICATE)
            rsp = self._decode("CERTIFICATE", _bind(codec.Certificate.decode, raw))
            if rsp.slot_id & 0x0F != slot:
                raise MalformedResponse(f"CERTIFICATE for slot {rsp.slot_id & 0xF}, asked {slot}")
            if not rsp.portion or len(rsp.portion) > self.config.cert_portion:
                raise MalformedResponse(f"CERTIFICATE: PortionLength {len(rsp.portion)} for a "
                                        f"request of {self.config.cert_portion}")
            size = len(chain) + len(rsp.portion) + rsp.remainder_length
            if total is not None and size != total:
                raise MalformedResponse(f"CERTIFICATE: chain size changed from {total} to {size}")
            total = size
            self._on_success(RequestCode.GET_CERTIFICATE, None)
            self.logs.b += req + rsp.raw
            chain += rsp.portion
            if rsp.remainder_length == 0:
                break
        self._verify_chain(slot, chain)
        return chain

    def _verify_chain(self, slot: int, chain: bytes) -> None:
        neg = self.negotiated
        hname = crypto.hash_name(neg.base_hash)
        try:
            _, certs = pki.parse_spdm_cert_chain(chain, hname)
            leaf = pki.verify_chain(certs, self.anchors)
        except pki.ChainError as exc:
            raise CertificateError(f"slot {slot} certificate chain: {exc}") from None
        if not crypto.key_matches_algo(leaf, neg.base_asym):
            raise CertificateError(f"slot {slot} leaf key does not match the negotiated "
                                   f"{BaseAsymAlgo(neg.base_asym).name}")
        if slot in self.digests and self.digests[slot] != crypto.digest(neg.base_hash, chain):
            raise CertificateError(f"slot {slot}: DIGESTS entry does not match the hash of "
                                   "the certificate chain")
        self.cert_chains[slot] = chain
        self.leaf_keys[slot] = leaf

    def _leaf(self, slot: int) -> crypto.PublicKey:
        try:
            return self.leaf_keys[slot]
        except KeyError:
            raise RequesterError(f"no verified certificate chain for slot {slot} "
                                 "(call get_certificate first)") from None

    def _verify(self, what: str, slot: int, context: bytes, transcript: bytes,
                signature: bytes) -> None:
        neg = self.negotiated
        try:
            crypto.spdm_verify(self._leaf(slot), self.version, neg.base_asym, neg.base_hash,
                               context, transcript, signature)
        except crypto.CryptoError as exc:
            raise SignatureError(f"{what} signature: {exc}") from None

    # --- §10.8 CHALLENGE ------------------------------------------------------------------------

    def challenge(self, slot: int = 0, summary_type: int = MeasSummaryHashType.NONE,
                  nonce: bytes | None = None) -> codec.ChallengeAuth:
        neg = self.negotiated
        leaf_chain = self.cert_chains.get(slot)
        self._leaf(slot)
        nonce = nonce if nonce is not None else self.random(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        ctx = self.random(REQ_CONTEXT_SIZE) if self.version >= SPDM_VERSION_13 else b""
        req = codec.Challenge(self.version, slot, summary_type, nonce, ctx).encode()
        raw = self._exchange("CHALLENGE", req, ResponseCode.CHALLENGE_AUTH)
        rsp = self._decode("CHALLENGE_AUTH", lambda: codec.ChallengeAuth.decode(
            raw, neg, summary_type != MeasSummaryHashType.NONE, pad=True))
        if rsp.attributes & 0x0F != slot or not rsp.slot_mask >> slot & 1:
            raise MalformedResponse(f"CHALLENGE_AUTH: slot {rsp.attributes & 0xF}, slot mask "
                                    f"0x{rsp.slot_mask:02x}, asked slot {slot}")
        assert leaf_chain is not None
        if rsp.cert_chain_hash != crypto.digest(neg.base_hash, leaf_chain):
            raise CertificateError("CHALLENGE_AUTH: CertChainHash is not the hash of the "
                                   f"slot {slot} certificate chain")
        if rsp.requester_context != ctx:
            raise MalformedResponse("CHALLENGE_AUTH: RequesterContext not echoed")
        self._on_success(RequestCode.CHALLENGE, None)
        c = req + rsp.raw[:len(rsp.raw) - len(rsp.signature)]
        self._verify("CHALLENGE_AUTH", slot, CHALLENGE_AUTH_SIGN_CONTEXT,
                     m1(self.logs.a, self.logs.b, c), rsp.signature)
        self.authenticated = True
        self.logs.b.clear()
        self.logs.c.clear()
        return rsp

    # --- §10.11 GET_MEASUREMENTS ----------------------------------------------------------------

    def get_measurements(self, operation: int = MEAS_OP_ALL, nonce: bytes | None = None,
                         signed: bool = True, raw_bit_stream: bool = False, slot: int = 0,
                         session_id: int | None = None) -> MeasurementResult:
        """GET_MEASUREMENTS for *operation* (0 count, index, 0xFF all) with the caller's
        *nonce* (random if None); verifies the signature when *signed*."""
        neg = self.negotiated
        if not neg.meas_hash:
            raise NegotiationError("measurements were not negotiated")
        sess = self._session(session_id) if session_id is not None else None
        if signed:
            self._leaf(slot)
            nonce = nonce if nonce is not None else self.random(NONCE_SIZE)
            if len(nonce) != NONCE_SIZE:
                raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        elif nonce:
            raise ValueError("a nonce is only sent with a signature request")
        attrs = ((MeasRequestAttr.SIGNATURE_REQUESTED if signed else 0)
                 | (MeasRequestAttr.RAW_BIT_STREAM_REQUESTED if raw_bit_stream else 0))
        ctx = self.random(REQ_CONTEXT_SIZE) if self.version >= SPDM_VERSION_13 else b""
        req = codec.GetMeasurements(self.version, attrs, operation, nonce or b"", slot,
                                    ctx).encode()
        pairs = sess.m_pairs if sess is not None else self.m_pairs
        try:
            raw = self._exchange("GET_MEASUREMENTS", req, ResponseCode.MEASUREMENTS, sess)
        except ErrorResponse:
            pairs.clear()   # the responder resets L1/L2 on a failed GET_MEASUREMENTS
            raise
        rsp = self._decode("MEASUREMENTS", lambda: codec.Measurements.decode(
            raw, neg, signed, pad=sess is None))
        blocks = self._check_measurements(rsp, operation, signed, slot, ctx)
        self._on_success(RequestCode.GET_MEASUREMENTS, sess)
        pairs.append((req, rsp.raw))
        transcript = tuple(pairs)
        if signed:
            pairs.clear()
            verify_measurement_transcript(self.vca, transcript, self._leaf(slot), neg)
        return MeasurementResult(tuple(blocks), rsp.param1 if operation == MEAS_OP_COUNT else 0,
                                 rsp, nonce or b"", signed, self.vca, transcript)

    def _check_measurements(self, rsp: codec.Measurements, operation: int, signed: bool,
                            slot: int, ctx: bytes) -> list[MeasurementBlock]:
        neg = self.negotiated
        if rsp.requester_context != ctx:
            raise MalformedResponse("MEASUREMENTS: RequesterContext not echoed")
        if signed and rsp.param2 & 0x0F != slot:
            raise MalformedResponse(f"MEASUREMENTS: slot {rsp.param2 & 0xF}, asked {slot}")
        if operation == MEAS_OP_COUNT:
            if rsp.number_of_blocks or rsp.record:
                raise MalformedResponse("MEASUREMENTS: blocks returned for a count request")
            return []
        try:
            blocks = parse_measurement_blocks(rsp.record, rsp.number_of_blocks,
                                              crypto.meas_hash_name(neg.meas_hash))
        except MeasurementDecodeError as exc:
            raise MalformedResponse(f"MEASUREMENTS record: {exc}") from None
        if operation != MEAS_OP_ALL and (len(blocks) != 1 or blocks[0].index != operation):
            raise MalformedResponse(f"MEASUREMENTS: asked block {operation}, got indices "
                                    f"{[b.index for b in blocks]}")
        return blocks

    # --- §10.15/10.16 KEY_EXCHANGE and FINISH ---------------------------------------------------

    def start_session(self, slot: int = 0,
                      summary_type: int = MeasSummaryHashType.NONE) -> int:
        """KEY_EXCHANGE then FINISH; returns the established session ID."""
        sid = self.key_exchange(slot, summary_type)
        self.finish(sid)
        return sid

    def key_exchange(self, slot: int = 0,
                     summary_type: int = MeasSummaryHashType.NONE) -> int:
        neg = self.negotiated
        for cap in (CapFlags.KEY_EX_CAP, CapFlags.ENCRYPT_CAP, CapFlags.MAC_CAP):
            if not self._both(cap):
                raise NegotiationError(f"KEY_EXCHANGE needs {cap.name} on both sides")
        if self.other_params & 0x0F != OtherParams.OPAQUE_DATA_FMT1:
            raise NegotiationError("OpaqueDataFmt1 was not selected")
        chain = self.cert_chains.get(slot)
        self._leaf(slot)
        assert chain is not None
        ct_hash = crypto.digest(neg.base_hash, chain)
        dhe = crypto.DheKeyPair.generate(neg.dhe)
        req_sid = self._alloc_req_session_id()
        req = codec.KeyExchange(self.version, summary_type, slot, req_sid, 0,
                                self.random(RANDOM_DATA_SIZE), dhe.public_bytes(),
                                opaque.supported_versions(self.config.secured_versions)).encode()
        raw = self._exchange("KEY_EXCHANGE", req, ResponseCode.KEY_EXCHANGE_RSP)
        rsp = self._decode("KEY_EXCHANGE_RSP", lambda: codec.KeyExchangeRsp.decode(
            raw, neg, summary_type != MeasSummaryHashType.NONE, pad=True))
        if rsp.mut_auth_requested:
            raise NegotiationError("KEY_EXCHANGE_RSP requests mutual authentication, which "
                                   "this requester does not support")
        try:
            sec_version = opaque.parse_version_selection(rsp.opaque)
        except DecodeError as exc:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP opaque data: {exc}") from None
        if sec_version not in self.config.secured_versions:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP selects secured-message version "
                                    f"0x{sec_version:02x}, not offered")
        full = rsp.raw
        vd_at = len(full) - len(rsp.verify_data)
        sig_at = vd_at - len(rsp.signature)
        self._on_success(RequestCode.KEY_EXCHANGE, None)
        self._verify("KEY_EXCHANGE_RSP", slot, KEY_EXCHANGE_RSP_SIGN_CONTEXT,
                     th(self.logs.a, ct_hash, req, full[:sig_at]), rsp.signature)
        try:
            shared = dhe.shared_secret(rsp.exchange_data)
        except crypto.CryptoError as exc:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP ExchangeData: {exc}") from None
        th1 = crypto.digest(neg.base_hash, th(self.logs.a, ct_hash, req, full[:vd_at]))
        hs = ks.derive_handshake(neg.base_hash, self.version, neg.aead, shared, th1)
        expected = crypto.hmac(neg.base_hash, hs.response_finished_key, th1)
        if not _hmac.compare_digest(expected, rsp.verify_data):
            raise VerifyDataError("KEY_EXCHANGE_RSP: ResponderVerifyData does not match")
        sid = session_id_of(req_sid, rsp.rsp_session_id)
        if sid in self.sessions:
            raise MalformedResponse(f"KEY_EXCHANGE_RSP: session 0x{sid:08x} already exists")
        channel = SecureChannel(sid, True, neg.base_hash, self.version, neg.aead, hs)
        self.sessions[sid] = _Session(sid, channel, slot, ct_hash, sec_version,
                                      rsp.heartbeat_period, req + full)
        self.log.info("session 0x%08x handshaking", sid)
        if self.on_session_secret is not None:
            self.on_session_secret(sid, shared)
        return sid

    def _alloc_req_session_id(self) -> int:
        used = {sid & 0xFFFF for sid in self.sessions}
        while self._next_req_sid in used or self._next_req_sid in (0, 0xFFFF):
            self._next_req_sid = (self._next_req_sid - 1) & 0xFFFF
        sid = self._next_req_sid
        self._next_req_sid = (sid - 1) & 0xFFFF
        return sid

    def finish(self, session_id: int) -> None:
        neg = self.negotiated
        sess = self._session(session_id)
        if sess.established:
            raise SessionError(f"session 0x{session_id:08x} is already established")
        header = codec.Finish(self.version, 0, 0, b"", b"").encode()
        verify = crypto.hmac(neg.base_hash, sess.channel.hs.request_finished_key,
                             crypto.digest(neg.base_hash, th(self.logs.a, sess.cert_chain_hash,
                                                             sess.k, header)))
        req = header + verify
        try:
            raw = self._exchange("FINISH", req, ResponseCode.FINISH_RSP, sess)
        except ErrorResponse:
            self.sessions.pop(session_id, None)
            raise
        rsp = self._decode("FINISH_RSP", lambda: codec.FinishRsp.decode(raw, neg))
        self._on_success(RequestCode.FINISH, sess)
        sess.f = req + rsp.raw
        th2 = crypto.digest(neg.base_hash, th(self.logs.a, sess.cert_chain_hash, sess.k, sess.f))
        sess.channel.establish(ks.derive_data(neg.base_hash, self.version, neg.aead,
                                              sess.channel.hs.handshake_secret, th2))
        self.log.info("session 0x%08x established", session_id)

    # --- §10.17-10.19 in-session housekeeping ---------------------------------------------------

    def _established(self, session_id: int) -> _Session:
        sess = self._session(session_id)
        if not sess.established:
            raise SessionError(f"session 0x{session_id:08x} is not established")
        return sess

    def heartbeat(self, session_id: int) -> None:
        sess = self._established(session_id)
        raw = self._exchange("HEARTBEAT", codec.Heartbeat(self.version).encode(),
                             ResponseCode.HEARTBEAT_ACK, sess)
        self._decode("HEARTBEAT_ACK", lambda: codec.HeartbeatAck.decode(raw))
        self._on_success(RequestCode.HEARTBEAT, sess)

    def key_update(self, session_id: int, operation: int = KeyUpdateOp.UpdateKey) -> None:
        """UpdateKey or UpdateAllKeys, then VerifyNewKey (§10.18; libspdm requester flow)."""
        sess = self._established(session_id)
        if operation not in (KeyUpdateOp.UpdateKey, KeyUpdateOp.UpdateAllKeys):
            raise ValueError(f"key update operation {operation}")
        all_keys = operation == KeyUpdateOp.UpdateAllKeys
        if all_keys:
            sess.channel.update_rx(keep_backup=True)   # the ACK comes under the new key
        try:
            self._key_update_op(sess, operation)
        except RequesterError:
            sess.channel.rollback_rx()
            raise
        sess.channel.commit_rx()
        sess.channel.update_tx()
        self._key_update_op(sess, KeyUpdateOp.VerifyNewKey)

    def _key_update_op(self, sess: _Session, operation: int) -> None:
        tag = self.random(1)[0]
        req = codec.KeyUpdate(self.version, operation, tag).encode()
        raw = self._exchange("KEY_UPDATE", req, ResponseCode.KEY_UPDATE_ACK, sess)
        ack = self._decode("KEY_UPDATE_ACK", lambda: codec.KeyUpdateAck.decode(raw))
        if (ack.param1, ack.param2) != (operation, tag):
            raise MalformedResponse(f"KEY_UPDATE_ACK operation/tag {ack.param1}/{ack.param2}, "
                                    f"sent {operation}/{tag}")
        self._on_success(RequestCode.KEY_UPDATE, sess)

    def end_session(self, session_id: int) -> None:
        sess = self._established(session_id)
        raw = self._exchange("END_SESSION", codec.EndSession(self.version).encode(),
                             ResponseCode.END_SESSION_ACK, sess)
        self._decode("END_SESSION_ACK", lambda: codec.EndSessionAck.decode(raw))
        self._on_success(RequestCode.END_SESSION, sess)
        del self.sessions[session_id]
        self.log.info("session 0x%08x ended", session_id)

    # --- §10.20 VENDOR_DEFINED ------------------------------------------------------------------

    def vendor_request(self, standard_id: int, vendor_id: int, payload: bytes,
                       session_id: int | None = None) -> bytes:
        """VENDOR_DEFINED_REQUEST; returns the response payload (StandardID/VendorID checked)."""
        sess = self._session(session_id) if session_id is not None else None
        vlen = VENDOR_ID_LEN.get(standard_id)
        vid = vendor_id.to_bytes(vlen, "little") if vlen else b""
        req = codec.VendorDefinedRequest(self.version, standard_id, vid, payload).encode()
        raw = self._exchange("VENDOR_DEFINED_REQUEST", req,
                             ResponseCode.VENDOR_DEFINED_RESPONSE, sess)
        rsp = self._decode("VENDOR_DEFINED_RESPONSE", lambda: codec.VendorDefinedResponse.decode(
            raw, pad=sess is None))
        if (rsp.standard_id, rsp.vendor_id) != (standard_id, vid):
            raise MalformedResponse(f"VENDOR_DEFINED_RESPONSE for StandardID {rsp.standard_id} "
                                    f"VendorID {rsp.vendor_id.hex()}, sent {standard_id} "
                                    f"{vid.hex()}")
        self._on_success(RequestCode.VENDOR_DEFINED_REQUEST, None)
        return rsp.payload


def _bind(fn: Callable[..., T], raw: bytes) -> Callable[[], T]:
    return lambda: fn(raw, pad=True)


# --- negotiation checks ----------------------------------------------------------------------

def _one_of(name: str, value: int, offered: int) -> None:
    if value == 0 or value & (value - 1) or not value & offered:
        raise NegotiationError(f"ALGORITHMS: {name} 0x{value:x} is not exactly one of the "
                               f"offered 0x{offered:x}")


def _check_algorithms(rsp: codec.Algorithms, cfg: RequesterConfig,
                      peer_flags: int) -> codec.Negotiated:
    _one_of("BaseAsymSel", rsp.base_asym_sel, cfg.base_asym)
    _one_of("BaseHashSel", rsp.base_hash_sel, cfg.base_hash)
    if rsp.ext_asym_sel or rsp.ext_hash_sel:
        raise NegotiationError("ALGORITHMS selects extended algorithms we did not offer")
    meas_hash = 0
    if peer_flags & (CapFlags.MEAS_CAP_SIG | CapFlags.MEAS_CAP_NO_SIG):
        if rsp.measurement_spec_sel != MEASUREMENT_SPECIFICATION_DMTF:
            raise NegotiationError(f"ALGORITHMS: MeasurementSpecificationSel "
                                   f"0x{rsp.measurement_spec_sel:x} is not DMTF")
        meas_hash = rsp.meas_hash_algo
        try:
            crypto.meas_hash_name(meas_hash)
        except crypto.CryptoError as exc:
            raise NegotiationError(f"ALGORITHMS: {exc}") from None
    dhe = rsp.selected(AlgType.DHE)
    aead = rsp.selected(AlgType.AEAD)
    if cfg.flags & peer_flags & CapFlags.KEY_EX_CAP:
        _one_of("DHE", dhe, cfg.dhe)
        _one_of("AEAD", aead, cfg.aead)
        _one_of("KeySchedule", rsp.selected(AlgType.KEY_SCHEDULE), KeySchedule.SPDM)
        if rsp.other_params_sel & 0x0F != OtherParams.OPAQUE_DATA_FMT1:
            raise NegotiationError("ALGORITHMS: OpaqueDataFmt1 not selected")
    return codec.Negotiated(rsp.version, rsp.base_hash_sel, rsp.base_asym_sel, meas_hash,
                            dhe, aead)


# --- third-party check of signed measurements ------------------------------------------------

def _vca_lengths(vca: bytes) -> list[int]:
    """Split a VCA into its six messages (each self-delimiting)."""
    try:
        out, pos = [], 0
        n = 4                                             # GET_VERSION
        out.append(n)
        pos += n
        n = 6 + 2 * vca[pos + 5]                          # VERSION
        out.append(n)
        pos += n
        n = 20 if vca[pos] >= SPDM_VERSION_12 else 12     # GET_CAPABILITIES
        out.append(n)
        pos += n
        n = 20                                            # CAPABILITIES (+1.3 block)
        if vca[pos] >= SPDM_VERSION_13 and vca[pos + 2] & 1:
            n += int.from_bytes(vca[pos + 22:pos + 24], "little")
        out.append(n)
        pos += n
        for _ in range(2):                                # NEGOTIATE_ALGORITHMS, ALGORITHMS
            n = int.from_bytes(vca[pos + 4:pos + 6], "little")
            out.append(n)
            pos += n
    except IndexError:
        raise MalformedResponse("VCA is truncated") from None
    if pos != len(vca):
        raise MalformedResponse(f"VCA has {len(vca) - pos} bytes after ALGORITHMS")
    return out


def parse_vca(vca: bytes) -> tuple[codec.Negotiated, int]:
    """Negotiated algorithms and responder capability flags, read back from a VCA."""
    sizes = _vca_lengths(vca)
    parts, pos = [], 0
    for n in sizes:
        parts.append(vca[pos:pos + n])
        pos += n
    try:
        codec.GetVersion.decode(parts[0])
        codec.Version.decode(parts[1])
        codec.GetCapabilities.decode(parts[2])
        caps = codec.Capabilities.decode(parts[3])
        codec.NegotiateAlgorithms.decode(parts[4])
        algs = codec.Algorithms.decode(parts[5])
    except DecodeError as exc:
        raise MalformedResponse(f"VCA: {exc}") from None
    return (codec.Negotiated(algs.version, algs.base_hash_sel, algs.base_asym_sel,
                             algs.meas_hash_algo, algs.selected(AlgType.DHE),
                             algs.selected(AlgType.AEAD)), caps.flags)


def verify_measurement_transcript(vca: bytes, requests_responses: Sequence[tuple[bytes, bytes]],
                                  leaf_pubkey: crypto.PublicKey,
                                  algs: codec.Negotiated | None = None) -> bool:
    """Re-check a signed MEASUREMENTS from evidence alone (DSP0274 1.2+ L1/L2).

    *vca* is the exact GET_VERSION..ALGORITHMS bytes, *requests_responses* the exact
    GET_MEASUREMENTS/MEASUREMENTS pairs since the previous signed one, the last
    response carrying the signature.  *algs* defaults to what the VCA negotiated (if
    given, it must agree with the VCA).  Returns True or raises SignatureError /
    MalformedResponse.
    """
    from_vca, _ = parse_vca(vca)
    if algs is None:
        algs = from_vca
    elif (algs.version, algs.base_hash, algs.base_asym) != (
            from_vca.version, from_vca.base_hash, from_vca.base_asym):
        raise MalformedResponse("algorithms given disagree with the VCA")
    if not requests_responses:
        raise MalformedResponse("no GET_MEASUREMENTS/MEASUREMENTS pair to verify")
    body = b""
    last = len(requests_responses) - 1
    for i, (req_raw, rsp_raw) in enumerate(requests_responses):
        try:
            req = codec.GetMeasurements.decode(req_raw)
            rsp = codec.Measurements.decode(rsp_raw, algs, req.signed)
        except DecodeError as exc:
            raise MalformedResponse(f"measurement pair {i}: {exc}") from None
        if req.version != algs.version or rsp.version != algs.version:
            raise MalformedResponse(f"measurement pair {i}: version differs from the VCA")
        if req.signed != (i == last):
            raise MalformedResponse(f"measurement pair {i}: only the last request may ask "
                                    "for a signature, and it must")
        body += req_raw + (rsp_raw[:len(rsp_raw) - len(rsp.signature)] if i == last
                           else rsp_raw)
    try:
        crypto.spdm_verify(leaf_pubkey, algs.version, algs.base_asym, algs.base_hash,
                           MEASUREMENTS_SIGN_CONTEXT, l1(vca, body), rsp.signature)
    except crypto.CryptoError as exc:
        raise SignatureError(f"MEASUREMENTS signature over L1: {exc}") from None
    return True


__all__ = ["MeasurementResult", "Requester", "RequesterConfig", "Transport", "parse_vca",
           "verify_measurement_transcript"]
