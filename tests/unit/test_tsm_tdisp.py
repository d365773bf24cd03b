"""tsm.tdisp.TdispClient against the device's DSM in-process (a real SPDM session over the
device's DOE dispatcher, as tests/protocol/test_tdisp_device.py does), and against a fake
responder for the response checks: wrong message type, wrong INTERFACE_ID, wrong version,
TDISP_ERROR with a known and an unknown code."""

from __future__ import annotations

from typing import Any

import pytest

from teeio.pcie.config import Command, Reg
from teeio.spdm import Requester
from teeio.tdisp.codec import (
    DeviceInterfaceState,
    TdispErrorResponse,
    TdispMessage,
    TdispVersion,
    function_id,
    to_vendor_payload,
)
from teeio.tdisp.defs import InterfaceInfo, LockInterfaceFlags, TdiState
from tests.support.dut import Dut, km, program_pr_keys
from tsm.tdisp import TdispClient, TdispClientError, TdispRequestError
from vfio_user_dev.device import BAR1_SIZE

pytestmark = pytest.mark.timeout(60)

BAR0_ADDR, BAR1_ADDR = 0xFE00_0000, 0xFE00_1000


def client(dut: Dut, keys: bool = True, chunk: int = 16) -> TdispClient:
    req = dut.requester()
    sid = req.start_session(0)
    if keys:
        program_pr_keys(km(req, sid, port=1))          # stream 0, K0 Rx/Tx PR
    return TdispClient(req, sid, function_id(dut.device.link_end.requester_id),
                       report_chunk=chunk)


def test_full_flow(dut: Dut) -> None:
    dut.cfg_write(Reg.BAR0, BAR0_ADDR)
    dut.cfg_write(Reg.BAR0 + 4, BAR1_ADDR)
    dut.cfg_write(Reg.COMMAND, Command.MEMORY_SPACE | Command.BUS_MASTER)
    c = client(dut)
    assert c.get_version() == (0x10,)
    caps = c.get_capabilities()
    assert caps.req_msgs_supported == 0xFE
    assert c.get_state() is TdiState.CONFIG_UNLOCKED
    nonce = c.lock(LockInterfaceFlags.NO_FW_UPDATE, 0, 0x1000)
    assert len(nonce) == 32
    assert c.get_state() is TdiState.CONFIG_LOCKED
    report = c.get_report()                             # 16-byte portions
    assert report.interface_info & InterfaceInfo.NO_UPDATE_AFTER_LOCK
    assert [(m.first_page, m.number_of_pages, m.range_id) for m in report.mmio_ranges] == [
        ((BAR0_ADDR + 0x1000) >> 12, 1, 0), ((BAR1_ADDR + 0x1000) >> 12, BAR1_SIZE >> 12, 1)]
    c.start(nonce)
    assert c.get_state() is TdiState.RUN
    c.stop()
    assert c.get_state() is TdiState.CONFIG_UNLOCKED


def test_whole_report_in_one_portion(dut: Dut) -> None:
    c = client(dut, chunk=0xFFFF)
    c.lock(0, 0)
    assert len(c.get_report().mmio_ranges) == 2


def test_tdisp_error_is_raised_with_the_code_name(dut: Dut) -> None:
    c = client(dut, keys=False)
    with pytest.raises(TdispRequestError) as e:
        c.lock(0, 0)                                    # no IDE keys in this session
    assert e.value.code_name == "INVALID_REQUEST"
    assert "LOCK_INTERFACE_REQUEST: TDISP_ERROR INVALID_REQUEST" in str(e.value)
    with pytest.raises(TdispRequestError) as e:
        c.get_report()
    assert e.value.code_name == "INVALID_INTERFACE_STATE"
    with pytest.raises(TdispRequestError) as e:
        c.start(bytes(32))
    assert e.value.code_name == "INVALID_INTERFACE_STATE"

    c = client(dut)
    nonce = c.lock(0, 0)
    with pytest.raises(TdispRequestError) as e:
        c.start(bytes(b ^ 0xFF for b in nonce))
    assert e.value.code_name == "INVALID_NONCE"
    assert c.get_state() is TdiState.CONFIG_LOCKED

    other = TdispClient(c.requester, c.session_id, c.function_id ^ 1)
    with pytest.raises(TdispRequestError) as e:
        other.get_state()
    assert e.value.code_name == "INVALID_INTERFACE"


class FakeRequester:
    """Answers every VENDOR_DEFINED request with one canned TDISP payload."""

    def __init__(self, rsp: TdispMessage | bytes) -> None:
        self.rsp = rsp if isinstance(rsp, bytes) else to_vendor_payload(rsp)

    def vendor_request(self, *_: Any) -> bytes:
        return self.rsp


def fake(rsp: TdispMessage | bytes, fid: int = 0x100) -> TdispClient:
    req: Any = FakeRequester(rsp)
    assert not isinstance(req, Requester)
    return TdispClient(req, 1, fid)


def test_response_checks() -> None:
    assert fake(DeviceInterfaceState(0x100, TdiState.RUN)).get_state() is TdiState.RUN
    with pytest.raises(TdispClientError, match="got TDISP_VERSION, expected "
                                               "DEVICE_INTERFACE_STATE"):
        fake(TdispVersion(0x100)).get_state()
    with pytest.raises(TdispClientError, match="INTERFACE_ID 0x00000101, sent 0x00000100"):
        fake(DeviceInterfaceState(0x101)).get_state()
    with pytest.raises(TdispClientError, match="does not offer TDISP 1.0"):
        fake(TdispVersion(0x100, (0x11,))).get_version()
    raw = bytearray(to_vendor_payload(DeviceInterfaceState(0x100)))
    raw[1] = 0x11                                       # TDISPVersion 1.1
    with pytest.raises(TdispClientError, match="TDISPVersion 0x11"):
        fake(bytes(raw)).get_state()
    with pytest.raises(TdispClientError, match="malformed response"):
        fake(b"\x00" + bytes(16)).get_state()           # Protocol ID 0 (IDE_KM)
    with pytest.raises(TdispRequestError) as e:
        fake(TdispErrorResponse(0x100, 0x0103, 0)).stop()
    assert e.value.code_name == "INSUFFICIENT_ENTROPY"
    with pytest.raises(TdispRequestError, match="error code 0x9999") as e:
        fake(TdispErrorResponse(0x100, 0x9999, 7)).stop()
    assert e.value.code == 0x9999 and e.value.data == 7
