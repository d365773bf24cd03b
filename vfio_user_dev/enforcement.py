"""TDISP enforcement rules of the device, as pure functions, and refusal accounting.

The T-bit rules of PCIe 6.x §11.2.1 for the function's one TDI: :func:`mmio_refusal` (the
device as completer of TEE MMIO) and :func:`dma_route` (the device as requester).
:class:`Refusals` counts refusals by kind and logs them without flooding.  How the device
applies them: docs/device-internals.md.
"""

from __future__ import annotations

import collections
import logging

from teeio.tdisp.defs import TdiState

__all__ = ["LOG_EVERY", "LOG_FIRST", "Refusals", "dma_route", "mmio_refusal"]

LOG_FIRST = 10
LOG_EVERY = 100


def mmio_refusal(state: TdiState, t_bit: bool, stream_id: int | None,
                 bound_stream: int | None, tee_access: bool) -> tuple[str, str] | None:
    """Why a request to TEE MMIO must get UR, as (kind, detail); None: serve it."""
    if not t_bit:
        if state is TdiState.CONFIG_UNLOCKED:
            return None
        return "mmio_t0_not_unlocked", f"T=0 request to TEE MMIO in {state.name}"
    if state is not TdiState.RUN or not tee_access:
        return "mmio_t1_not_run", f"T=1 request to TEE MMIO in {state.name}"
    if stream_id is None or stream_id != bound_stream:
        return "mmio_t1_wrong_stream", (f"T=1 request on stream {stream_id}, the TDI is "
                                        f"bound to stream {bound_stream}")
    return None


def dma_route(state: TdiState, tee_access: bool,
              bound_stream: int | None) -> tuple[bool, int | None] | str:
    """(T bit, stream to use or None for any Secure one) for the device's DMA in *state*,
    or why the device must not issue it."""
    if state is TdiState.CONFIG_UNLOCKED:
        return False, None
    if state is TdiState.RUN and tee_access and bound_stream is not None:
        return True, bound_stream
    return f"DMA refused: the TDI is {state.name}"


class Refusals:
    """Refusals by kind, logged at INFO: the first LOG_FIRST of a kind, then every
    LOG_EVERY-th (with the count), so an attacker's flood does not flood the log."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
                 ) -> None:
        self.log = logger
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            self.log.info("TDISP refusal %s #%d: %s", kind, n, detail)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
