"""TDISP device side (PCIe 6.x §11): one TDI, the whole function, TDISP 1.0.

:class:`TdispResponder` answers the TDISP requests of §11.3 (PCI-SIG Protocol ID 0x01 over
SPDM VENDOR_DEFINED, secured sessions only, §11.2.2) and applies the security events of
§11.2.6 to the TDI state machine (:mod:`.state`).  What only the device knows it asks
through :class:`TdispDeviceHooks`, the hardware hooks the device side implements.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from ..ide import Direction, KeySet, SubStream
from ..spdm.errors import DropRequest
from .codec import (
    DeviceInterfaceState,
    GetDeviceInterfaceReport,
    GetDeviceInterfaceState,
    GetTdispCapabilities,
    GetTdispVersion,
    LockInterfaceRequest,
    LockInterfaceResponse,
    StartInterfaceRequest,
    StartInterfaceResponse,
    StopInterfaceRequest,
    StopInterfaceResponse,
    TdispCapabilities,
    TdispError,
    TdispMessage,
    TdispVersion,
    from_vendor_payload,
    function_id,
    to_vendor_payload,
)
from .defs import (
    FUNCTION_ID_REQUESTER_ID_MASK,
    FUNCTION_ID_REQUESTER_SEGMENT_MASK,
    FUNCTION_ID_REQUESTER_SEGMENT_SHIFT,
    FUNCTION_ID_REQUESTER_SEGMENT_VALID,
    HEADER_SIZE,
    SUPPORTED_VERSIONS,
    ErrorCode,
    InterfaceInfo,
    LockInterfaceFlags,
    MessageType,
    MmioRangeAttributes,
    TdiState,
)
from .report import DeviceInterfaceReport, MmioRange, page_number, report_portion
from .state import TRANSITIONS, Outcome, Tdi, TdiAction, TdiEvent

log = logging.getLogger(__name__)

#: The FUNCTION_ID DMTF spdm-emu's requester sends whatever the device (accepted as ours).
SPDM_EMU_FUNCTION_ID = 0xBEEF

#: Request codes served here: 0x81..0x87 (the ones TDISP 1.0 requires, §11.3.4).
SUPPORTED_REQUESTS: tuple[MessageType, ...] = (
    MessageType.GET_TDISP_VERSION, MessageType.GET_TDISP_CAPABILITIES,
    MessageType.LOCK_INTERFACE_REQUEST, MessageType.GET_DEVICE_INTERFACE_REPORT,
    MessageType.GET_DEVICE_INTERFACE_STATE, MessageType.START_INTERFACE_REQUEST,
    MessageType.STOP_INTERFACE_REQUEST,
)
REQ_MSGS_SUPPORTED = sum(1 << (code - 0x80) for code in SUPPORTED_REQUESTS)
#: No LOCK_MSIX (the MSI-X table stays with the VMM), no BIND_P2P (no P2P streams).
LOCK_FLAGS_SUPPORTED = (LockInterfaceFlags.NO_FW_UPDATE
                        | LockInterfaceFlags.SYSTEM_CACHE_LINE_SIZE
                        | LockInterfaceFlags.ALL_REQUEST_REDIRECT)
DEV_ADDR_WIDTH = 64
#: The BAR that holds only the MSI-X table and PBA (reported IS_NON_TEE_MEM, not locked).
MSIX_BAR = 1

#: (event, state before, state after, actions) of a transition taken.
TransitionListener = Callable[[TdiEvent, TdiState, TdiState, TdiAction], None]
#: (key set, direction, sub-stream) of one IDE key.
KeyName = tuple[KeySet, Direction, SubStream]


class TdispDeviceHooks(Protocol):
    """The hardware hooks: what the responder asks of the device (as libspdm's TDISP
    device HAL does).  The device side implements them (``vfio_user_dev.dsm``)."""

    def mmio_bars(self) -> Sequence[tuple[int, int, int]]:
        """(BAR index, base address, size in bytes) of each implemented memory BAR, as
        assigned now in config space."""
        ...

    def msix_bar(self) -> int:
        """The BAR holding the MSI-X table and PBA: reported IS_NON_TEE_MEM, not locked."""
        ...

    def stream_configured(self, stream_id: int) -> bool:
        """Whether *stream_id* is a configured stream of the device's IDE capability."""
        ...

    def ide_keys_programmed(self, session_id: int, stream_id: int) -> set[KeyName] | None:
        """The keys of *stream_id* IDE_KM programmed (KP_ACK Success) in SPDM session
        *session_id* and still programmed; None if the device has no IDE_KM."""
        ...


class TdispResponder:
    """TDISP for one TDI (the function): ``handle(payload, session_id) -> payload``, the
    shape ``teeio.ide_km.PciSigProtocolMux`` expects.  Raises :class:`DropRequest`
    for a request outside a secured session (no response, §11.2.2).

    The session whose LOCK succeeded owns the TDI until STOP or its end: LOCK,
    GET_DEVICE_INTERFACE_REPORT, START and STOP from any other session are
    INVALID_REQUEST.  Every transition taken is reported to :attr:`on_transition` (the
    device performs its actions, §11.2.1); :meth:`ide_changed` to :attr:`ide_listeners`."""

    def __init__(self, hooks: TdispDeviceHooks, *, requester_id: int, segment: int = 0,
                 aliases: Sequence[int] = (SPDM_EMU_FUNCTION_ID,),
                 nonce_source: Callable[[], bytes] = lambda: os.urandom(32),
                 device_specific_info: bytes = b"teeio", name: str = "") -> None:
        self.hooks = hooks
        self.requester_id = requester_id
        self.segment = segment
        self.aliases = frozenset(aliases)
        self.device_specific_info = device_specific_info
        self.tdi = Tdi(nonce_source)
        self.bound_session: int | None = None
        self.lock_request: LockInterfaceRequest | None = None
        self.report: bytes | None = None
        self.log = log.getChild(name) if name else log
        #: called after every transition taken, in order (the device performs the actions)
        self.on_transition: list[TransitionListener] = []
        #: called after IDE_KM changed keys (the device re-checks its bound stream)
        self.ide_listeners: list[Callable[[], None]] = []

    # -- identity (INTERFACE_ID, §11.3.2) ---------------------------------------------------
    def names_this_function(self, fid: int) -> bool:
        """The TDI is the function: a FUNCTION_ID names it when its Requester ID is the
        function's (segment not valid, or valid and equal), or it is an alias (spdm-emu's
        requester hard-codes 0xBEEF whatever the device)."""
        if fid in self.aliases:
            return True
        if fid & ~(FUNCTION_ID_REQUESTER_ID_MASK | FUNCTION_ID_REQUESTER_SEGMENT_MASK
                   | FUNCTION_ID_REQUESTER_SEGMENT_VALID):
            return False
        if fid & FUNCTION_ID_REQUESTER_ID_MASK != self.requester_id:
            return False
        if fid & FUNCTION_ID_REQUESTER_SEGMENT_VALID:
            seg = (fid & FUNCTION_ID_REQUESTER_SEGMENT_MASK) >> FUNCTION_ID_REQUESTER_SEGMENT_SHIFT
            return seg == self.segment
        return not fid & FUNCTION_ID_REQUESTER_SEGMENT_MASK

    @property
    def function_id(self) -> int:
        return function_id(self.requester_id)

    @property
    def state(self) -> TdiState:
        return self.tdi.state

    @property
    def default_stream_id(self) -> int | None:
        """The IDE stream LOCK bound the TDI to (DEFAULT_STREAM_ID), until STOP."""
        return None if self.lock_request is None else self.lock_request.default_stream_id

    def firmware_update_allowed(self) -> bool:
        """False while LOCK's NO_FW_UPDATE protects the TDI (CONFIG_LOCKED or RUN)."""
        return not (self.tdi.state in (TdiState.CONFIG_LOCKED, TdiState.RUN)
                    and self.tdi.lock_flags & LockInterfaceFlags.NO_FW_UPDATE)

    def _take(self, event: TdiEvent, nonce: bytes | None = None) -> Outcome:
        """Apply *event* to the TDI (TdispError if not legal) and tell the listeners."""
        before = self.tdi.state
        out = self.tdi.handle_event(event, nonce=nonce)
        self._notify(event, before, out)
        return out

    def _notify(self, event: TdiEvent, before: TdiState, out: Outcome) -> None:
        for fn in list(self.on_transition):
            try:
                fn(event, before, out.state, out.actions)
            except Exception:
                self.log.exception("TDISP: transition listener failed on %s", event.name)

    # -- events from outside TDISP (§11.2.6) --------------------------------------------------
    def session_closed(self, session_id: int,
                       event: TdiEvent = TdiEvent.SPDM_SESSION_TERMINATED) -> None:
        """The SPDM session *session_id* ended: if it owns the TDI, *event*
        (SPDM_SESSION_TERMINATED, or HEARTBEAT_TIMEOUT; LOCKED/RUN -> ERROR) and the
        binding is gone, so a new session can STOP it back to CONFIG_UNLOCKED."""
        if session_id != self.bound_session:
            return
        self.bound_session = None
        before = self.tdi.state
        self._take(event)
        self.log.info("TDISP: owning session 0x%08x ended (%s): TDI %s -> %s", session_id,
                      event.name, before.name, self.tdi.state.name)

    def security_event(self, event: TdiEvent) -> None:
        """A security event of §11.2.6 happened to the function (LOCKED/RUN -> ERROR)."""
        before = self.tdi.state
        self._take(event)
        if self.tdi.state is not before:
            self.log.warning("TDISP: %s: TDI %s -> %s", event.name, before.name,
                             self.tdi.state.name)

    def ide_changed(self) -> None:
        """IDE_KM changed the device's keys (the DSM calls this after each request)."""
        for fn in list(self.ide_listeners):
            fn()

    # -- requests (§11.3) ---------------------------------------------------------------------
    def handle(self, payload: bytes, session_id: int | None) -> bytes:
        raw = bytes(payload)
        if session_id is None:
            self.log.info("TDISP request dropped, no response: outside a secured session")
            raise DropRequest("TDISP outside a secured session")
        fid = int.from_bytes(raw[5:9], "little") if len(raw) >= 1 + HEADER_SIZE else 0
        try:
            msg = from_vendor_payload(raw)
            rsp = self._dispatch(msg, session_id)
        except TdispError as e:
            self.log.info("TDISP request %s -> TDISP_ERROR %s: %s",
                          raw[2:3].hex(), e.code.name, e)
            return to_vendor_payload(e.to_response(fid))
        return to_vendor_payload(rsp)

    __call__ = handle

    def _dispatch(self, msg: TdispMessage, session_id: int) -> TdispMessage:
        code = msg.MESSAGE_TYPE
        if code not in SUPPORTED_REQUESTS:
            if code.is_request:     # BIND_P2P, UNBIND_P2P, SET_MMIO_ATTRIBUTE, VDM
                raise TdispError(ErrorCode.UNSUPPORTED_REQUEST, f"{code.name} not supported",
                                 data=code)
            raise TdispError(ErrorCode.INVALID_REQUEST, f"{code.name} is not a request")
        if not self.names_this_function(msg.function_id):
            raise TdispError(ErrorCode.INVALID_INTERFACE,
                             f"FUNCTION_ID 0x{msg.function_id:08x} is not this function")
        fid = msg.function_id       # responses echo the request's FUNCTION_ID
        if isinstance(msg, GetTdispVersion):
            return TdispVersion(fid, SUPPORTED_VERSIONS)
        if isinstance(msg, GetTdispCapabilities):
            return TdispCapabilities(fid, 0, REQ_MSGS_SUPPORTED, int(LOCK_FLAGS_SUPPORTED),
                                     DEV_ADDR_WIDTH, 1, 1)
        if isinstance(msg, GetDeviceInterfaceState):
            return DeviceInterfaceState(fid, self.tdi.state)
        if self.bound_session is not None and self.bound_session != session_id:
            raise TdispError(ErrorCode.INVALID_REQUEST,
                             f"the TDI is bound to SPDM session 0x{self.bound_session:08x}")
        if isinstance(msg, LockInterfaceRequest):
            return self._lock(msg, session_id)
        if isinstance(msg, GetDeviceInterfaceReport):
            self._require(TdiEvent.GET_REPORT)
            assert self.report is not None
            return report_portion(self.report, msg)
        if isinstance(msg, StartInterfaceRequest):
            self._take(TdiEvent.START, nonce=msg.nonce)
            self.log.info("TDISP: START: TDI RUN (session 0x%08x)", session_id)
            return StartInterfaceResponse(fid)
        assert isinstance(msg, StopInterfaceRequest)
        before = self.tdi.state
        out = self.tdi.handle_event(TdiEvent.STOP)
        self.bound_session = None
        self.lock_request = None
        self.report = None
        self._notify(TdiEvent.STOP, before, out)
        self.log.info("TDISP: STOP: TDI %s -> CONFIG_UNLOCKED", before.name)
        return StopInterfaceResponse(fid)

    def _require(self, event: TdiEvent) -> None:
        if (self.tdi.state, event) not in TRANSITIONS:
            raise TdispError(ErrorCode.INVALID_INTERFACE_STATE,
                             f"{event.name} not allowed in {self.tdi.state.name}")

    def _lock(self, req: LockInterfaceRequest, session_id: int) -> LockInterfaceResponse:
        """LOCK_INTERFACE (§11.3.7): a flag not supported is INVALID_REQUEST; the report
        is built now, from the BARs as assigned (they cannot change afterwards without
        the TDI going to ERROR)."""
        self._require(TdiEvent.LOCK)
        if req.flags & ~LOCK_FLAGS_SUPPORTED:
            raise TdispError(ErrorCode.INVALID_REQUEST,
                             f"LOCK flags 0x{req.flags:04x} not supported (supported "
                             f"0x{LOCK_FLAGS_SUPPORTED:04x})")
        self._check_ide(req.default_stream_id, session_id)
        self._check_configuration()
        report = self._build_report(req).encode()
        out = self.tdi.handle_event(TdiEvent.LOCK, lock_flags=req.flags)
        assert out.nonce is not None
        self.bound_session = session_id
        self.lock_request = req
        self.report = report
        self._notify(TdiEvent.LOCK, TdiState.CONFIG_UNLOCKED, out)
        self.log.info("TDISP: LOCK: TDI CONFIG_LOCKED (session 0x%08x, stream %d, flags "
                      "0x%04x, MMIO reporting offset 0x%x)", session_id, req.default_stream_id,
                      req.flags, req.mmio_reporting_offset)
        return LockInterfaceResponse(req.function_id, out.nonce)

    def _check_ide(self, stream_id: int, session_id: int) -> None:
        """§11.3.7: DEFAULT_STREAM_ID must name a configured stream whose keys were
        programmed by IDE_KM in the session that carries the LOCK and are programmed
        still; else INVALID_REQUEST.  The spec asks for every sub-stream's keys;
        spdm-emu's requester programs only K0 Rx PR and K0 Tx PR before it locks, so the
        rule is "both PR keys of one key set"."""
        keys = self.hooks.ide_keys_programmed(session_id, stream_id)
        if keys is None:
            raise TdispError(ErrorCode.INVALID_REQUEST, "no IDE_KM: IDE keys cannot have "
                             "been programmed")
        if not self.hooks.stream_configured(stream_id):
            raise TdispError(ErrorCode.INVALID_REQUEST,
                             f"DEFAULT_STREAM_ID {stream_id} is not a configured IDE stream")
        for ks in KeySet:
            if {(ks, d, SubStream.PR) for d in Direction} <= keys:
                return
        raise TdispError(ErrorCode.INVALID_REQUEST,
                         f"IDE keys of stream {stream_id} were not programmed through SPDM "
                         f"session 0x{session_id:08x}")

    def _check_configuration(self) -> None:
        """§11.3.6: LOCK fails with INVALID_DEVICE_CONFIGURATION when the configuration to
        be locked is not a valid one.  Checked here: assigned memory BARs must not overlap
        each other (an unassigned BAR, address 0, is left alone: a device driven without a
        VMM, as by DMTF spdm-emu, locks with its BARs still at 0)."""
        assigned = sorted((base, base + size, index)
                          for index, base, size in self.hooks.mmio_bars() if base)
        for (a0, a1, ia), (b0, _b1, ib) in zip(assigned, assigned[1:], strict=False):
            if b0 < a1:
                raise TdispError(ErrorCode.INVALID_DEVICE_CONFIGURATION,
                                 f"BAR{ia} [{a0:#x}, {a1:#x}) overlaps BAR{ib} at {b0:#x}")

    def _build_report(self, req: LockInterfaceRequest) -> DeviceInterfaceReport:
        """§11.3.11: one MMIO range per BAR in ascending order, first page = (BAR address
        + MMIO_REPORTING_OFFSET) >> 12, Range ID = BAR index.  The MSI-X BAR is not locked,
        so it is IS_NON_TEE_MEM (without the MSIX_TABLE/PBA attributes of locked tables)."""
        ranges = []
        msix_bar = self.hooks.msix_bar()
        for index, base, size in sorted(self.hooks.mmio_bars()):
            attrs = (MmioRangeAttributes.IS_NON_TEE_MEM if index == msix_bar
                     else MmioRangeAttributes(0))
            ranges.append(MmioRange(page_number(base, req.mmio_reporting_offset),
                                    max(1, (size + 0xFFF) >> 12), attrs, index))
        info = InterfaceInfo.DMA_WITHOUT_PASID
        if req.flags & LockInterfaceFlags.NO_FW_UPDATE:
            info |= InterfaceInfo.NO_UPDATE_AFTER_LOCK
        return DeviceInterfaceReport(info, mmio_ranges=tuple(ranges),
                                     device_specific_info=self.device_specific_info)


__all__ = ["DEV_ADDR_WIDTH", "LOCK_FLAGS_SUPPORTED", "MSIX_BAR", "REQ_MSGS_SUPPORTED",
           "SPDM_EMU_FUNCTION_ID", "SUPPORTED_REQUESTS", "KeyName", "TdispDeviceHooks",
           "TdispResponder", "TransitionListener"]
