"""The platform's cached direct-path decision for BAR0 (vfio_user_dev/platform.py): every
input flipped after the decision was made -- the link's taps, the root port's MMIO routing
(streams, keys, Enable, IDE failures, private MMIO), device reset, client gone, the
requester ID, the TDI state -- is honoured by the very next access (PCIe 6.x §11.2.1:
TEE MMIO crosses the link as TLPs whenever anything but the clear T=0 path applies)."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from teeio.device_regs import R
from teeio.ide import Direction, IdeKey, IdeTx, KeySet, SubStream
from teeio.tdisp.defs import TdiState
from teeio.tlp import Tlp, TlpType, peek
from vfio_user_dev.link.capture import CaptureWriter, read_capture
from vfio_user_dev.link.faults import Fault, FaultKind
from vfio_user_dev.link.interfaces import LinkDirection
from vfio_user_dev.link.wire import Link
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import PciRegion
from vfio_user_dev.root_port import RootPort, RootPortError

SID = 5
ALL_ONES = b"\xff" * 4


@pytest.fixture
def m() -> Iterator[Platform]:
    p = Platform()
    yield p
    p.close()


def rid_of(m: Platform) -> int:
    return m.device.link_end.requester_id


def sent(m: Platform) -> int:
    """MMIO requests the root port built, sent or refused to send (the direct path: none)."""
    c = m.root_port.counters
    return c["mmio_requests"] + c["mmio_not_sent"]


def read_path(m: Platform, host: bool = False) -> tuple[str, bytes]:
    """One BAR0 read of SCRATCH: which path it took, and what it read."""
    before = sent(m)
    got = m.region_read(PciRegion.BAR0, R.SCRATCH, 4, host=host)
    return ("link" if sent(m) > before else "direct"), got


def write_path(m: Platform, value: bytes = b"\x01\x02\x03\x04") -> str:
    before = sent(m)
    m.region_write(PciRegion.BAR0, R.SCRATCH, value)
    return "link" if sent(m) > before else "direct"


def key_all(rp: RootPort, sid: int, key_set: KeySet = KeySet.K0) -> None:
    """Keys in every (direction, sub-stream) slot of the root port's end, GO."""
    for d in Direction:
        for s in SubStream:
            rp.program_key(sid, key_set, d, s, IdeKey.generate())
        rp.key_set_go(sid, key_set, d)


def secure_stream(m: Platform, sid: int = SID) -> None:
    rid = rid_of(m)
    m.root_port.setup_stream(sid, rid, rid)
    key_all(m.root_port, sid)
    m.root_port.enable_stream(sid)


def warm(m: Platform) -> None:
    """The decision made and kept: two accesses, both direct."""
    assert read_path(m)[0] == "direct"
    assert write_path(m) == "direct"


# -- the link's taps --------------------------------------------------------------------------

def test_a_capture_started_mid_session_sees_the_next_mmio_tlp(m: Platform,
                                                              tmp_path: Path) -> None:
    warm(m)
    m.link.capture = CaptureWriter(tmp_path / "late.pcap")
    path, got = read_path(m)
    assert path == "link" and got == b"\x01\x02\x03\x04"
    m.link.capture.flush()
    kinds = [peek(r.data).type for r in read_capture(tmp_path / "late.pcap")]
    assert TlpType.MRD32 in kinds or TlpType.MRD64 in kinds
    assert write_path(m) == "link"
    m.link.capture.close()
    m.link.capture = None                       # stopped: direct again
    warm(m)


def test_an_armed_fault_takes_the_next_access_onto_the_link(m: Platform) -> None:
    warm(m)
    fault = m.link.inject(Fault(FaultKind.DROP, LinkDirection.DOWNSTREAM))
    path, got = read_path(m)
    assert path == "link" and got == ALL_ONES     # the MRd was dropped
    assert fault.done
    warm(m)                                        # fired: nothing armed any more


def test_a_fault_that_never_fires_keeps_the_accesses_on_the_link(m: Platform) -> None:
    warm(m)
    m.link.inject(Fault(FaultKind.FLIP_T_BIT, LinkDirection.DOWNSTREAM))  # needs IDE TLPs
    for _ in range(3):
        assert read_path(m) == ("link", b"\x01\x02\x03\x04")
    m.link.clear_faults()
    warm(m)


# -- the TDI state (read on every access, never kept) ------------------------------------------

@pytest.mark.parametrize("state", [TdiState.CONFIG_LOCKED, TdiState.RUN, TdiState.ERROR])
def test_a_tdi_leaving_unlocked_is_gated_at_once(m: Platform, state: TdiState,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    warm(m)
    tdi = SimpleNamespace(state=state, default_stream_id=None)
    monkeypatch.setattr(m.device, "tdisp", tdi)
    assert read_path(m) == ("link", ALL_ONES)      # T=0 outside CONFIG_UNLOCKED: UR
    assert write_path(m) == "link"
    assert m.device.r[R.SCRATCH] == 0x04030201     # the write was refused
    assert m.device.tdisp_refusals().get("mmio_t0_not_unlocked") == 2
    tdi.state = TdiState.CONFIG_UNLOCKED
    warm(m)


# -- the root port's MMIO routing --------------------------------------------------------------

def test_a_stream_turning_secure_is_honoured(m: Platform) -> None:
    warm(m)
    rid = rid_of(m)
    m.root_port.setup_stream(SID, rid, rid)
    warm(m)                                        # Insecure: still in the clear
    key_all(m.root_port, SID)
    warm(m)                                        # keyed but not enabled: still clear
    m.root_port.enable_stream(SID)
    assert read_path(m)[0] == "link"               # Secure: on the stream
    m.root_port.enable_stream(SID, False)
    warm(m)


@pytest.mark.parametrize("leave", ["remove", "reset", "invalidate_all", "key_set_stop",
                                   "fail_message", "device_reset", "client_gone",
                                   "platform_reset"])
def test_a_stream_leaving_secure_is_honoured(m: Platform, leave: str) -> None:
    secure_stream(m)
    assert read_path(m)[0] == "link"
    assert read_path(m)[0] == "link"               # kept: still the stream
    rp = m.root_port
    {"remove": lambda: rp.remove_stream(SID),
     "reset": lambda: rp.reset_stream(SID),
     "invalidate_all": lambda: rp.invalidate_all("test"),
     "key_set_stop": lambda: rp.key_set_stop(SID, KeySet.K0, Direction.TX, SubStream.NPR),
     "fail_message": lambda: rp.ide_fail_message(SID, "test"),
     "device_reset": lambda: m.device.reset("flr"),
     "client_gone": lambda: m.client_gone("test"),
     "platform_reset": lambda: m.reset()}[leave]()
    warm(m)


def test_a_stream_keyed_again_after_key_set_stop_is_honoured(m: Platform) -> None:
    secure_stream(m)
    m.root_port.key_set_stop(SID, KeySet.K0, Direction.RX)
    warm(m)                                        # Rx keys gone: Insecure, clear
    for s in SubStream:
        m.root_port.program_key(SID, KeySet.K1, Direction.RX, s, IdeKey.generate())
    warm(m)
    m.root_port.key_set_go(SID, KeySet.K1, Direction.RX)    # Enable still set: Secure
    assert read_path(m)[0] == "link"


def test_private_mmio_and_its_revocation_are_honoured(m: Platform) -> None:
    secure_stream(m)
    rp, rid = m.root_port, rid_of(m)
    rp.set_mmio_private(rid, SID, True)
    t1 = rp.counters["mmio_t1"]
    assert read_path(m)[0] == "link" and rp.counters["mmio_t1"] == t1 + 1
    rp.revoke_requester(rid, "test")               # private MMIO off, stream still Secure
    assert read_path(m)[0] == "link" and rp.counters["mmio_t1"] == t1 + 1
    rp.remove_stream(SID)
    warm(m)


def test_an_ide_check_failure_at_the_root_port_is_honoured(m: Platform) -> None:
    secure_stream(m)
    assert read_path(m)[0] == "link"
    forged = IdeTx(SID)                    # keys the root port never saw: the MAC fails
    for s in SubStream:
        forged.program(KeySet.K0, s, IdeKey.generate())
    forged.go(KeySet.K0)
    m.root_port.receive([forged.protect(Tlp.memory_write(rid_of(m), 0, 0x1000, b"x" * 8))])
    assert m.root_port.counters["ide_failures"] == 1
    assert not m.root_port.streams[SID].is_secure()
    warm(m)                                # Insecure: in the clear again


def test_a_new_requester_id_is_decided_again(m: Platform) -> None:
    other = rid_of(m) + 1
    m.root_port.setup_stream(SID, other, other)
    key_all(m.root_port, SID)
    m.root_port.enable_stream(SID)
    warm(m)                                        # the stream covers another function
    m.device.link_end.requester_id = other
    assert read_path(m)[0] == "link"


def test_the_hosts_path_is_decided_on_every_access(m: Platform) -> None:
    secure_stream(m)
    m.root_port.set_mmio_private(rid_of(m), SID, True)
    t1 = m.root_port.counters["mmio_t1"]
    read_path(m)                                   # the VMM's: T=1, decision kept
    read_path(m, host=True)                        # the host's: never T=1
    read_path(m)
    assert m.root_port.counters["mmio_t1"] == t1 + 2


# -- every change, against the decision made afresh -------------------------------------------

#: the root port's and the link's public methods that change nothing MMIO routing or the
#: taps read (queries, DMA, windows), each reviewed; a new method must be added here or to
#: OPERATIONS below
NOT_ROUTING = {
    "RootPort": {"events_since", "status", "has_stream", "key_programmed", "mmio_in_clear",
                 "mmio_read", "mmio_write", "receive", "clear_write", "clear_read",
                 "copy_direct_many",
                 "authorise_window", "reauthorise_window", "revoke_window", "attach_link",
                 "completer_id", "mps", "mrrs", "window_gate", "aggregation_supported"},
    "Link": {"set_payload_sizes", "send_upstream", "send_downstream", "clear_write", "clear_copy",
             "clear_copy_many",
             "clear_read", "ide_fail_message_upstream", "ide_fail_message_downstream",
             "status", "close", "tapped"},
}


def _public(cls: type) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}


Op = Callable[[Platform, random.Random, Path], None]


def _stream_range(m: Platform, rng: random.Random) -> tuple[int, int]:
    rid = rid_of(m)
    return rng.choice([(rid, rid), (rid + 1, rid + 1), (0, 0xFFFF)])


def _capture(m: Platform, rng: random.Random, tmp: Path) -> None:
    if m.link.capture is None:
        m.link.capture = CaptureWriter(tmp / f"c{rng.getrandbits(32)}.pcap")
    else:
        m.link.capture.close()
        m.link.capture = None


OPERATIONS: dict[str, dict[str, Op]] = {
    "RootPort": {
        "setup_stream": lambda m, r, _t: m.root_port.setup_stream(
            rng_sid(r), *_stream_range(m, r)),
        "remove_stream": lambda m, r, _t: m.root_port.remove_stream(rng_sid(r)),
        "program_key": lambda m, r, _t: m.root_port.program_key(
            rng_sid(r), r.choice(list(KeySet)), r.choice(list(Direction)),
            r.choice(list(SubStream)), IdeKey.generate()),
        "key_set_go": lambda m, r, _t: key_all(m.root_port, rng_sid(r),
                                               r.choice(list(KeySet))),
        "key_set_stop": lambda m, r, _t: m.root_port.key_set_stop(
            rng_sid(r), r.choice(list(KeySet)), r.choice(list(Direction))),
        "set_aggregation": lambda m, r, _t: m.root_port.set_aggregation(
            rng_sid(r), {SubStream.PR: r.choice([1, 2])}),
        "enable_stream": lambda m, r, _t: m.root_port.enable_stream(
            rng_sid(r), r.random() < 0.7),
        "reset_stream": lambda m, r, _t: m.root_port.reset_stream(rng_sid(r)),
        "invalidate_all": lambda m, _r, _t: m.root_port.invalidate_all("test"),
        "ide_fail_message": lambda m, r, _t: m.root_port.ide_fail_message(rng_sid(r), "t"),
        "set_mmio_private": lambda m, r, _t: m.root_port.set_mmio_private(
            rid_of(m), rng_sid(r), r.random() < 0.7),
        "revoke_requester": lambda m, _r, _t: m.root_port.revoke_requester(rid_of(m), "t"),
        "device_reset": lambda m, _r, _t: m.root_port.device_reset(rid_of(m), "t"),
    },
    "Link": {
        "capture": _capture,
        "inject": lambda m, r, _t: m.link.inject(Fault(
            r.choice([FaultKind.DROP, FaultKind.FLIP_T_BIT, FaultKind.FLIP_PAYLOAD]),
            r.choice(list(LinkDirection)), r.choice([1, 2]))),
        "clear_faults": lambda m, _r, _t: m.link.clear_faults(),
    },
    "other": {
        "secure_stream": lambda m, r, _t: secure_stream(m, rng_sid(r)),
        "reset": lambda m, _r, _t: m.reset(),
        "client_gone": lambda m, _r, _t: m.client_gone("test"),
        "flr": lambda m, _r, _t: m.device.reset("flr"),
        "requester_id": lambda m, r, _t: setattr(
            m.device.link_end, "requester_id", r.choice([0x0100, 0x0101])),
    },
}


def rng_sid(rng: random.Random) -> int:
    return rng.choice([SID, SID + 1])


@pytest.mark.parametrize(("cls", "name"), [(RootPort, "RootPort"), (Link, "Link")])
def test_every_public_method_is_reviewed(cls: type, name: str) -> None:
    assert _public(cls) == NOT_ROUTING[name] | set(OPERATIONS[name])


@pytest.mark.parametrize("seed", range(6))
def test_every_access_takes_the_path_a_fresh_decision_gives(m: Platform, seed: int,
                                                            tmp_path: Path) -> None:
    rng = random.Random(seed)
    ops = [(group, name, op) for group, table in OPERATIONS.items()
           for name, op in table.items()]
    seen: set[str] = set()
    for _ in range(600):
        group, name, op = rng.choice(ops)
        try:
            op(m, rng, tmp_path)
        except RootPortError:
            continue                                # refused: nothing changed
        seen.add(name)
        for access in ("read", "write"):
            expected = ("direct" if m.device.tdi_state() is TdiState.CONFIG_UNLOCKED
                        and not m.link.tapped and m.root_port.mmio_in_clear(rid_of(m))
                        else "link")
            got = read_path(m)[0] if access == "read" else write_path(m)
            assert got == expected, (seed, group, name, access)
    assert seen == {n for table in OPERATIONS.values() for n in table}
