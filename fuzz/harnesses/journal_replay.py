"""The TSM daemon's start on an arbitrary journal (``Daemon(state_dir)``: ``Journal.open``
then ``_apply`` of every record): JournalError, or a daemon whose tables hold what the
records said; nothing is connected."""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from tsm.daemon import Daemon
from tsm.journal import JOURNAL_NAME, JournalError

KIND = "responder"


@lru_cache(maxsize=1)
def base() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-replay-"))


def seeds() -> list[bytes]:
    recs = [
        {"seq": 1, "type": "daemon_start", "boot_id": "00", "pid": 1},
        {"seq": 2, "type": "device", "device": "dev0", "doe_socket": "/nonexistent/doe.sock",
         "platform_socket": "/nonexistent/platform.sock", "stream_id": 1,
         "platform_credential": "/nonexistent/cred", "trust_anchor": "/nonexistent/root.pem"},
        {"seq": 3, "type": "stream", "device": "dev0", "state": "secure", "requester_id": 256},
        {"seq": 4, "type": "vm", "vm": "vm0", "device": "dev0", "ghcx_socket": "/x.sock",
         "secret_file": "/x.secret", "mmio_reporting_offset": 0},
        {"seq": 5, "type": "tdi", "device": "dev0", "state": "RUN", "lock_epoch": 2},
        {"seq": 6, "type": "mmio_private", "device": "dev0", "enabled": True},
        {"seq": 7, "type": "window", "vm": "vm0", "window_id": 1, "base": 4096, "size": 4096,
         "access": "rw"},
        {"seq": 8, "type": "window_revoked", "window_id": 1},
        {"seq": 9, "type": "vm_removed", "vm": "vm0"},
        {"seq": 10, "type": "device_removed", "device": "dev0"}]
    lines = [json.dumps(r).encode() + b"\n" for r in recs]
    return [b"".join(lines), b"".join(lines[:7]), b"".join(lines[:3]) + b'{"seq": 4'] + [
        lines[1] + line for line in lines[2:]]


def one_input(data: bytes) -> None:
    state = base() / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o700)
    (state / JOURNAL_NAME).write_bytes(data)
    try:
        daemon = Daemon(state, heartbeat=0, reconnect_delays=())
    except JournalError:
        return
    daemon.close()
