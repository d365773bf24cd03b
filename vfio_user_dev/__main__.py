"""``teeio-device``: serve the emulated TEE-IO device to a vfio-user client (QEMU)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.server import Server

log = logging.getLogger("vfio_user_dev")


def write_stats(path: Path, device: TeeIoDevice, server: Server) -> None:
    doc = {**device.stats(), "clients": server.clients}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-device", description=__doc__)
    ap.add_argument("--socket", required=True, help="UNIX socket path for the vfio-user client")
    ap.add_argument("--stats-file", type=Path,
                    help="keep device counters (DMA jobs, bytes, interrupts) in this JSON file")
    ap.add_argument("--max-clients", type=int, default=None,
                    help="exit after this many client sessions (default: serve forever)")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="-v logs every vfio-user message (direction, command, id, size)")
    ns = ap.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = TeeIoDevice()
    server = Server(ns.socket, device)
    if ns.stats_file:
        lock = threading.Lock()

        def on_change(_dev: TeeIoDevice) -> None:
            with lock:
                write_stats(ns.stats_file, device, server)

        device.listeners.append(on_change)
        write_stats(ns.stats_file, device, server)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        server.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(max_clients=ns.max_clients)
    finally:
        if ns.stats_file:
            write_stats(ns.stats_file, device, server)
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
