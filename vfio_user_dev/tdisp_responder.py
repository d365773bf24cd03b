"""The device side of TDISP (PCIe 6.x ch. 11): one TDI, the whole function.

Registered by the DSM (:mod:`vfio_user_dev.dsm`) as PCI-SIG Protocol ID 0x01 on the same
:class:`~teeio.ide_km.PciSigProtocolMux` as IDE_KM, so it is reached through SPDM
VENDOR_DEFINED_REQUEST (StandardID PCI-SIG, VendorID 0x0001).  The wire formats, the
report structure and the TDI state machine are the sans-IO pieces in :mod:`teeio.tdisp`;
this module adds what only the device knows.  Decisions:

* **Secured sessions only.**  A TDISP request in the clear (or in a session that is not
  yet established -- the DSM checks that) gets no response at all (§11.2.2), as IDE_KM.
* **INTERFACE_ID.**  The TDI is the function itself; a FUNCTION_ID names it when its
  Requester ID is the function's (segment either not valid, or valid and equal).  DMTF
  spdm-emu's requester hard-codes FUNCTION_ID 0xBEEF whatever the device, so that value is
  accepted as an alias (:data:`SPDM_EMU_FUNCTION_ID`).  Anything else: INVALID_INTERFACE.
  Responses echo the request's FUNCTION_ID.
* **Versions and capabilities.**  TDISP 1.0 only.  REQ_MSGS_SUPPORTED = 0x81..0x87 (the
  required set); BIND_P2P/UNBIND_P2P/SET_MMIO_ATTRIBUTE/VDM get TDISP_ERROR
  UNSUPPORTED_REQUEST with ERROR_DATA = the request code.  LOCK_INTERFACE_FLAGS_SUPPORTED =
  NO_FW_UPDATE, SYSTEM_CACHE_LINE_SIZE, ALL_REQUEST_REDIRECT: no LOCK_MSIX (the MSI-X table
  stays with the VMM) and no BIND_P2P (no P2P streams).  A LOCK asking for a flag not
  supported is INVALID_REQUEST.
* **LOCK and IDE.**  LOCK needs DEFAULT_STREAM_ID to name a configured stream of the
  device's IDE capability and, for one key set, the PR keys of *both* directions of that
  stream to have been programmed by IDE_KM (KP_ACK Success) **in the same SPDM session**
  that carries the LOCK, and to be programmed still.  The spec asks for the keys of all
  sub-streams; spdm-emu's requester programs only K0 Rx PR and K0 Tx PR before it locks,
  so the rule is "at least the stream's PR keys".  Failing that: TDISP_ERROR
  INVALID_REQUEST (the code §11.3.7 gives for the key/session checks; reference §4.4).
* **Binding.**  The session whose LOCK succeeded owns the TDI until STOP brings it back to
  CONFIG_UNLOCKED or the session ends.  LOCK, GET_DEVICE_INTERFACE_REPORT, START and STOP
  from any other session are refused with INVALID_REQUEST; GET_VERSION, GET_CAPABILITIES
  and GET_DEVICE_INTERFACE_STATE are answered in any secured session.
* **Session end.**  When the owning session ends, the TDI takes the
  SPDM_SESSION_TERMINATED security event (LOCKED/RUN -> ERROR) and the binding is dropped,
  so a new session can STOP it back to CONFIG_UNLOCKED.
* **Report.**  Built at LOCK from the BARs as then assigned in config space (they cannot
  change afterwards without the TDI going to ERROR): one MMIO range per BAR in ascending BAR
  order, first page = (BAR address + MMIO_REPORTING_OFFSET) >> 12, Range ID = BAR index.
  BAR1 holds only the MSI-X table and PBA; since the table is not locked it is reported as
  IS_NON_TEE_MEM (and without the MSIX_TABLE/PBA attributes, which are for locked tables).
  INTERFACE_INFO: DMA_WITHOUT_PASID, plus NO_UPDATE_AFTER_LOCK if LOCK set NO_FW_UPDATE.
  Sent in portions of at most the requested LENGTH.
* **Security events.**  :meth:`TdispResponder.security_event` applies a
  :class:`~teeio.tdisp.TdiEvent` (the device calls it for BAR writes and for Memory Space
  / Bus Master Enable cleared, and an FLR).  Nothing else is enforced here (no T-bit
  checks on MMIO or DMA).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from teeio.ide import Direction, KeySet, SubStream
from teeio.spdm.errors import DropRequest
from teeio.tdisp.codec import (
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
from teeio.tdisp.defs import (
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
from teeio.tdisp.report import DeviceInterfaceReport, MmioRange, page_number, report_portion
from teeio.tdisp.state import TRANSITIONS, Tdi, TdiEvent

log = logging.getLogger(__name__)

#: The FUNCTION_ID DMTF spdm-emu's requester sends whatever the device (accepted as ours).
SPDM_EMU_FUNCTION_ID = 0xBEEF

#: Request codes served here: 0x81..0x87 (the ones TDISP 1.0 requires).
SUPPORTED_REQUESTS: tuple[MessageType, ...] = (
    MessageType.GET_TDISP_VERSION, MessageType.GET_TDISP_CAPABILITIES,
    MessageType.LOCK_INTERFACE_REQUEST, MessageType.GET_DEVICE_INTERFACE_REPORT,
    MessageType.GET_DEVICE_INTERFACE_STATE, MessageType.START_INTERFACE_REQUEST,
    MessageType.STOP_INTERFACE_REQUEST,
)
REQ_MSGS_SUPPORTED = sum(1 << (code - 0x80) for code in SUPPORTED_REQUESTS)
LOCK_FLAGS_SUPPORTED = (LockInterfaceFlags.NO_FW_UPDATE
                        | LockInterfaceFlags.SYSTEM_CACHE_LINE_SIZE
                        | LockInterfaceFlags.ALL_REQUEST_REDIRECT)
DEV_ADDR_WIDTH = 64
#: The BAR that holds only the MSI-X table and PBA (reported IS_NON_TEE_MEM, not locked).
MSIX_BAR = 1


class TdiHost(Protocol):
    """What the device supplies: its memory BARs as assigned now in config space."""

    def mmio_bars(self) -> Sequence[tuple[int, int, int]]:
        """(BAR index, base address, size in bytes) of each implemented memory BAR."""
        ...


class IdeKeyRecord(Protocol):
    """What LOCK asks the IDE_KM responder (``teeio.ide_km.IdeKmResponder`` is one)."""

    def keys_programmed_by(self, session_id: int, stream_id: int
                           ) -> set[tuple[KeySet, Direction, SubStream]]: ...


class TdispResponder:
    """TDISP for one TDI (the function): ``handle(payload, session_id) -> payload``, the
    shape :class:`~teeio.ide_km.PciSigProtocolMux` expects.  Raises :class:`DropRequest`
    for a request outside a secured session."""

    def __init__(self, host: TdiHost, ide_km: IdeKeyRecord | None, *, requester_id: int,
                 segment: int = 0, aliases: Sequence[int] = (SPDM_EMU_FUNCTION_ID,),
                 has_stream: Callable[[int], bool] | None = None,
                 nonce_source: Callable[[], bytes] = lambda: os.urandom(32),
                 device_specific_info: bytes = b"teeio", name: str = "") -> None:
        self.host = host
        self.ide_km = ide_km
        self.requester_id = requester_id
        self.segment = segment
        self.aliases = frozenset(aliases)
        self.has_stream = has_stream
        self.device_specific_info = device_specific_info
        self.tdi = Tdi(nonce_source)
        self.bound_session: int | None = None
        self.lock_request: LockInterfaceRequest | None = None
        self.report: bytes | None = None
        self.log = log.getChild(name) if name else log

    # -- identity ---------------------------------------------------------------------------
    def names_this_function(self, fid: int) -> bool:
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

    # -- events from outside TDISP ------------------------------------------------------------
    def session_closed(self, session_id: int) -> None:
        """The SPDM session *session_id* ended: if it owns the TDI, SPDM_SESSION_TERMINATED
        (LOCKED/RUN -> ERROR) and the binding is gone."""
        if session_id != self.bound_session:
            return
        self.bound_session = None
        before = self.tdi.state
        self.tdi.handle_event(TdiEvent.SPDM_SESSION_TERMINATED)
        self.log.info("TDISP: owning session 0x%08x ended: TDI %s -> %s", session_id,
                      before.name, self.tdi.state.name)

    def security_event(self, event: TdiEvent) -> None:
        """A security event of §11.2.6 happened to the function (LOCKED/RUN -> ERROR)."""
        before = self.tdi.state
        self.tdi.handle_event(event)
        if self.tdi.state is not before:
            self.log.warning("TDISP: %s: TDI %s -> %s", event.name, before.name,
                             self.tdi.state.name)

    # -- requests ---------------------------------------------------------------------------
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
            if code.is_request:
                raise TdispError(ErrorCode.UNSUPPORTED_REQUEST, f"{code.name} not supported",
                                 data=code)
            raise TdispError(ErrorCode.INVALID_REQUEST, f"{code.name} is not a request")
        if not self.names_this_function(msg.function_id):
            raise TdispError(ErrorCode.INVALID_INTERFACE,
                             f"FUNCTION_ID 0x{msg.function_id:08x} is not this function")
        fid = msg.function_id
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
            self.tdi.handle_event(TdiEvent.START, nonce=msg.nonce)
            self.log.info("TDISP: START: TDI RUN (session 0x%08x)", session_id)
            return StartInterfaceResponse(fid)
        assert isinstance(msg, StopInterfaceRequest)
        before = self.tdi.state
        self.tdi.handle_event(TdiEvent.STOP)
        self.bound_session = None
        self.lock_request = None
        self.report = None
        self.log.info("TDISP: STOP: TDI %s -> CONFIG_UNLOCKED", before.name)
        return StopInterfaceResponse(fid)

    def _require(self, event: TdiEvent) -> None:
        if (self.tdi.state, event) not in TRANSITIONS:
            raise TdispError(ErrorCode.INVALID_INTERFACE_STATE,
                             f"{event.name} not allowed in {self.tdi.state.name}")

    def _lock(self, req: LockInterfaceRequest, session_id: int) -> LockInterfaceResponse:
        self._require(TdiEvent.LOCK)
        if req.flags & ~LOCK_FLAGS_SUPPORTED:
            raise TdispError(ErrorCode.INVALID_REQUEST,
                             f"LOCK flags 0x{req.flags:04x} not supported (supported "
                             f"0x{LOCK_FLAGS_SUPPORTED:04x})")
        self._check_ide(req.default_stream_id, session_id)
        report = self._build_report(req).encode()
        out = self.tdi.handle_event(TdiEvent.LOCK, lock_flags=req.flags)
        assert out.nonce is not None
        self.bound_session = session_id
        self.lock_request = req
        self.report = report
        self.log.info("TDISP: LOCK: TDI CONFIG_LOCKED (session 0x%08x, stream %d, flags "
                      "0x%04x, MMIO reporting offset 0x%x)", session_id, req.default_stream_id,
                      req.flags, req.mmio_reporting_offset)
        return LockInterfaceResponse(req.function_id, out.nonce)

    def _check_ide(self, stream_id: int, session_id: int) -> None:
        if self.ide_km is None:
            raise TdispError(ErrorCode.INVALID_REQUEST, "no IDE_KM: IDE keys cannot have "
                             "been programmed")
        if self.has_stream is not None and not self.has_stream(stream_id):
            raise TdispError(ErrorCode.INVALID_REQUEST,
                             f"DEFAULT_STREAM_ID {stream_id} is not a configured IDE stream")
        keys = self.ide_km.keys_programmed_by(session_id, stream_id)
        for ks in KeySet:
            if {(ks, d, SubStream.PR) for d in Direction} <= keys:
                return
        raise TdispError(ErrorCode.INVALID_REQUEST,
                         f"IDE keys of stream {stream_id} were not programmed through SPDM "
                         f"session 0x{session_id:08x}")

    def _build_report(self, req: LockInterfaceRequest) -> DeviceInterfaceReport:
        ranges = []
        for index, base, size in sorted(self.host.mmio_bars()):
            attrs = (MmioRangeAttributes.IS_NON_TEE_MEM if index == MSIX_BAR
                     else MmioRangeAttributes(0))
            ranges.append(MmioRange(page_number(base, req.mmio_reporting_offset),
                                    max(1, (size + 0xFFF) >> 12), attrs, index))
        info = InterfaceInfo.DMA_WITHOUT_PASID
        if req.flags & LockInterfaceFlags.NO_FW_UPDATE:
            info |= InterfaceInfo.NO_UPDATE_AFTER_LOCK
        return DeviceInterfaceReport(info, mmio_ranges=tuple(ranges),
                                     device_specific_info=self.device_specific_info)


__all__ = ["DEV_ADDR_WIDTH", "LOCK_FLAGS_SUPPORTED", "REQ_MSGS_SUPPORTED",
           "SPDM_EMU_FUNCTION_ID", "SUPPORTED_REQUESTS", "TdiHost", "TdispResponder"]
