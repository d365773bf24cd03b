"""What sizes an SPDM message beyond its own fields (DSP0274 §10.5): the negotiated
algorithms (hash H, signature S, DHE D), what the request asked for (a measurement
summary hash, a signature), and whether DOE DW padding may follow (PCIe 6.x §6.30.1);
and the size functions that context-sized fields call."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from teeio.lite_dataclass import dataclass

from . import crypto

Known = Mapping[str, Any]


@dataclass(frozen=True)
class Negotiated:
    """What NEGOTIATE_ALGORITHMS settled; decoders of variable-size fields need it."""

    version: int
    base_hash: int
    base_asym: int
    meas_hash: int = 0
    dhe: int = 0
    aead: int = 0
    handshake_in_the_clear: bool = False
    req_asym: int = 0

    @property
    def hash_size(self) -> int:
        return crypto.hash_size(self.base_hash)

    @property
    def sig_size(self) -> int:
        return crypto.signature_size(self.base_asym)

    @property
    def dhe_size(self) -> int:
        return crypto.dhe_public_size(self.dhe)

    @property
    def req_sig_size(self) -> int:
        return crypto.signature_size(self.req_asym) if self.req_asym else 0


class Unsized(Exception):  # noqa: N818 - a signal between a size function and its field
    """A size function lacks what it needs (no negotiated algorithms, say)."""


@dataclass(frozen=True)
class Context:
    """What sizes a message beyond its own fields: the negotiated algorithms, whether the
    request asked for a MeasurementSummaryHash (CHALLENGE/KEY_EXCHANGE Param1 != 0) or a
    signature (GET_MEASUREMENTS), and whether DOE DW padding may follow (PCIe 6.x §6.30.1)."""

    neg: Negotiated | None = None
    summary: bool = False
    signed: bool = False
    pad: bool = False

    @classmethod
    def of(cls, ctx: Any, *, pad: bool = False, summary: bool = False,
           signed: bool = False) -> Context:
        """*ctx* (a Context, a Negotiated or None) with the given flags added."""
        if isinstance(ctx, Context):
            return dataclasses.replace(ctx, pad=ctx.pad or pad, summary=ctx.summary or summary,
                                       signed=ctx.signed or signed)
        if ctx is not None and not isinstance(ctx, Negotiated):
            raise TypeError(f"an SPDM context is a Negotiated or a Context, not "
                            f"{type(ctx).__name__}")
        return cls(ctx, summary, signed, pad)

    @property
    def algorithms(self) -> Negotiated:
        if self.neg is None:
            raise Unsized("needs the negotiated algorithms")
        return self.neg


def _ctx(ctx: Any) -> Context:
    return Context.of(ctx)


# --- sizes from the context (DSP0274 §10.5 H, S, D) -----------------------------------------------

def hash_size(known: Known, ctx: Any) -> int:
    return _ctx(ctx).algorithms.hash_size


def sig_size(known: Known, ctx: Any) -> int:
    return _ctx(ctx).algorithms.sig_size


def dhe_size(known: Known, ctx: Any) -> int:
    return _ctx(ctx).algorithms.dhe_size


def summary_size(known: Known, ctx: Any) -> int:
    """MeasurementSummaryHash: H when the request asked for one, else absent."""
    c = _ctx(ctx)
    return c.algorithms.hash_size if c.summary else 0


def measurements_sig_size(known: Known, ctx: Any) -> int:
    """MEASUREMENTS Signature: S when GET_MEASUREMENTS asked for one, else absent."""
    c = _ctx(ctx)
    return c.algorithms.sig_size if c.signed else 0


def req_sig_size(known: Known, ctx: Any) -> int:
    n = _ctx(ctx).algorithms.req_sig_size
    if not n:
        raise Unsized("signature included but no requester algorithm negotiated")
    return n


def responder_verify_size(known: Known, ctx: Any) -> int:
    """KEY_EXCHANGE_RSP ResponderVerifyData: H, absent with HANDSHAKE_IN_THE_CLEAR."""
    neg = _ctx(ctx).algorithms
    return 0 if neg.handshake_in_the_clear else neg.hash_size


def finish_rsp_verify_size(known: Known, ctx: Any) -> int:
    """FINISH_RSP ResponderVerifyData: H only with HANDSHAKE_IN_THE_CLEAR."""
    neg = _ctx(ctx).algorithms
    return neg.hash_size if neg.handshake_in_the_clear else 0
