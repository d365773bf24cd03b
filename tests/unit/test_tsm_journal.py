"""tsm.journal: append + replay, fsync of every record and of the directory on create, a
torn last line tolerated (and cut before the next append), corruption elsewhere refused,
secret-bearing field names refused; and the daemon's replay of a journal into its state,
with the fail-safe at start when the devices cannot be reached."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from teeio.tdisp.defs import TdiState
from tsm.daemon import Daemon, read_secret, write_secret
from tsm.journal import JOURNAL_NAME, Journal, JournalError, read_records
from tsm.tdi import REASON_RESTART

pytestmark = pytest.mark.timeout(30)


def test_append_and_replay(tmp_path: Path) -> None:
    j, records = Journal.open(tmp_path)
    assert records == []
    j.append("device", device="dev0", stream_id=1)
    j.append("tdi", device="dev0", state="RUN", lock_epoch=2)
    j.close()
    j2, records = Journal.open(tmp_path)
    assert [(r["seq"], r["type"]) for r in records] == [(1, "device"), (2, "tdi")]
    assert records[1]["lock_epoch"] == 2 and isinstance(records[1]["time"], float)
    assert j2.append("vm", vm="vm0")["seq"] == 3          # numbering goes on
    j2.close()
    assert (tmp_path / JOURNAL_NAME).stat().st_mode & 0o777 == 0o600


def test_every_record_and_the_directory_are_fsynced(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)                 # the module tsm.journal uses
    j, _ = Journal.open(tmp_path)
    assert str(tmp_path) in synced                          # the directory, on create
    synced.clear()
    j.append("a")
    j.append("b")
    assert synced == [str(tmp_path / JOURNAL_NAME)] * 2     # each record before returning
    j.close()


@pytest.mark.parametrize("tail", [b'{"seq":3,"type":"tdi","sta', b'{"seq":3,"type":"x"}',
                                  b"\xff\xfe"])
def test_torn_last_line_is_ignored_and_cut(tmp_path: Path, tail: bytes) -> None:
    j, _ = Journal.open(tmp_path)
    j.append("a")
    j.append("b")
    j.close()
    path = tmp_path / JOURNAL_NAME
    good = path.read_bytes()
    path.write_bytes(good + tail)                           # a crash mid-write
    records, length = read_records(path)
    assert [r["type"] for r in records] == ["a", "b"] and length == len(good)
    j, records = Journal.open(tmp_path)
    assert len(records) == 2
    j.append("c")
    j.close()
    assert [r["type"] for r in read_records(path)[0]] == ["a", "b", "c"]
    assert path.read_bytes().startswith(good) and tail not in path.read_bytes()


def test_corruption_before_the_end_is_refused(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    path.write_bytes(b'{"seq":1,"type":"a"}\nnot json\n{"seq":3,"type":"c"}\n')
    with pytest.raises(JournalError, match="line 2 is corrupt"):
        Journal.open(tmp_path)


def test_secret_fields_are_refused(tmp_path: Path) -> None:
    j, _ = Journal.open(tmp_path)
    for name in ("secret", "key", "nonce", "token", "wrapped_key", "session_key", "keys",
                 "start_nonce", "Secret", "launch_secret", "psk_hint", "auth_token",
                 "credential", "ide_key_table", "SESSION_KEYS"):
        with pytest.raises(ValueError, match="may not carry"):
            j.append("vm", vm="vm0", **{name: "00"})
    with pytest.raises(ValueError, match=r"may not carry \['my_secret_file'\]"):
        j.append("vm", vm="vm0", secret_file="/p", my_secret_file="/q")
    j.close()
    assert read_records(tmp_path / JOURNAL_NAME)[0] == []
    # the path fields are allowed: they name files, they do not hold the material
    j, _ = Journal.open(tmp_path)
    j.append("device", device="dev0", platform_credential="/c", trust_anchor="/a",
             session_id="0x1", stream_id=3, lock_epoch=1)
    j.append("vm", vm="vm0", secret_file="/s")
    j.close()
    assert [r["type"] for r in read_records(tmp_path / JOURNAL_NAME)[0]] == ["device", "vm"]


def test_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "vms" / "vm0.secret"
    write_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "vms").stat().st_mode & 0o777 == 0o700
    first = read_secret(path)
    write_secret(path)
    assert len(first) == 32 and read_secret(path) != first
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="0600"):
        read_secret(path)


def _journal(tmp_path: Path, *records: dict[str, Any]) -> None:
    lines = [json.dumps({"seq": i, "time": 0.0, **r}) for i, r in enumerate(records, 1)]
    (tmp_path / JOURNAL_NAME).write_text("\n".join(lines) + "\n")


def _device(tmp_path: Path) -> dict[str, Any]:
    return {"type": "device", "device": "dev0", "doe_socket": str(tmp_path / "gone.sock"),
            "trust_anchor": str(tmp_path / "anchor.pem"),
            "platform_socket": str(tmp_path / "gone-platform.sock"),
            "platform_credential": str(tmp_path / "cred"), "stream_id": 3, "block": 0}


def test_replay_then_fail_safe_without_the_device(tmp_path: Path) -> None:
    """The journal says: device, secure stream, VM bound, TDI RUN at epoch 2, a window.
    The device is unreachable: the daemon still knows everything, marks the stream
    Insecure and the TDI ERROR (journaled), keeps the window it could not revoke, and
    counts the failures."""
    secret = tmp_path / "vm0.secret"
    write_secret(secret)
    _journal(tmp_path, _device(tmp_path),
             {"type": "session", "device": "dev0", "session_id": "0xfffe0001"},
             {"type": "stream", "device": "dev0", "stream_id": 3, "state": "secure",
              "requester_id": 0x100},
             {"type": "vm", "vm": "vm0", "device": "dev0",
              "ghcx_socket": str(tmp_path / "ghcx.sock"), "secret_file": str(secret)},
             {"type": "tdi", "device": "dev0", "state": "CONFIG_LOCKED", "lock_epoch": 2},
             {"type": "tdi", "device": "dev0", "state": "RUN", "lock_epoch": 2},
             {"type": "mmio_private", "device": "dev0", "enabled": True},
             {"type": "window", "window_id": 7, "vm": "vm0", "device": "dev0",
              "base": 0x1000, "size": 0x1000, "access": "rw"},
             {"type": "window", "window_id": 8, "vm": "vm0", "device": "dev0",
              "base": 0x3000, "size": 0x1000, "access": "r"},
             {"type": "window_revoked", "window_id": 8})
    d = Daemon(tmp_path)
    try:
        dev = d.devices["dev0"]
        assert (dev.tdi.state, dev.tdi.lock_epoch, dev.tdi.vm) == (TdiState.RUN, 2, "vm0")
        assert dev.stream_state == "secure" and dev.requester_id == 0x100
        assert d.vms["vm0"].windows == {7: {"base": 0x1000, "size": 0x1000, "access": "rw"}}
        d.start()
        assert dev.tdi.state is TdiState.ERROR and dev.tdi.reason == REASON_RESTART
        assert dev.stream_state == "insecure" and not dev.link.session_up
        assert d.counters["reconnect_failures"] == 1
        assert d.counters["platform_errors"] == 2     # the window and private MMIO
        assert 7 in d.vms["vm0"].windows              # not revoked: kept, not forgotten
        st = d.ctl_status({})
        assert st["tdis"][0]["state"] == "ERROR" and st["tdis"][0]["reason"] == REASON_RESTART
        assert st["vms"][0]["ghcx"]["connected"] is False
        assert (tmp_path / "ghcx.sock").exists()      # serving the VM again
    finally:
        d.close()
    records = read_records(tmp_path / JOURNAL_NAME)[0]
    new = records[10:]
    assert new[0]["type"] == "daemon_start"
    assert {"type": "tdi", "state": "ERROR", "reason": REASON_RESTART}.items() <= \
        next(r for r in new if r["type"] == "tdi").items()
    assert next(r for r in new if r["type"] == "stream")["state"] == "insecure"
    # a second replay agrees
    d2 = Daemon(tmp_path)
    try:
        assert d2.devices["dev0"].tdi.state is TdiState.ERROR
    finally:
        d2.close()
    raw = (tmp_path / JOURNAL_NAME).read_bytes()
    assert secret.read_bytes() not in raw and secret.read_bytes().hex().encode() not in raw


# -- every decode error names its line; contradicting records are refused -----------------------

@pytest.mark.parametrize("bad", [
    b'{"seq":2,"type":"x","v":' + b"[" * 100000 + b"]" * 100000 + b"}",
    b'{"seq":2,"type":"x","v":[[[[[[[[[[1]]]]]]]]]]}',
    b'{"seq":2,"type":"x","v":Infinity}',
    b'{"seq":2,"type":"x","v":-Infinity}',
    b'{"seq":2,"type":"x","v":NaN}',
    b'{"seq":2,"type":"tdi","lock_epoch":1e400}',
], ids=["very-deep", "deep", "inf", "-inf", "nan", "1e400"])
def test_every_decode_error_names_the_line(tmp_path: Path, bad: bytes) -> None:
    """Finding: deep nesting escaped as RecursionError, and Infinity / 1e400 were accepted
    (then failed to apply with a message naming no line)."""
    state = tmp_path / "tsm"
    state.mkdir()
    (state / JOURNAL_NAME).write_bytes(b'{"seq":1,"type":"daemon_start"}\n' + bad + b"\n"
                                       + b'{"seq":3,"type":"daemon_start"}\n')
    with pytest.raises(JournalError, match=r"line 2 is corrupt"):
        read_records(state / JOURNAL_NAME)
    with pytest.raises(JournalError, match=r"line 2 is corrupt"):
        Daemon(state, reconnect_delays=())


def test_device_removed_while_bound_is_refused(tmp_path: Path) -> None:
    """Finding: replay dropped a device whose VM was still bound, so the start's fail-safe
    never revoked that VM's windows and private MMIO.  Such a record (the daemon never
    writes one) refuses the replay, naming its line and seq."""
    state = tmp_path / "tsm"
    state.mkdir(mode=0o700)
    j, _ = Journal.open(state)
    j.append("device", device="dev0", doe_socket=str(tmp_path / "d.sock"),
             trust_anchor=str(tmp_path / "a.pem"), platform_socket=str(tmp_path / "p.sock"),
             platform_credential=str(tmp_path / "cred"))
    secret = state / "vms" / "vm0.secret"
    write_secret(secret)
    j.append("vm", vm="vm0", device="dev0", ghcx_socket=str(tmp_path / "vm0.sock"),
             secret_file=str(secret), mmio_reporting_offset=0)
    j.append("window", window_id=1, vm="vm0", device="dev0", base=0, size=4096, access="rw")
    j.append("device_removed", device="dev0")
    j.close()
    with pytest.raises(JournalError, match=r"line 4 \(record 4, device_removed\).*VM vm0 "
                                           r"is bound"):
        Daemon(state, reconnect_delays=())


def test_journal_is_not_followed_through_a_symlink(tmp_path: Path) -> None:
    state = tmp_path / "tsm"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (state / JOURNAL_NAME).symlink_to(victim)
    with pytest.raises(JournalError, match="journal"):
        Daemon(state, reconnect_delays=())
    assert victim.read_bytes() == b"keep me"


@pytest.mark.usefixtures("no_fd_leak")
def test_a_journal_that_cannot_be_replayed_is_closed(tmp_path: Path) -> None:
    """Found by fuzz/harnesses/journal_replay.py: a replay that refused a record left the
    journal's file open, one fd per failed start, until the fuzzer's process ran out of
    them.  A refused start lets it go, and a start on the mended journal works."""
    state = tmp_path / "tsm"
    state.mkdir(mode=0o700)
    (state / JOURNAL_NAME).write_bytes(
        b'{"seq": 1, "type": "daemon_start", "boot_id": "00", "pid": 1}\n'
        b'{"seq": 2, "type": "window", "vm": "vm0", "window_id": 1, "base": 4096}\n')
    for _ in range(3):
        with pytest.raises(JournalError, match="line 2"):
            Daemon(state, reconnect_delays=())
    (state / JOURNAL_NAME).write_bytes(
        b'{"seq": 1, "type": "daemon_start", "boot_id": "00", "pid": 1}\n')
    Daemon(state, reconnect_delays=()).close()
