"""Responder: GET_VERSION (DSP0274 §10.3), GET_CAPABILITIES (§10.4) and
NEGOTIATE_ALGORITHMS (§10.5), the VCA that message log A records (libspdm
``libspdm_rsp_version.c``, ``_capabilities.c``, ``_algorithms.c``)."""

from __future__ import annotations

from collections.abc import Sequence

from .. import codec
from ..defs import (
    MAX_CT_EXPONENT,
    MEAS_CAP_MASK,
    MEASUREMENT_SPECIFICATION_DMTF,
    MIN_DATA_TRANSFER_SIZE_12,
    PSK_CAP_MASK,
    SPDM_VERSION_10,
    SPDM_VERSION_13,
    AeadSuite,
    AlgType,
    BaseAsymAlgo,
    BaseHashAlgo,
    CapFlags,
    DheGroup,
    ErrorCode,
    KeySchedule,
    MeasurementHashAlgo,
    OtherParams,
    RequestCode,
    version_number_entry,
)
from ..errors import SpdmError
from .context import ResponderContext
from .state import ConnectionState, Session

_MEAS_HASH_FOR = {BaseHashAlgo.SHA_256: MeasurementHashAlgo.SHA_256,
                  BaseHashAlgo.SHA_384: MeasurementHashAlgo.SHA_384,
                  BaseHashAlgo.SHA_512: MeasurementHashAlgo.SHA_512}


class VcaHandlers(ResponderContext):
    """GET_VERSION, GET_CAPABILITIES and NEGOTIATE_ALGORITHMS."""

    # --- §10.3 GET_VERSION --------------------------------------------------------------------

    def _get_version(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        if sess is not None:
            raise SpdmError(ErrorCode.UnexpectedRequest, "GET_VERSION inside a session")
        req = codec.GetVersion.decode(msg, pad=pad)
        if req.version != SPDM_VERSION_10:
            # §10.3: GET_VERSION is always 1.0; the ERROR is 1.0 too (see _dispatch).
            raise SpdmError(ErrorCode.VersionMismatch, f"GET_VERSION version 0x{req.version:02x}")
        self._reset()
        rsp = codec.Version(entries=tuple(version_number_entry(v)
                                           for v in self.config.versions))
        out = rsp.encode()
        self.logs.a += req.raw + out
        self.state = ConnectionState.AFTER_VERSION
        return out

    # --- §10.4 GET_CAPABILITIES ---------------------------------------------------------------

    def _get_capabilities(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        version = msg[0]
        if version not in self.config.versions:
            raise SpdmError(ErrorCode.VersionMismatch, f"version 0x{version:02x} not offered")
        req = codec.GetCapabilities.decode(msg, pad=pad)
        _check_requester_flags(req.flags, version)
        if (req.data_transfer_size < MIN_DATA_TRANSFER_SIZE_12
                or req.data_transfer_size > req.max_spdm_msg_size):
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"DataTransferSize {req.data_transfer_size} / MaxSPDMmsgSize "
                            f"{req.max_spdm_msg_size} inconsistent")
        if not req.flags & CapFlags.CHUNK_CAP and req.data_transfer_size != req.max_spdm_msg_size:
            raise SpdmError(ErrorCode.InvalidRequest,
                            "DataTransferSize != MaxSPDMmsgSize without CHUNK_CAP")
        if req.ct_exponent > MAX_CT_EXPONENT:
            raise SpdmError(ErrorCode.InvalidRequest, f"CTExponent {req.ct_exponent}")
        if version >= SPDM_VERSION_13 and req.param1 & 1 and not req.flags & CapFlags.CHUNK_CAP:
            raise SpdmError(ErrorCode.InvalidRequest,
                            "supported algorithms requested without CHUNK_CAP")
        self._on_request(RequestCode.GET_CAPABILITIES, sess)
        # We do not set CHUNK_CAP, so the 1.3 supported-algorithms block is never sent.
        out = codec.Capabilities(version, ct_exponent=self.config.ct_exponent,
                                 flags=self.config.flags,
                                 data_transfer_size=self.config.data_transfer_size,
                                 max_spdm_msg_size=self.config.max_spdm_msg_size).encode()
        self.logs.a += req.raw + out
        self.version = version
        self.req_flags = req.flags
        self.req_dts, self.req_max_msg = req.data_transfer_size, req.max_spdm_msg_size
        self.state = ConnectionState.AFTER_CAPABILITIES
        return out

    # --- §10.5 NEGOTIATE_ALGORITHMS -----------------------------------------------------------

    def _negotiate_algorithms(self, msg: bytes, sess: Session | None, pad: bool) -> bytes:
        if msg[0] != self.version:
            raise SpdmError(ErrorCode.VersionMismatch,
                            f"request version 0x{msg[0]:02x}, negotiated 0x{self.version:02x}")
        req = codec.NegotiateAlgorithms.decode(msg, pad=pad)
        if len(req.raw) > 0x80:
            raise SpdmError(ErrorCode.InvalidRequest, f"Length {len(req.raw)} exceeds 128")
        ext_total = len(req.ext_asym) + len(req.ext_hash) + sum(len(s.ext)
                                                                 for s in req.alg_structs)
        if ext_total > 0x14:
            raise SpdmError(ErrorCode.InvalidRequest, f"{ext_total} external algorithms")
        for s in req.alg_structs:
            if s.alg_type not in set(AlgType):
                raise SpdmError(ErrorCode.InvalidRequest, f"AlgType {s.alg_type}")
            if s.supported == 0:
                raise SpdmError(ErrorCode.InvalidRequest, f"AlgType {s.alg_type}: nothing offered")
        cfg = self.config
        base_hash = _pick(cfg.base_hash & req.base_hash, _hash_preference(self.asym))
        base_asym = self.asym if req.base_asym & self.asym else 0
        meas_cap = bool(cfg.flags & MEAS_CAP_MASK)
        meas_spec = (MEASUREMENT_SPECIFICATION_DMTF
                     if meas_cap and req.measurement_spec & MEASUREMENT_SPECIFICATION_DMTF else 0)
        meas_hash = _MEAS_HASH_FOR.get(BaseHashAlgo(base_hash), 0) if meas_spec else 0
        other = (OtherParams.OPAQUE_DATA_FMT1
                 if req.other_params & OtherParams.OPAQUE_DATA_FMT1 else 0)
        selected: list[codec.AlgStruct] = []
        for s in req.alg_structs:
            local = {AlgType.DHE: cfg.dhe, AlgType.AEAD: cfg.aead,
                     AlgType.KEY_SCHEDULE: KeySchedule.SPDM}.get(AlgType(s.alg_type), 0)
            pref = {AlgType.DHE: _dhe_preference(self.asym),
                    AlgType.AEAD: (AeadSuite.AES_256_GCM, AeadSuite.AES_128_GCM),
                    AlgType.KEY_SCHEDULE: (KeySchedule.SPDM,)}.get(AlgType(s.alg_type), ())
            selected.append(codec.AlgStruct(s.alg_type, _pick(local & s.supported, pref)))
        sel = {s.alg_type: s.supported for s in selected}
        # Business rules (libspdm_get_response_algorithms): every capability in use
        # needs its algorithm.
        if meas_cap and req.measurement_spec and not meas_hash:
            raise SpdmError(ErrorCode.InvalidRequest, "no common measurement hash")
        if not base_hash:
            raise SpdmError(ErrorCode.InvalidRequest, "no common base hash algorithm")
        if not base_asym:
            raise SpdmError(ErrorCode.InvalidRequest,
                            f"requester does not offer our signing algorithm {self.asym.name}")
        if self._both(CapFlags.KEY_EX_CAP, CapFlags.KEY_EX_CAP):
            for t in (AlgType.DHE, AlgType.AEAD, AlgType.KEY_SCHEDULE):
                if not sel.get(t):
                    raise SpdmError(ErrorCode.InvalidRequest, f"no common {t.name} algorithm")
        self._on_request(RequestCode.NEGOTIATE_ALGORITHMS, sess)
        out = codec.Algorithms(
            self.version, meas_spec, other, meas_hash, base_asym, base_hash,
            alg_structs=tuple(selected)).encode()
        self.logs.a += req.raw + out
        self._neg = codec.Negotiated(self.version, base_hash, base_asym, meas_hash,
                                     sel.get(AlgType.DHE, 0), sel.get(AlgType.AEAD, 0))
        self.other_params = other
        self.state = ConnectionState.NEGOTIATED
        return out


def _pick(common: int, preference: Sequence[int]) -> int:
    return next((p for p in preference if common & p), 0)


def _hash_preference(asym: int) -> tuple[int, ...]:
    if asym == BaseAsymAlgo.ECDSA_P256:
        return (BaseHashAlgo.SHA_256, BaseHashAlgo.SHA_384, BaseHashAlgo.SHA_512)
    return (BaseHashAlgo.SHA_384, BaseHashAlgo.SHA_256, BaseHashAlgo.SHA_512)


def _dhe_preference(asym: int) -> tuple[int, ...]:
    if asym == BaseAsymAlgo.ECDSA_P256:
        return (DheGroup.SECP_256_R1, DheGroup.SECP_384_R1)
    return (DheGroup.SECP_384_R1, DheGroup.SECP_256_R1)


def _check_requester_flags(flags: int, version: int) -> None:
    """libspdm ``libspdm_check_request_flag_compatibility`` (SPDM 1.1+ rules)."""
    def bit(f: int) -> bool:
        return bool(flags & f)

    psk = (flags & PSK_CAP_MASK) >> 10
    key_ex, mac, enc = bit(CapFlags.KEY_EX_CAP), bit(CapFlags.MAC_CAP), bit(CapFlags.ENCRYPT_CAP)
    cert, pub_key_id = bit(CapFlags.CERT_CAP), bit(CapFlags.PUB_KEY_ID_CAP)
    chal, mut = bit(CapFlags.CHAL_CAP), bit(CapFlags.MUT_AUTH_CAP)
    ep_info = (flags >> 22) & 3
    multi_key = (flags >> 26) & 3
    bad: str | None = None
    if psk in (2, 3):
        bad = "PSK_CAP value reserved for requesters"
    elif key_ex or psk:
        if not mac and not enc:
            bad = "KEY_EX/PSK without MAC_CAP or ENCRYPT_CAP"
    elif (mac or enc or bit(CapFlags.HANDSHAKE_IN_THE_CLEAR_CAP) or bit(CapFlags.HBEAT_CAP)
          or bit(CapFlags.KEY_UPD_CAP) or (version >= SPDM_VERSION_13 and bit(CapFlags.EVENT_CAP))):
        bad = "session capabilities without KEY_EX_CAP or PSK_CAP"
    if bad is None and not key_ex and psk == 1 and bit(CapFlags.HANDSHAKE_IN_THE_CLEAR_CAP):
        bad = "HANDSHAKE_IN_THE_CLEAR with PSK only"
    if bad is None:
        if cert or pub_key_id:
            if cert and pub_key_id:
                bad = "CERT_CAP and PUB_KEY_ID_CAP both set"
            elif not chal and not key_ex and (version < SPDM_VERSION_13 or ep_info in (0, 1)):
                bad = "CERT_CAP/PUB_KEY_ID_CAP without CHAL_CAP or KEY_EX_CAP"
        elif chal or mut:
            bad = "CHAL_CAP/MUT_AUTH_CAP without CERT_CAP or PUB_KEY_ID_CAP"
        elif version >= SPDM_VERSION_13 and ep_info == 2:
            bad = "EP_INFO_CAP with signature but no key"
    if bad is None and mut and not key_ex and not chal:
        bad = "MUT_AUTH_CAP without KEY_EX_CAP or CHAL_CAP"
    if bad is None and version >= SPDM_VERSION_13:
        if ep_info == 3 or multi_key == 3:
            bad = "reserved EP_INFO_CAP / MULTI_KEY_CAP value"
        elif multi_key and (pub_key_id or not cert):
            bad = "MULTI_KEY_CAP without CERT_CAP"
    if bad is not None:
        raise SpdmError(ErrorCode.InvalidRequest,
                        f"requester capability flags 0x{flags:08x}: {bad}")
