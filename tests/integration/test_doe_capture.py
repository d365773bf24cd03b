"""``--doe-capture`` on both ends of a real SPDM exchange (``teeio-device`` and ``teeio-tsm
attest --session``): the pcap checked byte by byte against the layout spdm-emu writes and
spdm_dump reads (:mod:`teeio.doe_pcap`), the exported session secret, and -- when
``TEEIO_SPDM_DUMP`` names a DMTF spdm_dump binary -- spdm_dump's own decoding of it."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teeio import doe_pcap
from teeio.doe import DoeObject
from tests.integration.device_process import PROJECT, StartDevice

pytestmark = pytest.mark.timeout(90)

SPDM_DUMP = os.environ.get("TEEIO_SPDM_DUMP")

#: SPDM request codes (DSP0274 §10) of the clear part of ``attest --session``, in order
CLEAR_REQUESTS = [0x84, 0xE1, 0xE3, 0x81, 0x82, 0x82, 0x83, 0xE0, 0xE4]


def attest(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tsm", "attest", *map(str, args)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=60, check=False)
    print(f"$ tsm attest {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}")
    assert "Traceback" not in proc.stderr
    return proc


def check_pcap(path: Path, t0: int, t1: int) -> list[bytes]:
    """The file byte by byte: header, each record's header, the DOE objects."""
    raw = path.read_bytes()
    assert raw[:24] == struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 0x10000, 292)
    objs, pos = [], 24
    while pos < len(raw):
        sec, usec, incl, orig = struct.unpack_from("<IIII", raw, pos)
        assert incl == orig and 8 <= incl <= 0x10000 and usec < 1_000_000
        assert t0 // 10**9 <= sec <= t1 // 10**9
        obj = raw[pos + 16:pos + 16 + incl]
        assert len(obj) == incl
        assert DoeObject.decode(obj).length_dw * 4 == incl   # one whole DOE object
        objs.append(obj)
        pos += 16 + incl
    assert pos == len(raw)
    return objs


def test_attest_session_capture_on_both_ends(start_device: StartDevice,
                                             tmp_path: Path) -> None:
    t0 = time.time_ns()
    dev = start_device("--doe-capture", str(tmp_path / "device.pcap"), identity=True)
    tsm_pcap, secrets = tmp_path / "tsm.pcap", tmp_path / "secrets.txt"
    proc = attest("--doe-socket", dev.doe, "--trust-anchor",
                  tmp_path / "identity" / "trust-anchor.pem", "--session",
                  "--doe-capture", tsm_pcap, "--export-session-secrets", secrets)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("WARNING") == 2 and "DEBUG" in proc.stderr   # start, session
    t1 = time.time_ns()
    tsm_objs = check_pcap(tsm_pcap, t0, t1)
    assert check_pcap(tmp_path / "device.pcap", t0, t1) == tsm_objs   # same objects, order
    hdrs = [DoeObject.decode(o) for o in tsm_objs]
    # DOE Discovery (3 protocols), then CMA/SPDM, then Secured CMA/SPDM: request, response
    assert [h.data_object_type for h in hdrs[:6]] == [0] * 6
    spdm = [h.payload for h in hdrs if h.data_object_type == 1]
    assert [p[1] for p in spdm[0::2]] == CLEAR_REQUESTS
    assert [p[1] for p in spdm[1::2]] == [c & 0x7F for c in CLEAR_REQUESTS]
    secured = [h.payload for h in hdrs if h.data_object_type == 2]
    assert len(secured) == 12 and hdrs[-1].data_object_type == 2   # FINISH .. END_SESSION
    sid = int.from_bytes(secured[0][:4], "little")                  # DSP0277 §6 SessionID
    assert f"session 0x{sid:08x}" in proc.stdout
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    hexes = doe_pcap.read_secrets(secrets)
    assert len(hexes) == 1 and len(bytes.fromhex(hexes[0])) == 48   # P-384 X coordinate

    if SPDM_DUMP is None:
        pytest.skip("spdm_dump decoding not checked: set TEEIO_SPDM_DUMP to a DMTF "
                    "spdm_dump binary (github.com/DMTF/spdm-dump) to run it")
    out = subprocess.run([SPDM_DUMP, "-r", str(tsm_pcap), "--dhe_secret", hexes[0]],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    print(out)
    assert "DataLink - 292 (PCI_DOE)" in out
    for name in ("SPDM_VERSION", "SPDM_CAPABILITIES", "SPDM_ALGORITHMS", "SPDM_CERTIFICATE",
                 "SPDM_CHALLENGE_AUTH", "SPDM_MEASUREMENTS", "SPDM_KEY_EXCHANGE ",
                 "SPDM_KEY_EXCHANGE_RSP"):
        assert name in out, name
    # decrypted with the exported secret: the secured messages are named
    for name in ("SPDM_FINISH_RSP", "SPDM_HEARTBEAT_ACK", "SPDM_KEY_UPDATE_ACK",
                 "SPDM_END_SESSION_ACK"):
        assert f"SecuredSPDM(0x{sid:08x}) SPDM(" in out and name in out, name
    assert "(?)->(?)" not in out        # every secured message was decrypted


def test_capture_file_that_cannot_be_made_fails_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "no" / "such" / "dir" / "x.pcap"
    proc = attest("--doe-socket", tmp_path / "nothing.sock", "--trust-anchor",
                  tmp_path / "anchor.pem", "--doe-capture", bad)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"attestation FAILED: cannot create {bad}: "
                                        "No such file or directory"]
    dev = subprocess.run([sys.executable, "-m", "vfio_user_dev", "--socket",
                          str(tmp_path / "v.sock"), "--doe-capture", str(bad)],
                         cwd=PROJECT, capture_output=True, text=True, timeout=60, check=False)
    assert dev.returncode == 1
    assert dev.stderr.splitlines() == [f"error: --doe-capture {bad}: folder {bad.parent} "
                                       "does not exist"]
