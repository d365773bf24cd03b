"""TDISP through the device's DSM (teeio/tdisp/responder.py): a real SPDM secured
session from teeio.spdm.Requester over the device's DOE dispatcher, IDE keys programmed by
IDE_KM in that session, then the TDISP flow DMTF spdm-emu's requester runs (FUNCTION_ID
0xBEEF, LOCK with default stream 0 and MMIO reporting offset 0xD0000000).

Also: LOCK without IDE keys (or with keys from another session) is refused, START with the
wrong nonce is refused, TDISP in the clear gets no response, a second session cannot
lock/start/stop/read the bound TDI, the owning session's end moves the TDI to ERROR, and
BAR / Command writes while locked do too."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from teeio.doe import DataObjectType
from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.ide_km import PCI_SIG_STANDARD_ID
from teeio.pcie.config import Command, Reg
from teeio.spdm import Requester, RequesterConfig, RequesterError, codec
from teeio.tdisp.codec import (
    BindP2pStreamRequest,
    DeviceInterfaceReportResponse,
    DeviceInterfaceState,
    GetDeviceInterfaceReport,
    GetDeviceInterfaceState,
    GetTdispCapabilities,
    GetTdispVersion,
    LockInterfaceRequest,
    LockInterfaceResponse,
    StartInterfaceRequest,
    StartInterfaceResponse,
    StopInterfaceRequest,
    StopInterfaceResponse,
    TdispCapabilities,
    TdispErrorResponse,
    TdispMessage,
    TdispVersion,
    decode_message,
    function_id,
    to_vendor_payload,
)
from teeio.tdisp.defs import (
    ErrorCode,
    InterfaceInfo,
    LockInterfaceFlags,
    MessageType,
    MmioRangeAttributes,
    TdiState,
)
from teeio.tdisp.report import ReportReader
from teeio.tdisp.responder import LOCK_FLAGS_SUPPORTED
from tests.support.dut import Dut, km, program_pr_keys, vendor
from vfio_user_dev.device import BAR1_SIZE
from vfio_user_dev.protocol import PciRegion

pytestmark = pytest.mark.timeout(60)

FID = 0xBEEF                        # what spdm-emu's requester sends
OFFSET = 0xD000_0000                # spdm-emu's MMIO_REPORTING_OFFSET
BAR0_ADDR, BAR1_ADDR = 0xFE00_0000, 0xFE00_1000


Send = Callable[[TdispMessage], TdispMessage]


def tdisp(req: Requester, sid: int | None) -> Send:
    def send(msg: TdispMessage) -> TdispMessage:
        rsp = vendor(req, to_vendor_payload(msg), sid)
        assert rsp[0] == 0x01
        return decode_message(rsp[1:])
    return send


def lock_req(flags: int = LOCK_FLAGS_SUPPORTED) -> LockInterfaceRequest:
    return LockInterfaceRequest(FID, LockInterfaceFlags(flags), 0, OFFSET, 0)


def error(rsp: TdispMessage, code: ErrorCode) -> None:
    assert isinstance(rsp, TdispErrorResponse), rsp
    assert rsp.error_code == code, ErrorCode(rsp.error_code).name


def state(send: Send) -> TdiState:
    rsp = send(GetDeviceInterfaceState(FID))
    assert isinstance(rsp, DeviceInterfaceState)
    return rsp.tdi_state


def locked(dut: Dut) -> tuple[Requester, int, Send, bytes]:
    req = dut.requester()
    sid = req.start_session(0)
    program_pr_keys(km(req, sid, port=1))
    send = tdisp(req, sid)
    rsp = send(lock_req())
    assert isinstance(rsp, LockInterfaceResponse)
    return req, sid, send, rsp.nonce


def test_full_flow_as_spdm_emu_runs_it(dut: Dut) -> None:
    # The VMM has assigned the BARs and enabled the function.
    dut.cfg_write(Reg.BAR0, BAR0_ADDR)
    dut.cfg_write(Reg.BAR0 + 4, BAR1_ADDR)
    dut.cfg_write(Reg.COMMAND, Command.MEMORY_SPACE | Command.BUS_MASTER)
    req = dut.requester()
    sid = req.start_session(0)
    program_pr_keys(km(req, sid, port=1))
    send = tdisp(req, sid)

    ver = send(GetTdispVersion(FID))
    assert isinstance(ver, TdispVersion) and ver.versions == (0x10,)
    assert ver.function_id == FID
    caps = send(GetTdispCapabilities(FID))
    assert isinstance(caps, TdispCapabilities)
    assert caps.req_msgs_supported == 0xFE
    assert all(caps.supports(MessageType(c)) for c in range(0x81, 0x88))
    assert not caps.supports(MessageType.BIND_P2P_STREAM_REQUEST)
    assert not caps.lock_interface_flags_supported & LockInterfaceFlags.LOCK_MSIX
    assert state(send) is TdiState.CONFIG_UNLOCKED

    lock = send(lock_req(caps.lock_interface_flags_supported))
    assert isinstance(lock, LockInterfaceResponse) and len(set(lock.nonce)) > 1
    assert state(send) is TdiState.CONFIG_LOCKED
    assert dut.dsm.tdisp is not None and dut.dsm.tdisp.bound_session == sid

    reader = ReportReader(FID, chunk=16)
    portions = 0
    while (r := reader.next_request()) is not None:
        rsp = send(r)
        assert isinstance(rsp, DeviceInterfaceReportResponse)
        reader.feed(rsp)
        portions += 1
    assert portions > 2
    report = reader.report()
    assert report.interface_info & InterfaceInfo.NO_UPDATE_AFTER_LOCK
    assert report.interface_info & InterfaceInfo.DMA_WITHOUT_PASID
    assert [(m.first_page, m.number_of_pages, m.range_id) for m in report.mmio_ranges] == [
        ((BAR0_ADDR + OFFSET) >> 12, 1, 0), ((BAR1_ADDR + OFFSET) >> 12, BAR1_SIZE >> 12, 1)]
    assert report.mmio_ranges[0].attributes == MmioRangeAttributes(0)
    assert report.mmio_ranges[1].attributes == MmioRangeAttributes.IS_NON_TEE_MEM
    # LENGTH 0xFFFF: the whole report in one portion, the same bytes.
    whole = send(GetDeviceInterfaceReport(FID, 0, 0xFFFF))
    assert isinstance(whole, DeviceInterfaceReportResponse)
    assert whole.portion == reader.report_bytes() and whole.remainder_length == 0
    error(send(GetDeviceInterfaceReport(FID, len(whole.portion), 16)),
          ErrorCode.INVALID_REQUEST)

    assert isinstance(send(StartInterfaceRequest(FID, lock.nonce)), StartInterfaceResponse)
    assert state(send) is TdiState.RUN
    # The nonce is spent; the report is still readable in RUN.
    error(send(StartInterfaceRequest(FID, lock.nonce)), ErrorCode.INVALID_INTERFACE_STATE)
    assert isinstance(send(GetDeviceInterfaceReport(FID, 0, 0xFFFF)),
                      DeviceInterfaceReportResponse)
    assert isinstance(send(StopInterfaceRequest(FID)), StopInterfaceResponse)
    assert state(send) is TdiState.CONFIG_UNLOCKED
    assert dut.dsm.tdisp.bound_session is None
    error(send(GetDeviceInterfaceReport(FID, 0, 16)), ErrorCode.INVALID_INTERFACE_STATE)
    # Locking again works (keys still programmed by this session), with a fresh nonce.
    again = send(lock_req())
    assert isinstance(again, LockInterfaceResponse) and again.nonce != lock.nonce


def test_own_function_id_is_accepted_others_are_invalid_interface(dut: Dut) -> None:
    req = dut.requester()
    send = tdisp(req, req.start_session(0))
    rid = dut.device.link_end.requester_id
    for fid in (function_id(rid), function_id(rid, 0)):
        rsp = send(GetTdispVersion(fid))
        assert isinstance(rsp, TdispVersion) and rsp.function_id == fid
    for fid in (function_id(rid ^ 1), function_id(rid, 3), 0xBEEE):
        error(send(GetDeviceInterfaceState(fid)), ErrorCode.INVALID_INTERFACE)


def test_lock_without_ide_keys_is_refused(dut: Dut) -> None:
    req = dut.requester()
    sid = req.start_session(0)
    send = tdisp(req, sid)
    error(send(lock_req()), ErrorCode.INVALID_REQUEST)         # no IDE_KM at all
    c = km(req, sid, port=1)
    c.query()
    c.key_prog(0, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    error(send(lock_req()), ErrorCode.INVALID_REQUEST)         # Tx PR missing
    c.key_prog(0, KeySet.K0, Direction.TX, SubStream.PR, IdeKey.generate())
    # Keys for stream 0 do not cover a LOCK naming another default stream.
    rsp = send(LockInterfaceRequest(FID, LockInterfaceFlags(0), 7, OFFSET, 0))
    error(rsp, ErrorCode.INVALID_REQUEST)
    # LOCK_MSIX is not supported.
    error(send(lock_req(LockInterfaceFlags.LOCK_MSIX)), ErrorCode.INVALID_REQUEST)
    assert state(send) is TdiState.CONFIG_UNLOCKED
    assert isinstance(send(lock_req()), LockInterfaceResponse)
    assert state(send) is TdiState.CONFIG_LOCKED


def test_lock_with_keys_of_another_session_is_refused(dut: Dut) -> None:
    req = dut.requester()
    a, b = req.start_session(0), req.start_session(0)
    program_pr_keys(km(req, a, port=1))
    send_b = tdisp(req, b)
    error(send_b(lock_req()), ErrorCode.INVALID_REQUEST)
    assert state(send_b) is TdiState.CONFIG_UNLOCKED


def test_start_with_a_wrong_nonce_is_refused(dut: Dut) -> None:
    _, _, send, nonce = locked(dut)
    wrong = bytes(b ^ 0xFF for b in nonce)
    error(send(StartInterfaceRequest(FID, wrong)), ErrorCode.INVALID_NONCE)
    assert state(send) is TdiState.CONFIG_LOCKED
    error(send(lock_req()), ErrorCode.INVALID_INTERFACE_STATE)
    assert isinstance(send(StartInterfaceRequest(FID, nonce)), StartInterfaceResponse)
    assert state(send) is TdiState.RUN


def test_clear_text_tdisp_gets_no_response(dut: Dut) -> None:
    req = dut.requester()
    for msg in (GetTdispVersion(FID), GetDeviceInterfaceState(FID), lock_req()):
        spdm = codec.VendorDefinedRequest(req.version, PCI_SIG_STANDARD_ID, b"\x01\x00",
                                          to_vendor_payload(msg)).encode()
        assert dut.raw(DataObjectType.CMA_SPDM, spdm) is None
    # ... and in a session still in its handshake phase.
    sid = req.key_exchange()
    spdm = codec.VendorDefinedRequest(req.version, PCI_SIG_STANDARD_ID, b"\x01\x00",
                                      to_vendor_payload(GetTdispVersion(FID))).encode()
    assert dut.raw(DataObjectType.SECURED_CMA_SPDM, req.sessions[sid].channel.seal(spdm)) \
        is None
    req.finish(sid)
    assert isinstance(tdisp(req, sid)(GetTdispVersion(FID)), TdispVersion)


def test_second_session_cannot_lock_start_or_stop_the_bound_tdi(dut: Dut) -> None:
    req, a, send_a, nonce = locked(dut)
    b = req.start_session(0)
    send_b = tdisp(req, b)
    # Read-only requests are answered in any secured session.
    assert isinstance(send_b(GetTdispVersion(FID)), TdispVersion)
    assert state(send_b) is TdiState.CONFIG_LOCKED
    for msg in (lock_req(), StartInterfaceRequest(FID, nonce), StopInterfaceRequest(FID),
                GetDeviceInterfaceReport(FID, 0, 16)):
        error(send_b(msg), ErrorCode.INVALID_REQUEST)
    assert state(send_a) is TdiState.CONFIG_LOCKED
    assert isinstance(send_a(StartInterfaceRequest(FID, nonce)), StartInterfaceResponse)
    error(send_b(StopInterfaceRequest(FID)), ErrorCode.INVALID_REQUEST)
    assert state(send_a) is TdiState.RUN
    # Ending the other session changes nothing.
    req.end_session(b)
    assert state(send_a) is TdiState.RUN


@pytest.mark.parametrize("when", [TdiState.CONFIG_LOCKED, TdiState.RUN])
def test_session_end_moves_the_tdi_to_error(dut: Dut, when: TdiState) -> None:
    req, sid, send, nonce = locked(dut)
    if when is TdiState.RUN:
        assert isinstance(send(StartInterfaceRequest(FID, nonce)), StartInterfaceResponse)
    req.end_session(sid)
    assert dut.dsm.tdisp is not None and dut.dsm.tdisp.state is TdiState.ERROR
    # A new session sees ERROR, may STOP it back to CONFIG_UNLOCKED, and must program
    # fresh keys before it can lock again.
    sid2 = req.start_session(0)
    send2 = tdisp(req, sid2)
    assert state(send2) is TdiState.ERROR
    error(send2(GetDeviceInterfaceReport(FID, 0, 16)), ErrorCode.INVALID_INTERFACE_STATE)
    assert isinstance(send2(StopInterfaceRequest(FID)), StopInterfaceResponse)
    assert state(send2) is TdiState.CONFIG_UNLOCKED
    error(send2(lock_req()), ErrorCode.INVALID_REQUEST)
    program_pr_keys(km(req, sid2, port=1))
    assert isinstance(send2(lock_req()), LockInterfaceResponse)


def test_session_end_while_unlocked_leaves_it_unlocked(dut: Dut) -> None:
    req, sid, send, _ = locked(dut)
    assert isinstance(send(StopInterfaceRequest(FID)), StopInterfaceResponse)
    req.end_session(sid)
    assert dut.dsm.tdisp is not None and dut.dsm.tdisp.state is TdiState.CONFIG_UNLOCKED


@pytest.mark.parametrize("write", ["bar0", "bar1", "rom", "memory_space", "bus_master",
                                   "flr"])
def test_config_writes_while_locked_move_the_tdi_to_error(dut: Dut, write: str) -> None:
    dut.cfg_write(Reg.COMMAND, Command.MEMORY_SPACE | Command.BUS_MASTER)
    _, _, send, nonce = locked(dut)
    assert isinstance(send(StartInterfaceRequest(FID, nonce)), StartInterfaceResponse)
    # Writes that are allowed: other Command bits, cache line size.
    dut.cfg_write(Reg.COMMAND, Command.MEMORY_SPACE | Command.BUS_MASTER
                  | Command.INTERRUPT_DISABLE)
    dut.device.region_write(PciRegion.CONFIG, Reg.CACHE_LINE_SIZE, b"\x10")
    assert state(send) is TdiState.RUN
    if write == "flr":
        dut.device.reset()
    else:
        off, value = {"bar0": (Reg.BAR0, BAR0_ADDR), "bar1": (Reg.BAR0 + 4, BAR1_ADDR),
                      "rom": (Reg.ROM_ADDRESS, 0),
                      "memory_space": (Reg.COMMAND, Command.BUS_MASTER),
                      "bus_master": (Reg.COMMAND, Command.MEMORY_SPACE)}[write]
        dut.cfg_write(off, value)
    assert state(send) is TdiState.ERROR
    assert isinstance(send(StopInterfaceRequest(FID)), StopInterfaceResponse)
    assert state(send) is TdiState.CONFIG_UNLOCKED


def test_unsupported_requests_and_malformed_ones(dut: Dut) -> None:
    req, sid, send, _ = locked(dut)
    rsp = send(BindP2pStreamRequest(FID, 1))
    error(rsp, ErrorCode.UNSUPPORTED_REQUEST)
    assert isinstance(rsp, TdispErrorResponse)
    assert rsp.error_data == MessageType.BIND_P2P_STREAM_REQUEST
    assert rsp.function_id == FID

    def raw(body: bytes) -> TdispMessage:
        return decode_message(vendor(req, b"\x01" + body, sid)[1:])

    header = bytes((0x10, 0x85, 0, 0)) + FID.to_bytes(4, "little") + bytes(8)
    error(raw(header + b"\x00"), ErrorCode.INVALID_REQUEST)              # wrong size
    error(raw(bytes((0x20,)) + header[1:]), ErrorCode.VERSION_MISMATCH)  # TDISP 2.0
    rsp = raw(header[:1] + b"\x8f" + header[2:])                          # unknown request
    error(rsp, ErrorCode.UNSUPPORTED_REQUEST)
    assert isinstance(rsp, TdispErrorResponse) and rsp.error_data == 0x8F
    error(raw(header[:1] + b"\x05" + header[2:] + b"\x00"), ErrorCode.INVALID_REQUEST)
    # A random 32-byte nonce from nowhere is still just a wrong nonce.
    error(raw(header[:1] + b"\x86" + header[2:] + os.urandom(32)), ErrorCode.INVALID_NONCE)


def test_a_tdisp_error_keeps_the_session_usable(dut: Dut) -> None:
    """A TDISP request that is answered with TDISP_ERROR is still a response: the session
    stays usable (no SessionError)."""
    req = dut.requester()
    sid = req.start_session(0)
    send = tdisp(req, sid)
    error(send(lock_req()), ErrorCode.INVALID_REQUEST)
    req.heartbeat(sid)
    assert isinstance(send(GetTdispVersion(FID)), TdispVersion)


def test_a_second_requester_downgrading_spdm_cannot_keep_or_take_the_tdi(dut: Dut) -> None:
    """Another SPDM requester on the same device (e.g. the untrusted host's own) restarts
    the connection with GET_VERSION and negotiates SPDM 1.2 (a downgrade from 1.3): the
    device keeps no state of the old connection (DSP0274 §10.3: GET_VERSION resets it), so
    the owning session is gone -- the TDI goes to ERROR and the IDE keys programmed in that
    session are invalidated; the downgraded requester may only STOP it and must key afresh
    before it can LOCK.  Nothing the old session locked survives into the new one."""
    req, sid, send, nonce = locked(dut)
    assert isinstance(send(StartInterfaceRequest(FID, nonce)), StartInterfaceResponse)
    km_rsp = dut.dsm.ide_km
    assert km_rsp is not None and km_rsp.keys_programmed_by(sid, 0)
    other = Requester(dut.send, [dut.identity.root], RequesterConfig(versions=(0x12,)),
                      name="host")
    assert other.init_connection().version == 0x12
    tdi = dut.dsm.tdisp
    assert tdi is not None and tdi.state is TdiState.ERROR
    assert not km_rsp.keys_programmed_by(sid, 0)                  # keys invalidated
    other.get_digests()
    other.get_certificate(0)
    sid2 = other.start_session(0)
    send2 = tdisp(other, sid2)
    error(send2(StartInterfaceRequest(FID, nonce)), ErrorCode.INVALID_INTERFACE_STATE)
    assert isinstance(send2(StopInterfaceRequest(FID)), StopInterfaceResponse)
    error(send2(lock_req()), ErrorCode.INVALID_REQUEST)           # no keys from this session
    # The first requester's session is dead: its records no longer decrypt anywhere.
    with pytest.raises(RequesterError):
        send(GetDeviceInterfaceState(FID))


def test_lock_with_overlapping_bars_is_an_invalid_device_configuration(dut: Dut) -> None:
    """§11.3.6: the configuration LOCK would freeze must be valid."""
    dut.cfg_write(Reg.BAR0, BAR0_ADDR)
    dut.cfg_write(Reg.BAR0 + 4, BAR0_ADDR)          # BAR1 on top of BAR0
    req = dut.requester()
    sid = req.start_session(0)
    program_pr_keys(km(req, sid, port=1))
    send = tdisp(req, sid)
    error(send(lock_req()), ErrorCode.INVALID_DEVICE_CONFIGURATION)
    assert state(send) is TdiState.CONFIG_UNLOCKED
    dut.cfg_write(Reg.BAR0 + 4, BAR1_ADDR)          # fixed: now it locks
    assert isinstance(send(lock_req()), LockInterfaceResponse)
