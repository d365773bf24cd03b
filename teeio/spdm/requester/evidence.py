"""Third-party check of signed measurements (DSP0274 1.2+ §15: L1 = VCA || the
GET_MEASUREMENTS/MEASUREMENTS pairs): a verifier holding only the exact VCA bytes, the
pairs and the responder's leaf key re-checks the MEASUREMENTS signature."""

from __future__ import annotations

from collections.abc import Sequence

from .. import codec, crypto
from ..defs import MEASUREMENTS_SIGN_CONTEXT, SPDM_VERSION_12, SPDM_VERSION_13, AlgType
from ..errors import DecodeError, MalformedResponse, SignatureError
from ..transcript import l1


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
