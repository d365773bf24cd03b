"""`make demo` end to end: the whole story (lock, attest, accept, RUN, encrypted DMA)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from qemu_configs import demo, image
from teeio import doe_pcap
from teeio.doe import DoeObject

SPDM_DUMP = os.environ.get("TEEIO_SPDM_DUMP")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def demo_run(guest_image: image.GuestImage, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[int, str, Path]:
    """One `teeio-demo --doe-capture` run: (exit code, its output, its work folder)."""
    wd = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = demo.main(["--workdir", str(wd), "--doe-capture", str(wd / "doe.pcap")])
    return rc, buf.getvalue(), wd


def test_demo_locks_attests_accepts_and_validates_dma(demo_run: tuple[int, str, Path]
                                                      ) -> None:
    rc, out, tmp_path = demo_run
    assert rc == 0, out
    assert "FAIL" not in out
    for name in ("verify:chain", "verify:signature", "verify:nonce", "verify:measurements",
                 "verify:report_ranges", "accepted", "guest:private_sha256",
                 "guest:private_batch", "guest:unaccepted_buffer_refused",
                 "guest:released_buffer_refused",
                 "host_recomputes_sha256", "link_ciphertext_only"):
        assert f"[PASS] {name}:" in out, name
    summary = json.loads((tmp_path / "demo-summary.json").read_text())
    steps = [s["step"] for s in summary["guest_steps"]]
    assert steps[:6] == ["enumerate", "ghcx_handshake", "tdi_lock", "get_evidence",
                         "tdi_info", "verify"], steps
    assert "tdi_accept" in steps and steps[-1] == "tdi_stop"
    # the TSM's view at the end: the TDI went back to CONFIG_UNLOCKED after the guest's STOP
    status = json.loads((tmp_path / "tsm-status.json").read_text())
    (tdi,) = status["tdis"]
    assert tdi["state"] == "CONFIG_UNLOCKED" and tdi["mmio_private"] is False, tdi
    assert status["vms"][0]["windows"] == [], status["vms"]
    assert (tmp_path / "identity" / "device.key").stat().st_mode & 0o777 == 0o600


def test_demo_doe_capture_is_the_pcap_spdm_dump_reads(demo_run: tuple[int, str, Path]
                                                      ) -> None:
    """The demo's DOE capture: PCI_DOE pcap, holding the TSM's SPDM exchange (clear part)
    and its secured messages."""
    rc, out, wd = demo_run
    assert rc == 0, out
    cap = doe_pcap.read(wd / "doe.pcap")
    assert cap.linktype == doe_pcap.LINKTYPE_PCI_DOE
    objs = [DoeObject.decode(r.data) for r in cap.records]
    spdm = [o.payload[1] for o in objs if o.data_object_type == 1]   # SPDM request codes...
    for code in (0x84, 0xE1, 0xE3, 0xE4):            # GET_VERSION, _CAPABILITIES, ...
        assert code in spdm, hex(code)
    assert any(o.data_object_type == 2 for o in objs)   # secured: IDE_KM, TDISP


@pytest.mark.skipif(SPDM_DUMP is None, reason="decoding with DMTF spdm_dump not checked: set "
                    "TEEIO_SPDM_DUMP to its binary (github.com/DMTF/spdm-dump)")
def test_demo_doe_capture_decodes_in_spdm_dump(demo_run: tuple[int, str, Path]) -> None:
    rc, _, wd = demo_run
    assert rc == 0 and SPDM_DUMP is not None
    out = subprocess.run([SPDM_DUMP, "-r", str(wd / "doe.pcap")], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "DataLink - 292 (PCI_DOE)" in out
    for name in ("SPDM_VERSION", "SPDM_ALGORITHMS", "SPDM_CERTIFICATE", "SPDM_MEASUREMENTS",
                 "SPDM_KEY_EXCHANGE_RSP"):
        assert name in out, name
