"""The TSM daemon's journal: ``STATE_DIR/journal.jsonl``, append-only, fsynced JSON lines.

It lets a restarted TSM know every device, stream, TDI and VM it had, and holds no
plaintext keys (docs/design.md, "Trust model / Restart").  The replay rules and the record
types are in docs/tdisp-and-tsm.md, "The journal, record by record".
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
#: A field whose name contains one of these (case-insensitive) could be key material: refused.
FORBIDDEN_PARTS = ("secret", "key", "nonce", "token", "psk", "credential")
#: ... except these, which hold a file's path (the material stays in the file).
PATH_FIELDS = frozenset({"platform_credential", "secret_file", "trust_anchor"})


def forbidden_field(name: str) -> bool:
    """True if a journal record may not carry a field called *name*."""
    lower = name.lower()
    return name not in PATH_FIELDS and any(part in lower for part in FORBIDDEN_PARTS)


class JournalError(Exception):
    """The journal cannot be read or written; the message is the one-line reason."""


#: How deeply a record's JSON may nest (objects and arrays): the daemon writes flat records.
MAX_DEPTH = 8


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a journal holds")


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:32]} is not finite")
    return value


def _depth(data: bytes) -> int:
    """How deeply *data*'s JSON arrays and objects nest (brackets inside strings skipped),
    counted before decoding so a deep line never reaches the recursive decoder."""
    depth = deepest = 0
    in_str = escaped = False
    for byte in data:
        if in_str:
            if escaped:
                escaped = False
            elif byte == 0x5C:          # backslash
                escaped = True
            elif byte == 0x22:          # quote
                in_str = False
        elif byte == 0x22:
            in_str = True
        elif byte in (0x5B, 0x7B):      # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def decode_record(line: bytes) -> dict[str, Any]:
    """One journal line → its record; ValueError (one line) if it is not one: not JSON,
    not an object with a string ``type``, a non-finite number (``NaN``, ``Infinity``,
    ``1e400``) or nesting deeper than :data:`MAX_DEPTH`."""
    if _depth(line) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        rec = json.loads(line, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
        raise ValueError("not a record object")
    return rec


def _fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every whole record of the journal at *path* (the file itself is not followed if it
    is a symlink), and the byte length of the good prefix (shorter than the file when the
    last line is torn).  A missing file is empty.  Record *i* (from 0) is line *i* + 1."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise JournalError(f"journal {path}: {exc.strerror or exc}") from None
    try:
        data = _read_all(fd)
    except OSError as exc:
        raise JournalError(f"journal {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return parse_records(data, path)


def parse_records(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """:func:`read_records` of the journal's bytes *data*; every error names its line."""
    records: list[dict[str, Any]] = []
    good = 0
    lines = data.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        last = lineno == len(lines)          # after the final newline: b"" or a torn tail
        if last and not line:
            break
        try:
            rec = decode_record(line)
        except ValueError as exc:      # UnicodeDecodeError is one
            if last:   # no newline after it: a write that a crash cut short
                log.warning("journal %s: ignoring a torn last line (%d bytes)", path,
                            len(line))
                break
            raise JournalError(f"journal {path}: line {lineno} is corrupt "
                               f"({str(exc)[:200]})") from None
        if last:
            log.warning("journal %s: ignoring a last record without its newline", path)
            break
        records.append(rec)
        good += len(line) + 1
    return records, good


class Journal:
    """The append side.  :meth:`open` replays first: ``Journal.open(dir)`` returns the
    journal and the records found."""

    def __init__(self, path: Path, fd: int, next_seq: int) -> None:
        self.path = path
        self._fd = fd
        self._seq = next_seq
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, seq={self._seq})"

    @classmethod
    def open(cls, state_dir: Path) -> tuple[Journal, list[dict[str, Any]]]:
        """Open (or create) the journal in *state_dir*: the directory is opened once and the
        file through it with ``O_NOFOLLOW``, read from the same descriptor it is appended
        to, so it is never resolved by path again."""
        path = state_dir / JOURNAL_NAME
        try:
            dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise JournalError(f"journal {path}: {exc.strerror or exc}") from None
        fd = -1
        try:
            flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(JOURNAL_NAME, flags | os.O_CREAT | os.O_EXCL, 0o600,
                             dir_fd=dir_fd)
                created = True
            except FileExistsError:
                fd = os.open(JOURNAL_NAME, flags, dir_fd=dir_fd)
                created = False
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise JournalError(f"journal {path}: not a regular file")
            records, good = parse_records(_read_all(fd), path)
            if os.fstat(fd).st_size != good:      # cut a torn tail before appending
                os.ftruncate(fd, good)
                os.fsync(fd)
            if created:
                os.fsync(fd)
                _fsync_dir(dir_fd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            raise JournalError(f"journal {path}: {exc.strerror or exc}") from None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            os.close(dir_fd)
        seqs = [r["seq"] for r in records if isinstance(r.get("seq"), int)]
        return cls(path, fd, max(seqs, default=0) + 1), records

    def read(self) -> list[dict[str, Any]]:
        """Every record written so far, read through the open file (``history``)."""
        with self._lock:
            try:
                data = _read_all(self._fd)
            except OSError as exc:
                raise JournalError(f"journal {self.path}: {exc.strerror or exc}") from None
        return parse_records(data, self.path)[0]

    def append(self, rtype: str, **fields: Any) -> dict[str, Any]:
        """Write one record durably (fsynced before this returns) and return it."""
        bad = sorted(name for name in fields if forbidden_field(name))
        if bad:
            raise ValueError(f"journal record {rtype!r} may not carry {bad}")
        with self._lock:
            rec = {"seq": self._seq, "time": round(time.time(), 3), "type": rtype, **fields}
            line = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
            try:
                os.write(self._fd, line)
                os.fsync(self._fd)
            except OSError as exc:
                raise JournalError(f"journal {self.path}: {exc.strerror or exc}") from None
            self._seq += 1
        return rec

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


__all__ = ["FORBIDDEN_PARTS", "JOURNAL_NAME", "MAX_DEPTH", "PATH_FIELDS", "Journal",
           "JournalError", "decode_record", "forbidden_field", "parse_records", "read_records"]
