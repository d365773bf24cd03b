"""The DOE dispatcher (teeio/doe/): DOE Discovery answered and walked (PCIe 6.3 §6.30.1.1),
objects routed to the handler of their protocol, registration rules, serialisation."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from teeio.doe import (
    PCI_SIG_VENDOR_ID,
    DataObjectType,
    DiscoveryRequest,
    DiscoveryResponse,
    DoeDecodeError,
    DoeDispatcher,
    DoeError,
    DoeObject,
    DoeUnsupportedError,
    discover,
)
from tests.support.doe_objects import DISCOVERY, SECURED, SPDM, Exchange, disc_obj, echo

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
