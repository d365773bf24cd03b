"""The TDI state machine (PCIe 6.x §11.2, Figure 11-4): one transition table.

::

    CONFIG_UNLOCKED --LOCK--> CONFIG_LOCKED --START (nonce ok)--> RUN
          ^                        |  security event               | security event
          |                        v                               v
          +------- STOP (any state; scrubs) ---------------- ERROR <+

:data:`TRANSITIONS` maps every (state, event) pair that is legal to the next state and
the actions the device must take; a pair absent from it is INVALID_INTERFACE_STATE.
Two rows have a guard that the table cannot express and :meth:`Tdi.handle_event` applies
before taking the row:

* START: the nonce must equal the one LOCK generated (constant-time compare), else
  INVALID_NONCE and the TDI stays CONFIG_LOCKED (the spec lists INVALID_NONCE as an error
  response only, with no state change; reference §4.4);
* FIRMWARE_UPDATE in LOCKED/RUN is a security event only if LOCK set NO_FW_UPDATE;
  otherwise the update is allowed (and reported by the device) and nothing changes.

Security events (§11.2.6, reference §4.6) in CONFIG_UNLOCKED or ERROR change nothing:
there is no locked configuration to protect, or the TDI is already in ERROR.  STOP in
CONFIG_UNLOCKED is accepted as a no-op (the spec allows STOP in all states; spdm-emu's
sample answers INVALID_INTERFACE_STATE there).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntFlag, auto
from types import MappingProxyType

from .codec import TdispError
from .defs import START_INTERFACE_NONCE_SIZE, ErrorCode, LockInterfaceFlags, TdiState

__all__ = ["SECURITY_EVENTS", "TRANSITIONS", "Outcome", "Tdi", "TdiAction", "TdiEvent",
           "Transition"]

U, L, R, E = (TdiState.CONFIG_UNLOCKED, TdiState.CONFIG_LOCKED, TdiState.RUN, TdiState.ERROR)


class TdiEvent(Enum):
    """What can happen to a TDI: TDISP requests, then the security events of §11.2.6."""

    # TDISP requests that move (or are only legal in) certain states (§11.3, Table 11-3)
    LOCK = auto()                       # LOCK_INTERFACE_REQUEST (device checks passed)
    START = auto()                      # START_INTERFACE_REQUEST
    STOP = auto()                       # STOP_INTERFACE_REQUEST
    GET_REPORT = auto()                 # GET_DEVICE_INTERFACE_REPORT: LOCKED or RUN
    P2P_OR_MMIO_ATTR = auto()           # BIND/UNBIND_P2P_STREAM, SET_MMIO_ATTRIBUTE: RUN only
    # security events: LOCKED/RUN -> ERROR (§11.2.6, Table 11-2; §11.4)
    BAR_WRITE = auto()                  # BAR, Expansion ROM BAR or BIST written
    MEMORY_SPACE_DISABLED = auto()      # Command.Memory Space Enable cleared
    BUS_MASTER_DISABLED = auto()        # Command.Bus Master Enable cleared
    PROTECTED_CONFIG_WRITE = auto()     # Device Control/2/3 fields, ReBAR, SR-IOV, PASID, ...
    MSIX_CHANGED = auto()               # locked and reported MSI-X capability/table changed
    REQUESTER_ID_CHANGED = auto()       # bus/segment renumbered
    IDE_STREAM_REGISTERS_CHANGED = auto()  # stream control / RID / address association
    IDE_STREAM_INSECURE = auto()        # bound stream lost (MAC failure, stop, link down)
    FLR = auto()                        # Function Level Reset of the function (or its PF)
    SPDM_SESSION_TERMINATED = auto()    # the session that locked the TDI ended
    HEARTBEAT_TIMEOUT = auto()          # ... by heartbeat timeout
    FIRMWARE_UPDATE = auto()            # guarded: only with NO_FW_UPDATE locked
    POISONED_DATA = auto()              # poisoned TLP / uncorrectable error on TDI data
    DSM_INTERNAL_ERROR = auto()         # lost TDI state, other device trust change
    # not a TDISP event, but every TDI ends in CONFIG_UNLOCKED after it (§11.2)
    CONVENTIONAL_RESET = auto()


SECURITY_EVENTS: frozenset[TdiEvent] = frozenset({
    TdiEvent.BAR_WRITE, TdiEvent.MEMORY_SPACE_DISABLED, TdiEvent.BUS_MASTER_DISABLED,
    TdiEvent.PROTECTED_CONFIG_WRITE, TdiEvent.MSIX_CHANGED, TdiEvent.REQUESTER_ID_CHANGED,
    TdiEvent.IDE_STREAM_REGISTERS_CHANGED, TdiEvent.IDE_STREAM_INSECURE, TdiEvent.FLR,
    TdiEvent.SPDM_SESSION_TERMINATED, TdiEvent.HEARTBEAT_TIMEOUT, TdiEvent.FIRMWARE_UPDATE,
    TdiEvent.POISONED_DATA, TdiEvent.DSM_INTERNAL_ERROR,
})


class TdiAction(IntFlag):
    """What the device must do when it takes a transition (the caller performs them)."""

    NONE = 0
    LOCK_CONFIG = auto()        # freeze config + default stream IDE regs, start tracking
    GENERATE_NONCE = auto()     # START_INTERFACE_NONCE (done by Tdi with the injected RNG)
    DESTROY_NONCE = auto()      # leaving LOCKED: the nonce is gone / invalidated
    ENABLE_TEE_ACCESS = auto()  # T=1 requests to TEE ranges now served; DMA with T=1 allowed
    REVOKE_TEE_ACCESS = auto()  # stop serving T=1; no TVM data exposed
    QUIESCE = auto()            # abort work and DMA, flush interrupts, drain ATS/PRI
    SCRUB_SECRETS = auto()      # scrub TDI secrets and private resources
    UNLOCK_CONFIG = auto()      # stop tracking; configuration writable again


A = TdiAction
_TO_ERROR_FROM_LOCKED = A.DESTROY_NONCE
_TO_ERROR_FROM_RUN = A.REVOKE_TEE_ACCESS
_UNLOCK_FROM_LOCKED = A.QUIESCE | A.SCRUB_SECRETS | A.DESTROY_NONCE | A.UNLOCK_CONFIG
_UNLOCK_FROM_RUN = A.QUIESCE | A.SCRUB_SECRETS | A.REVOKE_TEE_ACCESS | A.UNLOCK_CONFIG
_UNLOCK_FROM_ERROR = A.QUIESCE | A.SCRUB_SECRETS | A.UNLOCK_CONFIG


@dataclass(frozen=True)
class Transition:
    target: TdiState
    actions: TdiAction = TdiAction.NONE


def _table() -> dict[tuple[TdiState, TdiEvent], Transition]:
    t: dict[tuple[TdiState, TdiEvent], Transition] = {
        (U, TdiEvent.LOCK): Transition(L, A.QUIESCE | A.LOCK_CONFIG | A.GENERATE_NONCE),
        (L, TdiEvent.START): Transition(R, A.DESTROY_NONCE | A.ENABLE_TEE_ACCESS),
        (U, TdiEvent.STOP): Transition(U),
        (L, TdiEvent.STOP): Transition(U, _UNLOCK_FROM_LOCKED),
        (R, TdiEvent.STOP): Transition(U, _UNLOCK_FROM_RUN),
        (E, TdiEvent.STOP): Transition(U, _UNLOCK_FROM_ERROR),
        (L, TdiEvent.GET_REPORT): Transition(L),
        (R, TdiEvent.GET_REPORT): Transition(R),
        (R, TdiEvent.P2P_OR_MMIO_ATTR): Transition(R),
        (U, TdiEvent.CONVENTIONAL_RESET): Transition(U),
        (L, TdiEvent.CONVENTIONAL_RESET): Transition(U, _UNLOCK_FROM_LOCKED),
        (R, TdiEvent.CONVENTIONAL_RESET): Transition(U, _UNLOCK_FROM_RUN),
        (E, TdiEvent.CONVENTIONAL_RESET): Transition(U, _UNLOCK_FROM_ERROR),
    }
    for ev in SECURITY_EVENTS:
        t[(U, ev)] = Transition(U)
        t[(L, ev)] = Transition(E, _TO_ERROR_FROM_LOCKED)
        t[(R, ev)] = Transition(E, _TO_ERROR_FROM_RUN)
        t[(E, ev)] = Transition(E)
    return t


#: The one transition table: (state, event) -> Transition.  Absent = INVALID_INTERFACE_STATE.
TRANSITIONS: Mapping[tuple[TdiState, TdiEvent], Transition] = MappingProxyType(_table())


@dataclass(frozen=True)
class Outcome:
    """Result of :meth:`Tdi.handle_event`; ``nonce`` is set only by LOCK."""

    state: TdiState
    actions: TdiAction
    nonce: bytes | None = field(default=None, repr=False)


class Tdi:
    """One TDI's TDISP state.  Pure: randomness comes from *nonce_source*, which returns
    32 bytes (anything else, or an exception from it, is INSUFFICIENT_ENTROPY)."""

    def __init__(self, nonce_source: Callable[[], bytes]) -> None:
        self._nonce_source = nonce_source
        self.state = TdiState.CONFIG_UNLOCKED
        self.lock_flags = LockInterfaceFlags(0)
        self._nonce: bytes | None = None

    def __repr__(self) -> str:
        return f"Tdi(state={self.state.name}, lock_flags={self.lock_flags!r})"

    def handle_event(self, event: TdiEvent, *, nonce: bytes | None = None,
                     lock_flags: int = 0) -> Outcome:
        """Apply *event*; raise :class:`TdispError` (state unchanged) if it is not legal.

        *nonce* is START's START_INTERFACE_NONCE; *lock_flags* are LOCK's FLAGS."""
        row = TRANSITIONS.get((self.state, event))
        if row is None:
            raise TdispError(ErrorCode.INVALID_INTERFACE_STATE,
                             f"{event.name} not allowed in {self.state.name}")
        # guards (checked before any state change)
        if (event is TdiEvent.FIRMWARE_UPDATE and row.target is TdiState.ERROR
                and not self.lock_flags & LockInterfaceFlags.NO_FW_UPDATE):
            return Outcome(self.state, TdiAction.NONE)
        if event is TdiEvent.START and (nonce is None or self._nonce is None
                                        or not hmac.compare_digest(nonce, self._nonce)):
            raise TdispError(ErrorCode.INVALID_NONCE, "START_INTERFACE_NONCE mismatch")
        new_nonce = None
        if row.actions & TdiAction.GENERATE_NONCE:
            new_nonce = self._generate_nonce()
        # update
        if row.actions & TdiAction.DESTROY_NONCE:
            self._nonce = None
        if event is TdiEvent.LOCK:
            self._nonce = new_nonce
            self.lock_flags = LockInterfaceFlags(lock_flags)
        if row.target is TdiState.CONFIG_UNLOCKED:
            self.lock_flags = LockInterfaceFlags(0)
            self._nonce = None
        self.state = row.target
        return Outcome(row.target, row.actions, new_nonce)

    def _generate_nonce(self) -> bytes:
        try:
            n = bytes(self._nonce_source())
        except Exception as e:  # an RNG failure of any kind
            raise TdispError(ErrorCode.INSUFFICIENT_ENTROPY, f"nonce source failed: {e}") \
                from e
        if len(n) != START_INTERFACE_NONCE_SIZE:
            raise TdispError(ErrorCode.INSUFFICIENT_ENTROPY,
                             f"nonce source returned {len(n)} bytes, not 32")
        return n
