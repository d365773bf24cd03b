"""Journal reading (``tsm.journal.read_records``) of arbitrary file contents: JournalError
or whole records, each an object with a string ``type``, and a good prefix that ends on a
line boundary within the file."""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

from fuzz.runner import check
from tsm.journal import JournalError, read_records

KIND = "decoder"


@lru_cache(maxsize=1)
def path() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-journal-")) / "journal.jsonl"


def seeds() -> list[bytes]:
    recs = [{"seq": 1, "time": 1.0, "type": "daemon_start", "boot_id": "00", "pid": 1},
            {"seq": 2, "type": "device", "device": "dev0", "doe_socket": "/x"},
            {"seq": 3, "type": "tdi", "device": "dev0", "state": "RUN", "lock_epoch": 1}]
    text = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    return [text, text + b'{"seq": 4, "ty', text[:-1]]


def one_input(data: bytes) -> None:
    p = path()
    p.write_bytes(data)
    try:
        records, good = read_records(p)
    except JournalError:
        return
    check(0 <= good <= len(data), f"good prefix {good} of {len(data)} bytes")
    check(good == 0 or data[good - 1:good] == b"\n", "good prefix ends inside a line")
    for rec in records:
        check(isinstance(rec, dict) and isinstance(rec.get("type"), str), f"record {rec!r}")
