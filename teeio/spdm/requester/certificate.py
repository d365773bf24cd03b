"""Requester: GET_DIGESTS (DSP0274 §10.6) and GET_CERTIFICATE (§10.7), recorded in
message log B; the chain is checked up to the trust anchors, its RootHash, the leaf
key against the negotiated algorithm and the DIGESTS entry."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from teeio import pki

from .. import codec, crypto
from ..defs import BaseAsymAlgo, RequestCode, ResponseCode
from ..errors import CertificateError, MalformedResponse
from .context import RequesterContext

T = TypeVar("T")


class CertificateRequests(RequesterContext):
    """GET_DIGESTS and GET_CERTIFICATE."""

    def get_digests(self) -> dict[int, bytes]:
        neg = self.negotiated
        req = codec.GetDigests(self.version).encode()
        raw = self._exchange("GET_DIGESTS", req, ResponseCode.DIGESTS)
        rsp = self._decode("DIGESTS", lambda: codec.Digests.decode(raw, neg, pad=True))
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
            req = codec.GetCertificate(self.version, slot, 0, len(chain),
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


def _bind(fn: Callable[..., T], raw: bytes) -> Callable[[], T]:
    return lambda: fn(raw, pad=True)
