"""``teeio-device``: serve the emulated TEE-IO device to a vfio-user client (QEMU)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from teeio import options
from teeio import personality as personalities
from teeio.doe_pcap import DoePcapWriter
from teeio.platform_channel import write_credential
from teeio.tlp import check_tlp_size
from teeio.transport import background
from vfio_user_dev import dsm, ide_host
from vfio_user_dev.doe_socket import DoeSocketServer
from vfio_user_dev.host_access import HostAccessServer
from vfio_user_dev.link.capture import CaptureWriter
from vfio_user_dev.link.interfaces import DEFAULT_MPS, DEFAULT_MRRS
from vfio_user_dev.nvme.namespace import Namespace
from vfio_user_dev.personality import PersonalityFactory
from vfio_user_dev.personality.accelerator import AcceleratorPersonality
from vfio_user_dev.personality.nvme import nvme_personality
from vfio_user_dev.platform import Platform
from vfio_user_dev.platform_ctl import PlatformControlServer
from vfio_user_dev.server import Server

if TYPE_CHECKING:
    from vfio_user_dev.libvfio_user import LibVfioUserServer

log = logging.getLogger("vfio_user_dev")


def write_stats(path: Path, device: Platform,
                server: Server | LibVfioUserServer) -> None:
    doc = {**device.stats(), "clients": server.clients}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _tlp_size(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return check_tlp_size(name, int(text, 0))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def check_options(ns: argparse.Namespace) -> None:
    """Every option that names a port, a file or a folder, checked before anything starts:
    :class:`~teeio.options.OptionError` names the first unusable one."""
    if ns.doe_tcp_port is not None:
        options.tcp_port("--doe-tcp-port", ns.doe_tcp_port)
    if ns.identity is not None:
        ident: Path = ns.identity
        # a provisioned identity is only read; a fresh one is written into the folder
        has_one = (ident / "chain.pem").is_file() and (ident / "device.key").is_file()
        options.usable_dir("--identity", ident, write=not has_one)
    for option, path in (("--platform-credential", ns.platform_credential),
                         ("--stats-file", ns.stats_file),
                         ("--link-capture", ns.link_capture),
                         ("--doe-capture", ns.doe_capture)):
        if path is not None:
            options.writable_file(option, path)
    for option, sock in (("--socket", ns.socket), ("--doe-socket", ns.doe_socket),
                         ("--platform-socket", ns.platform_socket),
                         ("--host-socket", ns.host_socket)):
        if sock is not None:
            options.writable_file(option, Path(sock))
    check_personality(ns)


def check_personality(ns: argparse.Namespace) -> None:
    """``--nvme-*`` only with ``--personality nvme``; the size a multiple of 512; the
    namespace file one that can be read and written (or made).  Sets ``ns.nvme_bytes``
    and ``ns.nvme_namespace``."""
    if ns.personality != personalities.NVME.name:
        for option, value in (("--nvme-namespace", ns.nvme_namespace),
                              ("--nvme-size", ns.nvme_size)):
            if value is not None:
                raise options.OptionError(f"{option} goes with --personality nvme")
        return
    size = ns.nvme_size or personalities.DEFAULT_NAMESPACE_SIZE
    try:
        ns.nvme_bytes = personalities.namespace_size(size)
    except ValueError as exc:
        raise options.OptionError(f"--nvme-size {exc}") from None
    if ns.nvme_namespace is None:
        ns.nvme_namespace = Path(ns.socket + ".nvme")
    path: Path = ns.nvme_namespace
    if path.exists():
        if not path.is_file():
            raise options.OptionError(f"--nvme-namespace {path}: not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise options.OptionError(f"--nvme-namespace {path}: cannot be read and written")
    else:
        options.writable_file("--nvme-namespace", path)


def make_personality(ns: argparse.Namespace) -> PersonalityFactory:
    """The personality's factory, its namespace opened (created sparse if missing);
    OSError if the file cannot be."""
    if ns.personality != personalities.NVME.name:
        return AcceleratorPersonality
    namespace = Namespace(ns.nvme_namespace, ns.nvme_bytes)
    log.info("NVMe namespace %s: %d bytes (%d blocks of %d)", namespace.path, namespace.size,
             namespace.blocks, namespace.block)
    return nvme_personality(namespace)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-device", description=__doc__)
    ap.add_argument("--socket", required=True, help="UNIX socket path for the vfio-user client")
    ap.add_argument("--personality", choices=tuple(personalities.PERSONALITIES),
                    default=personalities.DEFAULT,
                    help="what the function is behind its TDISP, IDE and DOE machinery: "
                         "the accelerator (default: BAR0 registers and a DMA engine) or an "
                         "NVMe 1.4 controller (class 01:08:02; see docs/nvme.md)")
    ap.add_argument("--nvme-namespace", type=Path, metavar="PATH",
                    help="--personality nvme: the namespace's backing file, created sparse "
                         "if missing (default: the --socket path with .nvme added)")
    ap.add_argument("--nvme-size", metavar="SIZE",
                    help=f"--personality nvme: the namespace's size, e.g. 64M, 1G (a "
                         f"multiple of 512 bytes; default "
                         f"{personalities.DEFAULT_NAMESPACE_SIZE}); a larger file is used "
                         f"up to this size")
    ap.add_argument("--backend", choices=("python", "libvfio-user"), default="python",
                    help="vfio-user transport: the pure-Python server (default), or "
                         "libvfio-user through ctypes (libvfio-user.so.0 from "
                         "$TEEIO_LIBVFIO_USER or the loader's search path)")
    ap.add_argument("--libvfio-user-socket-dma", action="store_true",
                    help="libvfio-user backend: reach guest memory without an fd (QEMU "
                         "without share=on) with DMA_READ/DMA_WRITE messages. Refused by "
                         "default (the job ends with FAULT): the library takes a client "
                         "command sent while such a request is outstanding for its reply, "
                         "which desynchronises the connection (libvfio-user's issue 279); "
                         "use this only if you accept that risk")
    ap.add_argument("--stats-file", type=Path,
                    help="keep device counters (DMA jobs, bytes, interrupts) in this JSON file")
    ap.add_argument("--max-clients", type=int, default=None,
                    help="exit after this many client sessions (default: serve forever)")
    ap.add_argument("--doe-socket", metavar="PATH",
                    help="serve the device's DOE mailbox to host tools (the TSM) on this UNIX "
                         "socket, in the DMTF spdm-emu platform socket framing (PCI_DOE)")
    ap.add_argument("--doe-tcp-port", type=int, metavar="N",
                    help="the same DOE transport on TCP 127.0.0.1:N (spdm-emu uses 2323)")
    ap.add_argument("--doe-exit-on-shutdown", action="store_true",
                    help="a SHUTDOWN on the DOE socket ends the device server "
                         "(as spdm_responder_emu does); by default the listener stays")
    ap.add_argument("--identity", type=Path, metavar="DIR",
                    help="device identity directory (chain.pem, device.key, trust-anchor.pem "
                         "as teeio-provision writes them; a fresh P-384 identity is "
                         "provisioned into DIR if it has none); enables the SPDM responder "
                         "on DOE 0001:01 and 0001:02")
    ap.add_argument("--firmware", type=Path, metavar="ELF",
                    help="firmware image the device loads and measures (default: "
                         "out/firmware/teeio-fw.elf in a checkout, else the user's cache "
                         "(teeio-firmware prints it); built if missing)")
    ap.add_argument("--platform-socket", metavar="PATH",
                    help="platform control socket: the TSM programs root-port IDE keys and "
                         "trusted-DMA windows and reads link status here (needs "
                         "--platform-credential)")
    ap.add_argument("--platform-credential", type=Path, metavar="FILE",
                    help="write the platform control credential (a fresh random token) to "
                         "FILE, mode 0600, for the TSM")
    ap.add_argument("--heartbeat-period", type=int, default=dsm.DEFAULT_HEARTBEAT_PERIOD,
                    metavar="SECONDS",
                    help=f"SPDM HeartbeatPeriod the device advertises (0..255, 0 = off; "
                         f"default {dsm.DEFAULT_HEARTBEAT_PERIOD}): a secured session silent for "
                         f"more than twice this is terminated (its IDE keys invalidated, the "
                         f"TDI it locked to ERROR)")
    ap.add_argument("--host-socket", metavar="PATH",
                    help="the untrusted host's own access to the function (config space, "
                         "BARs as T=0, FLR, firmware update, link faults) on this UNIX "
                         "socket, no credential (python -m vfio_user_dev.host_access)")
    ap.add_argument("--mps", type=_tlp_size("Max_Payload_Size"), default=DEFAULT_MPS,
                    metavar="BYTES", help=f"Max_Payload_Size Supported in Device "
                                          f"Capabilities (128..4096, a power of two; default "
                                          f"{DEFAULT_MPS}): the link splits DMA writes and "
                                          f"read completions by the Max_Payload_Size the guest "
                                          f"programs in Device Control, never above this")
    ap.add_argument("--mrrs", type=_tlp_size("Max_Read_Request_Size"), default=DEFAULT_MRRS,
                    metavar="BYTES", help=f"Max_Read_Request_Size in Device Control after "
                                          f"reset (default {DEFAULT_MRRS}): DMA reads are "
                                          f"split by the value the guest programs there")
    ap.add_argument("--link-capture", type=Path, metavar="FILE",
                    help="write every TLP that crosses the link to FILE (pcap, link type "
                         "USER0; list it with python -m vfio_user_dev.link FILE)")
    ap.add_argument("--doe-capture", type=Path, metavar="FILE",
                    help="write every DOE object the device receives and sends (config-space "
                         "mailbox and DOE sockets) to FILE as a pcap of link type 292 "
                         "PCI_DOE, the form DMTF spdm_dump -r FILE decodes")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="-v logs every vfio-user message (direction, command, id, size) "
                         "and DOE object")
    ap.add_argument(background.FLAG, action="store_true",
                    help="run in the background: return once every socket listens "
                         "(prints the pid), the log going to --log")
    ap.add_argument("--log", type=Path, metavar="FILE",
                    help="with --background: where the log goes (default: the --socket "
                         "path with .log added)")
    ns = ap.parse_args(argv)
    if ns.background:
        return background.start("teeio-device",
                                ["-m", "vfio_user_dev", *(sys.argv[1:] if argv is None
                                                          else argv)],
                                ns.log or Path(ns.socket + ".log"))
    if (ns.platform_socket is None) != (ns.platform_credential is None):
        ap.error("--platform-socket and --platform-credential go together")
    if ns.libvfio_user_socket_dma and ns.backend != "libvfio-user":
        ap.error("--libvfio-user-socket-dma goes with --backend libvfio-user")
    if not 0 <= ns.heartbeat_period <= dsm.MAX_HEARTBEAT_PERIOD:
        ap.error(f"--heartbeat-period must be 0..{dsm.MAX_HEARTBEAT_PERIOD} seconds")
    try:
        check_options(ns)        # before anything is started
    except options.OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lib: Any = None
    if ns.backend == "libvfio-user":
        from vfio_user_dev import libvfio_user
        try:
            lib = libvfio_user.load()
        except libvfio_user.LibraryMissing as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        security = dsm.from_options(ns.identity, ns.firmware, ns.heartbeat_period)
    except dsm.DsmSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        personality = make_personality(ns)
    except OSError as exc:
        print(f"error: --nvme-namespace {ns.nvme_namespace}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    try:
        capture = CaptureWriter(ns.link_capture) if ns.link_capture else None
        doe_capture = DoePcapWriter(ns.doe_capture) if ns.doe_capture else None
    except OSError as exc:
        print(f"error: capture file {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    machine = Platform(mps=ns.mps, mrrs=ns.mrrs, capture=capture, personality=personality)
    device = machine.device
    if doe_capture is not None:
        device.doe.tap = doe_capture.write   # both paths: the mailbox and the DOE sockets
        log.info("DOE capture (pcap, PCI_DOE) to %s", doe_capture.path)
    if security is not None:
        # SPDM on DOE, and IDE_KM over the device's IDE capability (keys, stream state).
        # TDISP for the function as its one TDI: the device follows its transitions and
        # reports the security events (config writes, FLR, its bound stream) to it.
        security.attach(device.doe, device.ide, requester_id=device.link_end.requester_id,
                        tdi=device)
        security.start_watchdog()
    # The DOE sockets listen before the vfio-user socket appears (which launchers wait for).
    doe_servers: list[DoeSocketServer] = []
    platform: PlatformControlServer | None = None
    host_access: HostAccessServer | None = None

    def shut_down() -> None:
        """Close every server, the DSM, the platform and the capture (in that order)."""
        for doe in doe_servers:
            doe.close()
        if platform is not None:
            platform.close()
        if host_access is not None:
            host_access.close()
        if security is not None:
            security.close()
        machine.close()
        if doe_capture is not None:
            doe_capture.close()

    for path, port in ((ns.doe_socket, None), (None, ns.doe_tcp_port)):
        if path is None and port is None:
            continue
        try:
            doe_servers.append(DoeSocketServer(device.doe, path=path, port=port,
                                               exit_on_shutdown=ns.doe_exit_on_shutdown))
        except OSError as exc:   # e.g. a file that is not a socket at the path: kept
            flag = "--doe-socket" if path is not None else "--doe-tcp-port"
            print(f"error: {flag} {path or port}: {exc.strerror or exc}", file=sys.stderr)
            shut_down()
            return 1
    if ns.platform_socket is not None:
        try:
            token = write_credential(ns.platform_credential)
        except OSError as exc:
            print(f"error: --platform-credential {ns.platform_credential}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            shut_down()
            return 1
        platform = PlatformControlServer(ns.platform_socket, token, machine.root_port,
                                         machine.link)
        ide_host.register(platform, device)   # the host's IDE register writes, for now
        platform.start()
        log.info("platform control credential written to %s", ns.platform_credential)
    if ns.host_socket is not None:
        host_access = HostAccessServer(ns.host_socket, machine)
        host_access.start()
    server: Server | LibVfioUserServer
    try:
        if lib is not None:
            from vfio_user_dev.libvfio_user import LibVfioUserServer
            server = LibVfioUserServer(ns.socket, machine, lib,
                                       socket_dma=ns.libvfio_user_socket_dma)
        else:
            server = Server(ns.socket, machine)
    except OSError as exc:
        print(f"error: --socket {ns.socket}: {exc.strerror or exc}", file=sys.stderr)
        shut_down()
        return 1
    for doe in doe_servers:
        doe.on_shutdown = server.close
        doe.start()
    if ns.stats_file:
        lock = threading.Lock()

        def on_change(_dev: object) -> None:
            with lock:
                write_stats(ns.stats_file, machine, server)

        try:
            write_stats(ns.stats_file, machine, server)
        except OSError as exc:
            print(f"error: --stats-file {ns.stats_file}: {exc.strerror or exc}",
                  file=sys.stderr)
            server.close()       # removes its socket
            shut_down()
            return 1
        device.listeners.append(on_change)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        server.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    background.notify_ready()              # every socket listens (--background)
    try:
        server.serve_forever(max_clients=ns.max_clients)
    finally:
        if ns.stats_file:
            write_stats(ns.stats_file, machine, server)
        shut_down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
