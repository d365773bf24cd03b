"""The TSM daemon's journal: ``STATE_DIR/journal.jsonl``, append-only JSON lines.

docs/design.md "Trust model / Restart": the journal lets a restarted TSM know every device,
stream, TDI and VM it had, and it holds **no plaintext keys**.  So:

* one JSON object per line, ``{"seq": n, "time": unix_seconds, "type": T, ...}``;
* every append is written with one ``write`` and ``fsync``ed before it returns; creating
  the file also fsyncs its directory, so the file itself survives a crash;
* a torn last line (a crash in the middle of a write: no newline, or not JSON) is
  tolerated on replay and cut off before the next append; a bad line anywhere else is
  corruption and refuses the replay (:class:`JournalError`), since silently skipping a
  record could forget a TDI or a window;
* a record may not carry a field whose name says it is secret material: a name that
  *contains* one of :data:`FORBIDDEN_PARTS` (``secret``, ``key``, ``nonce``, ...; so
  ``session_key`` or ``start_nonce`` too), except the few fields that hold a *path*
  (:data:`PATH_FIELDS`).  VMs are journaled with the path of their secret file, and
  sessions by their id only.  This is a guard, not the only line of defence: callers pass
  paths, ids and states, never bytes.

Record types (``type``) and their fields, written by :mod:`tsm.daemon`:

=================  ==========================================================================
``daemon_start``   ``boot_id``, ``pid``
``device``         ``device``, ``doe_socket`` | ``doe_tcp_port`` + ``host``, ``trust_anchor``,
                   ``reference_values``, ``platform_socket``, ``platform_credential`` (path),
                   ``stream_id``, ``block``
``device_removed`` ``device``
``session``        ``device``, ``session_id`` (``"0x…"``, or null when the session ended),
                   ``reason``
``stream``         ``device``, ``stream_id``, ``state`` (``secure``/``insecure``),
                   ``requester_id``, ``reason``
``vm``             ``vm``, ``device``, ``ghcx_socket``, ``secret_file`` (path),
                   ``mmio_reporting_offset``
``vm_removed``     ``vm``
``tdi``            ``device``, ``state``, ``lock_epoch``, ``vm``, ``reason``, ``source``
                   (``tsm`` or ``device``: what the device itself reported)
``mmio_private``   ``device``, ``enabled``
``window``         ``window_id``, ``vm``, ``device``, ``base``, ``size``, ``access``
``window_revoked`` ``window_id``, ``reason``
=================  ==========================================================================
"""

from __future__ import annotations

import json
import logging
import os
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every whole record of the journal at *path*, and the byte length of the good prefix
    (shorter than the file when the last line is torn).  A missing file is empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise JournalError(f"journal {path}: {exc.strerror or exc}") from None
    records: list[dict[str, Any]] = []
    good = 0
    lines = data.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        last = lineno == len(lines)          # after the final newline: b"" or a torn tail
        if last and not line:
            break
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
                raise ValueError("not a record object")
        except (ValueError, UnicodeDecodeError) as exc:
            if last:   # no newline after it: a write that a crash cut short
                log.warning("journal %s: ignoring a torn last line (%d bytes)", path,
                            len(line))
                break
            raise JournalError(f"journal {path}: line {lineno} is corrupt ({exc})") from None
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
        path = state_dir / JOURNAL_NAME
        records, good = read_records(path)
        created = not path.exists()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise JournalError(f"journal {path}: {exc.strerror or exc}") from None
        try:
            if os.fstat(fd).st_size != good:      # cut a torn tail before appending
                os.ftruncate(fd, good)
                os.fsync(fd)
            if created:
                os.fsync(fd)
                _fsync_dir(state_dir)
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"journal {path}: {exc.strerror or exc}") from None
        seqs = [r["seq"] for r in records if isinstance(r.get("seq"), int)]
        return cls(path, fd, max(seqs, default=0) + 1), records

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


__all__ = ["FORBIDDEN_PARTS", "JOURNAL_NAME", "PATH_FIELDS", "Journal", "JournalError",
           "forbidden_field", "read_records"]
