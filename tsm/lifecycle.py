"""The TSM's view of one TDI: one table of (state, input) -> next state and actions.

The DSM owns the TDI state (PCIe 6.x §11.2); the TSM changes its own record only through
this table, on an operation it performs or a fact it learns from the device or the
platform; only a step down is believed.  The diagram and the actions are in
docs/tdisp-and-tsm.md, "The TSM's record of a TDI".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntFlag, auto
from types import MappingProxyType

from teeio.tdisp.defs import TdiState

U, L, R, E = (TdiState.CONFIG_UNLOCKED, TdiState.CONFIG_LOCKED, TdiState.RUN, TdiState.ERROR)


class Input(Enum):
    # operations (guest GHCx or host ctl)
    LOCK = auto()
    ACCEPT = auto()
    STOP = auto()
    DMA_ACCEPT = auto()
    DMA_RELEASE = auto()
    EVIDENCE = auto()            # GET_EVIDENCE: signed measurements under a LOCK
    # what the TSM learns
    DEVICE_UNLOCKED = auto()     # the device says CONFIG_UNLOCKED
    DEVICE_LOCKED = auto()       # the device says CONFIG_LOCKED
    DEVICE_RUN = auto()          # the device says RUN
    DEVICE_ERROR = auto()        # the device says ERROR
    SESSION_LOST = auto()        # heartbeat failed, device server gone: fail safe
    TSM_RESTART = auto()         # the journal says LOCKED/RUN, the session is gone
    STOP_FAILED = auto()         # STOP_INTERFACE could not be sent or failed: fail safe


class Act(IntFlag):
    NONE = 0
    REVOKE_WINDOWS = auto()
    CLOSE_MMIO = auto()
    CLEAR_LOCK = auto()
    JOURNAL = auto()


@dataclass(frozen=True)
class Step:
    next: TdiState
    acts: Act = Act.NONE


_DOWN = Act.REVOKE_WINDOWS | Act.CLOSE_MMIO | Act.JOURNAL
_FAIL = Step(E, _DOWN)
_UNLOCKED = Step(U, _DOWN | Act.CLEAR_LOCK)

#: (state, input) -> Step.  A pair absent is refused (operations) or ignored (learning
#: something already known).
TABLE: Mapping[tuple[TdiState, Input], Step] = MappingProxyType({
    # operations
    (U, Input.LOCK): Step(L, Act.JOURNAL),
    (L, Input.ACCEPT): Step(R, Act.JOURNAL),
    (R, Input.DMA_ACCEPT): Step(R),
    (R, Input.DMA_RELEASE): Step(R),
    (L, Input.DMA_RELEASE): Step(L),      # a window left from an earlier RUN: forget it
    (E, Input.DMA_RELEASE): Step(E),
    (U, Input.DMA_RELEASE): Step(U),
    (L, Input.EVIDENCE): Step(L),
    (R, Input.EVIDENCE): Step(R),
    (U, Input.STOP): Step(U, Act.REVOKE_WINDOWS | Act.CLOSE_MMIO),
    (L, Input.STOP): _UNLOCKED,
    (R, Input.STOP): _UNLOCKED,
    (E, Input.STOP): _UNLOCKED,
    # the device's word: only a step down is believed
    (L, Input.DEVICE_UNLOCKED): _UNLOCKED,
    (R, Input.DEVICE_UNLOCKED): _UNLOCKED,
    (E, Input.DEVICE_UNLOCKED): _UNLOCKED,
    (L, Input.DEVICE_ERROR): _FAIL,
    (R, Input.DEVICE_ERROR): _FAIL,
    (R, Input.DEVICE_LOCKED): _FAIL,        # RUN -> LOCKED is no TDISP transition
    (U, Input.DEVICE_LOCKED): _FAIL,        # locked behind the TSM's back
    (U, Input.DEVICE_RUN): _FAIL,
    (L, Input.DEVICE_RUN): _FAIL,           # started behind the TSM's back
    (E, Input.DEVICE_LOCKED): Step(E, Act.REVOKE_WINDOWS | Act.CLOSE_MMIO),
    (E, Input.DEVICE_RUN): Step(E, Act.REVOKE_WINDOWS | Act.CLOSE_MMIO),
    (U, Input.DEVICE_ERROR): _FAIL,
    # fail-safe
    (L, Input.SESSION_LOST): _FAIL,
    (R, Input.SESSION_LOST): _FAIL,
    (E, Input.SESSION_LOST): Step(E, Act.REVOKE_WINDOWS | Act.CLOSE_MMIO),
    (L, Input.TSM_RESTART): _FAIL,
    (R, Input.TSM_RESTART): _FAIL,
    (E, Input.TSM_RESTART): Step(E, Act.REVOKE_WINDOWS | Act.CLOSE_MMIO),
    (L, Input.STOP_FAILED): _FAIL,
    (R, Input.STOP_FAILED): _FAIL,
})

OPERATIONS = frozenset({Input.LOCK, Input.ACCEPT, Input.STOP, Input.DMA_ACCEPT,
                        Input.DMA_RELEASE, Input.EVIDENCE})

_WHY = {
    Input.LOCK: "not CONFIG_UNLOCKED (STOP it first)",
    Input.ACCEPT: "not CONFIG_LOCKED",
    Input.DMA_ACCEPT: "DMA windows only in RUN",
    Input.DMA_RELEASE: "",
    Input.EVIDENCE: "evidence is given under a LOCK",
    Input.STOP: "",
}

#: What the device says -> the input it is to the table.
DEVICE_SAYS = {U: Input.DEVICE_UNLOCKED, L: Input.DEVICE_LOCKED, R: Input.DEVICE_RUN,
               E: Input.DEVICE_ERROR}


class Refused(Exception):
    """An operation the table does not allow in the current state."""


def step(state: TdiState, what: Input, name: str = "TDI") -> Step | None:
    """The row for (*state*, *what*): for an operation, raises :class:`Refused` if there
    is none; for something learnt, None means nothing to do (already known)."""
    row = TABLE.get((state, what))
    if row is None and what in OPERATIONS:
        raise Refused(f"{name} is {state.name}: {_WHY[what] or 'refused'}")
    if row is None and DEVICE_SAYS.get(state) is what:
        return None
    return row
