"""TDI state machine: the whole table (every state x event), guards, nonce handling."""

from __future__ import annotations

import itertools

import pytest

from teeio.tdisp.codec import TdispError
from teeio.tdisp.defs import ErrorCode, LockInterfaceFlags, TdiState
from teeio.tdisp.state import SECURITY_EVENTS, TRANSITIONS, Tdi, TdiAction, TdiEvent

U, L, R, E = (TdiState.CONFIG_UNLOCKED, TdiState.CONFIG_LOCKED, TdiState.RUN, TdiState.ERROR)
NONCE = bytes(range(32))


def _nonces() -> Tdi:
    return Tdi(lambda: NONCE)


def tdi_in(state: TdiState, flags: int = LockInterfaceFlags.NO_FW_UPDATE) -> Tdi:
    t = _nonces()
    if state is U:
        return t
    t.handle_event(TdiEvent.LOCK, lock_flags=flags)
    if state is R:
        t.handle_event(TdiEvent.START, nonce=NONCE)
    elif state is E:
        t.handle_event(TdiEvent.FLR)
    assert t.state is state
    return t


# Expected next state for every (state, event): None = INVALID_INTERFACE_STATE.
def expected(state: TdiState, ev: TdiEvent) -> TdiState | None:
    if ev in SECURITY_EVENTS:
        return E if state in (L, R) else state
    return {
        TdiEvent.LOCK: {U: L},
        TdiEvent.START: {L: R},
        TdiEvent.STOP: {U: U, L: U, R: U, E: U},
        TdiEvent.CONVENTIONAL_RESET: {U: U, L: U, R: U, E: U},
        TdiEvent.GET_REPORT: {L: L, R: R},
        TdiEvent.P2P_OR_MMIO_ATTR: {R: R},
    }[ev].get(state)


@pytest.mark.parametrize(("state", "ev"), list(itertools.product(TdiState, TdiEvent)),
                         ids=lambda x: x.name)
def test_every_state_event(state: TdiState, ev: TdiEvent) -> None:
    t = tdi_in(state)
    want = expected(state, ev)
    if want is None:
        assert (state, ev) not in TRANSITIONS
        with pytest.raises(TdispError) as ei:
            t.handle_event(ev, nonce=NONCE)
        assert ei.value.code is ErrorCode.INVALID_INTERFACE_STATE
        assert t.state is state
        return
    out = t.handle_event(ev, nonce=NONCE)
    assert out.state is want is t.state
    if want is U and state is not U:
        assert out.actions & TdiAction.SCRUB_SECRETS and out.actions & TdiAction.UNLOCK_CONFIG
        assert t.lock_flags == 0
    if want is E and state is not E:
        assert not out.actions & TdiAction.ENABLE_TEE_ACCESS
        assert bool(out.actions & TdiAction.REVOKE_TEE_ACCESS) == (state is R)


def test_table_is_complete_and_only_legal_rows() -> None:
    for state, ev in itertools.product(TdiState, TdiEvent):
        row = TRANSITIONS.get((state, ev))
        assert (row.target if row else None) is expected(state, ev)


def test_lock_generates_nonce_and_start_checks_it() -> None:
    t = _nonces()
    out = t.handle_event(TdiEvent.LOCK, lock_flags=LockInterfaceFlags.LOCK_MSIX)
    assert out.nonce == NONCE and out.actions & TdiAction.GENERATE_NONCE
    assert NONCE.hex() not in repr(out)
    for bad in (None, bytes(32), NONCE[:-1]):
        with pytest.raises(TdispError) as ei:
            t.handle_event(TdiEvent.START, nonce=bad)
        assert ei.value.code is ErrorCode.INVALID_NONCE
        assert t.state is L                      # a wrong nonce changes nothing
    out = t.handle_event(TdiEvent.START, nonce=NONCE)
    assert out.state is R and out.actions & TdiAction.DESTROY_NONCE
    # the nonce is single use: STOP, re-LOCK gives a fresh one; the old TDI run is gone
    t.handle_event(TdiEvent.STOP)
    with pytest.raises(TdispError) as ei:
        t.handle_event(TdiEvent.START, nonce=NONCE)
    assert ei.value.code is ErrorCode.INVALID_INTERFACE_STATE


def test_nonce_destroyed_on_error_and_stop() -> None:
    for ev in (TdiEvent.SPDM_SESSION_TERMINATED, TdiEvent.STOP):
        t = tdi_in(L)
        t.handle_event(ev)
        t.handle_event(TdiEvent.STOP)
        t.handle_event(TdiEvent.LOCK)
        assert t.state is L


def test_firmware_update_guard() -> None:
    for state in (L, R):
        t = tdi_in(state, flags=0)
        out = t.handle_event(TdiEvent.FIRMWARE_UPDATE)
        assert out.state is state and out.actions == TdiAction.NONE
        t = tdi_in(state, flags=LockInterfaceFlags.NO_FW_UPDATE)
        assert t.handle_event(TdiEvent.FIRMWARE_UPDATE).state is E


def test_insufficient_entropy() -> None:
    def broken() -> bytes:
        raise OSError("no RNG")

    for src in (broken, lambda: bytes(16)):
        t = Tdi(src)
        with pytest.raises(TdispError) as ei:
            t.handle_event(TdiEvent.LOCK)
        assert ei.value.code is ErrorCode.INSUFFICIENT_ENTROPY
        assert t.state is U


def test_deterministic() -> None:
    seq = [TdiEvent.LOCK, TdiEvent.GET_REPORT, TdiEvent.START, TdiEvent.BAR_WRITE,
           TdiEvent.STOP]
    runs = []
    for _ in range(2):
        t = _nonces()
        runs.append([t.handle_event(e, nonce=NONCE) for e in seq])
    assert runs[0] == runs[1]
    assert [o.state for o in runs[0]] == [L, L, R, E, U]
