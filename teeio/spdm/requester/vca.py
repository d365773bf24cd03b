"""Requester: GET_VERSION (DSP0274 §10.3), GET_CAPABILITIES (§10.4) and
NEGOTIATE_ALGORITHMS (§10.5), recorded in message log A (the VCA), with the checks
that the responder's selections are single values we offered."""

from __future__ import annotations

from .. import codec, crypto
from ..defs import (
    MEASUREMENT_SPECIFICATION_DMTF,
    AlgType,
    BaseAsymAlgo,
    BaseHashAlgo,
    CapFlags,
    KeySchedule,
    OtherParams,
    ResponseCode,
)
from ..errors import MalformedResponse, NegotiationError
from .config import RequesterConfig
from .context import RequesterContext


class VcaRequests(RequesterContext):
    """GET_VERSION, GET_CAPABILITIES and NEGOTIATE_ALGORITHMS."""

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
        req = codec.GetCapabilities(self.version, ct_exponent=cfg.ct_exponent, flags=cfg.flags,
                                    data_transfer_size=cfg.data_transfer_size,
                                    max_spdm_msg_size=cfg.max_spdm_msg_size).encode()
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
