"""Checks of command-line options that name files, folders and ports, run before a CLI
starts anything, so a bad option fails at once in one line that names it (the CLIs print
:class:`OptionError`'s message and exit non-zero, without a traceback)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class OptionError(Exception):
    """An unusable option; the message is the one line to print."""


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _writable_folder(option: str, path: Path, folder: Path) -> None:
    if not folder.exists():
        raise OptionError(f"{option} {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OptionError(f"{option} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: folder {folder} is not writable")


def writable_file(option: str, path: Path) -> None:
    """*path* can be written: not a folder, in an existing, writable folder."""
    if path.is_dir():
        raise OptionError(f"{option} {path}: is a folder, not a file")
    _writable_folder(option, path, _folder_of(path))


def usable_dir(option: str, path: Path, *, write: bool = True) -> None:
    """*path* is a folder (or can be made in an existing, writable folder) and, with
    *write*, is writable."""
    if path.exists():
        if not path.is_dir():
            raise OptionError(f"{option} {path}: is not a folder")
        if write and not os.access(path, os.W_OK | os.X_OK):
            raise OptionError(f"{option} {path}: folder is not writable")
        return
    _writable_folder(option, path, _folder_of(path))


def tcp_port(option: str, port: int, host: str = "127.0.0.1") -> None:
    """*port* is 1..65535 and free on *host* now."""
    if not 1 <= port <= 65535:
        raise OptionError(f"{option} {port}: not a TCP port (1..65535)")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError as exc:
        why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise OptionError(f"{option} {port}: {host}:{port} {why}") from None
    finally:
        s.close()


def os_error(what: str, exc: OSError) -> str:
    """One line for *exc*, naming *what* and the file it concerns."""
    name = exc.filename if exc.filename is not None else what
    return f"{what}: {name}: {exc.strerror or exc}" if name != what else \
        f"{what}: {exc.strerror or exc}"


__all__ = ["OptionError", "os_error", "tcp_port", "usable_dir", "writable_file"]
