"""The spdm-probe mode: SPDM GET_VERSION and GET_CAPABILITIES through a DOE mailbox.

From the guest, through sysfs ``config``, on the DOE capability of a target function:
``teeio`` (our vfio-user device, 1234:7e10) or ``nvme`` (QEMU's NVMe controller,
1b36:0010, whose ``spdm_port`` forwards CMA/SPDM objects to an SPDM responder over
the spdm-emu socket).  The messages are encoded by hand here (DSP0274 1.2/1.3
§10.3-10.4): the guest needs no SPDM stack to ask a responder what it speaks.

GET_VERSION always travels as SPDM 1.0; GET_CAPABILITIES uses the highest version
both sides have (1.3, else 1.2).  Responses may carry DOE DW padding: every field is
read at its offset, nothing is sized from the DOE length.
"""

from __future__ import annotations

import struct
from typing import Any

from guest_agent.doe import DoeMailboxClient, DoeMailboxError, SysfsConfig, check_idle, discovery
from guest_agent.pci import AgentError, find_device
from guest_agent.selftest import DEVICE, VENDOR, Checks
from teeio.doe import PCI_SIG_VENDOR_ID, DataObjectType, DoeError, DoeObject, pad_dw

TARGETS = {"teeio": (VENDOR, DEVICE), "nvme": (0x1B36, 0x0010)}

# DSP0274 request/response codes and versions used here.
SPDM_10 = 0x10
OUR_VERSIONS = (0x13, 0x12)          # preference order
GET_VERSION, VERSION = 0x84, 0x04
GET_CAPABILITIES, CAPABILITIES = 0xE1, 0x61
ERROR = 0x7F

# GET_CAPABILITIES Flags (§10.4 Table "Flag fields definitions for the Requester"), by bit.
CAP_FLAG_NAMES = (
    "CACHE_CAP", "CERT_CAP", "CHAL_CAP", "MEAS_CAP_NO_SIG", "MEAS_CAP_SIG", "MEAS_FRESH_CAP",
    "ENCRYPT_CAP", "MAC_CAP", "MUT_AUTH_CAP", "KEY_EX_CAP", "PSK_CAP", "PSK_CAP_WITH_CONTEXT",
    "ENCAP_CAP", "HBEAT_CAP", "KEY_UPD_CAP", "HANDSHAKE_IN_THE_CLEAR_CAP", "PUB_KEY_ID_CAP",
    "CHUNK_CAP", "ALIAS_CERT_CAP", "SET_CERT_CAP", "CSR_CAP", "CERT_INSTALL_RESET_CAP",
    "EP_INFO_CAP_NO_SIG", "EP_INFO_CAP_SIG", "MEL_CAP", "EVENT_CAP", "MULTI_KEY_CAP_ONLY",
    "MULTI_KEY_CAP_NEG", "GET_KEY_PAIR_INFO_CAP", "SET_KEY_PAIR_INFO_CAP",
    "SET_KEY_PAIR_RESET_CAP", "LARGE_RESP_CAP",
)
# What we claim as a requester: certificates, challenge, sessions (the TSM's set).
REQUESTER_FLAGS = sum(1 << CAP_FLAG_NAMES.index(n) for n in (
    "CERT_CAP", "CHAL_CAP", "ENCRYPT_CAP", "MAC_CAP", "KEY_EX_CAP", "HBEAT_CAP", "KEY_UPD_CAP"))
DATA_TRANSFER_SIZE = 4096
CAPABILITIES_12 = struct.Struct("<BBBBBBHIII")   # 1.2/1.3 layout, without 1.3's algorithms


class SpdmProbeError(AgentError):
    pass


def version_text(v: int) -> str:
    return f"{v >> 4}.{v & 0xF}"


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in enumerate(CAP_FLAG_NAMES) if flags >> bit & 1]


def _check_header(rsp: bytes, version: int, code: int, what: str) -> None:
    if len(rsp) < 4:
        raise SpdmProbeError(f"{what}: {len(rsp)}-byte response")
    if rsp[1] == ERROR:
        raise SpdmProbeError(f"{what}: ERROR response, code 0x{rsp[2]:02x} data 0x{rsp[3]:02x}")
    if rsp[1] != code or rsp[0] != version:
        raise SpdmProbeError(f"{what}: response version 0x{rsp[0]:02x} code 0x{rsp[1]:02x}, "
                             f"expected 0x{version:02x}/0x{code:02x}")


def get_version_request() -> bytes:
    return bytes((SPDM_10, GET_VERSION, 0, 0))


def parse_version(rsp: bytes) -> list[int]:
    """VERSION (§10.3): header, reserved, VersionNumberEntryCount, entries (u16 LE,
    major 15:12, minor 11:8, update 7:4, alpha 3:0) -> [0x12, 0x13, ...]."""
    _check_header(rsp, SPDM_10, VERSION, "VERSION")
    if len(rsp) < 6 or len(rsp) < 6 + 2 * rsp[5]:
        raise SpdmProbeError(f"VERSION: {len(rsp)} bytes for {rsp[5] if len(rsp) > 5 else '?'} "
                             "entries")
    return [int.from_bytes(rsp[6 + 2 * i:8 + 2 * i], "little") >> 8 for i in range(rsp[5])]


def get_capabilities_request(version: int) -> bytes:
    return CAPABILITIES_12.pack(version, GET_CAPABILITIES, 0, 0, 0, 0, 0, REQUESTER_FLAGS,
                                DATA_TRANSFER_SIZE, DATA_TRANSFER_SIZE)


def parse_capabilities(rsp: bytes, version: int) -> dict[str, Any]:
    _check_header(rsp, version, CAPABILITIES, "CAPABILITIES")
    if len(rsp) < CAPABILITIES_12.size:
        raise SpdmProbeError(f"CAPABILITIES: {len(rsp)} bytes, a 1.2 response has "
                             f"{CAPABILITIES_12.size}")
    _, _, p1, _, _, ct_exp, _, flags, dts, max_msg = CAPABILITIES_12.unpack_from(rsp)
    return {"version": version_text(version), "ct_exponent": ct_exp, "flags": f"0x{flags:08x}",
            "flag_names": flag_names(flags), "data_transfer_size": dts,
            "max_spdm_msg_size": max_msg, "param1": p1}


class SpdmOverDoe:
    """One SPDM message per CMA/SPDM (0001:01) data object on *mb*."""

    def __init__(self, mb: DoeMailboxClient) -> None:
        self.mb = mb

    def call(self, msg: bytes) -> bytes:
        req = DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM, pad_dw(msg))
        rsp = self.mb.exchange_object(req)
        if rsp is None:
            raise SpdmProbeError(f"no DOE response to SPDM request code 0x{msg[1]:02x}")
        if rsp.protocol != req.protocol:
            raise SpdmProbeError(f"SPDM request answered on DOE protocol {rsp.protocol}")
        return rsp.payload


def probe(spdm: SpdmOverDoe, checks: Checks) -> dict[str, Any]:
    """GET_VERSION, then GET_CAPABILITIES at the best common version; report fields."""
    out: dict[str, Any] = {}
    raw = spdm.call(get_version_request())
    entries = parse_version(raw)
    out["version"] = {"entries": [version_text(v) for v in entries], "response": raw.hex()}
    common = [v for v in OUR_VERSIONS if v in entries]
    checks.add("spdm_version", bool(common), entries=out["version"]["entries"])
    if not common:
        return out
    raw = spdm.call(get_capabilities_request(common[0]))
    out["capabilities"] = parse_capabilities(raw, common[0]) | {"response": raw.hex()}
    checks.add("spdm_capabilities", True, **{k: out["capabilities"][k] for k in
                                             ("version", "flags", "data_transfer_size")})
    return out


def run(target: str) -> dict[str, Any]:
    if target not in TARGETS:
        raise AgentError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    checks = Checks()
    dev = find_device(*TARGETS[target])
    report: dict[str, Any] = {"mode": "spdm-probe", "target": target}
    cfg = SysfsConfig(dev)
    try:
        mb = DoeMailboxClient.find(cfg)
        report |= discovery(dev, mb, checks)
        checks.add("lists_cma_spdm", "0001:01" in report["user_protocols"],
                   user=report["user_protocols"])
        try:
            report["spdm"] = probe(SpdmOverDoe(mb), checks)
        except (SpdmProbeError, DoeMailboxError, DoeError) as exc:
            checks.add("spdm", False, error=str(exc))
        check_idle(mb, checks)
    finally:
        cfg.close()
    report |= {"checks": checks.items, "ok": checks.ok}
    return report
