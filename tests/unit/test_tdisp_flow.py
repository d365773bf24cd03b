"""TDISP requester ⇄ responder in process (PCIe 6.x §11), with only :mod:`teeio`.

:class:`~teeio.tdisp.requester.TdispRequester` talks to
:class:`~teeio.tdisp.responder.TdispResponder` through a plain function; the device is a
small :class:`~teeio.tdisp.responder.TdispDeviceHooks` double.  The whole message flow
(versions, capabilities, LOCK, the report in portions, START, STOP) and the error
responses, as each end sees them.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import pytest

from teeio.ide import Direction, KeySet, SubStream
from teeio.spdm.errors import DropRequest
from teeio.tdisp.codec import (
    BindP2pStreamRequest,
    BindP2pStreamResponse,
    GetTdispVersion,
    StopInterfaceResponse,
    TdispErrorResponse,
    TdispVersion,
    from_vendor_payload,
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
from teeio.tdisp.requester import TdispClientError, TdispRequester, TdispRequestError
from teeio.tdisp.responder import (
    LOCK_FLAGS_SUPPORTED,
    REQ_MSGS_SUPPORTED,
    KeyName,
    TdispResponder,
)
from teeio.tdisp.state import TdiAction, TdiEvent

RID = 0x0108                  # bus 1, device 1, function 0
FID = function_id(RID)
SESSION, OTHER = 0x1111_2222, 0x3333_4444
STREAM = 2
BAR0, BAR1 = 0xFE00_0000, 0xFE01_0000
PR_KEYS: set[KeyName] = {(KeySet.K0, d, SubStream.PR) for d in Direction}
NONCE = bytes(range(32))


class Device:
    """The hardware hooks: two BARs, one IDE stream, the keys IDE_KM programmed."""

    def __init__(self) -> None:
        self.bars: list[tuple[int, int, int]] = [(0, BAR0, 0x1000), (1, BAR1, 0x4000)]
        self.streams = {STREAM}
        self.keys: dict[tuple[int, int], set[KeyName]] | None = {(SESSION, STREAM): PR_KEYS}

    def msix_bar(self) -> int:
        return 1

    def mmio_bars(self) -> Sequence[tuple[int, int, int]]:
        return self.bars

    def stream_configured(self, stream_id: int) -> bool:
        return stream_id in self.streams

    def ide_keys_programmed(self, session_id: int, stream_id: int) -> set[KeyName] | None:
        if self.keys is None:
            return None
        return self.keys.get((session_id, stream_id), set())


Transition = tuple[TdiEvent, TdiState, TdiState, TdiAction]


def pair(device: Device | None = None, session: int = SESSION, chunk: int = 24,
         ) -> tuple[TdispResponder, TdispRequester, list[Transition]]:
    rsp = TdispResponder(device or Device(), requester_id=RID, nonce_source=lambda: NONCE)
    seen: list[Transition] = []
    rsp.on_transition.append(lambda *t: seen.append(t))
    return rsp, requester(rsp, session, chunk=chunk), seen


def requester(rsp: TdispResponder, session: int | None, fid: int = FID,
              chunk: int = 24) -> TdispRequester:
    return TdispRequester(lambda p: rsp.handle(p, session), fid, report_chunk=chunk)


def test_full_flow() -> None:
    rsp, req, seen = pair()
    assert req.get_version() == (0x10,)
    caps = req.get_capabilities()
    assert caps.req_msgs_supported == REQ_MSGS_SUPPORTED == 0xFE
    assert caps.lock_interface_flags_supported == LOCK_FLAGS_SUPPORTED
    assert req.get_state() is TdiState.CONFIG_UNLOCKED

    nonce = req.lock(LockInterfaceFlags.NO_FW_UPDATE, STREAM, mmio_reporting_offset=0x1000)
    assert nonce == NONCE
    assert req.get_state() is TdiState.CONFIG_LOCKED
    assert rsp.bound_session == SESSION and rsp.default_stream_id == STREAM
    assert not rsp.firmware_update_allowed()

    raw = req.get_report_bytes()                       # 24-byte portions
    assert raw == rsp.report and len(raw) > 24
    report = req.get_report()
    assert report.interface_info == (InterfaceInfo.DMA_WITHOUT_PASID
                                     | InterfaceInfo.NO_UPDATE_AFTER_LOCK)
    assert [(r.first_page, r.number_of_pages, r.attributes, r.range_id)
            for r in report.mmio_ranges] == [
        ((BAR0 + 0x1000) >> 12, 1, MmioRangeAttributes(0), 0),
        ((BAR1 + 0x1000) >> 12, 4, MmioRangeAttributes.IS_NON_TEE_MEM, 1)]
    assert report.device_specific_info == b"teeio"

    req.start(nonce)
    assert req.get_state() is TdiState.RUN
    req.stop()
    assert req.get_state() is TdiState.CONFIG_UNLOCKED
    assert rsp.bound_session is None and rsp.default_stream_id is None
    assert [(e, a, b) for e, a, b, _ in seen] == [
        (TdiEvent.LOCK, TdiState.CONFIG_UNLOCKED, TdiState.CONFIG_LOCKED),
        (TdiEvent.START, TdiState.CONFIG_LOCKED, TdiState.RUN),
        (TdiEvent.STOP, TdiState.RUN, TdiState.CONFIG_UNLOCKED)]
    assert seen[1][3] & TdiAction.ENABLE_TEE_ACCESS
    assert seen[2][3] & TdiAction.SCRUB_SECRETS and seen[2][3] & TdiAction.REVOKE_TEE_ACCESS


def code_of(call: object) -> str:
    assert callable(call)
    with pytest.raises(TdispRequestError) as e:
        call()
    return e.value.code_name


def test_lock_needs_the_stream_keys_of_this_session() -> None:
    device = Device()
    rsp, req, seen = pair(device)
    assert code_of(lambda: req.lock(0, STREAM + 1)) == "INVALID_REQUEST"   # no keys there
    device.streams.clear()
    assert code_of(lambda: req.lock(0, STREAM)) == "INVALID_REQUEST"       # not configured
    device.streams.add(STREAM)
    device.keys = {(SESSION, STREAM): {(KeySet.K0, Direction.RX, SubStream.PR)}}
    assert code_of(lambda: req.lock(0, STREAM)) == "INVALID_REQUEST"       # Tx PR missing
    device.keys = None
    assert code_of(lambda: req.lock(0, STREAM)) == "INVALID_REQUEST"       # no IDE_KM
    other = requester(rsp, OTHER)
    device.keys = {(SESSION, STREAM): PR_KEYS}
    assert code_of(lambda: other.lock(0, STREAM)) == "INVALID_REQUEST"     # other session's
    assert rsp.state is TdiState.CONFIG_UNLOCKED and not seen
    device.keys = {(SESSION, STREAM): {(KeySet.K1, d, SubStream.PR) for d in Direction}}
    assert req.lock(0, STREAM) == NONCE                                    # K1 will do


def test_lock_refusals() -> None:
    device = Device()
    rsp, req, _ = pair(device)
    with pytest.raises(TdispRequestError) as e:
        req.lock(LockInterfaceFlags.LOCK_MSIX, STREAM)
    assert e.value.code_name == "INVALID_REQUEST" and e.value.code == ErrorCode.INVALID_REQUEST
    device.bars = [(0, BAR0, 0x2000), (2, BAR0 + 0x1000, 0x1000)]
    assert code_of(lambda: req.lock(0, STREAM)) == "INVALID_DEVICE_CONFIGURATION"
    device.bars = [(0, 0, 0x2000), (2, 0, 0x1000)]       # unassigned BARs: left alone
    req.lock(0, STREAM)
    assert code_of(lambda: req.lock(0, STREAM)) == "INVALID_INTERFACE_STATE"
    assert rsp.state is TdiState.CONFIG_LOCKED


def test_state_and_nonce_errors() -> None:
    rsp, req, _ = pair()
    assert code_of(req.get_report) == "INVALID_INTERFACE_STATE"
    assert code_of(lambda: req.start(NONCE)) == "INVALID_INTERFACE_STATE"
    req.stop()                                          # STOP when unlocked: a no-op
    nonce = req.lock(0, STREAM)
    assert code_of(lambda: req.start(bytes(b ^ 1 for b in nonce))) == "INVALID_NONCE"
    assert rsp.state is TdiState.CONFIG_LOCKED
    req.start(nonce)
    assert code_of(lambda: req.start(nonce)) == "INVALID_INTERFACE_STATE"


def test_interface_id_and_unsupported_requests() -> None:
    rsp, req, _ = pair()
    assert code_of(requester(rsp, SESSION, fid=FID ^ 1).get_state) == "INVALID_INTERFACE"
    seg = requester(rsp, SESSION, fid=function_id(RID, segment=0))
    assert seg.get_state() is TdiState.CONFIG_UNLOCKED      # segment valid and equal
    assert code_of(requester(rsp, SESSION, fid=function_id(RID, 1)).get_state) == \
        "INVALID_INTERFACE"
    assert requester(rsp, SESSION, fid=0xBEEF).get_version() == (0x10,)  # spdm-emu's alias
    with pytest.raises(TdispRequestError) as e:
        req.request(BindP2pStreamRequest(FID, 1), BindP2pStreamResponse)
    assert e.value.code_name == "UNSUPPORTED_REQUEST"
    assert e.value.data == MessageType.BIND_P2P_STREAM_REQUEST
    with pytest.raises(TdispRequestError, match="INVALID_REQUEST"):
        req.request(StopInterfaceResponse(FID), StopInterfaceResponse)   # not a request


def test_bad_bytes_get_tdisp_error_and_no_session_gets_nothing() -> None:
    rsp, _, _ = pair()
    good = to_vendor_payload(GetTdispVersion(FID))
    for raw in (good[:-1], good + b"\0", good[:2] + b"\xee" + good[3:]):
        out = from_vendor_payload(rsp.handle(raw, SESSION))
        assert isinstance(out, TdispErrorResponse)
        assert out.error_code in (ErrorCode.INVALID_REQUEST, ErrorCode.UNSUPPORTED_REQUEST)
    with pytest.raises(DropRequest, match="outside a secured session"):
        rsp.handle(good, None)
    with pytest.raises(DropRequest):
        requester(rsp, None).get_version()


def test_binding_session_end_and_security_events() -> None:
    rsp, req, seen = pair()
    other = requester(rsp, OTHER)
    nonce = req.lock(0, STREAM)
    assert other.get_state() is TdiState.CONFIG_LOCKED       # state: any session
    assert code_of(other.stop) == "INVALID_REQUEST"
    assert code_of(other.get_report) == "INVALID_REQUEST"
    req.start(nonce)
    rsp.session_closed(OTHER)                                 # not the owner: nothing
    assert rsp.state is TdiState.RUN
    rsp.session_closed(SESSION, TdiEvent.HEARTBEAT_TIMEOUT)
    assert rsp.state is TdiState.ERROR and rsp.bound_session is None
    assert seen[-1][:3] == (TdiEvent.HEARTBEAT_TIMEOUT, TdiState.RUN, TdiState.ERROR)
    assert seen[-1][3] & TdiAction.REVOKE_TEE_ACCESS
    other.stop()                                              # a new session recovers it
    assert other.get_state() is TdiState.CONFIG_UNLOCKED



def test_security_events() -> None:
    rsp, req, _ = pair()
    rsp.security_event(TdiEvent.BAR_WRITE)                    # unlocked: nothing to protect
    assert rsp.state is TdiState.CONFIG_UNLOCKED
    req.lock(0, STREAM)
    rsp.security_event(TdiEvent.FIRMWARE_UPDATE)              # no NO_FW_UPDATE: allowed
    assert rsp.state is TdiState.CONFIG_LOCKED and rsp.firmware_update_allowed()
    rsp.security_event(TdiEvent.BAR_WRITE)
    assert req.get_state() is TdiState.ERROR
    assert code_of(req.get_report) == "INVALID_INTERFACE_STATE"
    req.stop()
    req.lock(LockInterfaceFlags.NO_FW_UPDATE, STREAM)
    rsp.security_event(TdiEvent.FIRMWARE_UPDATE)              # NO_FW_UPDATE: ERROR
    assert rsp.state is TdiState.ERROR


def test_listeners() -> None:
    rsp, req, seen = pair()

    def broken(*_: object) -> None:
        raise RuntimeError("listener bug")

    rsp.on_transition.insert(0, broken)                       # logged, the rest still run
    assert req.lock(0, STREAM) == NONCE
    assert [t[0] for t in seen] == [TdiEvent.LOCK]
    calls: list[int] = []
    rsp.ide_listeners.append(lambda: calls.append(1))
    rsp.ide_changed()
    assert calls == [1]


def test_requester_checks_responses() -> None:
    def answer(msg: TdispVersion | bytes) -> TdispRequester:
        raw = msg if isinstance(msg, bytes) else to_vendor_payload(msg)
        return TdispRequester(lambda _p: raw, FID)

    assert answer(TdispVersion(FID)).get_version() == (0x10,)
    with pytest.raises(TdispClientError, match="INTERFACE_ID"):
        answer(TdispVersion(FID + 1)).get_version()
    with pytest.raises(TdispClientError, match="expected DEVICE_INTERFACE_STATE"):
        answer(TdispVersion(FID)).get_state()
    with pytest.raises(TdispClientError, match="malformed response"):
        answer(b"\x01\x10").get_version()
    with pytest.raises(TdispRequestError, match="error code 0x1234"):
        answer(to_vendor_payload(TdispErrorResponse(FID, 0x1234))).get_state()


def test_uses_no_role_package() -> None:
    """This file talks to both ends through teeio alone."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    tops = {(n.module or "").split(".")[0] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)}
    tops |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    assert not tops & {"vfio_user_dev", "tsm", "guest_agent"}
    assert "teeio" in tops
