"""The optional C accelerator of IDE TLP protection (teeio._ide_accel, PCIe 6.x
§6.33.4-§6.33.6) against the pure-Python reference (teeio.ide_runs): byte-identical TLPs
and MACs, the same plaintexts and stopping points for any payload sizes, aggregation on or
off, tampering; and the fallback when it is not there."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeio import ide_accel, ide_runs
from teeio.ide import IdeKey

pytestmark = pytest.mark.skipif(not ide_accel.available(),
                                reason="the C accelerator is not built")

KEY = IdeKey(bytes(range(32)), ifv=1)
PATTERN = bytes(range(251)) * 20          # payload bytes, a different start per TLP


@contextmanager
def path(c: bool) -> Iterator[None]:
    before = ide_accel.set_enabled(c)
    try:
        yield
    finally:
        ide_accel.set_enabled(before)


@st.composite
def runs(draw: st.DrawFn) -> tuple[bytes, list[bytes], list[bytes], int, int]:
    """A prefix (M set), headers of 3 or 4 DW (Fmt bit 5 saying which), DW-padded
    payloads of 0..4096 bytes, a unit size and a first counter."""
    n = draw(st.integers(0, 24))
    sizes = draw(st.lists(st.sampled_from([0, 4, 12, 128, 256, 260, 512, 1020, 1024, 1028,
                                           2048, 4096]), min_size=n, max_size=n))
    headers = []
    for _ in range(n):
        wide = draw(st.booleans())
        rest = draw(st.binary(min_size=15 if wide else 11, max_size=15 if wide else 11))
        headers.append(bytes((0x60 if wide else 0x40,)) + rest)
    payloads = [PATTERN[i:i + size] for i, size in enumerate(sizes)]
    prefix = bytes((0x92, draw(st.sampled_from([0x01, 0x05, 0x13, 0x27])), 9, 0))
    return (prefix, headers, payloads, draw(st.sampled_from(ide_runs.UNIT_TLPS_MODES)),
            draw(st.integers(1, (1 << 64) - 30)))


@settings(max_examples=300, deadline=None)
@given(runs(), st.data())
def test_c_and_python_give_the_same_bytes(run: tuple[bytes, list[bytes], list[bytes], int, int],
                                          data: st.DataObject) -> None:
    prefix, headers, payloads, unit, counter = run
    with path(True):
        c_wires, c_units = ide_runs.seal_units(KEY, counter, prefix, headers,
                                               [memoryview(p) for p in payloads], unit)
    with path(False):
        py_wires, py_units = ide_runs.seal_units(KEY, counter, prefix, headers, payloads, unit)
    assert c_wires == py_wires and c_units == py_units
    assert py_units == len(ide_runs.unit_sizes([len(p) for p in payloads], unit))
    wires = list(py_wires)
    if wires and data.draw(st.booleans()):         # tamper, drop or truncate something
        i = data.draw(st.integers(0, len(wires) - 1))
        how = data.draw(st.sampled_from(["flip", "drop", "cut"]))
        if how == "drop":
            del wires[i]
        elif how == "cut":
            wires[i] = wires[i][:data.draw(st.integers(0, len(wires[i])))]
        else:
            bad = bytearray(wires[i])
            bad[data.draw(st.integers(0, len(bad) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            wires[i] = bytes(bad)
    stop = data.draw(st.integers(0, len(wires)))
    receiver_unit = data.draw(st.sampled_from([unit, ide_runs.UNIT_TLPS_MAX]))
    results = []
    for c in (True, False):
        with path(c):
            listed = ide_runs.open_units(KEY, counter, wires, 0, stop, receiver_unit)
            joined = ide_runs.open_units_joined(KEY, counter, wires, 0, stop, receiver_unit)
        assert joined == (b"".join(listed[0]), listed[1], listed[2])
        results.append(listed)
    assert results[0] == results[1]
    if wires == py_wires and stop == len(wires):
        assert b"".join(results[0][0]) == b"".join(payloads)
        assert results[0][1:] == (len(wires), py_units)


def test_the_counter_stops_at_2_to_the_64() -> None:
    top = (1 << 64) - 1
    prefix, headers, payloads = bytes((0x92, 1, 9, 0)), [bytes((0x40,)) + bytes(11)] * 3, \
        [b"abcd"] * 3
    with path(False):
        wires, _ = ide_runs.seal_units(KEY, top - 1, prefix, headers[:2], payloads[:2])
        wires += ide_runs.seal_units(KEY, 5, prefix, headers[2:], payloads[2:])[0]
    for c in (True, False):
        with path(c):
            assert ide_runs.open_units(KEY, top - 1, wires, 0, 3)[1:] == (2, 2)
            assert ide_runs.open_units(KEY, top + 1, wires, 0, 3)[1:] == (0, 0)


def test_the_engine_keeps_no_secret_in_its_repr() -> None:
    engine = KEY.accel
    assert KEY.key.hex() not in repr(engine) and "Gcm" in repr(engine)
    with pytest.raises(ValueError, match="32 bytes"):
        ide_accel.gcm(bytes(16))


def test_switching_paths_and_the_environment() -> None:
    with path(True):
        assert ide_accel.backend() == "c" and ide_accel.enabled()
    assert ide_accel.openssl_version()
    with path(False):
        assert ide_accel.backend() == "python" and not ide_accel.enabled()
    code = "from teeio import ide_accel; print(ide_accel.available(), ide_accel.backend())"
    env = dict(os.environ, TEEIO_IDE_ACCEL="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["True", "python"]


def test_without_the_extension_everything_takes_the_reference() -> None:
    """As on a host where it was not built: the import fails, the reference runs."""
    code = ("import sys; sys.modules['teeio._ide_accel'] = None\n"
            "from teeio import ide_accel, ide_runs\n"
            "from teeio.ide import IdeKey\n"
            "k = IdeKey(bytes(32))\n"
            "w, u = ide_runs.seal_units(k, 1, bytes((0x92, 1, 9, 0)), [bytes([0x40]) + "
            "bytes(11)] * 2, [b'abcd', b'efgh'], 2)\n"
            "print(ide_accel.available(), ide_accel.backend(), u, "
            "ide_runs.open_units_joined(k, 1, w, 0, 2, 8)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "python", "1", "b'abcdefgh'"]
