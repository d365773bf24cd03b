"""The platform's event log (vfio_user_dev/platform_events.py) and what emits into it."""

from __future__ import annotations

import threading
import time

from teeio.pcie.config import Command, Reg
from teeio.tdisp.defs import TdiState
from vfio_user_dev.platform import Platform
from vfio_user_dev.platform_events import PlatformEvents
from vfio_user_dev.protocol import PciRegion


def test_events_are_numbered_in_order_and_filtered_by_kind() -> None:
    log = PlatformEvents()
    log.emit("a", x=1)
    log.emit("b")
    log.emit("a", x=2)
    events, lost = log.since(0)
    assert [(e["seq"], e["kind"]) for e in events] == [(1, "a"), (2, "b"), (3, "a")]
    assert not lost and log.last_seq == 3
    assert [e["x"] for e in log.since(1, kinds=frozenset({"a"}))[0]] == [2]
    assert log.since(3) == ([], False)


def test_a_long_poll_returns_at_the_next_event() -> None:
    log = PlatformEvents()
    threading.Timer(0.1, lambda: log.emit("late")).start()
    t0 = time.monotonic()
    events, _ = log.since(0, wait=5)
    assert [e["kind"] for e in events] == ["late"] and time.monotonic() - t0 < 2
    t0 = time.monotonic()
    assert log.since(1, wait=0.2) == ([], False)
    assert time.monotonic() - t0 >= 0.15


def test_dropped_events_are_reported_as_lost() -> None:
    log = PlatformEvents(max_events=4)
    for i in range(10):
        log.emit("e", i=i)
    events, lost = log.since(2)
    assert lost and [e["i"] for e in events] == [6, 7, 8, 9]
    assert log.since(6)[1] is False          # nothing after 6 was dropped
    assert PlatformEvents().boot != log.boot


def test_the_device_and_the_platform_report_what_changes_truth() -> None:
    m = Platform()
    try:
        rid = m.device.link_end.requester_id
        m.region_write(PciRegion.CONFIG, Reg.COMMAND,
                       int(Command.MEMORY_SPACE | Command.BUS_MASTER).to_bytes(2, "little"))
        m.reset("flr")
        events, _ = m.events.since(0)
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "command" and events[0]["bus_master"] is True
        assert events[0]["by"] == "vmm" and events[0]["requester_id"] == rid
        reset = next(e for e in events if e["kind"] == "device_reset")
        assert reset["reason"] == "flr" and reset["requester_id"] == rid
        m.client_gone("killed", client=3)
        gone = m.events.since(int(str(reset["seq"])))[0]
        assert gone[0]["kind"] == "client_disconnected" and gone[0]["reason"] == "killed"
        assert any(e["kind"] == "device_reset" and e["reason"] == "client_gone" for e in gone)
    finally:
        m.close()


def test_a_reset_takes_the_root_ports_end_out_of_secure() -> None:
    """The device's keys go with a reset (§6.33.6); so does the root port's end."""
    m = Platform()
    try:
        rid = m.device.link_end.requester_id
        rp = m.root_port
        rp.setup_stream(3, rid, rid)
        rp.streams[3].enabled = True
        seq = m.events.last_seq
        m.reset("client_reset")
        (ev,) = rp.events_since(seq, ("rp_stream",))
        assert ev["stream"] == 3 and ev["state"] == "insecure"
        assert "device reset (client_reset)" in str(ev["reason"])
        assert not rp.streams[3].enabled
    finally:
        m.close()


def test_ide_capability_writes_are_events() -> None:
    m = Platform()
    try:
        ide = m.device.ide
        seq = m.events.last_seq
        m.region_write(PciRegion.CONFIG, ide.offset + 4, bytes(4), host=True)
        (ev,) = m.events.since(seq, kinds=frozenset({"ide_registers"}))[0]
        assert ev["offset"] == ide.offset + 4 and ev["size"] == 4 and ev["by"] == "host"
    finally:
        m.close()


def test_windows_only_for_a_tdi_in_run_once_the_function_has_tdisp() -> None:
    m = Platform()
    try:
        rid = m.device.link_end.requester_id
        assert m.root_port.window_gate is not None
        assert m.root_port.window_gate(rid) is None            # no TDISP: any window
        m.device.tdisp = object()   # type: ignore[assignment]  # a TDI, CONFIG_UNLOCKED
        m.device.tdi_state = lambda: TdiState.CONFIG_UNLOCKED   # type: ignore[method-assign]
        assert m.root_port.window_gate(rid) == "its TDI is CONFIG_UNLOCKED, not RUN"
        assert m.root_port.window_gate(rid + 1) is None        # another function's
    finally:
        m.device.tdisp = None
        m.close()
