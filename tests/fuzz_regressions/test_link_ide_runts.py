"""Found by fuzz/harnesses/link_ide.py: a burst from the device whose IDE requests were
followed by a runt (a TLP of 0 or 1 bytes) raised IndexError from the root port's run
parser (``teeio.tlp.parse_runs._matching`` read byte 1 of every wire it looked ahead at),
and so did a runt after an IDE completion in the device's completion parser.  A runt
ends the run; the receiver refuses it as malformed and goes on."""

from __future__ import annotations

import os

import pytest

from fuzz.harnesses.link_ide import SID, World, traffic
from teeio.tlp.parse_runs import parse_ide_completion_runs, parse_ide_request_runs

RUNTS = [b"", b"\x92"]


@pytest.mark.parametrize("runt", RUNTS, ids=["empty", "one byte"])
def test_a_runt_ends_a_run_of_requests(runt: bytes) -> None:
    up, _, _ = traffic(4)
    unit = up[0]                                  # a 1 KiB write: one aggregated unit of 4
    wires = [unit[0], runt, *unit[1:]]
    assert [k for _, k in parse_ide_request_runs(wires, 0, SID, True)] == [1]
    w = World(4)
    try:
        w.rp.receive(wires)                       # the runt refused, the unit still whole
        assert os.pread(w.fd, 1024, 0x1000) == bytes(range(256)) * 4
        assert w.rp.status()["streams"][0]["state"] == "secure"
    finally:
        w.close()


@pytest.mark.parametrize("runt", RUNTS, ids=["empty", "one byte"])
def test_a_runt_ends_a_run_of_completions(runt: bytes) -> None:
    _, down, _ = traffic(4)
    cpls = next(b for b in down if b)             # the read's four CplDs
    assert [k for _, k in parse_ide_completion_runs(cpls, 0, SID, True)] == [2, 2]
    wires = [cpls[0], runt, *cpls[1:]]
    assert [k for _, k in parse_ide_completion_runs(wires, 0, SID, True)] == [1]
