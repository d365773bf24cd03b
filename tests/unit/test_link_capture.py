"""The link's capture tap and capture files (vfio_user_dev.link.capture, .capture_cli):
pcapng block by block (draft-ietf-opsawg-pcapng §4.1-4.3), fault flags in a comment, the
older pcap, other files refused, the listing."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from teeio.tlp import Tlp, TlpType, is_protected
from tests.support.link_rig import GUEST, PATTERN, Rig, payload
from vfio_user_dev.link.capture import (
    CaptureFlags,
    CaptureRecord,
    CaptureWriter,
    pcapng_header,
    read_capture,
)
from vfio_user_dev.link.capture_cli import main
from vfio_user_dev.link.interfaces import LinkDirection

pytestmark = pytest.mark.timeout(30)


def test_capture_holds_plaintext_without_ide(cap: Rig) -> None:
    cap.ep.write(GUEST + 0x800, payload(2048))
    recs = cap.records()
    assert recs and not any(is_protected(r) for r in recs)
    assert sum(r.count(PATTERN) for r in recs) >= 2048 // len(PATTERN) - 2 * len(recs)
    assert PATTERN in b"".join(recs)


def _blocks(raw: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(raw):
        btype, total = struct.unpack_from("<II", raw, pos)
        assert total % 4 == 0 and struct.unpack_from("<I", raw, pos + total - 4)[0] == total
        out.append((btype, raw[pos + 8:pos + total - 4]))
        pos += total
    return out


def _opts(raw: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while True:
        code, n = struct.unpack_from("<HH", raw, pos)
        if code == 0:
            return out
        out[code] = raw[pos + 4:pos + 4 + n]
        pos += 4 + n + (-n % 4)


def test_capture_file_format(cap: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    """pcapng (draft-ietf-opsawg-pcapng) block by block: SHB, IDB (USER0, ns), EPBs with
    the direction in epb_flags and the bare TLP as the packet data."""
    cap.ep.write(GUEST, b"\x11" * 300)
    cap.ep.read(GUEST, 300)
    assert cap.capture_path is not None and cap.link.capture is not None
    cap.link.capture.flush()
    blocks = _blocks(cap.capture_path.read_bytes())
    (shb_t, shb), (idb_t, idb), *epbs = blocks
    assert shb_t == 0x0A0D0D0A and struct.unpack_from("<IHHq", shb) == (0x1A2B3C4D, 1, 0, -1)
    assert _opts(shb[16:])[4] == b"teeio-emu"                      # shb_userappl
    assert idb_t == 1 and struct.unpack_from("<HHI", idb) == (147, 0, 65535)   # USER0
    idb_opts = _opts(idb[8:])
    assert idb_opts[9] == b"\x09" and idb_opts[2] == b"pcie-link"  # if_tsresol, if_name
    assert [t for t, _ in epbs] == [6] * 5
    recs = read_capture(cap.capture_path)
    for (_, body), rec in zip(epbs, recs, strict=True):
        ifid, hi, lo, caplen, orig = struct.unpack_from("<IIIII", body)
        assert ifid == 0 and caplen == orig == len(rec.data)
        assert (hi << 32 | lo) == rec.timestamp_ns                  # nanoseconds
        assert body[20:20 + caplen] == rec.data                     # no pseudo-header
        flags = struct.unpack("<I", _opts(body[20 + caplen + (-caplen % 4):])[2])[0]
        assert flags == (1 if rec.direction == LinkDirection.UPSTREAM else 2)  # in / out
    dirs = [r.direction for r in recs]
    assert dirs == [LinkDirection.UPSTREAM] * 3 + [LinkDirection.DOWNSTREAM] * 2
    assert all(r.flags == 0 for r in recs)
    assert [r.timestamp_ns for r in recs] == sorted(r.timestamp_ns for r in recs)
    assert [Tlp.decode(r.data).type for r in recs] == [TlpType.MWR64, TlpType.MWR64,
                                                       TlpType.MRD64, TlpType.CPLD,
                                                       TlpType.CPLD]
    assert main([str(cap.capture_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and "MWR64" in out[0] and "down" in out[3]


def test_fault_flags_travel_in_a_comment(tmp_path: Path) -> None:
    w = CaptureWriter(tmp_path / "c.pcapng", clock=lambda: 1_700_000_000_000_000_001)
    w.write(LinkDirection.DOWNSTREAM, b"\x01\x02\x03\x04\x05",
            CaptureFlags.TAMPERED | CaptureFlags.REPLAYED)
    w.close()
    (_, body), = _blocks((tmp_path / "c.pcapng").read_bytes())[2:]
    assert _opts(body[20 + 8:])[1] == b"teeio: tampered,replayed"   # opt_comment
    rec, = read_capture(tmp_path / "c.pcapng")
    assert rec == CaptureRecord(1_700_000_000_000_000_001, LinkDirection.DOWNSTREAM,
                                CaptureFlags.TAMPERED | CaptureFlags.REPLAYED,
                                b"\x01\x02\x03\x04\x05")


def test_read_capture_still_reads_the_older_pcap(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tlp = Tlp.memory_write(0x0100, 0, GUEST, b"\xaa" * 8).encode()
    p = tmp_path / "old.pcap"
    body = struct.pack("<BBH", 1, 2, 0) + tlp
    p.write_bytes(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 147)
                  + struct.pack("<IIII", 1_700_000_000, 5, len(body), len(body)) + body)
    assert read_capture(p) == [CaptureRecord(1_700_000_000_000_000_005,
                                             LinkDirection.DOWNSTREAM, CaptureFlags.DROPPED,
                                             tlp)]
    assert main([str(p)]) == 0
    assert "MWR" in capsys.readouterr().out


def test_read_capture_rejects_other_files(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.pcap"
    p.write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(20))
    with pytest.raises(ValueError, match="not a TLP capture"):
        read_capture(p)
    ng = tmp_path / "eth.pcapng"
    ng.write_bytes(pcapng_header().replace(struct.pack("<HHI", 147, 0, 65535),
                                           struct.pack("<HHI", 1, 0, 65535)))
    with pytest.raises(ValueError, match="link type 1"):
        read_capture(ng)
    assert main([str(p)]) == 1 and main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "No such file" in err[1]
