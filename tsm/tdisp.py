"""``teeio-tsm tdisp``: the TSM's side of TDISP (PCIe 6.x §11) for the device's TDI.

    teeio-tsm tdisp demo
        (--doe-socket PATH | --doe-tcp-port N [--host H]) --trust-anchor PEM
        [--reference-values JSON] [--nonce HEX]
        --platform-socket PATH --platform-credential FILE
        [--stream-id N] [--block N]

TDISP runs inside an SPDM secured session as VENDOR_DEFINED messages (PCI-SIG, VendorID
0x0001, Protocol ID 0x01), with :class:`teeio.tdisp.requester.TdispRequester` bound to
the session by :class:`TdispClient`.  The device only LOCKs its TDI when the IDE stream
named by DEFAULT_STREAM_ID was keyed through IDE_KM in the same session, so ``demo``
does, in one session: attest, KEY_EXCHANGE/FINISH, IDE stream setup
(``tsm.ide.SelectiveStream``), then version, capabilities, LOCK (NO_FW_UPDATE), the
report in portions, START, STOP, IDE teardown and END_SESSION.

Exit 0 on success; 1 and one line on stderr (``tdisp demo FAILED: <reason>``) otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from teeio.ide_km import PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, IdeKmError
from teeio.platform_channel import PlatformCtlError
from teeio.spdm import Requester, RequesterError
from teeio.tdisp.codec import function_id
from teeio.tdisp.defs import LockInterfaceFlags, TdiState
from teeio.tdisp.requester import (
    DEFAULT_REPORT_CHUNK,
    TdispClientError,
    TdispRequester,
    TdispRequestError,
)
from tsm import attest, ide, ide_cli
from tsm.attest import Attestation, AttestError, AttestOptions
from tsm.doe_client import DoeTransportError

COMMANDS = ("demo",)


class TdispClient(TdispRequester):
    """TDISP requests for one TDI (*function_id*) inside SPDM session *session_id*."""

    def __init__(self, requester: Requester, session_id: int, function_id: int,
                 report_chunk: int = DEFAULT_REPORT_CHUNK) -> None:
        self.requester = requester
        self.session_id = session_id
        super().__init__(self._send, function_id, report_chunk)

    def _send(self, payload: bytes) -> bytes:
        return self.requester.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID,
                                             payload, self.session_id)


# -- the demo -------------------------------------------------------------------------------

def _expect_state(client: TdispRequester, want: TdiState, out: Callable[[str], None]) -> None:
    got = client.get_state()
    out(f"DEVICE_INTERFACE_STATE: {got.name}")
    if got is not want:
        raise TdispClientError(f"TDI state is {got.name}, expected {want.name}")


def tdisp_demo(client: TdispRequester, stream_id: int, out: Callable[[str], None]) -> None:
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


def run_demo(opts: ide_cli.IdeOptions, run: Attestation) -> None:
    out = run.out
    with ide_cli.platform_client(opts) as rp, ide_cli.spdm_session(opts, run, True) as (req, sid):
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
    ap.add_argument("--stream-id", type=ide_cli.u8_arg, default=ide.DEFAULT_STREAM_ID, metavar="N",
                    help=f"IDE Stream ID (default {ide.DEFAULT_STREAM_ID})")
    ap.add_argument("--block", type=int, default=0, metavar="N",
                    help="the device's Selective IDE stream block to use (default 0)")


def run_command(ns: argparse.Namespace) -> int:
    try:
        debug = attest.DoeDebug.from_args(ns, "teeio-tsm tdisp")
    except AttestError as exc:
        print(f"tdisp {ns.tdisp_command} FAILED: {exc}", file=sys.stderr)
        return 1
    opts = ide_cli.IdeOptions(
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
