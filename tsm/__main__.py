"""``teeio-tsm``: the host TSM's command line.

    teeio-tsm attest ...    attest a device over DOE (see tsm/attest.py)
    teeio-tsm ide CMD ...   key, refresh, tear down, report an IDE stream (tsm/ide.py)
    teeio-tsm tdisp demo    lock, report, start, stop the device's TDI (tsm/tdisp.py)
    teeio-tsm daemon ...    the persistent TSM: sessions, TDIs, GHCx per VM (tsm/daemon.py)
    teeio-tsm ctl OP ...    drive the daemon: connect, bind, lock, stop, status... (tsm/ctl.py)
    teeio-tsm status        the daemon's status (``ctl status``)

Only the chosen command's module is imported (its options are added on dispatch), so a
command pays for its own imports alone: ``attest`` never loads the daemon, the control
API or the GHCx server.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
import threading
from types import ModuleType

#: Command -> its one-line help, in the order ``teeio-tsm --help`` lists them.
COMMANDS = {
    "attest": "attest a device over its DOE transport (SPDM)",
    "ide": "a Selective IDE stream: device (IDE_KM) and root port",
    "tdisp": "TDISP for the device's TDI, over an IDE stream",
    "daemon": "run the TSM daemon in the foreground (logs to stderr)",
    "ctl": "send one request to the TSM daemon",
    "status": "the TSM daemon's status (ctl status)",
}


_freeze_at_exit = False      # atexit.register(gc.freeze) done


def load(command: str) -> ModuleType:
    """The module implementing *command*, imported now."""
    if command == "attest":
        from tsm import attest
        return attest
    if command == "ide":
        from tsm import ide_cli
        return ide_cli
    if command == "tdisp":
        from tsm import tdisp
        return tdisp
    if command == "daemon":
        from tsm import daemon
        return daemon
    if command in ("ctl", "status"):
        from tsm import ctl
        return ctl
    raise KeyError(command)


def chosen_command(argv: list[str]) -> str | None:
    """The command *argv* names: its first word that is not an option (the top-level
    parser has no option taking a value), if it is one of :data:`COMMANDS`."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def terminal_columns() -> int:
    """The width ``shutil.get_terminal_size().columns`` gives ($COLUMNS, else the
    terminal's, else 80), without importing shutil and its compression modules."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's own, its default width taken from :func:`terminal_columns` (argparse
    makes one for every option it adds)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_columns() - 2 if width is None else width)


def parser(command: str | None) -> argparse.ArgumentParser:
    """Every command listed (*command* None: the top-level help or a usage error), else
    only *command*'s parser, with its options: the others are never looked at then."""
    ap = argparse.ArgumentParser(prog="teeio-tsm", description="The host TSM.",
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if command is not None and name != command:
            continue
        p = sub.add_parser(name, help=help_text, formatter_class=HelpFormatter)
        if name != command:
            continue
        mod = load(name)
        if name == "status":
            mod.add_socket_arguments(p)
            mod.add_status_arguments(p)
        else:
            p.description = (mod.__doc__ or "").split("\n\n")[0]
            mod.add_arguments(p)
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="log to stderr (-v: progress, -vv: every SPDM message in hex)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """The program (*argv* None: ``sys.argv``, and a one-shot command ends the process
    itself, see :func:`end_process`), or one command for a caller (*argv* given)."""
    # A one-shot command is a short process that frees everything at exit: the cyclic
    # collector's passes over its start-up objects (modules, classes) are pure cost there.
    # The daemon runs with it; so does the caller once main returns.  At interpreter exit
    # the final collections would traverse every object the process made (~20 ms for
    # attest): frozen first, they are left to the OS (atexit runs before them).
    global _freeze_at_exit
    if not _freeze_at_exit:
        _freeze_at_exit = True
        atexit.register(gc.freeze)
    collecting = gc.isenabled()
    gc.disable()
    args = sys.argv[1:] if argv is None else argv
    try:
        code = _main(args, argv, collecting)
    except SystemExit as stop:          # argparse: --help, or a usage error
        if argv is not None or not (stop.code is None or isinstance(stop.code, int)):
            raise
        code = stop.code or 0
    finally:
        if collecting:
            gc.enable()
    if argv is None and chosen_command(args) != "daemon":
        end_process(code)
    return code


def end_process(code: int) -> None:
    """Exit with *code* as the interpreter would (atexit handlers, logging's flush among
    them, then the standard streams flushed), without its teardown of every module and
    object (~8 ms for ``attest``), which the OS does anyway.  Returns instead when that
    cannot be done safely: another thread still runs, a stream cannot be flushed, or this
    Python has no ``atexit._run_exitfuncs``."""
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None or threading.active_count() > 1:
        return
    run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return                          # the interpreter's own exit reports it
    os._exit(code)


def _main(args: list[str], argv: list[str] | None, collecting: bool) -> int:
    ap = parser(chosen_command(args))
    ns = ap.parse_args(args)
    level = {0: logging.WARNING, 1: logging.INFO}.get(ns.verbose, logging.DEBUG)
    if ns.command == "daemon":
        level = min(level, logging.INFO)      # a daemon tells what it does
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    mod = load(ns.command)
    if ns.command == "daemon":
        if collecting:
            gc.enable()
        return int(mod.run_command(ns, argv))
    if ns.command == "status":
        ns.ctl_op = "status"
    return int(mod.run_command(ns))


if __name__ == "__main__":
    sys.exit(main())
