"""The TSM's TDI lifecycle table (tsm/lifecycle.py): every (state, input) pair."""

from __future__ import annotations

import pytest

from teeio.tdisp.defs import TdiState
from tsm.lifecycle import DEVICE_SAYS, OPERATIONS, TABLE, Act, Input, Refused, step

U, L, R, E = (TdiState.CONFIG_UNLOCKED, TdiState.CONFIG_LOCKED, TdiState.RUN, TdiState.ERROR)


@pytest.mark.parametrize("state", list(TdiState))
@pytest.mark.parametrize("what", sorted(OPERATIONS, key=lambda i: i.value))
def test_an_operation_is_allowed_exactly_where_the_table_says(state: TdiState,
                                                              what: Input) -> None:
    if (state, what) in TABLE:
        assert step(state, what) is TABLE[(state, what)]
    else:
        with pytest.raises(Refused, match=f"TDI is {state.name}"):
            step(state, what)


def test_the_operations_move_the_tdi_as_tdisp_does() -> None:
    lock = step(U, Input.LOCK)
    assert lock is not None and lock.next is L
    accept = step(L, Input.ACCEPT)
    assert accept is not None and accept.next is R
    for s in (L, R, E):
        stop = step(s, Input.STOP)
        assert stop is not None and stop.next is U
        assert stop.acts & Act.REVOKE_WINDOWS and stop.acts & Act.CLEAR_LOCK


def test_lock_only_from_unlocked_and_says_stop_first() -> None:
    for s in (L, R, E):
        with pytest.raises(Refused, match="STOP it first"):
            step(s, Input.LOCK)


def test_dma_windows_only_in_run() -> None:
    assert step(R, Input.DMA_ACCEPT) is not None
    for s in (U, L, E):
        with pytest.raises(Refused, match="DMA windows only in RUN"):
            step(s, Input.DMA_ACCEPT)


@pytest.mark.parametrize("state", list(TdiState))
def test_what_the_device_says_already_known_is_nothing_to_do(state: TdiState) -> None:
    assert step(state, DEVICE_SAYS[state]) is None


@pytest.mark.parametrize("state", [L, R])
def test_a_step_down_is_believed(state: TdiState) -> None:
    err = step(state, Input.DEVICE_ERROR)
    assert err is not None and err.next is E
    assert err.acts & Act.REVOKE_WINDOWS and err.acts & Act.CLOSE_MMIO
    unl = step(state, Input.DEVICE_UNLOCKED)
    assert unl is not None and unl.next is U and unl.acts & Act.CLEAR_LOCK


@pytest.mark.parametrize(("state", "says"), [(U, Input.DEVICE_LOCKED), (U, Input.DEVICE_RUN),
                                             (L, Input.DEVICE_RUN), (R, Input.DEVICE_LOCKED)])
def test_a_state_the_tsm_did_not_lead_the_tdi_to_is_error(state: TdiState,
                                                          says: Input) -> None:
    row = step(state, says)
    assert row is not None and row.next is E


@pytest.mark.parametrize("says", [Input.DEVICE_LOCKED, Input.DEVICE_RUN])
def test_error_stays_error_until_a_stop(says: Input) -> None:
    row = step(E, says)
    assert row is not None and row.next is E and row.acts & Act.REVOKE_WINDOWS


@pytest.mark.parametrize("what", [Input.SESSION_LOST, Input.TSM_RESTART])
def test_fail_safe(what: Input) -> None:
    for s in (L, R):
        row = step(s, what)
        assert row is not None and row.next is E and row.acts & Act.JOURNAL
    assert step(U, what) is None            # nothing locked: nothing to fail


def test_every_row_leaves_a_locked_or_running_tdi_only_by_revoking() -> None:
    """Whatever takes a TDI out of RUN revokes its windows and private MMIO."""
    for (state, _what), row in TABLE.items():
        if state is R and row.next is not R:
            assert row.acts & Act.REVOKE_WINDOWS and row.acts & Act.CLOSE_MMIO
