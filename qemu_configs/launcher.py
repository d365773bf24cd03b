"""Boot the guest with our vfio-user device attached, and judge the run
(docs/design.md decisions 5-6).

A run: start the device server on a private socket, start QEMU (through the
sysroot's loader) with q35, memfd RAM, pcie-root-port + vfio-user-pci, three 9p
shares (sysroot ro, the guest's part of the project ro, results rw), serial console to a
file and a QMP socket; wait for the guest's status file (written last, on the results share)
or for QEMU to end, bounded by one timeout table; then stop and clean up
everything that was started, whatever happened.  The verdict comes from the
status file and the results, never from QEMU's exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu_configs import image as image_mod
from teeio import options, paths
from teeio import personality as personalities

log = logging.getLogger(__name__)

# The folder holding the project's packages (the checkout, or site-packages when installed):
# the host-side processes run with it on PYTHONPATH.
PROJECT_DIR = paths.PACKAGES_DIR
CONFIG_FILE = Path(__file__).resolve().parent / "teeio-q35.cfg"
# What the guest needs from the project, shared read-only as /mnt/project (relative to
# PROJECT_DIR): the agent, the shared library, and the guest-run script.
GUEST_SHARE_ITEMS = ("guest_agent", "teeio", "qemu_configs/guest")
GUEST_SHARE_MAX_AGE = 24 * 3600   # seconds a share unused by any boot is kept in the cache

# One table bounds every wait (seconds).  TCG on 2 shared cores is the baseline.
TIMEOUTS: dict[str, float] = {
    "device_socket": 15,     # device server creates its socket
    "qmp_connect": 30,       # QEMU opens its QMP socket
    "run": 240,              # boot + guest workload until the status file appears
    "probe": 60,             # KVM probe boot
    "shutdown": 15,          # QEMU / device server exit after being asked
}


class LaunchError(RuntimeError):
    pass


@dataclass
class VmOptions:
    mode: str = "selftest"
    params: dict[str, str] = field(default_factory=dict)
    share_memory: bool = True
    memory_mb: int = 1024
    accel: str = "tcg"                 # tcg | kvm (kvm only if a probe boot works)
    interactive: bool = False
    device_verbose: bool = False
    workdir: Path | None = None
    keep_workdir: bool = False
    run_timeout: float | None = None
    device_args: list[str] = field(default_factory=list)   # extra teeio-device options
    # teeio-device --personality; nvme: its namespace file is in the work folder
    personality: str = "accelerator"
    nvme_size: str | None = None        # teeio-device --nvme-size (default its own)
    extra_qemu_args: list[str] = field(default_factory=list)   # appended to QEMU's argv
    # Called with the work folder once QEMU runs with the device realized (the guest is
    # booting): host-side work that runs beside the guest, e.g. the TSM attesting the device.
    on_running: Callable[[Path], None] | None = None
    # Called with the work folder once the device server is up, before QEMU starts: e.g.
    # the TSM connecting to the device and binding the VM (its launch secret must exist
    # before QEMU reads it from fw_cfg).
    before_qemu: Callable[[Path], None] | None = None


@dataclass
class RunResult:
    ok: bool
    status: str
    workdir: Path
    report: dict[str, Any] | None
    device_stats: dict[str, Any] | None
    qmp_pci: list[dict[str, Any]] | None
    console_log: Path
    reason: str = ""

    def text(self, name: str) -> str:
        path = self.workdir / "results" / name
        return path.read_text(errors="replace") if path.exists() else ""


def kvm_usable() -> bool:
    """A probe boot under KVM: /dev/kvm may exist and still fail on a stock kernel."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        res = run_vm(VmOptions(mode="probe", accel="kvm-probe", run_timeout=TIMEOUTS["probe"]))
    except LaunchError:
        return False
    return res.ok


def _guest_files(src: Path) -> list[tuple[str, Path]]:
    files = []
    for item in GUEST_SHARE_ITEMS:
        top = src / item
        if not top.is_dir():
            raise LaunchError(f"{top} is missing: the guest needs it")
        for path in top.rglob("*"):
            if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
                continue
            files.append((path.relative_to(src).as_posix(), path))
    return sorted(files)


def guest_share(src: Path = PROJECT_DIR) -> Path:
    """A folder holding only what the guest needs from the project (GUEST_SHARE_ITEMS),
    shared into it as /mnt/project: never the whole checkout or site-packages.

    It is a copy in the cache (``guest-share/<hash of the files>``; 9p does not follow
    host symlinks), made once per content and renamed into place whole, so concurrent
    boots share it; shares no boot used for a day are removed."""
    try:
        return _make_guest_share(src)
    except OSError as exc:
        raise LaunchError(f"the guest share in {paths.cache_root()}: "
                          f"{exc.strerror or exc}") from None


def _make_guest_share(src: Path) -> Path:
    files = _guest_files(src)
    h = hashlib.sha256()
    for rel, path in files:
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    base = paths.cache_root() / "guest-share"
    final = base / h.hexdigest()[:16]
    if not final.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
        try:
            for rel, path in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / rel)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:            # another boot made the same share meanwhile
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    os.utime(final)
    now = time.time()
    for old in base.iterdir():
        with contextlib.suppress(OSError):
            if old != final and now - old.stat().st_mtime > GUEST_SHARE_MAX_AGE:
                shutil.rmtree(old)
    return final


def qemu_argv(img: image_mod.GuestImage, opts: VmOptions, wd: Path, sock: Path,
              qmp: Path, accel: str, project: Path | None = None) -> list[str]:
    """QEMU's command line; *project* is the folder shared as /mnt/project (default:
    guest_share())."""
    kparams = ["console=ttyS0", "panic=-1", "rdinit=/init", "loglevel=4",
               f"teeio.mode={opts.mode}"]
    kparams += [f"teeio.{k}={v}" for k, v in opts.params.items()]
    device = {"driver": "vfio-user-pci", "id": "teeio0", "bus": "rp0",
              "socket": {"type": "unix", "path": str(sock)}}
    argv = img.qemu_argv0() + [
        "-readconfig", str(CONFIG_FILE),
        # memfd share=on: DMA_MAP carries fds the server can mmap.  Without sharing we use
        # plain anonymous RAM: QEMU then sends no fds and every DMA becomes a DMA_READ /
        # DMA_WRITE message.  (A memfd with share=off would still be passed as an fd,
        # but QEMU maps it privately, so the server would not see the guest's writes.)
        "-object", (f"memory-backend-memfd,id=mem,size={opts.memory_mb}M,share=on"
                    if opts.share_memory else f"memory-backend-ram,id=mem,size={opts.memory_mb}M"),
        "-m", f"{opts.memory_mb}M",
        "-accel", "kvm" if accel == "kvm" else "tcg",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(img.kernel), "-initrd", str(img.initramfs),
        "-append", " ".join(kparams),
        "-device", json.dumps(device),
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-no-reboot",
    ]
    if project is None:
        project = guest_share()
    for tag, path, ro in (("sysroot", img.sysroot, True), ("project", project, True),
                          ("results", wd / "results", False)):
        argv += ["-fsdev", f"local,id={tag},path={path},security_model=none"
                           f"{',readonly=on' if ro else ''}",
                 "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
    if opts.interactive:
        argv += ["-serial", "mon:stdio"]
    else:
        argv += ["-serial", f"file:{wd / 'console.log'}"]
    return argv + opts.extra_qemu_args


def _wait_for(pred: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
              interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class _LogWatch:
    """Spots QEMU's fatal accelerator errors early (a KVM that cannot run the guest)."""

    PATTERNS = ("KVM internal error", "emulation failure", "KVM: entry failed")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._found: str | None = None

    def fatal(self) -> str | None:
        if self._found is None and self.path.exists():
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                chunk = fh.read().decode(errors="replace")
            self._pos += len(chunk.encode(errors="replace"))
            for line in chunk.splitlines():
                if any(p in line for p in self.PATTERNS):
                    self._found = line.strip()[:200]
                    break
        return self._found


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def find_qdev(pci: list[dict[str, Any]], qdev_id: str) -> dict[str, Any] | None:
    todo: list[dict[str, Any]] = [d for bus in pci for d in bus.get("devices", [])]
    while todo:
        d = todo.pop()
        if d.get("qdev_id") == qdev_id:
            return d
        todo += d.get("pci_bridge", {}).get("devices", [])
    return None


def _qmp_query_pci(qmp_path: Path, qdev_id: str, timeout: float) -> list[dict[str, Any]]:
    """QEMU's own PCI view, once our device has been realized (QMP starts before it is)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + timeout
    mon = QEMUMonitorProtocol(str(qmp_path))
    while True:
        try:
            mon.connect()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        while True:
            out = mon.cmd("query-pci")
            pci = list(out) if isinstance(out, list) else []
            if find_qdev(pci, qdev_id) is not None or time.monotonic() > deadline:
                return pci
            time.sleep(0.1)
    finally:
        mon.close()


def personality_args(opts: VmOptions, wd: Path) -> list[str]:
    """teeio-device's options for *opts*' personality (none for the default)."""
    if opts.personality == personalities.DEFAULT:
        return []
    args = ["--personality", opts.personality]
    if opts.personality == personalities.NVME.name:
        args += ["--nvme-namespace", str(wd / "nvme-namespace.img")]
        if opts.nvme_size is not None:
            args += ["--nvme-size", opts.nvme_size]
    return args


def run_vm(opts: VmOptions) -> RunResult:
    img = image_mod.paths()
    if not image_mod.is_built():
        raise LaunchError("the guest image is not built: run 'make image'")
    accel = opts.accel
    if accel == "kvm" and not kvm_usable():
        log.warning("KVM requested but a probe boot failed: using TCG")
        accel = "tcg"
    elif accel == "kvm-probe":
        accel = "kvm"
    own_wd = opts.workdir is None
    wd = Path(tempfile.mkdtemp(prefix="teeio-vm-")) if own_wd else Path(opts.workdir)  # type: ignore[arg-type]
    (wd / "results").mkdir(parents=True, exist_ok=True)
    for stale in ("status", "report.json"):
        (wd / "results" / stale).unlink(missing_ok=True)
    sock, qmp, stats = wd / "vfio-user.sock", wd / "qmp.sock", wd / "device-stats.json"
    console = wd / "console.log"
    dev_proc: subprocess.Popen[bytes] | None = None
    qemu_proc: subprocess.Popen[bytes] | None = None
    qmp_pci: list[dict[str, Any]] | None = None
    reason = ""
    try:
        dev_cmd = [sys.executable, "-m", "vfio_user_dev", "--socket", str(sock),
                   "--stats-file", str(stats), "--max-clients", "1"]
        if opts.device_verbose:
            dev_cmd.append("-v")
        dev_cmd += personality_args(opts, wd) + opts.device_args
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR))
        with open(wd / "device.log", "wb") as devlog:
            dev_proc = subprocess.Popen(dev_cmd, stdout=devlog, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        _wait_for(sock.exists, TIMEOUTS["device_socket"], "the device server socket", dev_proc)
        if opts.before_qemu is not None:
            opts.before_qemu(wd)
        argv = qemu_argv(img, opts, wd, sock, qmp, accel)
        (wd / "qemu-cmdline.txt").write_text(shlex.join(argv) + "\n")
        if opts.interactive:
            qemu_proc = subprocess.Popen(argv)
            qemu_proc.wait()
        else:
            with open(wd / "qemu.log", "wb") as qlog:
                qemu_proc = subprocess.Popen(argv, stdout=qlog, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            _wait_for(qmp.exists, TIMEOUTS["qmp_connect"], "QEMU's QMP socket", qemu_proc)
            try:
                qmp_pci = _qmp_query_pci(qmp, "teeio0", TIMEOUTS["qmp_connect"])
            except Exception as exc:  # QMP is diagnostic here; the verdict is the status file
                log.warning("QMP query-pci failed: %s", exc)
            if opts.on_running is not None:
                opts.on_running(wd)
            status_file = wd / "results" / "status"
            watch = _LogWatch(wd / "qemu.log")
            try:
                qp = qemu_proc
                _wait_for(lambda: status_file.exists() or qp.poll() is not None
                          or watch.fatal() is not None,
                          opts.run_timeout or TIMEOUTS["run"], "the guest's status file")
            except LaunchError as exc:
                reason = str(exc)
            if watch.fatal() is not None:
                reason = f"QEMU reported: {watch.fatal()}"
            with contextlib.suppress(subprocess.TimeoutExpired):
                qemu_proc.wait(TIMEOUTS["shutdown"])
    except KeyboardInterrupt:
        reason = "interrupted"
        raise
    except LaunchError as exc:
        reason = str(exc)
    finally:
        _stop(qemu_proc, TIMEOUTS["shutdown"])
        _stop(dev_proc, TIMEOUTS["shutdown"])
        for path in (sock, qmp):
            path.unlink(missing_ok=True)
    status_path = wd / "results" / "status"
    status = status_path.read_text().strip() if status_path.exists() else "missing"
    report = None
    rp = wd / "results" / "report.json"
    if rp.exists():
        try:
            report = json.loads(rp.read_text())
        except json.JSONDecodeError as exc:
            reason = reason or f"report.json is not JSON: {exc}"
    dev_stats = json.loads(stats.read_text()) if stats.exists() else None
    if opts.interactive:  # the user ended the shell session; nothing to judge
        return RunResult(not reason, status, wd, report, dev_stats, qmp_pci, console, reason)
    ok = status == "ok" and not reason and (opts.mode in ("probe", "shell") or report is not None)
    if not ok and not reason:
        reason = f"guest status: {status}"
    result = RunResult(ok, status, wd, report, dev_stats, qmp_pci, console, reason)
    if not ok:
        log.error("guest run failed (%s); console log: %s", reason, console)
    elif own_wd and not opts.keep_workdir:
        pass  # callers read results first; they remove the folder with cleanup()
    return result


def cleanup(result: RunResult) -> None:
    shutil.rmtree(result.workdir, ignore_errors=True)


def guest_modes() -> list[str]:
    """The guest's modes (``teeio.mode=``): its init script's own (``shell``, ``sh``) and
    every ``guest_agent`` command."""
    from guest_agent.__main__ import build_parser
    commands: list[str] = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands += list(action.choices)
    return ["shell", "sh", *sorted(commands)]


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C: KeyboardInterrupt, so the same cleanup
    runs (QEMU, the device server, the TSM daemon, their sockets); once, quietly.  SIGINT is
    taken too: a process started in the background by a non-interactive shell inherits it
    ignored, and Ctrl-C (or ``kill -INT``) must still clean up."""
    def _interrupt(signum: int, _frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)       # the cleanup is not cut short
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _interrupt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-vm", description=__doc__)
    ap.add_argument("--mode", default="selftest", help="guest mode: selftest | shell | probe")
    ap.add_argument("--shell", action="store_true", help="boot to a root shell on this terminal")
    ap.add_argument("--param", action="append", default=[], metavar="K=V",
                    help="extra teeio.K=V kernel parameter for the guest agent")
    ap.add_argument("--no-share", action="store_true",
                    help="guest RAM share=off: every DMA goes through DMA_READ/DMA_WRITE messages")
    ap.add_argument("--kvm", action="store_true", help="use KVM if a probe boot works")
    ap.add_argument("--workdir", type=Path, help="keep logs and results here")
    ap.add_argument("-v", "--device-verbose", action="store_true",
                    help="log every vfio-user message in device.log")
    ap.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                    help="one more QEMU argument, appended to its command line (repeatable, "
                         "in order; write a leading dash with '=': --qemu-arg=-device "
                         "--qemu-arg=virtio-rng-pci)")
    ap.add_argument("--personality", choices=tuple(personalities.PERSONALITIES),
                    default=personalities.DEFAULT,
                    help="the device's personality (teeio-device --personality; default "
                         f"{personalities.DEFAULT}); nvme: the namespace file is "
                         "nvme-namespace.img in the work folder (docs/nvme.md)")
    ap.add_argument("--nvme-size", metavar="SIZE",
                    help="with --personality nvme: the namespace's size (e.g. 64M, 1G)")
    ap.add_argument("--guest-share", action="store_true",
                    help="make (if needed) and print the folder shared into the guest as "
                         "/mnt/project, then exit (e.g. for qemu_configs/libvirt/)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if ns.guest_share:
        try:
            print(guest_share())
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if ns.nvme_size is not None:
        if ns.personality != personalities.NVME.name:
            print("error: --nvme-size goes with --personality nvme", file=sys.stderr)
            return 2
        try:
            personalities.namespace_size(ns.nvme_size)
        except ValueError as exc:
            print(f"error: --nvme-size {exc}", file=sys.stderr)
            return 2
    bad = [kv for kv in ns.param if "=" not in kv]
    if bad:
        print(f"error: --param {bad[0]!r}: expected K=V", file=sys.stderr)
        return 2
    modes = guest_modes()
    if not ns.shell and ns.mode not in modes:
        print(f"error: --mode {ns.mode!r}: not a guest mode (one of {', '.join(modes)})",
              file=sys.stderr)
        return 2
    if ns.workdir is not None:
        try:
            options.usable_dir("--workdir", ns.workdir)
        except options.OptionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    interrupt_on_signals()
    params = dict(kv.split("=", 1) for kv in ns.param)
    opts = VmOptions(mode="shell" if ns.shell else ns.mode, params=params,
                     share_memory=not ns.no_share, accel="kvm" if ns.kvm else "tcg",
                     interactive=ns.shell, device_verbose=ns.device_verbose,
                     workdir=ns.workdir, keep_workdir=True, extra_qemu_args=ns.qemu_arg,
                     personality=ns.personality, nvme_size=ns.nvme_size)
    try:
        res = run_vm(opts)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: QEMU and the device server were stopped", file=sys.stderr)
        return 130
    print(json.dumps({"ok": res.ok, "status": res.status, "workdir": str(res.workdir),
                      "reason": res.reason}, indent=2))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
