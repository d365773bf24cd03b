"""teeio.doe_pcap: the spdm-emu / spdm_dump pcap layout byte by byte, the writer, the
dispatcher tap (the config-space mailbox path), the session secrets log."""

from __future__ import annotations

import logging
import stat
import struct
from pathlib import Path

import pytest

from teeio import doe_pcap
from teeio.doe import DoeDispatcher, DoeObject
from teeio.doe_pcap import (
    LINKTYPE_PCI_DOE,
    SNAPLEN,
    DoeDirection,
    DoePcapWriter,
    PcapFormatError,
    SessionSecretLog,
)
from tests.support.doe_box import Box

T0 = 1_700_000_000_123_456_789


def test_global_header_is_spdm_emus() -> None:
    # spdm-emu pcap.c: magic a1b2c3d4, 2.4, zone 0, sigfigs 0, snaplen 0x10000, network 292
    assert doe_pcap.global_header() == bytes.fromhex(
        "d4c3b2a1" "0200" "0400" "00000000" "00000000" "00000100" "24010000")
    assert LINKTYPE_PCI_DOE == 292 and SNAPLEN == 0x10000


def test_record_layout_and_truncation() -> None:
    obj = DoeObject(1, 1, b"\x10\x84\x00\x00").encode()
    rec = doe_pcap.record(T0, obj)
    assert rec[:16] == struct.pack("<IIII", 1_700_000_000, 123_456, len(obj), len(obj))
    assert rec[16:] == obj
    big = bytes(SNAPLEN + 8)
    cut = doe_pcap.record(T0, big)
    assert struct.unpack_from("<II", cut, 8) == (SNAPLEN, SNAPLEN + 8)
    assert len(cut) == 16 + SNAPLEN


def test_decode_round_trip_and_errors() -> None:
    objs = [DoeObject(1, 0, bytes(4)).encode(), DoeObject(1, 2, bytes(range(16))).encode()]
    raw = doe_pcap.global_header() + b"".join(doe_pcap.record(T0 + i * 1000, o)
                                              for i, o in enumerate(objs))
    pcap = doe_pcap.decode(raw)
    assert (pcap.magic, pcap.version, pcap.snaplen, pcap.linktype) == (
        0xA1B2C3D4, (2, 4), SNAPLEN, 292)
    assert [r.data for r in pcap.records] == objs
    assert [r.timestamp_ns for r in pcap.records] == [T0 - 789, T0 + 1000 - 789]
    with pytest.raises(PcapFormatError, match="truncated record"):
        doe_pcap.decode(raw[:-1])
    with pytest.raises(PcapFormatError, match="magic"):
        doe_pcap.decode(bytes(24))
    with pytest.raises(PcapFormatError, match="too short"):
        doe_pcap.decode(raw[:10])


def test_dispatcher_tap_records_the_mailbox_exchange_in_order(tmp_path: Path) -> None:
    d = DoeDispatcher()
    d.register(1, 1, lambda payload: b"\x12\x04\x00\x00")
    w = DoePcapWriter(tmp_path / "doe.pcap", clock=lambda: T0)
    d.tap = w.write
    box = Box(d)
    req = DoeObject(1, 1, b"\x10\x84\x00\x00").encode()
    box.send(req)
    rsp = box.receive()
    box.send(DoeObject(1, 0, bytes(4)).encode())   # DOE Discovery, index 0
    box.receive()
    w.close()
    w.write(DoeDirection.REQUEST, req)              # after close: ignored
    recs = doe_pcap.read(w.path).records
    assert [r.data for r in recs][:2] == [req, rsp]
    assert len(recs) == 4 and recs[2].data[:4] == bytes.fromhex("01000000")
    assert w.counts == {DoeDirection.REQUEST: 2, DoeDirection.RESPONSE: 2}


def test_secret_log_is_0600_loud_and_spdm_dump_ready(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="teeio.doe_pcap")
    path = tmp_path / "secrets.txt"
    log = SessionSecretLog(path, "unit test")
    assert "DEBUG" in caplog.text and "unit test" in caplog.text
    log.record(0x0001FFFE, bytes(range(48)))
    log.record(0x0002FFFD, b"\xff" * 48)
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert caplog.text.count("0x0001fffe") == 1 and caplog.text.count("0x0002fffd") == 1
    assert doe_pcap.read_secrets(path) == [bytes(range(48)).hex(), "ff" * 48]
    args = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    assert args == [f"--dhe_secret {bytes(range(48)).hex()}", f"--dhe_secret {'ff' * 48}"]
