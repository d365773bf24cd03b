"""The device's TDISP enforcement rules as pure functions (vfio_user_dev/enforcement.py,
PCIe 6.x §11.2.1): the completer's and the requester's tables, and the SPDM responder's
heartbeat bookkeeping (sans-IO: the caller's clock)."""

from __future__ import annotations

import pytest

from teeio.tdisp.defs import TdiState
from vfio_user_dev.enforcement import dma_route, mmio_refusal

U, L, R, E = (TdiState.CONFIG_UNLOCKED, TdiState.CONFIG_LOCKED, TdiState.RUN, TdiState.ERROR)
BOUND = 3

# (state, T, stream it arrived on, TEE access enabled) -> refusal kind or None (served)
COMPLETER = [
    (U, False, None, False, None),
    (U, False, BOUND, False, None),             # T=0 over IDE: still legacy use
    (U, True, BOUND, False, "mmio_t1_not_run"),
    (L, False, BOUND, False, "mmio_t0_not_unlocked"),
    (L, True, BOUND, False, "mmio_t1_not_run"),
    (R, False, BOUND, True, "mmio_t0_not_unlocked"),
    (R, True, BOUND, True, None),
    (R, True, BOUND + 1, True, "mmio_t1_wrong_stream"),
    (R, True, BOUND, False, "mmio_t1_not_run"),  # access revoked
    (E, False, None, False, "mmio_t0_not_unlocked"),
    (E, True, BOUND, False, "mmio_t1_not_run"),
]


@pytest.mark.parametrize(("state", "t_bit", "stream", "tee", "kind"), COMPLETER)
def test_completer_table(state: TdiState, t_bit: bool, stream: int | None, tee: bool,
                         kind: str | None) -> None:
    got = mmio_refusal(state, t_bit, stream, BOUND, tee)
    assert (got[0] if got else None) == kind
    if got:
        assert state.name in got[1] or "stream" in got[1]


@pytest.mark.parametrize(("state", "tee", "expect"), [
    (U, False, (False, None)),
    (L, False, None),
    (R, True, (True, BOUND)),
    (R, False, None),
    (E, False, None),
])
def test_requester_table(state: TdiState, tee: bool,
                         expect: tuple[bool, int | None] | None) -> None:
    got = dma_route(state, tee, BOUND)
    if expect is None:
        assert isinstance(got, str) and state.name in got
    else:
        assert got == expect
