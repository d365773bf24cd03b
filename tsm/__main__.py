"""``teeio-tsm``: the host TSM's command line.

    teeio-tsm attest ...    attest a device over DOE (see tsm/attest.py)
    teeio-tsm ide CMD ...   key, refresh, tear down, report an IDE stream (tsm/ide.py)
    teeio-tsm tdisp demo    lock, report, start, stop the device's TDI (tsm/tdisp.py)
    teeio-tsm daemon ...    the persistent TSM: sessions, TDIs, GHCx per VM (tsm/daemon.py)
    teeio-tsm ctl OP ...    drive the daemon: connect, bind, lock, stop, status... (tsm/ctl.py)
    teeio-tsm status        the daemon's status (``ctl status``)
"""

from __future__ import annotations

import argparse
import logging
import sys

from tsm import attest, ctl, daemon, tdisp
from tsm import ide_cli as ide


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-tsm", description="The host TSM.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    att = sub.add_parser("attest", help="attest a device over its DOE transport (SPDM)",
                         description=(attest.__doc__ or "").split("\n\n")[0])
    attest.add_arguments(att)
    idep = sub.add_parser("ide", help="a Selective IDE stream: device (IDE_KM) and root port",
                          description=(ide.__doc__ or "").split("\n\n")[0])
    ide.add_arguments(idep)
    tdp = sub.add_parser("tdisp", help="TDISP for the device's TDI, over an IDE stream",
                         description=(tdisp.__doc__ or "").split("\n\n")[0])
    tdisp.add_arguments(tdp)
    dmn = sub.add_parser("daemon", help="run the TSM daemon in the foreground (logs to stderr)",
                         description=(daemon.__doc__ or "").split("\n\n")[0])
    daemon.add_arguments(dmn)
    ctlp = sub.add_parser("ctl", help="send one request to the TSM daemon",
                          description=(ctl.__doc__ or "").split("\n\n")[0])
    ctl.add_arguments(ctlp)
    stp = sub.add_parser("status", help="the TSM daemon's status (ctl status)")
    ctl.add_socket_arguments(stp)
    ctl.add_status_arguments(stp)
    for p in (att, idep, tdp, dmn, ctlp, stp):
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="log to stderr (-v: progress, -vv: every SPDM message in hex)")
    ns = ap.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(ns.verbose, logging.DEBUG)
    if ns.command == "daemon":
        level = min(level, logging.INFO)      # a daemon tells what it does
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if ns.command == "attest":
        return attest.run_command(ns)
    if ns.command == "ide":
        return ide.run_command(ns)
    if ns.command == "tdisp":
        return tdisp.run_command(ns)
    if ns.command == "daemon":
        return daemon.run_command(ns, argv)
    if ns.command == "ctl":
        return ctl.run_command(ns)
    if ns.command == "status":
        ns.ctl_op = "status"
        return ctl.run_command(ns)
    ap.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
