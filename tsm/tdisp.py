"""``teeio-tsm tdisp``: the TSM's side of TDISP (PCIe 6.x ch. 11) for the device's TDI.

    teeio-tsm tdisp demo
        (--doe-socket PATH | --doe-tcp-port N [--host H]) --trust-anchor PEM
        [--reference-values JSON] [--nonce HEX]
        --platform-socket PATH --platform-credential FILE
        [--stream-id N] [--block N]

TDISP runs inside an SPDM secured session as VENDOR_DEFINED messages (PCI-SIG, VendorID
0x0001, Protocol ID 0x01), the same way IDE_KM does (``tsm/ide.py``).  The device only
LOCKs its TDI when the IDE stream named by DEFAULT_STREAM_ID was keyed through IDE_KM in
the same session (the device server's TDISP responder), so ``demo`` does, in one
session: attest, KEY_EXCHANGE/FINISH, IDE stream setup (``tsm.ide.SelectiveStream``),
then GET_TDISP_VERSION, GET_TDISP_CAPABILITIES, LOCK_INTERFACE (NO_FW_UPDATE, the stream
as DEFAULT_STREAM_ID), GET_DEVICE_INTERFACE_REPORT in portions (the MMIO ranges printed),
START_INTERFACE with LOCK's nonce, state RUN, STOP_INTERFACE, state CONFIG_UNLOCKED, IDE
teardown and END_SESSION.

:class:`TdispClient` checks every response: the message type it must be, the TDISP
version (1.0) and the echoed INTERFACE_ID; TDISP_ERROR becomes :class:`TdispRequestError`
carrying the decoded ERROR_CODE name.

Exit 0 on success; 1 and one line on stderr (``tdisp demo FAILED: <reason>``) otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from teeio.ide_km import PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, IdeKmError
from teeio.platform_channel import PlatformCtlError
from teeio.spdm import Requester, RequesterError
from teeio.tdisp.codec import (
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
    function_id,
    to_vendor_payload,
)
from teeio.tdisp.defs import TDISP_VERSION_1_0, ErrorCode, LockInterfaceFlags, TdiState
from teeio.tdisp.report import DeviceInterfaceReport, ReportReader
from tsm import attest, ide
from tsm.attest import Attestation, AttestError, AttestOptions
from tsm.doe_client import DoeTransportError

COMMANDS = ("demo",)
#: The portion size asked for in GET_DEVICE_INTERFACE_REPORT (small, so the demo shows
#: the chunked transfer).
DEFAULT_REPORT_CHUNK = 64

_R = TypeVar("_R", bound=TdispMessage)


class TdispClientError(Exception):
    """A TDISP exchange failed: a malformed or unexpected response."""


class TdispRequestError(TdispClientError):
    """The device answered TDISP_ERROR; ``code_name`` is the decoded ERROR_CODE."""

    def __init__(self, request: str, code: int, data: int = 0) -> None:
        self.request = request
        self.code = code
        self.data = data
        try:
            self.code_name = ErrorCode(code).name
        except ValueError:
            self.code_name = f"error code 0x{code:x}"
        super().__init__(f"{request}: TDISP_ERROR {self.code_name} (ERROR_DATA 0x{data:x})")


class TdispClient:
    """TDISP requests for one TDI (*function_id*) inside SPDM session *session_id*."""

    def __init__(self, requester: Requester, session_id: int, function_id: int,
                 report_chunk: int = DEFAULT_REPORT_CHUNK) -> None:
        self.requester = requester
        self.session_id = session_id
        self.function_id = function_id
        self.report_chunk = report_chunk

    def _send(self, msg: TdispMessage) -> bytes:
        return self.requester.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID,
                                             to_vendor_payload(msg), self.session_id)

    def request(self, msg: TdispMessage, expect: type[_R]) -> _R:
        """Send *msg*, return its response if it is an *expect* for this INTERFACE_ID."""
        name = msg.MESSAGE_TYPE.name
        raw = self._send(msg)
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

    def get_report(self) -> DeviceInterfaceReport:
        """The whole DEVICE_INTERFACE_REPORT, in portions of at most ``report_chunk``."""
        reader = ReportReader(self.function_id, self.report_chunk)
        try:
            while (req := reader.next_request()) is not None:
                reader.feed(self.request(req, DeviceInterfaceReportResponse))
            return reader.report()
        except TdispDecodeError as exc:
            raise TdispClientError(f"GET_DEVICE_INTERFACE_REPORT: {exc}") from None

    def start(self, nonce: bytes) -> None:
        self.request(StartInterfaceRequest(self.function_id, nonce), StartInterfaceResponse)

    def stop(self) -> None:
        self.request(StopInterfaceRequest(self.function_id), StopInterfaceResponse)


# -- the demo -------------------------------------------------------------------------------

def _expect_state(client: TdispClient, want: TdiState, out: Callable[[str], None]) -> None:
    got = client.get_state()
    out(f"DEVICE_INTERFACE_STATE: {got.name}")
    if got is not want:
        raise TdispClientError(f"TDI state is {got.name}, expected {want.name}")


def tdisp_demo(client: TdispClient, stream_id: int, out: Callable[[str], None]) -> None:
    """The TDISP part of the demo (the IDE stream must be keyed in the client's session)."""
    versions = client.get_version()
    out("TDISP_VERSION: " + ", ".join(f"{v >> 4}.{v & 0xF}" for v in versions))
    caps = client.get_capabilities()
    lock_flags = LockInterfaceFlags(caps.lock_interface_flags_supported)
    out(f"TDISP_CAPABILITIES: REQ_MSGS_SUPPORTED 0x{caps.req_msgs_supported:x}, "
        f"LOCK_INTERFACE_FLAGS_SUPPORTED 0x{caps.lock_interface_flags_supported:04x}, "
        f"DEV_ADDR_WIDTH {caps.dev_addr_width}")
    _expect_state(client, TdiState.CONFIG_UNLOCKED, out)
    flags = LockInterfaceFlags.NO_FW_UPDATE & lock_flags
    nonce = client.lock(flags, stream_id, 0)
    out(f"LOCK_INTERFACE (flags 0x{int(flags):04x}, DEFAULT_STREAM_ID {stream_id}): "
        f"CONFIG_LOCKED, START_INTERFACE_NONCE received ({len(nonce)} bytes)")
    _expect_state(client, TdiState.CONFIG_LOCKED, out)
    report = client.get_report()
    out(f"DEVICE_INTERFACE_REPORT: INTERFACE_INFO 0x{int(report.interface_info):04x}, "
        f"{len(report.mmio_ranges)} MMIO range(s)")
    for r in report.mmio_ranges:
        out(f"  MMIO range {r.range_id}: first page 0x{r.first_page:x} "
            f"({r.first_page << 12:#x}), {r.number_of_pages} page(s), attributes "
            f"0x{int(r.attributes):04x}")
    client.start(nonce)
    out("START_INTERFACE: acknowledged")
    _expect_state(client, TdiState.RUN, out)
    client.stop()
    out("STOP_INTERFACE: acknowledged")
    _expect_state(client, TdiState.CONFIG_UNLOCKED, out)


def run_demo(opts: ide.IdeOptions, run: Attestation) -> None:
    out = run.out
    with ide.platform_client(opts) as rp, ide.spdm_session(opts, run, True) as (req, sid):
        s = ide.SelectiveStream(rp, ide.ide_client(req, sid), opts.stream_id, opts.block,
                                out)
        s.setup()
        assert s.device_rid is not None
        fid = function_id(s.device_rid)
        out(f"TDISP: INTERFACE_ID FUNCTION_ID 0x{fid:08x} (the function's Requester ID)")
        tdisp_demo(TdispClient(req, sid, fid), opts.stream_id, out)
        s.teardown()
        s.status()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("tdisp_command", choices=COMMANDS, metavar="{" + ",".join(COMMANDS) + "}",
                    help="demo: IDE stream setup, then TDISP lock/report/start/stop, then "
                         "IDE teardown, in one SPDM session")
    attest.add_device_arguments(ap)
    ap.add_argument("--platform-socket", required=True, metavar="PATH",
                    help="the device server's platform control socket (root port)")
    ap.add_argument("--platform-credential", type=Path, required=True, metavar="FILE",
                    help="the platform control credential the device server wrote (0600)")
    ap.add_argument("--stream-id", type=ide.u8_arg, default=ide.DEFAULT_STREAM_ID, metavar="N",
                    help=f"IDE Stream ID (default {ide.DEFAULT_STREAM_ID})")
    ap.add_argument("--block", type=int, default=0, metavar="N",
                    help="the device's Selective IDE stream block to use (default 0)")


def run_command(ns: argparse.Namespace) -> int:
    try:
        debug = attest.DoeDebug.from_args(ns, "teeio-tsm tdisp")
    except AttestError as exc:
        print(f"tdisp {ns.tdisp_command} FAILED: {exc}", file=sys.stderr)
        return 1
    opts = ide.IdeOptions(
        attest=AttestOptions(trust_anchor=ns.trust_anchor, doe_socket=ns.doe_socket,
                             doe_tcp_port=ns.doe_tcp_port, host=ns.host,
                             reference_values=ns.reference_values, nonce=ns.nonce,
                             session=True, debug=debug),
        platform_socket=ns.platform_socket, platform_credential=ns.platform_credential,
        stream_id=ns.stream_id, block=ns.block)
    run = Attestation(out=print)
    command: str = ns.tdisp_command
    try:
        run_demo(opts, run)
    except (TdispClientError, ide.IdeError, IdeKmError, AttestError, RequesterError,
            DoeTransportError, PlatformCtlError, OSError) as exc:
        sys.stdout.flush()
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"tdisp {command} FAILED: {reason}", file=sys.stderr)
        return 1
    finally:
        if debug is not None:
            debug.close()
    print(f"tdisp {command}: done")
    return 0


__all__ = ["TdispClient", "TdispClientError", "TdispRequestError", "add_arguments",
           "run_command", "run_demo", "tdisp_demo"]
