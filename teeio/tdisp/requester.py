"""TDISP requester side (PCIe 6.x §11.3): the TSM's requests for one TDI.

:class:`TdispRequester` builds each request and checks its response (message type,
TDISPVersion 1.0, the echoed INTERFACE_ID); TDISP_ERROR becomes :class:`TdispRequestError`
with the decoded ERROR_CODE.  It does no I/O: *exchange* carries one vendor-defined
payload (Protocol ID included) to the device and returns the response payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .codec import (
    DeviceInterfaceReportResponse,
    DeviceInterfaceState,
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
    TdispDecodeError,
    TdispErrorResponse,
    TdispMessage,
    TdispVersion,
    from_vendor_payload,
    to_vendor_payload,
)
from .defs import TDISP_VERSION_1_0, ErrorCode, LockInterfaceFlags, TdiState
from .report import DeviceInterfaceReport, ReportReader

__all__ = ["DEFAULT_REPORT_CHUNK", "Exchange", "TdispClientError", "TdispRequestError",
           "TdispRequester"]

#: The portion size asked for in GET_DEVICE_INTERFACE_REPORT (small, so the transfer in
#: portions of §11.3.9 is exercised).
DEFAULT_REPORT_CHUNK = 64
#: One vendor-defined payload to the device and its response payload.
Exchange = Callable[[bytes], bytes]

_R = TypeVar("_R", bound=TdispMessage)


class TdispClientError(Exception):
    """A TDISP exchange failed: a malformed or unexpected response."""


class TdispRequestError(TdispClientError):
    """The device answered TDISP_ERROR (§11.3.23); ``code_name`` is the decoded ERROR_CODE."""

    def __init__(self, request: str, code: int, data: int = 0) -> None:
        self.request = request
        self.code = code
        self.data = data
        try:
            self.code_name = ErrorCode(code).name
        except ValueError:
            self.code_name = f"error code 0x{code:x}"
        super().__init__(f"{request}: TDISP_ERROR {self.code_name} (ERROR_DATA 0x{data:x})")


class TdispRequester:
    """TDISP requests for one TDI (*function_id*) over *exchange*."""

    def __init__(self, exchange: Exchange, function_id: int,
                 report_chunk: int = DEFAULT_REPORT_CHUNK) -> None:
        self.exchange = exchange
        self.function_id = function_id
        self.report_chunk = report_chunk

    def request(self, msg: TdispMessage, expect: type[_R]) -> _R:
        """Send *msg*, return its response if it is an *expect* for this INTERFACE_ID."""
        name = msg.MESSAGE_TYPE.name
        raw = self.exchange(to_vendor_payload(msg))
        try:
            rsp = from_vendor_payload(raw)
        except TdispDecodeError as exc:
            raise TdispClientError(f"{name}: malformed response: {exc}") from None
        if isinstance(rsp, TdispErrorResponse):
            raise TdispRequestError(name, rsp.error_code, rsp.error_data)
        if not isinstance(rsp, expect):
            raise TdispClientError(f"{name}: got {rsp.MESSAGE_TYPE.name}, expected "
                                   f"{expect.MESSAGE_TYPE.name}")
        if rsp.version != TDISP_VERSION_1_0:
            raise TdispClientError(f"{name}: response TDISPVersion 0x{rsp.version:02x}, "
                                   f"expected 0x{TDISP_VERSION_1_0:02x}")
        if rsp.function_id != msg.function_id:
            raise TdispClientError(f"{name}: response for INTERFACE_ID "
                                   f"0x{rsp.function_id:08x}, sent 0x{msg.function_id:08x}")
        return rsp

    def get_version(self) -> tuple[int, ...]:
        rsp = self.request(GetTdispVersion(self.function_id), TdispVersion)
        if TDISP_VERSION_1_0 not in rsp.versions:
            raise TdispClientError("GET_TDISP_VERSION: the device does not offer TDISP 1.0 ("
                                   + ", ".join(f"0x{v:02x}" for v in rsp.versions) + ")")
        return rsp.versions

    def get_capabilities(self, tsm_caps: int = 0) -> TdispCapabilities:
        return self.request(GetTdispCapabilities(self.function_id, tsm_caps),
                            TdispCapabilities)

    def get_state(self) -> TdiState:
        return self.request(GetDeviceInterfaceState(self.function_id),
                            DeviceInterfaceState).tdi_state

    def lock(self, flags: LockInterfaceFlags | int, default_stream_id: int,
             mmio_reporting_offset: int = 0, bind_p2p_address_mask: int = 0) -> bytes:
        """LOCK_INTERFACE; returns START_INTERFACE_NONCE."""
        req = LockInterfaceRequest(self.function_id, LockInterfaceFlags(flags),
                                   default_stream_id, mmio_reporting_offset,
                                   bind_p2p_address_mask)
        return self.request(req, LockInterfaceResponse).nonce

    def get_report_bytes(self) -> bytes:
        """The whole DEVICE_INTERFACE_REPORT as the device sent it (portions of at most
        ``report_chunk`` joined, §11.3.9), checked by decoding it once."""
        reader = ReportReader(self.function_id, self.report_chunk)
        try:
            while (req := reader.next_request()) is not None:
                reader.feed(self.request(req, DeviceInterfaceReportResponse))
            reader.report()
        except TdispDecodeError as exc:
            raise TdispClientError(f"GET_DEVICE_INTERFACE_REPORT: {exc}") from None
        return reader.report_bytes()

    def get_report(self) -> DeviceInterfaceReport:
        """The whole DEVICE_INTERFACE_REPORT, decoded."""
        return DeviceInterfaceReport.decode(self.get_report_bytes())

    def start(self, nonce: bytes) -> None:
        self.request(StartInterfaceRequest(self.function_id, nonce), StartInterfaceResponse)

    def stop(self) -> None:
        self.request(StopInterfaceRequest(self.function_id), StopInterfaceResponse)
