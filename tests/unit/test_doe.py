"""DOE (teeio/doe/): data object and Discovery codecs, the dispatcher, the mailbox state
machine (PCIe 6.3 §6.30, §7.9.24) and the spdm-emu socket header."""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio.codec import DecodeError, Struct, strategy
from teeio.doe import (
    DOE_TIMEOUT,
    MAILBOX_TRANSITIONS,
    MAX_OBJECT_BYTES,
    MAX_OBJECT_DW,
    PCI_SIG_VENDOR_ID,
    DataObjectType,
    DiscoveryRequest,
    DiscoveryResponse,
    DoeCapabilities,
    DoeControl,
    DoeDecodeError,
    DoeDispatcher,
    DoeError,
    DoeMailbox,
    DoeObject,
    DoeReg,
    DoeStatus,
    DoeUnsupportedError,
    MailboxEvent,
    MailboxState,
    SocketCommand,
    SocketHeader,
    SocketTransport,
    discover,
    interrupt_condition,
    pad_dw,
    protocol_name,
)
from tests.support.doe_box import READY, Box, dw

SPDM = (PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM)
SECURED = (PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM)
DISCOVERY = (PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY)
BUSY, ERROR = DoeStatus.BUSY, DoeStatus.ERROR
Exchange = Callable[[DoeObject], DoeObject | None]


def echo(payload: bytes) -> bytes:
    return payload


def disc_obj(index: int, version: int = 2) -> bytes:
    return DoeObject(*DISCOVERY, DiscoveryRequest(index, version).encode()).encode()


# -- data objects -------------------------------------------------------------------------------

payloads = st.integers(0, 64).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@given(vendor=st.integers(0, 0xFFFF), dtype=st.integers(0, 0xFF), payload=payloads)
def test_object_round_trip(vendor: int, dtype: int, payload: bytes) -> None:
    obj = DoeObject(vendor, dtype, payload)
    raw = obj.encode()
    assert len(raw) == 8 + len(payload) == 4 * obj.length_dw
    assert DoeObject.decode(raw) == obj
    assert raw[:2] == vendor.to_bytes(2, "little") and raw[2] == dtype and raw[3] == 0
    assert int.from_bytes(raw[4:8], "little") == obj.length_dw


@given(dtype=st.sampled_from([DataObjectType.CMA_SPDM_CONNECTION_ID,
                              DataObjectType.SECURED_CMA_SPDM_CONNECTION_ID]),
       conn=st.integers(0, 0xFFF), payload=payloads)
def test_object_with_connection_id_round_trip(dtype: int, conn: int, payload: bytes) -> None:
    obj = DoeObject(PCI_SIG_VENDOR_ID, dtype, payload, conn)
    raw = obj.encode()
    assert (int.from_bytes(raw[4:8], "little") >> 18) & 0xFFF == conn
    assert DoeObject.decode(raw) == obj


def test_largest_object_encodes_length_zero() -> None:
    obj = DoeObject(1, 1, bytes(MAX_OBJECT_BYTES - 8))
    raw = obj.encode()
    assert len(raw) == MAX_OBJECT_BYTES and obj.length_dw == MAX_OBJECT_DW
    assert int.from_bytes(raw[4:8], "little") == 0        # 0 encodes 2^18 DW
    assert DoeObject.decode(raw) == obj
    with pytest.raises(ValueError):
        DoeObject(1, 1, bytes(MAX_OBJECT_BYTES - 4))


def test_pad_dw() -> None:
    assert pad_dw(b"") == b""
    assert pad_dw(b"\x10") == b"\x10\0\0\0"
    assert pad_dw(b"abcd") == b"abcd"
    assert pad_dw(b"abcde") == b"abcde\0\0\0"


@pytest.mark.parametrize("kwargs", [
    {"vendor_id": 0x10000, "data_object_type": 1},
    {"vendor_id": 1, "data_object_type": 0x100},
    {"vendor_id": 1, "data_object_type": 1, "payload": b"abc"},
    {"vendor_id": 1, "data_object_type": 1, "connection_id": 1},       # type 1 has no CID
    {"vendor_id": 1, "data_object_type": 3, "connection_id": 0x1000},
])
def test_object_constructor_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DoeObject(**kwargs)  # type: ignore[arg-type]


def _hdr(dw0: int, dw1: int, payload: bytes = b"") -> bytes:
    return struct.pack("<II", dw0, dw1) + payload


@pytest.mark.parametrize(("raw", "offset", "why"), [
    (b"", 0, "shorter than its header"),
    (b"\1\0\1\0\2\0\0", 7, "shorter than its header"),
    (_hdr(0x00010001, 3, b"ab"), 10, "whole number of DWs"),
    (_hdr(0x01010001, 2), 3, "reserved bits 31:24"),
    (_hdr(0x00010001, 2 | 1 << 30), 4, "reserved bits 31:30"),
    (_hdr(0x00010001, 2 | 1 << 31), 4, "reserved bits 31:30"),
    (_hdr(0x00010001, 1), 4, "Length 1"),
    (_hdr(0x00010001, 3), 4, "3 DW, 2 DW received"),
    (_hdr(0x00010001, 2, bytes(4)), 4, "2 DW, 3 DW received"),
    (_hdr(0x00010001, 0, bytes(4)), 4, "262144 DW"),
    (_hdr(0x00010001, 2 | 5 << 18), 4, "reserved bits 29:18"),   # CID on type 1
])
def test_malformed_objects(raw: bytes, offset: int, why: str) -> None:
    with pytest.raises(DoeDecodeError, match=why) as exc:
        DoeObject.decode(raw)
    assert exc.value.data == raw and exc.value.offset == offset


# -- DOE Discovery codec ------------------------------------------------------------------------

@given(index=st.integers(0, 255), version=st.integers(0, 255))
def test_discovery_request_round_trip(index: int, version: int) -> None:
    req = DiscoveryRequest(index, version)
    raw = req.encode()
    assert raw == bytes([index, version, 0, 0])
    assert DiscoveryRequest.decode(raw) == req


@given(vendor=st.integers(0, 0xFFFF), dtype=st.integers(0, 0xFF), nxt=st.integers(0, 0xFF))
def test_discovery_response_round_trip(vendor: int, dtype: int, nxt: int) -> None:
    rsp = DiscoveryResponse(vendor, dtype, nxt)
    raw = rsp.encode()
    assert int.from_bytes(raw, "little") == vendor | dtype << 16 | nxt << 24
    assert DiscoveryResponse.decode(raw) == rsp
    assert rsp.valid == (vendor != 0xFFFF)


@pytest.mark.parametrize("cls", [DoeObject, DiscoveryRequest, DiscoveryResponse, SocketHeader],
                         ids=lambda k: k.__name__)
def test_declared_round_trip(cls: type[Struct]) -> None:
    """decode(encode(m)) == m and a byte-identical re-encode, for values the declaration
    itself generates (teeio.codec.strategy)."""
    @settings(max_examples=80, deadline=None)
    @given(strategy(cls))
    def run(m: Struct) -> None:
        wire = m.encode()
        back = cls.decode(wire)
        assert back == m and back.encode() == wire
    run()


def test_decode_errors_are_the_core_decode_error() -> None:
    with pytest.raises(DecodeError) as exc:
        DoeObject.decode(_hdr(0x01010001, 2))
    assert isinstance(exc.value, DoeDecodeError) and isinstance(exc.value, DoeError)
    assert exc.value.raw == exc.value.data and exc.value.offset == 3
    with pytest.raises(DoeDecodeError, match="trailing"):
        DiscoveryResponse.decode(bytes(5))


def test_discovery_request_ignores_reserved_bits() -> None:
    # Table 6-30: responders must ignore bits 31:16.
    assert DiscoveryRequest.decode(b"\x02\x02\xAA\x55") == DiscoveryRequest(2, 2)


@pytest.mark.parametrize("raw", [b"", b"\0\0\0", bytes(5), bytes(8)])
def test_discovery_codecs_want_one_dw(raw: bytes) -> None:
    with pytest.raises(DoeDecodeError):
        DiscoveryRequest.decode(raw)
    with pytest.raises(DoeDecodeError):
        DiscoveryResponse.decode(raw)


def test_protocol_name_matches_linux_sysfs() -> None:
    assert protocol_name(1, 0) == "0001:00"
    assert protocol_name(0x1E98, 0x2) == "1e98:02"


# -- dispatcher ---------------------------------------------------------------------------------

def exchanger(d: DoeDispatcher) -> Exchange:
    def exchange(obj: DoeObject) -> DoeObject | None:
        rsp = d.handle_object(obj.encode())
        return None if rsp is None else DoeObject.decode(rsp)
    return exchange


def test_discovery_lists_only_itself_when_nothing_is_registered() -> None:
    d = DoeDispatcher()
    assert d.protocols() == [DISCOVERY]
    assert discover(exchanger(d)) == [DISCOVERY]
    rsp = d.handle_object(disc_obj(0))
    assert rsp == DoeObject(*DISCOVERY, DiscoveryResponse(1, 0, 0).encode()).encode()


def test_discovery_walk_in_registration_order() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    d.register(*SECURED, echo)
    d.register(0x1E98, 0x02, echo)
    assert discover(exchanger(d)) == [DISCOVERY, SPDM, SECURED, (0x1E98, 2)]
    entries = [DiscoveryResponse.decode(DoeObject.decode(d.handle_object(disc_obj(i)) or b"")
                                        .payload) for i in range(4)]
    assert [e.next_index for e in entries] == [1, 2, 3, 0]


@pytest.mark.parametrize("index", [1, 2, 200, 255])
def test_discovery_invalid_index_is_vendor_ffff(index: int) -> None:
    d = DoeDispatcher()
    raw = d.handle_object(disc_obj(index))
    assert raw is not None
    entry = DiscoveryResponse.decode(DoeObject.decode(raw).payload)
    assert entry.vendor_id == 0xFFFF and not entry.valid and entry.next_index == 0


def test_discovery_version_0_and_extra_dws_are_answered() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    assert discover(exchanger(d), version=0) == [DISCOVERY, SPDM]
    # §6.30.1: longer than expected -> the expected part is processed.
    long_req = DoeObject(*DISCOVERY, DiscoveryRequest(1).encode() + bytes(8)).encode()
    raw = d.handle_object(long_req)
    assert raw is not None
    assert DoeObject.decode(raw).payload == DiscoveryResponse(1, 1, 0).encode()


def test_discovery_shorter_than_expected_is_discarded() -> None:
    d = DoeDispatcher()
    assert d.handle_object(DoeObject(*DISCOVERY).encode()) is None


def test_handler_gets_payload_and_response_is_padded_with_request_protocol() -> None:
    seen: list[bytes] = []

    def handler(payload: bytes) -> bytes:
        seen.append(payload)
        return b"\x05"

    d = DoeDispatcher()
    d.register(0x1234, 0x42, handler)
    raw = d.handle_object(DoeObject(0x1234, 0x42, b"abcdefgh").encode())
    assert seen == [b"abcdefgh"]
    assert raw == DoeObject(0x1234, 0x42, b"\x05\0\0\0").encode()
    assert (d.objects, d.responses) == (1, 1)


def test_connection_id_is_echoed_in_the_response() -> None:
    d = DoeDispatcher()
    d.register(PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM_CONNECTION_ID, echo)
    req = DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM_CONNECTION_ID, b"abcd", 0x7A5)
    assert d.handle_object(req.encode()) == req.encode()


def test_handler_may_stay_silent() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, lambda _p: None)
    assert d.handle_object(DoeObject(*SPDM, b"abcd").encode()) is None
    assert (d.objects, d.responses) == (1, 0)


def test_unsupported_and_malformed_objects_raise() -> None:
    d = DoeDispatcher()
    raw = DoeObject(*SECURED, b"abcd").encode()
    with pytest.raises(DoeUnsupportedError) as exc:
        d.handle_object(raw)
    assert exc.value.data == raw
    with pytest.raises(DoeDecodeError):
        d.handle_object(raw[:-4])


def test_handler_exceptions_propagate() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, lambda _p: 1 // 0)  # type: ignore[arg-type,return-value]
    with pytest.raises(ZeroDivisionError):
        d.handle_object(DoeObject(*SPDM).encode())


def test_register_rejects_discovery_duplicates_and_bad_ids() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    for args in (DISCOVERY, SPDM, (0xFFFF, 1), (1, 0x100), (-1, 1)):
        with pytest.raises(ValueError):
            d.register(*args, echo)
    assert d.protocols() == [DISCOVERY, SPDM]


def test_at_most_256_discovery_entries() -> None:
    d = DoeDispatcher()
    for t in range(255):
        d.register(0x1000, t, echo)
    with pytest.raises(ValueError, match="256"):
        d.register(0x1000, 255, echo)
    walk = discover(exchanger(d))
    assert len(walk) == 256 and walk[-1] == (0x1000, 254)


def test_dispatcher_serialises_concurrent_objects() -> None:
    inside = 0
    most = 0
    guard = threading.Lock()

    def slow(payload: bytes) -> bytes:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.002)
        with guard:
            inside -= 1
        return payload

    d = DoeDispatcher()
    d.register(*SPDM, slow)
    bad: list[int] = []

    def worker(k: int) -> None:
        for i in range(20):
            req = DoeObject(*SPDM, struct.pack("<II", k, i)).encode()
            if d.handle_object(req) != req:
                bad.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not bad and most == 1 and d.objects == 80


def test_dispatcher_uses_the_lock_it_is_given() -> None:
    lock = threading.RLock()
    d = DoeDispatcher(lock=lock)
    owned: list[bool] = []

    def handler(payload: bytes) -> bytes:
        owned.append(lock._is_owned())  # type: ignore[attr-defined]
        return payload

    d.register(*SPDM, handler)
    d.handle_object(DoeObject(*SPDM).encode())
    assert owned == [True]


# -- discovery walk errors ----------------------------------------------------------------------

def _answer(*entries: DiscoveryResponse | None,
            protocol: tuple[int, int] = DISCOVERY) -> Exchange:
    it = iter(entries)

    def exchange(_obj: DoeObject) -> DoeObject | None:
        e = next(it)
        return None if e is None else DoeObject(*protocol, e.encode())
    return exchange


@pytest.mark.parametrize(("exchange", "why"), [
    (_answer(None), "no response"),
    (_answer(DiscoveryResponse(1, 0, 1), protocol=SPDM), "answered by 0001:01"),
    (_answer(DiscoveryResponse(0xFFFF, 0xFF, 0)), "reported invalid"),
    (_answer(DiscoveryResponse(1, 1, 1)), "not DOE Discovery itself"),
    (_answer(DiscoveryResponse(1, 0, 2)), "says next 2"),
    (_answer(DiscoveryResponse(1, 0, 1), DiscoveryResponse(1, 1, 1)), "says next 1"),
])
def test_discovery_walk_errors(exchange: Exchange, why: str) -> None:
    with pytest.raises(DoeError, match=why):
        discover(exchange)


# -- mailbox ------------------------------------------------------------------------------------

def test_mailbox_happy_path_discovery() -> None:
    b = Box()
    assert b.status() == 0 and b.state() is MailboxState.IDLE
    b.send(disc_obj(0), go=False)
    assert b.state() is MailboxState.RECEIVING and b.status() == 0
    b.wr(DoeReg.CONTROL, DoeControl.GO)
    assert b.status() == READY                    # synchronous dispatcher: Ready at once
    expected = DoeObject(*DISCOVERY, DiscoveryResponse(1, 0, 0).encode()).encode()
    assert b.receive() == expected
    assert b.status() == 0 and b.state() is MailboxState.IDLE


def test_read_mailbox_reads_without_advancing_and_write_advances() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    req = DoeObject(*SPDM, b"ABCDEFGH").encode()
    b.send(req)
    words = dw(req)
    for i, w in enumerate(words):
        assert b.rd(DoeReg.READ_MAILBOX) == w
        assert b.rd(DoeReg.READ_MAILBOX) == w      # reading twice does not advance
        assert b.status() & READY                  # Ready stays until the final DW's ack
        b.wr(DoeReg.READ_MAILBOX, 0xDEADBEEF if i % 2 else 0)   # any value advances
    assert not b.status() & READY
    assert b.rd(DoeReg.READ_MAILBOX) == 0


def test_reads_when_not_ready_return_zero_and_acks_are_ignored() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    assert b.rd(DoeReg.READ_MAILBOX) == 0
    b.wr(DoeReg.READ_MAILBOX, 0)                   # ignored: nothing is Ready
    assert b.status() == 0
    b.send(DoeObject(*SPDM, b"abcd").encode(), go=False)
    assert b.rd(DoeReg.READ_MAILBOX) == 0 and b.rd(DoeReg.WRITE_MAILBOX) == 0
    b.wr(DoeReg.READ_MAILBOX, 0)                   # ignored while receiving, too
    b.wr(DoeReg.CONTROL, DoeControl.GO)
    assert b.receive() == DoeObject(*SPDM, b"abcd").encode()
    assert b.rd(DoeReg.WRITE_MAILBOX) == 0


def test_back_to_back_exchanges() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    for i in range(5):
        req = DoeObject(*SPDM, bytes([i]) * 4 * (i + 1)).encode()
        b.send(req)
        assert b.receive() == req


def test_abort_clears_ready_error_and_both_mailboxes() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, echo)
    b = Box(d)
    # while receiving: the partial request is dropped
    b.send(DoeObject(*SPDM, b"abcd").encode()[:8], go=False)
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.state() is MailboxState.IDLE
    b.send(disc_obj(0))
    assert b.status() & READY                      # the aborted DWs did not prefix it
    # while Ready: the response is dropped
    b.rd(DoeReg.READ_MAILBOX)
    b.wr(DoeReg.READ_MAILBOX, 0)
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0 and b.rd(DoeReg.READ_MAILBOX) == 0
    # in Error
    b.send(DoeObject(*SECURED).encode())
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0
    b.send(disc_obj(0))
    assert DoeObject.decode(b.receive()).protocol == DISCOVERY


def test_abort_wins_over_go_in_the_same_write() -> None:
    b = Box()
    b.send(disc_obj(0), go=False)
    b.wr(DoeReg.CONTROL, DoeControl.ABORT | DoeControl.GO)
    assert b.status() == 0 and b.d.objects == 0


def test_write_mailbox_overflow_sets_error() -> None:
    b = Box(max_object_dw=4)
    for _ in range(4):
        b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == 0
    b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.GO)            # no response in Error (§6.30.2)
    assert b.status() == ERROR and b.d.objects == 0
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    b.send(disc_obj(0))                            # 3 DW fit in 4
    assert b.status() == READY


@pytest.mark.parametrize("raw", [
    disc_obj(0) + bytes(4),                        # one DW more than the Length says
    disc_obj(0)[:-4],                              # one DW fewer
    _hdr(0x00000001, 0x40000003, bytes(4)),        # reserved bits: malformed
    b"",                                           # Go with nothing written
])
def test_length_mismatch_or_malformed_is_silently_discarded(raw: bytes) -> None:
    b = Box()
    b.send(raw)
    assert b.status() == 0                         # no Ready, no Error, not Busy
    assert b.state() is MailboxState.IDLE
    b.send(disc_obj(0))                            # the mailbox works on
    assert DoeObject.decode(b.receive()).protocol == DISCOVERY


def test_unsupported_type_sets_error() -> None:
    b = Box()
    b.send(DoeObject(*SPDM, b"abcd").encode())
    assert b.status() == ERROR
    assert b.rd(DoeReg.READ_MAILBOX) == 0
    b.send(disc_obj(0))                            # ignored while Error
    assert b.status() == ERROR and b.d.objects == 1
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0


def test_handler_failure_sets_error(caplog: pytest.LogCaptureFixture) -> None:
    d = DoeDispatcher()
    d.register(*SPDM, lambda _p: 1 // 0)  # type: ignore[arg-type,return-value]
    b = Box(d)
    with caplog.at_level(logging.ERROR):
        b.send(DoeObject(*SPDM).encode())
    assert b.status() == ERROR
    assert "ZeroDivisionError" in caplog.text


def test_handler_that_is_not_an_object_sets_error() -> None:
    b = Box()
    b.mb.handler = lambda _obj: b"\1\2\3\4"
    b.send(disc_obj(0))
    assert b.status() == ERROR


def test_silent_handler_means_no_response() -> None:
    d = DoeDispatcher()
    d.register(*SPDM, lambda _p: None)
    b = Box(d)
    b.send(DoeObject(*SPDM, b"abcd").encode())
    assert b.status() == 0 and b.state() is MailboxState.IDLE


def test_new_object_while_response_unread_is_an_error() -> None:
    b = Box()
    b.send(disc_obj(0))
    b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    b.send(disc_obj(0))
    b.wr(DoeReg.CONTROL, DoeControl.GO)
    assert b.status() == ERROR


@pytest.mark.parametrize("reg", [DoeReg.WRITE_MAILBOX, DoeReg.READ_MAILBOX])
@pytest.mark.parametrize("be", [0x1, 0x3, 0xC, 0x7])
def test_mailbox_writes_without_all_bytes_enabled_set_error(reg: DoeReg, be: int) -> None:
    # §6.30.2: checking is permitted; "strongly recommended" to set Error.
    b = Box()
    b.send(disc_obj(0))
    b.wr(reg, 0, be)
    assert b.status() == ERROR


def test_sub_dword_control_and_status_writes() -> None:
    b = Box(interrupt_message_number=3)
    b.send(disc_obj(0), go=False)
    b.wr(DoeReg.CONTROL, 0x02, be=0x1)            # byte 0: Interrupt Enable
    assert b.rd(DoeReg.CONTROL) == DoeControl.INTERRUPT_ENABLE
    b.wr(DoeReg.CONTROL, 0x80 << 24, be=0x8)      # byte 3 = 0x80: Go (Enable kept)
    assert b.status() & READY
    assert b.rd(DoeReg.CONTROL) == DoeControl.INTERRUPT_ENABLE
    b.wr(DoeReg.CONTROL, 0xFFFFFFFF, be=0x2)      # only byte 1 enabled: no Abort, no Go
    assert b.status() & READY
    b.wr(DoeReg.STATUS, 0xFF, be=0x2)             # RW1C bit lives in byte 0: unaffected
    assert b.status() & DoeStatus.INTERRUPT_STATUS
    b.wr(DoeReg.CONTROL, 0x01, be=0x1)            # byte 0: Abort
    assert not b.status() & READY


def test_read_only_registers_and_control_reads() -> None:
    b = Box()
    b.wr(DoeReg.CAPABILITIES, 0xFFFFFFFF)
    assert b.rd(DoeReg.CAPABILITIES) == 0
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE | DoeControl.ATTENTION_NOT_NEEDED
         | DoeControl.ASYNC_MESSAGE_ENABLE)
    assert b.rd(DoeReg.CONTROL) == 0              # no interrupt support: RsvdP, reads 0
    b.wr(DoeReg.STATUS, 0xFFFFFFFF)
    assert b.status() == 0
    with pytest.raises(ValueError):
        b.rd(0x18)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        b.wr(0x02, 0)  # type: ignore[arg-type]


def test_busy_until_the_response_latency_has_passed() -> None:
    b = Box(response_latency=0.25)
    b.send(disc_obj(0))
    assert b.status() == BUSY
    b.wr(DoeReg.CONTROL, DoeControl.GO)            # Go while Busy: ignored
    b.wr(DoeReg.READ_MAILBOX, 0)                   # ack while Busy: ignored
    assert b.rd(DoeReg.READ_MAILBOX) == 0
    b.now += 0.2499
    assert b.status() == BUSY
    b.now += 0.0001
    assert b.status() == READY
    assert DoeObject.decode(b.receive()).protocol == DISCOVERY
    assert b.d.objects == 1


def test_writing_while_busy_overflows() -> None:
    b = Box(response_latency=0.5)
    b.send(disc_obj(0))
    b.wr(DoeReg.WRITE_MAILBOX, 0)
    assert b.status() == ERROR
    b.now += 1
    assert b.status() == ERROR                     # the late response is not delivered


def test_abort_while_busy_drops_the_pending_response() -> None:
    b = Box(response_latency=0.5)
    b.send(disc_obj(0))
    b.wr(DoeReg.CONTROL, DoeControl.ABORT)
    assert b.status() == 0
    b.now += 1
    assert b.status() == 0 and b.rd(DoeReg.READ_MAILBOX) == 0


@given(latency=st.floats(0.0, 0.999), unsupported=st.booleans())
def test_one_second_rule(latency: float, unsupported: bool) -> None:
    # §6.30.2: Ready (or Error) within 1 s of Go.
    b = Box(response_latency=latency)
    b.send(DoeObject(*SPDM).encode() if unsupported else disc_obj(0))
    b.now += DOE_TIMEOUT
    assert b.status() & (ERROR if unsupported else READY)
    assert not b.status() & BUSY


@pytest.mark.parametrize("latency", [1.0, 2.5, -0.1])
def test_latency_beyond_the_one_second_rule_is_refused(latency: float) -> None:
    with pytest.raises(ValueError, match="1 s"):
        DoeMailbox(DoeDispatcher().handle_object, response_latency=latency)


@pytest.mark.parametrize("kw", [{"max_object_dw": 1}, {"max_object_dw": MAX_OBJECT_DW + 1},
                                {"interrupt_message_number": 1 << 11}])
def test_mailbox_constructor_bounds(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        DoeMailbox(DoeDispatcher().handle_object, **kw)  # type: ignore[arg-type]


def test_interrupts() -> None:
    b = Box(interrupt_message_number=5)
    assert b.rd(DoeReg.CAPABILITIES) == DoeCapabilities.INTERRUPT_SUPPORT | 5 << 1
    # Interrupt Enable clear: no interrupt is generated, so Interrupt Status stays clear
    # (§7.9.24.4: it is Set when an interrupt is generated).
    b.send(disc_obj(0))
    assert b.status() == READY
    assert not b.mb.take_interrupt()
    b.receive()
    assert b.status() == 0
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    assert b.status() == READY | DoeStatus.INTERRUPT_STATUS
    assert b.mb.take_interrupt() and not b.mb.take_interrupt()   # once per 0 -> 1
    b.receive()
    b.send(disc_obj(0))                                # status still set: no new interrupt
    assert not b.mb.take_interrupt()
    b.receive()
    b.wr(DoeReg.STATUS, DoeStatus.INTERRUPT_STATUS)
    b.send(DoeObject(*SPDM).encode())                  # Error raises it too
    assert b.status() == ERROR | DoeStatus.INTERRUPT_STATUS
    assert b.mb.take_interrupt()


def test_interrupt_status_is_rw1c_and_needs_interrupt_enable() -> None:
    b = Box(interrupt_message_number=1)
    b.send(DoeObject(*SPDM).encode())                  # Error, interrupts disabled
    assert b.status() == ERROR
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)  # enabling later raises nothing
    assert b.status() == ERROR and not b.mb.take_interrupt()
    b.wr(DoeReg.CONTROL, DoeControl.ABORT | DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    assert b.status() == READY | DoeStatus.INTERRUPT_STATUS and b.mb.take_interrupt()
    b.wr(DoeReg.STATUS, 0)                             # writing 0: no effect
    assert b.status() & DoeStatus.INTERRUPT_STATUS
    b.wr(DoeReg.CONTROL, 0)                            # disabling does not clear it
    assert b.status() & DoeStatus.INTERRUPT_STATUS
    b.wr(DoeReg.STATUS, DoeStatus.INTERRUPT_STATUS | DoeStatus.DATA_OBJECT_READY)  # RW1C
    assert b.status() == READY                         # Ready is RO: still set


def test_busy_cleared_is_an_interrupt_condition() -> None:
    # A request with no response (silently discarded): Busy set, then cleared (§6.30.3).
    b = Box(interrupt_message_number=2, response_latency=0.5)
    b.d.register(*SPDM, lambda _p: None)
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(DoeObject(*SPDM, b"abcd").encode())
    assert b.status() == BUSY and not b.mb.take_interrupt()
    b.now += 0.5
    assert b.status() == DoeStatus.INTERRUPT_STATUS and b.mb.take_interrupt()


@pytest.mark.parametrize(("old", "new", "irq"), [
    (MailboxState.RECEIVING, MailboxState.BUSY, False),
    (MailboxState.BUSY, MailboxState.READY, True),
    (MailboxState.BUSY, MailboxState.IDLE, True),       # Busy cleared
    (MailboxState.BUSY, MailboxState.ERROR, True),
    (MailboxState.READY, MailboxState.IDLE, False),     # Ready cleared by the last ack
    (MailboxState.RECEIVING, MailboxState.ERROR, True),
    (MailboxState.ERROR, MailboxState.IDLE, False),     # Abort
    (MailboxState.IDLE, MailboxState.RECEIVING, False),
])
def test_interrupt_conditions(old: MailboxState, new: MailboxState, irq: bool) -> None:
    assert interrupt_condition(old, new) is irq


def test_no_interrupt_support_never_sets_interrupt_status() -> None:
    b = Box()
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    assert b.status() == READY and not b.mb.take_interrupt()


def test_reset_aborts_and_restores_register_defaults() -> None:
    b = Box(interrupt_message_number=1)
    b.wr(DoeReg.CONTROL, DoeControl.INTERRUPT_ENABLE)
    b.send(disc_obj(0))
    b.mb.reset()
    assert b.status() == 0 and b.rd(DoeReg.CONTROL) == 0
    assert not b.mb.take_interrupt()


def test_transition_table_is_complete() -> None:
    completions = {MailboxEvent.RESPONSE, MailboxEvent.DISCARD, MailboxEvent.FAILURE}
    for s in MailboxState:
        for e in MailboxEvent:
            # a handler's outcome only ever arrives in BUSY (or is ignored in ERROR)
            expected = s in (MailboxState.BUSY, MailboxState.ERROR) or e not in completions
            assert ((s, e) in MAILBOX_TRANSITIONS) == expected, (s, e)
    assert all(MAILBOX_TRANSITIONS[(s, MailboxEvent.ABORT)] is MailboxState.IDLE
               for s in MailboxState)
    leave_error = {e for e in MailboxEvent
                   if MAILBOX_TRANSITIONS[(MailboxState.ERROR, e)] is not MailboxState.ERROR}
    assert leave_error == {MailboxEvent.ABORT}


# -- spdm-emu socket header ---------------------------------------------------------------------

@given(cmd=st.integers(0, 0xFFFFFFFF), tr=st.integers(0, 0xFFFFFFFF),
       size=st.integers(0, 0xFFFFFFFF))
def test_socket_header_round_trip_big_endian(cmd: int, tr: int, size: int) -> None:
    h = SocketHeader(cmd, tr, size)
    raw = h.encode()
    assert raw == struct.pack(">III", cmd, tr, size)
    assert SocketHeader.decode(raw) == h


def test_socket_header_names_and_errors() -> None:
    assert SocketHeader(SocketCommand.TEST, SocketTransport.PCI_DOE, 0).encode() \
        == bytes.fromhex("0000dead" "00000002" "00000000")
    assert SocketHeader(0xFFFE, 2, 0).command_name() == "SHUTDOWN"
    assert SocketHeader(0x1234, 2, 0).command_name() == "0x1234"
    with pytest.raises(ValueError):
        SocketHeader.decode(bytes(11))
