"""``python -m tsm attest`` against the real device server process (``--identity``,
``--firmware``): success with and without a session, a wrong trust anchor, a firmware
that does not match the reference values, evidence a third party re-verifies, and the
transport failures.  The device log is printed at teardown."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from teeio import pki
from teeio.measurements import FIRMWARE_INDICES
from teeio.spdm.errors import SignatureError
from teeio.spdm.requester import verify_measurement_transcript
from tests.integration.device_process import PROJECT, DeviceProcess, StartDevice
from vfio_user_dev.firmware_build import build

pytestmark = pytest.mark.timeout(90)

NONCE = bytes(range(0x40, 0x60))


@pytest.fixture(scope="module")
def firmware_refs(firmware: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The golden firmware, its patched variant, and reference values of each (the CLI)."""
    d = tmp_path_factory.mktemp("firmware")
    out = {"elf": firmware,
           "patched_elf": build(d / "teeio-fw-patched.elf", {"TEEIO_FW_PATCH": "1"})}
    for name, elf in (("ref", out["elf"]), ("patched_ref", out["patched_elf"])):
        out[name] = d / f"{name}.json"
        subprocess.run([sys.executable, "-m", "tsm.refvalues", "--elf", str(elf), "--out",
                        str(out[name])], cwd=PROJECT, check=True, capture_output=True,
                       timeout=60)
    return out


@pytest.fixture
def spdm_device(start_device: StartDevice,
                firmware_refs: dict[str, Path]) -> DeviceProcess:
    """A device whose identity it provisions itself into tmp/identity on start."""
    return start_device(identity=True, firmware=firmware_refs["elf"])


def attest(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tsm", "attest", *map(str, args)], cwd=PROJECT,
                          capture_output=True, text=True, timeout=60, check=False)
    print(f"$ tsm attest {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}")
    assert "Traceback" not in proc.stderr
    return proc


def reason(proc: subprocess.CompletedProcess[str]) -> str:
    """The one reason line a failed run prints."""
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("attestation FAILED: ")
    return lines[0].removeprefix("attestation FAILED: ")


def measurement_lines(stdout: str) -> dict[int, str]:
    lines = stdout.split("signature verified):\n", 1)[1].splitlines()
    return {int(line.split()[0]): line for line in lines
            if line.strip() and line.split()[0].isdigit()}


# -- success ------------------------------------------------------------------------------------

@pytest.mark.parametrize("session", [False, True], ids=["no-session", "session"])
def test_attest_verifies_with_reference_values(spdm_device: DeviceProcess, tmp_path: Path,
                                               firmware_refs: dict[str, Path],
                                               session: bool) -> None:
    assert "provisioned a fresh P-384" in spdm_device.log_text()
    ident = tmp_path / "identity"
    proc = attest("--doe-socket", spdm_device.doe, "--trust-anchor",
                  ident / "trust-anchor.pem", "--reference-values", firmware_refs["ref"],
                  *(["--session"] if session else []))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert "protocols 0001:00 0001:01 0001:02" in out
    assert "SPDM version: 1.3" in out
    assert ("algorithms: base_asym=ECDSA_P384 base_hash=SHA_384 measurement_hash=SHA_384 "
            "dhe=SECP_384_R1 aead=AES_256_GCM") in out
    leaf = pki.load_identity(ident).leaf
    assert f"leaf subject: {leaf.subject.rfc4514_string()}" in out
    assert f"leaf SHA-384 fingerprint: {leaf.fingerprint(hashes.SHA384()).hex(':').upper()}" in out
    assert "CHALLENGE: CHALLENGE_AUTH signature verified" in out
    lines = measurement_lines(out)
    assert sorted(lines) == list(FIRMWARE_INDICES) == [1, 2, 3, 4, 5]
    assert all(line.endswith("match") for line in lines.values()), lines
    assert "MUTABLE_FIRMWARE" in lines[1] and "VERSION" in lines[3]
    assert "MUTABLE_FIRMWARE" in lines[5]
    assert "'teeio-fw 1.0.0'" in lines[3]
    assert "reference values: all 5 measurements match" in out
    session_lines = ("KEY_EXCHANGE + FINISH: session 0x", "HEARTBEAT: acknowledged",
                     "KEY_UPDATE (UpdateAllKeys, VerifyNewKey)",
                     "GET_MEASUREMENTS in the session: 5 blocks, the same as signed",
                     "END_SESSION: acknowledged")
    assert all((s in out) == session for s in session_lines)
    assert out.rstrip().endswith("attestation verified")
    assert ("session 0x" in spdm_device.log_text()) == session


def test_attest_over_tcp(tmp_path: Path, firmware_refs: dict[str, Path],
                         start_device: StartDevice) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start_device("--doe-tcp-port", str(port), identity=True, firmware=firmware_refs["elf"])
    # The DOE listeners listen before the vfio-user socket (what DeviceProcess waited for)
    # is created: no further wait.
    proc = attest("--doe-tcp-port", port, "--host", "127.0.0.1", "--trust-anchor",
                  tmp_path / "identity" / "trust-anchor.pem", "--reference-values",
                  firmware_refs["ref"], "--session")
    assert proc.returncode == 0, proc.stderr
    assert f"DOE: tcp:127.0.0.1:{port}" in proc.stdout


def test_json_evidence_is_reverified_by_a_third_party(spdm_device: DeviceProcess,
                                                      tmp_path: Path) -> None:
    evidence = tmp_path / "evidence.json"
    anchor = tmp_path / "identity" / "trust-anchor.pem"
    proc = attest("--doe-socket", spdm_device.doe, "--trust-anchor", anchor,
                  "--nonce", NONCE.hex(), "--json", evidence)
    assert proc.returncode == 0, proc.stderr
    assert f"nonce {NONCE.hex()}" in proc.stdout
    ev = json.loads(evidence.read_text())
    assert ev["format"] == "teeio-attestation-evidence/1"
    assert ev["verified"] is True and ev["reason"] is None
    assert ev["nonce"] == NONCE.hex() and ev["spdm_version"] == "1.3"
    # The third party: the chain from the evidence, checked against its own anchor; then
    # the signature over VCA + the exact GET_MEASUREMENTS/MEASUREMENTS bytes.
    _, certs = pki.parse_spdm_cert_chain(bytes.fromhex(ev["certificate_chain"]), "sha384")
    leaf_key = pki.verify_chain(certs, pki.load_anchors(anchor))
    vca = bytes.fromhex(ev["vca"])
    pairs = [(bytes.fromhex(p["request"]), bytes.fromhex(p["response"]))
             for p in ev["measurement_transcript"]]
    assert len(pairs) == 1
    assert pairs[0][0][4:4 + len(NONCE)] == NONCE    # GET_MEASUREMENTS carries our nonce
    assert verify_measurement_transcript(vca, pairs, leaf_key) is True
    # ... and it binds the nonce: another nonce in the request fails the signature
    forged = bytearray(pairs[0][0])
    forged[4] ^= 1
    with pytest.raises(SignatureError):
        verify_measurement_transcript(vca, [(bytes(forged), pairs[0][1])], leaf_key)
    assert [m["index"] for m in ev["measurements"]] == list(FIRMWARE_INDICES)


# -- failures: one precise reason line, non-zero exit -------------------------------------------

def test_wrong_trust_anchor(spdm_device: DeviceProcess, tmp_path: Path,
                            firmware_refs: dict[str, Path]) -> None:
    other = pki.provision(tmp_path / "other-identity")["trust_anchor"]
    proc = attest("--doe-socket", spdm_device.doe, "--trust-anchor", other,
                  "--reference-values", firmware_refs["ref"], "--json", tmp_path / "ev.json")
    text = reason(proc)
    assert "certificate chain: root is not a configured trust anchor" in text, text
    assert "SPDM version: 1.3" in proc.stdout and "measurements" not in proc.stdout
    assert not (tmp_path / "ev.json").exists()     # no evidence was gathered


def test_patched_firmware_does_not_match(spdm_device: DeviceProcess, tmp_path: Path,
                                         firmware_refs: dict[str, Path]) -> None:
    evidence = tmp_path / "evidence.json"
    proc = attest("--doe-socket", spdm_device.doe, "--trust-anchor",
                  tmp_path / "identity" / "trust-anchor.pem", "--reference-values",
                  firmware_refs["patched_ref"], "--json", evidence)
    assert reason(proc).startswith("measurement 1 does not match the reference value")
    lines = measurement_lines(proc.stdout)
    assert lines[1].endswith("MISMATCH")
    assert all(lines[i].endswith("match") and not lines[i].endswith("MISMATCH")
               for i in (2, 3, 4))
    patched = json.loads(firmware_refs["patched_ref"].read_text())["measurements"]["1"]["sha384"]
    assert f"{patched}  (reference)" in proc.stdout
    ev = json.loads(evidence.read_text())             # the evidence is kept, with the verdict
    assert ev["verified"] is False and ev["reason"].startswith("measurement 1 does not match")
    assert {"index": 1, "status": "MISMATCH"} in ev["reference_check"]


def test_device_without_identity_has_no_spdm(start_device: StartDevice,
                                             tmp_path: Path) -> None:
    dev = start_device()
    anchor = pki.provision(tmp_path / "id")["trust_anchor"]
    proc = attest("--doe-socket", dev.doe, "--trust-anchor", anchor)
    assert reason(proc) == "DOE discovery: the device does not list CMA/SPDM (0001:01)"


def test_unreachable_device(tmp_path: Path) -> None:
    anchor = pki.provision(tmp_path / "id")["trust_anchor"]
    proc = attest("--doe-socket", tmp_path / "missing.sock", "--trust-anchor", anchor)
    assert reason(proc).startswith(f"DOE transport: cannot connect to unix:{tmp_path}")


def test_bad_inputs(tmp_path: Path) -> None:
    proc = attest("--doe-socket", tmp_path / "x.sock", "--trust-anchor", tmp_path / "none.pem")
    assert reason(proc).startswith(f"trust anchor {tmp_path / 'none.pem'}: ")
    anchor = pki.provision(tmp_path / "id")["trust_anchor"]
    bad = tmp_path / "ref.json"
    bad.write_text("{}")
    proc = attest("--doe-socket", tmp_path / "x.sock", "--trust-anchor", anchor,
                  "--reference-values", bad)
    assert reason(proc) == (f"reference values {bad}: not in the teeio-reference-values/1 "
                            "format")
    proc = attest("--doe-socket", tmp_path / "x.sock", "--trust-anchor", anchor,
                  "--nonce", "abcd")
    assert proc.returncode == 2 and "the nonce is 32 bytes" in proc.stderr


def test_device_refuses_a_half_identity_or_a_bad_firmware(tmp_path: Path,
                                                          firmware: Path) -> None:
    def device_start(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vfio_user_dev", "--socket",
                               str(tmp_path / "v.sock"), *args], cwd=PROJECT,
                              capture_output=True, text=True, timeout=60, check=False)

    half = tmp_path / "half"
    pki.provision(half)
    (half / "device.key").unlink()
    proc = device_start("--identity", str(half), "--firmware", str(firmware))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (f"error: identity directory {half} has chain.pem "
                                            "but not device.key")
    not_elf = tmp_path / "fw.bin"
    not_elf.write_bytes(b"not an ELF")
    proc = device_start("--identity", str(tmp_path / "id"), "--firmware", str(not_elf))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(f"error: firmware image {not_elf}: not a "
                                                   "readable ELF image")
    assert not (tmp_path / "v.sock").exists()
