"""``python3 -m guest_agent COMMAND``: the guest agent (stdlib + teeio + cryptography only).

Commands for a person at the VM's shell (human-readable output, ``--json`` for JSON):

  accept     lock, attest, verify and accept the TDI, validate encrypted DMA (leaves RUN);
             an NVMe function: then trusted DMA over the guest's RAM and Linux's nvme driver
  tdi-info   the TDI as the TSM reports it (TDI_INFO) and the device as the guest sees it
  dma        one DMA job on the device (polled, with a DMA window in RUN)
  stop       TDI_STOP: back to CONFIG_UNLOCKED

Run by the guest's init script (``teeio.mode=...``; they also accept and ignore the
options of other modes, since the script passes every ``teeio.K=V`` to the mode):
selftest, probe, doe-discovery, spdm-probe, accept, script.

Exit status: 0 done, 1 failed (one line on stderr saying why), 2 bad usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from guest_agent import accept, commands, dmajob, doe, nvme_accept, selftest, spdm_probe
from guest_agent.ghcx_client import GhcxClient, GhcxSetupError
from guest_agent.pci import AgentError, find_device
from teeio import tdi_verify
from teeio.device_regs import MAX_DMA_LEN

#: Modes the guest's init script runs: options they do not know are ignored (with a note).
TOLERANT = frozenset({"selftest", "probe", "doe-discovery", "spdm-probe", "accept", "script"})
SCRIPT_STEP_TIMEOUT = 600.0


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _size(text: str) -> int:
    """An integer, decimal or 0x-hex, with an optional k / M suffix (KiB, MiB)."""
    mult = 1
    if text[-1:] in ("k", "K"):
        text, mult = text[:-1], 1024
    elif text[-1:] in ("m", "M"):
        text, mult = text[:-1], 1024 * 1024
    try:
        return int(text, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _length(text: str) -> int:
    n = _size(text)
    if not 0 < n <= MAX_DMA_LEN:
        raise argparse.ArgumentTypeError(f"{text} is not in 1..{MAX_DMA_LEN} bytes")
    return n


def _pattern(text: str) -> int:
    n = _int0(text)
    if not 0 <= n <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"{text} is not a 32-bit pattern")
    return n


def _hex(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex number: {text!r}") from None


def _int0(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError(f"not a timeout in seconds (0 < s <= 3600): {text!r}")
    return v


def build_parser() -> Parser:
    ap = Parser(prog="guest_agent", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True,
                            parser_class=Parser)
    legacy_json = "accepted for symmetry; this mode always prints a JSON summary line"

    def add(name: str, help_: str, *, report_required: bool = False,
            json_help: str | None = None) -> Parser:
        p: Parser = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        p.add_argument("--json", action="store_true",
                       help=json_help or "print the result as JSON instead of text")
        p.add_argument("--debug", action="store_true",
                       help="on an error, also print the Python traceback")
        p.add_argument("--report", type=Path, required=report_required,
                       help="also write the whole result as JSON to this file"
                       + (" (required)" if report_required else ""))
        return p

    p = add("selftest", "plain device self-test (CONFIG_UNLOCKED only): scratch register, "
            "FILL/COPY/SHA-256 by DMA, INTx through uio_pci_generic -- closing uio clears "
            "Bus Master Enable, which would ERROR a locked TDI; use 'dma' in a TEE flow",
            report_required=True, json_help=legacy_json)
    p.add_argument("--seed", default="0", help="hex seed the host chose for the test data")
    p.add_argument("--rounds", type=int, default=3, help="rounds of FILL/COPY/SHA-256")
    add("probe", "boot probe: writes an ok report", report_required=True,
        json_help=legacy_json)
    add("doe-discovery", "DOE discovery through the device's mailbox in config space",
        report_required=True, json_help=legacy_json)
    p = add("spdm-probe", "SPDM GET_VERSION .. MEASUREMENTS over a DOE mailbox",
            report_required=True, json_help=legacy_json)
    p.add_argument("--target", default="teeio", choices=sorted(spdm_probe.TARGETS),
                   help="whose DOE mailbox to drive (teeio: our device; nvme: QEMU's NVMe "
                        "controller with spdm_port)")

    p = add("accept", "lock, attest, verify and accept the TDI, then validate encrypted DMA; "
            "the TDI stays RUN after the agent exits (unless --stop 1).  An NVMe function "
            "(class 01:08:02): after ACCEPT a trusted-DMA window over each System RAM range, "
            "then Linux's nvme driver is bound to it")
    p.add_argument("--policy", type=Path,
                   help="the guest's policy (trust anchors, reference values, expected "
                        "device), from teeio-guest-policy (required unless --no-tee)")
    p.add_argument("--no-tee", action="store_true",
                   help="NVMe only: bind Linux's nvme driver without TDISP (no lock, no "
                        "attestation: T=0 DMA in the clear, as an ordinary assigned device); "
                        "the TDI must be CONFIG_UNLOCKED")
    p.add_argument("--restart", action="store_true",
                   help="if the TDI is not CONFIG_UNLOCKED (RUN, CONFIG_LOCKED, ERROR), "
                        "TDI_STOP it first and run the whole flow again; without it an "
                        "already-RUN TDI is left as it is (exit 0) and a CONFIG_LOCKED / "
                        "ERROR one is an error")
    p.add_argument("--seed", default="0",
                   help="hex seed for the data DMAed through the private buffer")
    p.add_argument("--pause-at", default="", choices=("", *accept.PAUSE_POINTS),
                   help="wait for the host at this point (tests)")
    p.add_argument("--sync-dir", type=Path, default=Path("/mnt/results"),
                   help="where pause/resume files are exchanged with the host (tests)")
    p.add_argument("--expect", default="accept", choices=("accept", "refuse"),
                   help="'refuse' when the host broke something on purpose (tests): "
                        "success then means the guest refused")
    p.add_argument("--stop", type=int, default=0, choices=(0, 1),
                   help="1 = TDI_STOP at the end (back to CONFIG_UNLOCKED)")
    p.add_argument("--cycles", type=int, default=0,
                   help="that many more STOP/LOCK/verify/ACCEPT rounds (benchmark)")

    p = add("tdi-info", "the TDI as the TSM reports it (TDI_INFO, STATUS: state, lock epoch, "
            "IDE stream, digests, boot id, DMA windows) and the device as the guest sees "
            "it in sysfs (Command register, BARs, driver, whether BAR0 answers)")
    p.add_argument("--local", action="store_true",
                   help="only the guest's own view; do not ask the TSM")

    p = add("stop", "TDI_STOP through the TSM, from RUN, CONFIG_LOCKED or ERROR: the TSM "
            "revokes this VM's DMA windows and private MMIO, the device scrubs and goes "
            "CONFIG_UNLOCKED")
    p.add_argument("--force", action="store_true",
                   help="send TDI_STOP even if TDI_INFO says CONFIG_UNLOCKED already")

    p = add("dma", "one job on the device's DMA engine (BAR0), completed by polling STATUS "
            "(no interrupts, no uio); in RUN with a DMA window over its buffer (T=1, "
            "IDE-encrypted), asked for and released around the job")
    p.add_argument("--op", default="fill", choices=sorted(commands.OPS),
                   help="fill: PATTERN -> DST; copy: SRC -> DST; sha256: SHA-256 of SRC -> "
                        "DST (default fill)")
    p.add_argument("--length", type=_length, default=4096,
                   help=f"bytes, 1..{MAX_DMA_LEN} (e.g. 4096, 0x1000, 64k, 1M; default 4096)")
    p.add_argument("--pattern", type=_pattern, default=None,
                   help="fill: the 32-bit pattern (e.g. 0xdeadbeef; default derived from "
                        "--seed)")
    p.add_argument("--seed", type=_hex, default=0,
                   help="hex seed of the source data (copy, sha256) and default pattern")
    p.add_argument("--timeout", type=_seconds, default=dmajob.JOB_TIMEOUT,
                   help=f"seconds to wait for completion (default {dmajob.JOB_TIMEOUT:.0f})")
    p.add_argument("--no-window", action="store_true",
                   help="in RUN, do not ask for a DMA window (the root port then refuses "
                        "the T=1 DMA: shows the enforcement)")
    p.add_argument("--keep-window", action="store_true",
                   help="do not release the window accepted for this job (it covers a "
                        "buffer freed when the command exits; 'stop' revokes it)")
    p.add_argument("--no-tsm", action="store_true",
                   help="do not ask the TSM (TDI state unknown, no window): a VM without "
                        "GHCx; without this option a missing GHCx port means the same")

    p = add("script", "run guest_agent commands from a file, each as its own process "
            "(e2e tests: the host judges what each printed)", report_required=True)
    p.add_argument("--file", type=Path, required=True,
                   help="one command per line (as after 'python3 -m guest_agent'); '#' "
                        "starts a comment; a leading '!' means the command must fail")
    p.add_argument("--step-timeout", type=_seconds, default=SCRIPT_STEP_TIMEOUT,
                   help=f"seconds for each command (default {SCRIPT_STEP_TIMEOUT:.0f})")
    return ap


# -- handlers: each returns (result, ok) -------------------------------------------------------

def _legacy(ns: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    if ns.command == "probe":
        report: dict[str, Any] = {"mode": "probe", "ok": True}
    elif ns.command == "doe-discovery":
        report = doe.run()
    elif ns.command == "spdm-probe":
        report = spdm_probe.run(ns.target)
    else:
        report = selftest.run(_hex(ns.seed), ns.rounds)
    return report, bool(report.get("ok"))


def _accept(ns: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    if ns.no_tee:
        ids = {}
        if ns.policy is not None:
            policy = tdi_verify.load_policy(ns.policy)
            ids = {"vendor": policy.vendor_id, "device": policy.device_id}
        report = nvme_accept.run_plain(**ids)
        return report, bool(report.get("ok"))
    report = accept.run(ns.policy, pause_at=ns.pause_at, sync_dir=ns.sync_dir,
                        expect=ns.expect, stop=bool(ns.stop), cycles=ns.cycles,
                        seed=_hex(ns.seed), restart=ns.restart)
    return report, bool(report.get("ok"))


def _connect(hint: str) -> GhcxClient:
    try:
        return GhcxClient.connect()
    except GhcxSetupError as exc:
        raise commands.CommandFailed(f"{exc} ({hint})") from None


def _tdi_info(ns: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    view: dict[str, Any] | None = None
    guest_error = None
    try:
        view = commands.guest_view(find_device(selftest.VENDOR, selftest.DEVICE))
    except (AgentError, OSError) as exc:
        guest_error = str(exc)
    if ns.local:
        if view is None:
            raise commands.CommandFailed(guest_error or "no device")
        return commands.tdi_info(None, view), True
    client = _connect("--local shows only the guest's view")
    try:
        res = commands.tdi_info(client, view)
    finally:
        client.close()
    if guest_error:
        res["guest_error"] = guest_error
    return res, True


def _stop(ns: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    client = _connect("no TSM to ask for TDI_STOP")
    try:
        return commands.stop(client, force=ns.force), True
    finally:
        client.close()


def _dma(ns: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    opts = commands.DmaOptions(op=ns.op, length=ns.length, pattern=ns.pattern, seed=ns.seed,
                               timeout=ns.timeout, window=not ns.no_window,
                               keep_window=ns.keep_window)
    d = selftest.Driver(irq=False, job_timeout=ns.timeout)   # polled; no uio (pci.py)
    client: GhcxClient | None = None
    note = "--no-tsm: the TSM was not asked" if ns.no_tsm else None
    if not ns.no_tsm:
        try:
            client = GhcxClient.connect()
        except GhcxSetupError as exc:
            note = f"no GHCx ({exc}): the TSM was not asked"
    try:
        res = commands.dma(opts, regs=d.mmio, buf=d.buf, tsm=client, bdf=d.dev.name,
                           command=d.command, note=note)
    finally:
        if client is not None:
            client.close()
    return res, True


def _script(ns: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    steps: list[dict[str, Any]] = []
    for lineno, raw in enumerate(ns.file.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        must_fail = line.startswith("!")
        argv = shlex.split(line.lstrip("!"))
        step: dict[str, Any] = {"line": lineno, "argv": argv, "must_fail": must_fail}
        try:
            proc = subprocess.run([sys.executable, "-m", "guest_agent", *argv],
                                  capture_output=True, text=True, timeout=ns.step_timeout,
                                  check=False)
            step.update(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        except subprocess.TimeoutExpired:
            step.update(rc=None, stdout="", stderr=f"timed out after {ns.step_timeout} s")
        try:
            step["json"] = json.loads(step["stdout"])
        except ValueError:
            step["json"] = None
        rc = step["rc"]
        step["ok"] = rc is not None and (rc != 0 if must_fail else rc == 0)
        print(f"[{'ok ' if step['ok'] else 'ERR'}] rc={rc} {' '.join(argv)}", flush=True)
        for text in (step["stdout"], step["stderr"]):
            if text.strip():
                print("    " + text.rstrip().replace("\n", "\n    "), flush=True)
        steps.append(step)
    ok = bool(steps) and all(s["ok"] for s in steps)
    return {"mode": "script", "file": str(ns.file), "steps": steps, "ok": ok}, ok


def _format_script(res: dict[str, Any]) -> str:
    steps = res.get("steps", [])
    return f"script {res.get('file')}: {sum(s['ok'] for s in steps)}/{len(steps)} steps ok"


HANDLERS: dict[str, Callable[[argparse.Namespace], tuple[dict[str, Any], bool]]] = {
    "selftest": _legacy, "probe": _legacy, "doe-discovery": _legacy, "spdm-probe": _legacy,
    "accept": _accept, "tdi-info": _tdi_info, "stop": _stop, "dma": _dma, "script": _script,
}

FORMATTERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "accept": commands.format_accept, "tdi-info": commands.format_tdi_info,
    "stop": commands.format_stop, "dma": commands.format_dma, "script": _format_script,
}


def one_line(exc: BaseException) -> str:
    """An exception as one line: the message of our own errors, else type and message."""
    text = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _write_report(path: Path | None, report: dict[str, Any]) -> None:
    """The whole result as JSON, written atomically (the host reads it after the run)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    tmp.replace(path)



def _print(cmd: str, ns: argparse.Namespace, result: dict[str, Any]) -> None:
    fmt = FORMATTERS.get(cmd)
    if fmt is None:     # the init script's modes: one JSON summary line, as ever
        print(json.dumps({k: v for k, v in result.items() if k != "checks"}, sort_keys=True,
                         default=str))
    elif ns.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    elif text := fmt(result):
        print(text)


def _failure(cmd: str, result: dict[str, Any]) -> str:
    if result.get("error"):
        return str(result["error"])
    if result.get("refusal"):
        return f"refused: {result['refusal']}"
    bad = [c.get("name") for c in result.get("checks", []) if not c.get("ok")]
    return f"checks failed: {', '.join(map(str, bad))}" if bad else f"{cmd} failed"


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ns, unknown = ap.parse_known_args(argv)
    cmd: str = ns.command
    if cmd == "accept" and ns.policy is None and not ns.no_tee:
        ap.error("accept: --policy is required (unless --no-tee)")
    # The init script's modes log warnings into agent.log as ever; a person's commands
    # keep to their output and one line of error unless --debug.
    logging.basicConfig(level=logging.DEBUG if ns.debug else logging.WARNING
                        if cmd in TOLERANT else logging.ERROR,
                        format="guest_agent: %(name)s: %(message)s", stream=sys.stderr)
    if unknown:
        if cmd not in TOLERANT:
            ap.error(f"{cmd}: unrecognized arguments: {' '.join(unknown)}")
        print(f"guest_agent {cmd}: ignoring options it does not use: {' '.join(unknown)}",
              file=sys.stderr)
    try:
        result, ok = HANDLERS[cmd](ns)
    except commands.CommandFailed as exc:
        if exc.result is not None:
            _write_report(ns.report, exc.result)
            _print(cmd, ns, exc.result)
        else:
            _write_report(ns.report, {"mode": cmd, "ok": False, "error": str(exc)})
        print(f"guest_agent {cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"guest_agent {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line (and the report says more)
        if ns.debug:
            traceback.print_exc()
        try:
            _write_report(ns.report, {"mode": cmd, "ok": False, "error": one_line(exc),
                                      "traceback": traceback.format_exc()})
        except OSError as wexc:
            print(f"guest_agent {cmd}: cannot write the report: {one_line(wexc)}",
                  file=sys.stderr)
        print(f"guest_agent {cmd}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    _write_report(ns.report, result)
    _print(cmd, ns, result)
    if not ok:
        print(f"guest_agent {cmd}: {_failure(cmd, result)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
