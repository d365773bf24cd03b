"""An SPDM requester and responder joined in-process (DSP0274), over a DOE-like transport
that DW-pads each object as PCIe DOE does (PCIe 6.x §6.30), with the run's identities."""

from __future__ import annotations

from dataclasses import dataclass, field

from teeio.measurements import DmtfValueType, MeasurementSource
from teeio.spdm import Requester, RequesterConfig, Responder, ResponderConfig
from teeio.spdm.defs import DOE_TYPE_SECURED_SPDM, DOE_TYPE_SPDM
from tests.support.pki import shared_identity

MEASUREMENTS = (
    MeasurementSource(1, DmtfValueType.IMMUTABLE_ROM, b"boot rom v1"),
    MeasurementSource(2, DmtfValueType.MUTABLE_FIRMWARE, b"firmware image"),
    MeasurementSource(3, DmtfValueType.HARDWARE_CONFIG, b"\x01\x02", as_digest=False),
    MeasurementSource(0x10, DmtfValueType.VERSION, b"1.2.3"),
)


@dataclass
class Link:
    """A DOE mailbox stand-in: pads each object to a DW like PCIe DOE; logs the exact
    (unpadded) payloads each way."""

    responder: Responder
    log: list[tuple[int, bytes, bytes]] = field(default_factory=list)

    def __call__(self, doe_type: int, payload: bytes) -> bytes:
        padded = payload + bytes(-len(payload) % 4)
        if doe_type == DOE_TYPE_SPDM:
            rsp: bytes | None = self.responder.handle_spdm(padded)
        elif doe_type == DOE_TYPE_SECURED_SPDM:
            rsp = self.responder.handle_secured(padded)
        else:
            raise AssertionError(f"DOE type {doe_type}")
        out = b"" if rsp is None else rsp
        self.log.append((doe_type, payload, out))
        return out + bytes(-len(out) % 4)


def make_pair(alg: str = "P-384", versions: tuple[int, ...] = (0x12, 0x13),
              rsp_config: ResponderConfig | None = None,
              req_config: RequesterConfig | None = None,
              anchors: list[object] | None = None) -> tuple[Requester, Responder, Link]:
    ident = shared_identity(alg)
    rsp = Responder(ident, MEASUREMENTS, rsp_config or ResponderConfig(versions=versions),
                    name="dev")
    link = Link(rsp)
    req = Requester(link, [ident.root] if anchors is None else anchors,  # type: ignore[arg-type]
                    req_config or RequesterConfig(), name="tsm")
    return req, rsp, link


def connect(req: Requester) -> None:
    """GET_VERSION .. ALGORITHMS, GET_DIGESTS and GET_CERTIFICATE of slot 0."""
    req.init_connection()
    req.get_digests()
    req.get_certificate(0)


def error_of(rsp: bytes) -> tuple[int, int, int]:
    """(version, ErrorCode, data) of an ERROR response; fails if it is not one."""
    assert len(rsp) >= 4 and rsp[1] == 0x7F, f"not an ERROR: {rsp.hex()}"
    return rsp[0], rsp[2], rsp[3]
