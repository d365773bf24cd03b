"""``teeio-tsm ide``: a Selective IDE stream between the device and its root port, keyed
by the TSM.

    teeio-tsm ide {setup,refresh,teardown,status,demo}
        (--doe-socket PATH | --doe-tcp-port N [--host H]) --trust-anchor PEM
        [--reference-values JSON] [--nonce HEX]
        --platform-socket PATH --platform-credential FILE
        [--stream-id N] [--block N] [--aggregation N] [--query]
        [--pause | --hold SECONDS] [--json OUT]

The device is attested as ``teeio-tsm attest`` does it, then a KEY_EXCHANGE/FINISH
session carries IDE_KM (PCIe 6.x §6.33.3) for :class:`tsm.ide.SelectiveStream`.  The
device's IDE_KM binds to that session: its keys live as long as it does, so this
one-process-per-command CLI runs ``demo`` (setup, refresh, teardown) in one session;
``setup`` leaves its session open (CONTINUE, not END_SESSION) until the next SPDM
connection ends it; ``status`` without ``--query`` uses no SPDM; ``teardown`` opens a new
session; ``refresh`` needs setup's session and says so (the TSM daemon keeps it).

Exit 0 on success; 1 and one line on stderr (``ide <command> FAILED: <reason>``)
otherwise.  ``--json OUT`` writes the last status (device block, root port stream).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeio.ide_km import IdeKmError
from teeio.platform_channel import PlatformClient, PlatformCtlError, StreamState, read_credential
from teeio.spdm import Requester, RequesterError
from tsm import attest
from tsm.attest import Attestation, AttestError, AttestOptions
from tsm.doe_client import DoeTransportError
from tsm.ide import DEFAULT_STREAM_ID, IdeError, SelectiveStream, ide_client

COMMANDS = ("setup", "refresh", "teardown", "status", "demo")


@dataclass
class IdeOptions:
    attest: AttestOptions
    platform_socket: str
    platform_credential: Path
    stream_id: int = DEFAULT_STREAM_ID
    block: int = 0
    query: bool = False
    pause: bool = False
    hold: float = 0.0
    json_out: Path | None = None
    aggregation: int = 1


def platform_client(opts: IdeOptions) -> PlatformClient:
    try:
        token = read_credential(opts.platform_credential)
    except (OSError, ValueError) as exc:
        raise IdeError(f"platform credential {opts.platform_credential}: {exc}") from None
    try:
        return PlatformClient(opts.platform_socket, token)
    except OSError as exc:
        raise IdeError(f"platform socket {opts.platform_socket}: cannot connect: "
                       f"{exc.strerror or exc}") from None


@contextlib.contextmanager
def spdm_session(opts: IdeOptions, run: Attestation, end: bool,
                  ) -> Iterator[tuple[Requester, int]]:
    """Attest, open a session; END_SESSION on the way out if *end*, and also after a
    failure (fail-safe: the device then drops every key the session programmed)."""
    with attest.attested(opts.attest, run) as (req, _blocks):
        sid = req.start_session(0)
        run.out(f"SPDM session 0x{sid:08x} established (KEY_EXCHANGE + FINISH)")
        try:
            yield req, sid
        except BaseException:
            if end and sid in req.sessions:
                with contextlib.suppress(RequesterError, DoeTransportError, AttestError):
                    req.end_session(sid)
            raise
        if end:
            req.end_session(sid)
            run.out(f"END_SESSION 0x{sid:08x}: acknowledged")
        else:
            run.out(f"SPDM session 0x{sid:08x} left open in the device: the IDE keys live "
                    "as long as it does (the next SPDM connection to the device ends it)")


def _wait(opts: IdeOptions, what: str, out: Callable[[str], None]) -> None:
    if opts.pause:
        out(f"PAUSE {what}: press Enter to continue")
        sys.stdout.flush()
        sys.stdin.readline()
    elif opts.hold > 0:
        out(f"holding {opts.hold:g} s ({what})")
        time.sleep(opts.hold)


def run_ide(command: str, opts: IdeOptions, run: Attestation) -> dict[str, Any]:
    """Run one ``ide`` command; returns the last status.  Raises IdeError and the
    transport/SPDM/IDE_KM errors."""
    out = run.out
    with platform_client(opts) as rp:
        if command == "status" and not opts.query:
            return SelectiveStream(rp, None, opts.stream_id, opts.block, out).status(False)
        if command == "refresh":
            raise IdeError("refresh needs the SPDM session that programmed the current keys; "
                           "a one-shot CLI cannot keep it (a new connection ends it, and "
                           "with it the keys). Use `teeio-tsm ide demo`, or the TSM daemon "
                           "(teeio-tsm daemon)")
        end = command != "setup"
        with spdm_session(opts, run, end) as (req, sid):
            s = SelectiveStream(rp, ide_client(req, sid), opts.stream_id, opts.block, out,
                                aggregation=opts.aggregation)
            if command == "status":
                return s.status(True)
            if command == "setup":
                return s.setup()
            if command == "teardown":
                s.teardown()
                return s.status()
            assert command == "demo"
            s.setup()
            _wait(opts, "stream Secure with K0", out)
            s.refresh()
            _wait(opts, "stream Secure with K1", out)
            s.teardown()
            last = s.status()
        # After END_SESSION (the device invalidates every key the session programmed).
        after = SelectiveStream(rp, None, opts.stream_id, opts.block, out).status(False)
        if after["device"]["state"] != StreamState.INSECURE:
            raise IdeError("the device's stream is not Insecure after END_SESSION")
        return {**last, "after_end_session": after}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("ide_command", choices=COMMANDS, metavar="{" + ",".join(COMMANDS) + "}",
                    help="setup: key and enable a stream (leaves the SPDM session open); "
                         "refresh: switch key sets (needs setup's session: use demo); "
                         "teardown: stop keys, disable, remove; status: both ends; "
                         "demo: setup, refresh, teardown in one session")
    attest.add_device_arguments(ap)
    ap.add_argument("--platform-socket", required=True, metavar="PATH",
                    help="the device server's platform control socket (root port)")
    ap.add_argument("--platform-credential", type=Path, required=True, metavar="FILE",
                    help="the platform control credential the device server wrote (0600)")
    ap.add_argument("--stream-id", type=u8_arg, default=DEFAULT_STREAM_ID, metavar="N",
                    help=f"IDE Stream ID (default {DEFAULT_STREAM_ID})")
    ap.add_argument("--block", type=int, default=0, metavar="N",
                    help="the device's Selective IDE stream block to use (default 0)")
    ap.add_argument("--aggregation", type=int, choices=(1, 2, 4, 8), default=1, metavar="N",
                    help="setup: IDE aggregation, up to N TLPs per MAC on every sub-stream "
                         "(PCIe 6.x §6.33.6), if both ends support it (default 1: none)")
    ap.add_argument("--query", action="store_true",
                    help="status: read the device's registers via QUERY_RESP in a new SPDM "
                         "session (this ends the session setup left open)")
    wait = ap.add_mutually_exclusive_group()
    wait.add_argument("--pause", action="store_true",
                      help="demo: after setup and after the refresh, wait for a line on "
                           "stdin (run DMA meanwhile)")
    wait.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                      help="demo: after setup and after the refresh, wait this long")
    ap.add_argument("--json", type=Path, dest="json_out", metavar="OUT",
                    help="write the last status as JSON")


def u8_arg(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= v <= 0xFF:
        raise argparse.ArgumentTypeError(f"{v} is not 0..255")
    return v


def run_command(ns: argparse.Namespace) -> int:
    try:
        debug = attest.DoeDebug.from_args(ns, "teeio-tsm ide")
    except AttestError as exc:
        print(f"ide {ns.ide_command} FAILED: {exc}", file=sys.stderr)
        return 1
    opts = IdeOptions(
        attest=AttestOptions(trust_anchor=ns.trust_anchor, doe_socket=ns.doe_socket,
                             doe_tcp_port=ns.doe_tcp_port, host=ns.host,
                             reference_values=ns.reference_values, nonce=ns.nonce,
                             session=True, debug=debug),
        platform_socket=ns.platform_socket, platform_credential=ns.platform_credential,
        stream_id=ns.stream_id, block=ns.block, query=ns.query, pause=ns.pause,
        hold=ns.hold, json_out=ns.json_out, aggregation=ns.aggregation)
    run = Attestation(out=print)
    command: str = ns.ide_command
    try:
        result = run_ide(command, opts, run)
        if opts.json_out is not None:
            opts.json_out.parent.mkdir(parents=True, exist_ok=True)
            opts.json_out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    except (IdeError, IdeKmError, AttestError, RequesterError, DoeTransportError,
            PlatformCtlError, OSError) as exc:
        sys.stdout.flush()
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ide {command} FAILED: {reason}", file=sys.stderr)
        return 1
    finally:
        if debug is not None:
            debug.close()
    print(f"ide {command}: done")
    return 0


__all__ = ["COMMANDS", "IdeOptions", "add_arguments", "platform_client", "run_command",
           "run_ide", "spdm_session", "u8_arg"]
