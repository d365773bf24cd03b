"""tsm.attest: reference values read back and compared with reported measurement blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teeio.measurements import DmtfValueType, MeasurementBlock
from tsm.attest import AttestError, compare_measurements, load_reference_values

CODE = MeasurementBlock(1, DmtfValueType.MUTABLE_FIRMWARE, False, bytes(range(48)))
VERSION = MeasurementBlock(3, DmtfValueType.VERSION, True, b"teeio-fw 1.0.0")
REFS = {1: {"value_type": 1, "label": "code", "sha384": bytes(range(48)).hex(),
            "sha256": "00" * 32},
        3: {"value_type": 6, "raw": b"teeio-fw 1.0.0".hex()}}


def test_all_match() -> None:
    got = compare_measurements([VERSION, CODE], REFS, "sha384")
    assert [(c.index, c.ok, c.status) for c in got] == [(1, True, "match"), (3, True, "match")]


def test_digest_and_raw_mismatch() -> None:
    refs = {1: dict(REFS[1], sha384="ff" * 48), 3: dict(REFS[3], raw=b"teeio-fw 1.0.1".hex())}
    got = compare_measurements([CODE, VERSION], refs, "sha384")
    assert [c.status for c in got] == ["MISMATCH", "MISMATCH"]
    assert got[0].reason == "measurement 1 does not match the reference value (code)"
    assert got[0].expected == "ff" * 48
    assert got[1].reason == "measurement 3 does not match the reference value"


def test_type_missing_hash_extra_and_missing_blocks() -> None:
    wrong_type = MeasurementBlock(1, DmtfValueType.FIRMWARE_CONFIG, False, bytes(48))
    got = compare_measurements([wrong_type], REFS, "sha384")
    assert got[0].reason == ("measurement 1 does not match the reference value (code): value "
                             "type FIRMWARE_CONFIG, expected MUTABLE_FIRMWARE")
    assert (got[1].index, got[1].status) == (3, "MISSING")
    got = compare_measurements([CODE], {1: REFS[1]}, "sha512")
    assert got[0].reason == "measurement 1: the reference values have no sha512 digest"
    got = compare_measurements([CODE, MeasurementBlock(9, 0, True, b"x")], {1: REFS[1]},
                               "sha384")
    assert (got[1].index, got[1].status, got[1].reason) == (
        9, "NO REFERENCE", "measurement 9 has no reference value")


@pytest.mark.parametrize(("doc", "message"), [
    ({"format": "other"}, "not in the teeio-reference-values/1 format"),
    ({"format": "teeio-reference-values/1"}, 'no "measurements" object'),
    ({"format": "teeio-reference-values/1", "measurements": {"x": {}}},
     "measurement 'x' is not an index with an object"),
    ({"format": "teeio-reference-values/1", "measurements": {"1": {"sha384": "00"}}},
     "measurement '1' has no integer value_type"),
    ({"format": "teeio-reference-values/1",
      "measurements": {"1": {"value_type": 1, "sha384": "xyz"}}},
     "measurement '1': sha384 is not a hex string"),
])
def test_bad_reference_files(tmp_path: Path, doc: object, message: str) -> None:
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(AttestError, match=message):
        load_reference_values(path)
