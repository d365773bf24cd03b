"""The pcapng TLP capture (``--link-capture``) opened by the standard tools: tcpdump and
tshark read it, and tshark with ``tools/teeio_tlp.lua`` decodes the TLP and IDE prefix
fields.  Each test skips, saying why, when its tool is not installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.link_rig import GUEST, Rig, payload
from vfio_user_dev.link.capture import read_capture
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkFault

PROJECT = Path(__file__).resolve().parents[2]
LUA = PROJECT / "tools" / "teeio_tlp.lua"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def capture(tmp_path: Path) -> Iterator[Path]:
    """Clear TLPs (one tampered), then IDE TLPs on stream 3, then a T=1 read."""
    r = Rig(tmp_path, capture=True)
    try:
        r.link.inject(Fault(FaultKind.FLIP_PAYLOAD, bit=3))
        r.ep.write(GUEST, b"\x11" * 300)                   # 2 MWr64 (256 + 44 bytes)
        r.ep.read(GUEST, 8)                                 # MRd64, CplD
        r.secure()
        r.ep.write(GUEST + 0x2000, payload(64))            # IDE, T=0
        r.ep.tee_dma = lambda: True
        with pytest.raises(LinkFault, match="UR"):          # IDE, T=1: MRd64, and no
            r.ep.read(GUEST + 0x2000, 64)                   # window for it: Cpl UR
    finally:
        r.close()
    assert r.capture_path is not None
    assert len(read_capture(r.capture_path)) == 7
    yield r.capture_path


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {name})")
    return path


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=90,
                          check=False)
    print(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    return proc


def test_tcpdump_reads_it(capture: Path) -> None:
    proc = run(tool("tcpdump"), "-n", "-r", capture)
    assert "link-type 147" in proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if not ln.startswith("\t")]) == 7


def test_tshark_reads_it_and_the_lua_dissector_decodes_it(capture: Path) -> None:
    tshark = tool("tshark")
    plain = run(tshark, "-r", capture)
    assert len(plain.stdout.splitlines()) == 7
    names = ("frame.p2p_dir", "teeio_tlp.type", "teeio_tlp.rid", "teeio_tlp.addr",
             "teeio_tlp.ide.stream_id", "teeio_tlp.ide.t", "teeio_tlp.byte_count")
    fields = run(tshark, "-X", f"lua_script:{LUA}", "-r", capture, "-T", "fields",
                 *(arg for name in names for arg in ("-e", name)))
    rows = [ln.split("\t") for ln in fields.stdout.splitlines()]
    # epb_flags: inbound (1) = upstream, outbound (0 = "sent") = downstream
    assert [r[0] for r in rows] == ["1", "1", "1", "0", "1", "1", "0"]
    assert [r[1] for r in rows] == ["0x60", "0x60", "0x20", "0x4a", "0x60", "0x20", "0x0a"]
    assert rows[0][2] == "0x0100" and rows[0][3] == "0x0000000100000000"
    assert [r[4] for r in rows] == ["", "", "", "", "3", "3", "3"]        # IDE stream ID
    t_bits = [r[5] for r in rows[4:]]
    assert t_bits[0] in ("0", "False") and t_bits[1:] in (["1", "1"], ["True", "True"])
    assert rows[3][6] == "8" and rows[6][6] == "64"                       # byte counts
    info = run(tshark, "-X", f"lua_script:{LUA}", "-r", capture).stdout.splitlines()
    assert "IDE stream 3 K0 T=1 NPR MRd64 rid=01:00.0" in info[5]
    assert "IDE stream 3 K0 T=1 CPL Cpl UR rid=01:00.0 tag=1" in info[6]
    verbose = run(tshark, "-X", f"lua_script:{LUA}", "-r", capture, "-V").stdout
    assert "teeio: tampered" in verbose                 # the fault tap's opt_comment
    assert "IDE MAC: " in verbose


@pytest.fixture
def aggregated(tmp_path: Path) -> Iterator[Path]:
    """A 1 KiB IDE write with aggregation of 4 at both ends (MPS 256): four MWr64 in one
    aggregated unit (§6.33.6), only the last with M set and the MAC."""
    r = Rig(tmp_path, capture=True)
    try:
        r.secure(aggregation=4)
        r.ep.write(GUEST + 0x3000, payload(1024))
        assert r.mem(0x3000, 1024) == payload(1024)
    finally:
        r.close()
    assert r.capture_path is not None
    yield r.capture_path


def test_the_capture_lister_marks_tlps_that_carry_no_mac(aggregated: Path) -> None:
    proc = run(sys.executable, "-m", "vfio_user_dev.link", aggregated)
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all("MWR64" in ln and "ide stream=3" in ln for ln in lines)
    assert ["aggregated (MAC later)" in ln for ln in lines] == [True, True, True, False]


def test_the_lua_dissector_reads_an_aggregated_unit(aggregated: Path) -> None:
    tshark = tool("tshark")
    fields = run(tshark, "-X", f"lua_script:{LUA}", "-r", aggregated, "-T", "fields",
                 "-e", "teeio_tlp.ide.m", "-e", "teeio_tlp.payload", "-e", "teeio_tlp.ide.mac")
    rows = [ln.split("\t") for ln in fields.stdout.splitlines()]
    assert len(rows) == 4
    assert [r[0] in ("1", "True") for r in rows] == [False, False, False, True]
    # every TLP's ciphertext is its whole 256-byte payload; only the last has a MAC
    assert [len(r[1].replace(":", "")) // 2 for r in rows] == [256] * 4
    assert [len(r[2].replace(":", "")) // 2 for r in rows] == [0, 0, 0, 12]
    info = run(tshark, "-X", f"lua_script:{LUA}", "-r", aggregated).stdout.splitlines()
    assert ["(aggregated, MAC later)" in ln for ln in info] == [True, True, True, False]
    verbose = run(tshark, "-X", f"lua_script:{LUA}", "-r", aggregated, "-V").stdout
    assert "Malformed" not in verbose and "Expert Info" not in verbose
