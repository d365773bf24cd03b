"""Benchmark: the TSM command line as a process, against DMTF spdm-emu's requester.

Run as ``python -m bench.bench_cli [--out FILE] [--quick] [--iterations N] [--spdm-emu PATH]``.
Every leg is a fresh process timed from spawn to exit (wall clock, and the CPU time it
used), the legs alternating in each round (the order reversed every other round) so load
on a shared machine hits them alike:

* ``floor``: ``python -c pass``, the interpreter and site;
* ``tsm_help``, ``tsm_attest_help``: ``teeio-tsm --help``, ``teeio-tsm attest --help``;
* ``tsm_attest_session``: ``teeio-tsm attest --session`` against the DOE TCP port of a
  device server this benchmark starts (a fresh P-384 identity, the firmware built here):
  DOE discovery, VCA, GET_DIGESTS, GET_CERTIFICATE, CHALLENGE, signed GET_MEASUREMENTS,
  KEY_EXCHANGE/FINISH, HEARTBEAT, KEY_UPDATE, GET_MEASUREMENTS in the session,
  END_SESSION (DSP0274 §10), then CONTINUE;
* ``floor_installed``, ``tsm_attest_session_installed``: the same two as the project is
  installed (``bench/installed.py``: its wheel's files in an environment of their own,
  without the editable install's start-up hook); skipped, saying why, when that copy
  cannot be made; the goal is judged on it, what a user of the tool runs;
* ``spdm_emu_requester``: ``spdm_requester_emu`` (``--spdm-emu``, else ``$TEEIO_SPDM_EMU``,
  else ``$TEEIO_SPDM_EMU_BIN/spdm_requester_emu``) doing that flow against the same port
  (``--trans PCI_DOE``); skipped, with the reason in the JSON, when there is none.

Also the import-time split of the ``attest --session`` process (``-X importtime``).  The
children cache bytecode in a private directory, warmed before timing.  The JSON is printed
and, with ``--out``, written to a file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bench.common import HostMeta, emit_report, host_meta, positive
from bench.installed import InstalledCopy, install_copy
from vfio_user_dev.firmware_build import build

PROJECT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 2.5          # tsm_attest_session / spdm_emu_requester, wall-clock medians
STARTUP = 30.0              # seconds for the device server to listen
RUN_TIMEOUT = 120.0         # any one measured process
TSM_MAIN = "import sys; from tsm.__main__ import main; sys.exit(main())"
INSTALLED = "tsm_attest_session_installed"      # the leg the goal is judged on, if any
SPDM_EMU_FLOW = ["--exe_conn", "DIGEST,CERT,CHAL,MEAS",
                 "--exe_session", "KEY_EX,HEARTBEAT,KEY_UPDATE,MEAS",
                 "--exe_mode", "CONTINUE", "--meas_op", "ALL", "--key_upd", "ALL",
                 "--mut_auth", "NO", "--basic_mut_auth", "NO"]
SPDM_EMU_KEYS = "ecp384"    # libspdm's sample folder of the device's P-384 identity
#: Modules ``attest --session`` does not need: the other commands, other roles, the ELF
#: reader, the device's SPDM responder.
NOT_NEEDED = ("tsm.daemon", "tsm.control_api", "tsm.journal", "tsm.ghcx_server",
              "tsm.guest_api", "tsm.ctl", "tsm.ide", "tsm.tdisp", "tsm.tdi", "tsm.device",
              "tsm.registry", "tsm.recovery", "vfio_user_dev", "guest_agent", "qemu_configs",
              "elftools", "teeio.spdm.responder")


# -- result types -----------------------------------------------------------------------------
class Stats(TypedDict):
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float


class LegResult(TypedDict):
    name: str
    command: list[str]
    n: int
    wall: Stats
    cpu: Stats                      # user + system time of the process
    off_cpu_ms: float               # wall - cpu medians: waiting (device, network, scheduler)
    ratio_to_floor: float           # wall medians
    ratio_to_spdm_emu: float | None


class Skipped(TypedDict):
    name: str
    reason: str


class ModuleTime(TypedDict):
    module: str
    self_ms: float
    cumulative_ms: float


class ImportSplit(TypedDict):
    command: list[str]
    runs: int
    total_ms: float                 # medians over the runs of the sum of every self time
    process_wall_ms: float
    by_group_ms: dict[str, float]   # self times: tsm, teeio.spdm, teeio, cryptography, ...
    top_modules: list[ModuleTime]
    not_needed_loaded: list[str]    # NOT_NEEDED modules the process imported


class Goal(TypedDict):
    target_ratio: float
    judged_on: str                  # the leg compared with spdm_emu_requester
    ratio: float | None             # wall medians
    cpu_ratio: float | None
    met: bool | None
    reason: str | None              # why there is no ratio, or why to doubt it


class Meta(HostMeta):
    date: str
    quick: bool
    iterations: int | None
    rounds: int
    warmup_rounds: int
    bytecode: str
    spdm_emu: str | None
    device_command: list[str]
    elapsed_s: float


class Report(TypedDict):
    meta: Meta
    legs: list[LegResult]
    skipped: list[Skipped]
    import_time: ImportSplit
    goal: Goal
    notes: str


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    warmup: int
    import_runs: int
    fixed: int | None

    @classmethod
    def from_args(cls, quick: bool, iterations: int | None) -> Settings:
        if iterations is not None:
            return cls(quick, iterations, 1, min(iterations, 3), iterations)
        return cls(quick, 7, 1, 3, None) if quick else cls(quick, 21, 2, 7, None)


# -- statistics ---------------------------------------------------------------------------------
def stats(samples_ns: Sequence[int]) -> Stats:
    if len(samples_ns) < 2:
        raise ValueError("need at least two samples")
    ms = [s / 1e6 for s in samples_ns]
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return Stats(median_ms=round(statistics.median(ms), 2), p10_ms=round(deciles[0], 2),
                 p90_ms=round(deciles[8], 2), mean_ms=round(statistics.fmean(ms), 2))


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else 0.0


def goal(legs: dict[str, LegResult], skipped: list[Skipped]) -> Goal:
    """``teeio-tsm attest --session`` as installed (the checkout's editable install when
    there is no installed copy) against ``spdm_emu_requester`` (wall-clock medians)."""
    judged = INSTALLED if INSTALLED in legs else "tsm_attest_session"
    tsm, emu = legs.get(judged), legs.get("spdm_emu_requester")
    if tsm is None or emu is None:
        why = next((s["reason"] for s in skipped if s["name"] == "spdm_emu_requester"),
                   "no spdm_emu_requester leg")
        return Goal(target_ratio=TARGET_RATIO, judged_on=judged, ratio=None, cpu_ratio=None,
                    met=None, reason=why)
    r = ratio(tsm["wall"]["median_ms"], emu["wall"]["median_ms"])
    doubt = None
    if emu["off_cpu_ms"] > emu["wall"]["median_ms"] / 2:
        doubt = (f"spdm_emu_requester spent {emu['off_cpu_ms']:g} of its "
                 f"{emu['wall']['median_ms']:g} ms off the CPU (waiting, e.g. for delayed "
                 "ACKs of its split socket writes): the wall ratio flatters teeio-tsm; "
                 "cpu_ratio compares the work")
    return Goal(target_ratio=TARGET_RATIO, judged_on=judged, ratio=r,
                cpu_ratio=ratio(tsm["cpu"]["median_ms"], emu["cpu"]["median_ms"]),
                met=r <= TARGET_RATIO, reason=doubt)


# -- processes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Leg:
    name: str
    argv: list[str]
    cwd: Path
    check: Callable[[subprocess.CompletedProcess[str]], str | None]   # what went wrong
    env: dict[str, str] | None = None       # its own environment (else the run's)


def exit_zero(expect: str | None = None) -> Callable[[subprocess.CompletedProcess[str]],
                                                      str | None]:
    def check(proc: subprocess.CompletedProcess[str]) -> str | None:
        if proc.returncode != 0:
            return f"exit status {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"
        if expect is not None and expect not in proc.stdout:
            return f"no {expect!r} in its output: {proc.stdout[-2000:]}"
        return None
    return check


def run_once(leg: Leg, env: dict[str, str]) -> tuple[int, int]:
    """Run *leg* once: (wall ns, CPU ns of the child); RuntimeError if it failed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter_ns()
    proc = subprocess.run(leg.argv, cwd=leg.cwd, env=leg.env or env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)
    wall = time.perf_counter_ns() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    problem = leg.check(proc)
    if problem is not None:
        raise RuntimeError(f"{leg.name} ({' '.join(leg.argv)}): {problem}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, round(cpu * 1e9)


def measure(legs: list[Leg], s: Settings, env: dict[str, str],
            ) -> dict[str, tuple[list[int], list[int]]]:
    """Warm-up rounds, then the timed rounds, the legs alternating: name -> (wall, cpu)."""
    out: dict[str, tuple[list[int], list[int]]] = {leg.name: ([], []) for leg in legs}
    for i in range(s.warmup + s.rounds):
        for leg in legs if i % 2 == 0 else legs[::-1]:
            wall, cpu = run_once(leg, env)
            if i >= s.warmup:
                out[leg.name][0].append(wall)
                out[leg.name][1].append(cpu)
    return out


def child_env(pycache: Path) -> dict[str, str]:
    """The children import this checkout and cache bytecode in *pycache* (as an installed
    package has it), whatever this process was started with."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT), PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def tsm_command() -> list[str]:
    """``teeio-tsm``: the console script next to this interpreter (run by it), else the
    same entry point through ``-c``."""
    script = Path(sys.executable).with_name("teeio-tsm")
    return [sys.executable, str(script)] if script.is_file() else [sys.executable, "-c",
                                                                    TSM_MAIN]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def device_server(tmp: Path, env: dict[str, str]) -> Iterator[tuple[int, Path, list[str]]]:
    """``python -m vfio_user_dev`` with the SPDM responder on a DOE TCP port; yields the
    port, the trust anchor of the identity it provisioned and its command line."""
    firmware = build(tmp / "teeio-fw.elf")
    port, sock, log = free_port(), tmp / "vfio-user.sock", tmp / "device.log"
    cmd = [sys.executable, "-m", "vfio_user_dev", "--socket", str(sock), "--doe-tcp-port",
           str(port), "--identity", str(tmp / "identity"), "--firmware", str(firmware)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP
        while not sock.exists():       # the DOE listener is up before the vfio-user socket
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"device server did not start ({' '.join(cmd)}):\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.02)
        yield port, tmp / "identity" / "trust-anchor.pem", cmd
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def spdm_emu_binary(option: str | None) -> tuple[Path | None, str]:
    """The spdm_requester_emu to run, or None and why not."""
    if option:
        path, origin = Path(option), f"--spdm-emu {option}"
    elif os.environ.get("TEEIO_SPDM_EMU"):
        path, origin = Path(os.environ["TEEIO_SPDM_EMU"]), "TEEIO_SPDM_EMU"
    elif os.environ.get("TEEIO_SPDM_EMU_BIN"):
        path = Path(os.environ["TEEIO_SPDM_EMU_BIN"]) / "spdm_requester_emu"
        origin = "TEEIO_SPDM_EMU_BIN"
    else:
        return None, ("TEEIO_SPDM_EMU is not set: point it at a built DMTF spdm-emu "
                      "spdm_requester_emu (libspdm's sample keys next to it)")
    path = path.expanduser().resolve()
    if not path.is_file() or not os.access(path, os.X_OK):
        return None, f"{origin}: {path} is not an executable file"
    if not (path.parent / SPDM_EMU_KEYS / "ca.cert.der").is_file():
        return None, (f"{origin}: no {SPDM_EMU_KEYS}/ca.cert.der next to {path} (libspdm's "
                      "sample keys belong beside the binary)")
    return path, ""


def spdm_emu_workdir(binary: Path, work: Path, anchor_pem: Path) -> Path:
    """spdm_requester_emu reads its keys relative to its working directory: the sample
    key folders linked, ``ecp384/ca.cert.der`` (its slot-0 trust anchor) being the
    device's root."""
    bin_dir = binary.parent
    work.mkdir()
    for entry in bin_dir.iterdir():
        if entry.is_dir() and entry.name != SPDM_EMU_KEYS:
            (work / entry.name).symlink_to(entry, target_is_directory=True)
    keys = work / SPDM_EMU_KEYS
    keys.mkdir()
    for entry in (bin_dir / SPDM_EMU_KEYS).iterdir():
        if entry.name != "ca.cert.der":
            (keys / entry.name).symlink_to(entry)
    root = x509.load_pem_x509_certificates(anchor_pem.read_bytes())[0]
    (keys / "ca.cert.der").write_bytes(root.public_bytes(Encoding.DER))
    return work


def spdm_emu_check(proc: subprocess.CompletedProcess[str]) -> str | None:
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "ERROR" in line]
    if proc.returncode != 0 or errors:
        return f"exit status {proc.returncode}, {len(errors)} ERROR lines: {out[-2000:]}"
    return None


# -- import time --------------------------------------------------------------------------------
def group_of(module: str) -> str:
    top = module.split(".")[0]
    if top in ("tsm", "cryptography"):
        return top
    if module == "teeio.spdm" or module.startswith("teeio.spdm."):
        return "teeio.spdm"
    if top == "teeio":
        return "teeio (other)"
    return "stdlib" if top in sys.stdlib_module_names else "other (site, third party)"


def parse_importtime(text: str) -> dict[str, tuple[int, int]]:
    """``-X importtime`` output -> {module: (self us, cumulative us)}."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        head, cum, name = line.split("|", 2)
        try:
            out[name.strip()] = (int(head.split(":", 1)[1]), int(cum))
        except ValueError:
            continue      # the column titles
    return out


def import_split(argv: list[str], cwd: Path, env: dict[str, str], runs: int) -> ImportSplit:
    """Median over *runs* of the process's import times, by group and by module."""
    cmd = [argv[0], "-X", "importtime", *argv[1:]]
    totals, walls = [], []
    groups: dict[str, list[int]] = {}
    modules: dict[str, list[tuple[int, int]]] = {}
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT, check=False)
        walls.append(time.perf_counter_ns() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit status {proc.returncode}: "
                               f"{proc.stderr[-2000:]}")
        times = parse_importtime(proc.stderr)
        totals.append(sum(s for s, _ in times.values()))
        per_group: dict[str, int] = {}
        for name, (self_us, cum_us) in times.items():
            per_group[group_of(name)] = per_group.get(group_of(name), 0) + self_us
            modules.setdefault(name, []).append((self_us, cum_us))
        for g, us in per_group.items():
            groups.setdefault(g, []).append(us)
    loaded = sorted(m for m in modules if any(m == p or m.startswith(p + ".")
                                              for p in NOT_NEEDED))
    top = sorted(modules, key=lambda m: -statistics.median(s for s, _ in modules[m]))[:15]
    return ImportSplit(
        command=cmd, runs=runs, total_ms=round(statistics.median(totals) / 1000, 2),
        process_wall_ms=round(statistics.median(walls) / 1e6, 2),
        by_group_ms={g: round(statistics.median(v + [0] * (runs - len(v))) / 1000, 2)
                     for g, v in sorted(groups.items())},
        top_modules=[ModuleTime(module=m,
                                self_ms=round(statistics.median(s for s, _ in modules[m]) / 1000,
                                              2),
                                cumulative_ms=round(statistics.median(c for _, c in modules[m])
                                                    / 1000, 2)) for m in top],
        not_needed_loaded=loaded)


# -- driver ---------------------------------------------------------------------------------------
NOTES = (
    "Each leg is a separate process, spawned by subprocess.run and timed from spawn to exit "
    "with perf_counter (wall) and by the children's rusage (cpu = user + system of that "
    "process only; the device server's work is in the wall time, not in cpu). Rounds run "
    "every leg once, in reversed order every other round; warm-up rounds (also filling the "
    "bytecode cache: PYTHONPYCACHEPREFIX in a temporary directory, as an installed package "
    "has its .pyc) are not counted. Statistics: median, p10, p90 (statistics.quantiles, "
    "inclusive) and mean, in ms. tsm_attest_session and spdm_emu_requester talk to the same "
    "device server process (python -m vfio_user_dev, DOE over TCP 127.0.0.1, spdm-emu "
    "framing, TCP_NODELAY on the server's side) and run the same flow; the device keeps "
    "serving between runs (both end with CONTINUE). spdm_requester_emu writes each socket "
    "message in several send() calls and does not set TCP_NODELAY, so its requests can wait "
    "for the server's delayed ACK (about 40 ms each on Linux loopback): off_cpu_ms shows "
    "it, and its cpu figure is free of it. goal: the judged_on leg's wall median <= "
    "target_ratio x spdm_emu_requester wall median (cpu_ratio beside it; reason says when "
    "spdm-emu mostly waited); judged_on is tsm_attest_session_installed (the project "
    "installed from its wheel's files into an environment of its own, as a user has it) "
    "when that copy could be made, else tsm_attest_session (this checkout, whose editable "
    "install adds an import hook to every process's start-up). import_time: -X importtime runs "
    "of the attest --session process; self times summed by group; not_needed_loaded lists "
    "modules that process does not need but imported."
)


def run(s: Settings, spdm_emu: str | None) -> Report:
    started = time.perf_counter()
    affinity = sorted(os.sched_getaffinity(0))
    tsm = tsm_command()
    emu_binary, emu_reason = spdm_emu_binary(spdm_emu)
    skipped: list[Skipped] = []
    with tempfile.TemporaryDirectory(prefix="teeio-bench-cli-") as tmp_name:
        tmp = Path(tmp_name)
        env = child_env(tmp / "pycache")
        with device_server(tmp, env) as (port, anchor, device_cmd):
            attest = [*tsm, "attest", "--doe-tcp-port", str(port), "--trust-anchor",
                      str(anchor), "--session"]
            legs = [Leg("floor", [sys.executable, "-c", "pass"], PROJECT, exit_zero()),
                    Leg("tsm_help", [*tsm, "--help"], PROJECT, exit_zero("attest")),
                    Leg("tsm_attest_help", [*tsm, "attest", "--help"], PROJECT,
                        exit_zero("--session")),
                    Leg("tsm_attest_session", attest, PROJECT,
                        exit_zero("attestation verified"))]
            copy = install_copy(tmp / "installed", PROJECT)
            if isinstance(copy, InstalledCopy):
                # Its own files only: no PYTHONPATH to the checkout, run from elsewhere.
                own = {k: v for k, v in env.items() if k != "PYTHONPATH"}
                legs += [Leg("floor_installed", [str(copy.python), "-c", "pass"], tmp,
                             exit_zero(), own),
                         Leg(INSTALLED, [*copy.script("teeio-tsm"), *attest[len(tsm):]],
                             tmp, exit_zero("attestation verified"), own)]
            else:
                skipped.append(Skipped(name=INSTALLED, reason=copy))
            if emu_binary is not None:
                work = spdm_emu_workdir(emu_binary, tmp / "spdm-emu", anchor)
                legs.append(Leg("spdm_emu_requester",
                                [str(emu_binary), "--trans", "PCI_DOE", "--port", str(port),
                                 *SPDM_EMU_FLOW], work, spdm_emu_check))
            else:
                skipped.append(Skipped(name="spdm_emu_requester", reason=emu_reason))
            samples = measure(legs, s, env)
            split = import_split(attest, PROJECT, env, s.import_runs)
    floor = statistics.median(samples["floor"][0]) / 1e6
    emu_wall = (statistics.median(samples["spdm_emu_requester"][0]) / 1e6
                if "spdm_emu_requester" in samples else None)
    results: dict[str, LegResult] = {}
    for leg in legs:
        wall, cpu = samples[leg.name]
        w = stats(wall)
        results[leg.name] = LegResult(
            name=leg.name, command=leg.argv, n=len(wall), wall=w, cpu=(c := stats(cpu)),
            off_cpu_ms=round(w["median_ms"] - c["median_ms"], 2),
            ratio_to_floor=ratio(w["median_ms"], floor),
            ratio_to_spdm_emu=ratio(w["median_ms"], emu_wall) if emu_wall else None)
    meta = Meta(
        **host_meta(None, affinity, 0, False),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=s.quick, iterations=s.fixed, rounds=s.rounds, warmup_rounds=s.warmup,
        bytecode="cached (private PYTHONPYCACHEPREFIX, warmed)",
        spdm_emu=str(emu_binary) if emu_binary is not None else None,
        device_command=device_cmd, elapsed_s=round(time.perf_counter() - started, 3))
    return Report(meta=meta, legs=list(results.values()), skipped=skipped, import_time=split,
                  goal=goal(results, skipped), notes=NOTES)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_cli",
        description="teeio-tsm start-up and attest --session as processes, against DMTF "
                    "spdm-emu's spdm_requester_emu doing the same flow")
    ap.add_argument("--out", type=Path, help="also write the JSON here (parent dirs are created)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (7; default 21)")
    ap.add_argument("--iterations", type=positive, metavar="N",
                    help="exact count of timed rounds (one warm-up round before them)")
    ap.add_argument("--spdm-emu", metavar="PATH",
                    help="spdm_requester_emu to compare with (default: $TEEIO_SPDM_EMU, "
                         "else $TEEIO_SPDM_EMU_BIN/spdm_requester_emu)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(Settings.from_args(args.quick, args.iterations), args.spdm_emu)
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
