"""Reported measurements against reference values (``teeio-refvalues`` JSON); pure.

Used by the TSM (``tsm/attest.py``) and by the guest agent, which checks the device's
measurements against its own policy's reference values (docs/design.md, "Trust model": the guest
verifies the evidence itself).  Reference values are computed from the golden firmware
ELF (:func:`teeio.measurements.reference_values`, docs/design.md decision 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from teeio.lite_dataclass import dataclass
from teeio.measurements import (
    MEASUREMENT_HASHES,
    REFERENCE_FORMAT,
    DmtfValueType,
    MeasurementBlock,
)

__all__ = ["Comparison", "compare_measurements", "parse_reference_values", "value_type_name"]


def _is_hex(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def parse_reference_values(doc: object) -> dict[int, dict[str, Any]]:
    """A ``teeio-refvalues`` document -> {index: entry}; ValueError saying what is wrong."""
    if not isinstance(doc, dict) or doc.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"not in the {REFERENCE_FORMAT} format")
    entries = doc.get("measurements")
    if not isinstance(entries, dict):
        raise ValueError("no \"measurements\" object")
    out: dict[int, dict[str, Any]] = {}
    for key, entry in entries.items():
        where = f"measurement {key!r}"
        if not (key.isascii() and key.isdigit()) or not isinstance(entry, dict):
            raise ValueError(f"{where} is not an index with an object")
        if not isinstance(entry.get("value_type"), int):
            raise ValueError(f"{where} has no integer value_type")
        for name in ("raw", *MEASUREMENT_HASHES):
            value = entry.get(name)
            if value is not None and not _is_hex(value):
                raise ValueError(f"{where}: {name} is not a hex string")
        out[int(key)] = entry
    return out


@dataclass(frozen=True)
class Comparison:
    index: int
    ok: bool
    status: str        # "match", "MISMATCH", "MISSING", "NO REFERENCE"
    reason: str = ""   # for a failure: the one-line reason
    expected: str = ""  # the reference value (hex) a MISMATCH was compared with


def value_type_name(value_type: int) -> str:
    try:
        return DmtfValueType(value_type).name
    except ValueError:
        return f"type 0x{value_type:02x}"


def compare_measurements(blocks: Sequence[MeasurementBlock],
                         references: dict[int, dict[str, Any]],
                         hash_name: str) -> list[Comparison]:
    """Each reported block against its reference (by index), then references the device
    did not report.  Digest blocks compare with the *hash_name* reference digest."""
    out: list[Comparison] = []
    for b in sorted(blocks, key=lambda b: b.index):
        ref = references.get(b.index)
        if ref is None:
            out.append(Comparison(b.index, False, "NO REFERENCE",
                                  f"measurement {b.index} has no reference value"))
            continue
        label = f" ({ref['label']})" if ref.get("label") else ""
        if ref.get("value_type") != b.value_type:
            out.append(Comparison(b.index, False, "MISMATCH",
                                  f"measurement {b.index} does not match the reference value"
                                  f"{label}: value type {value_type_name(b.value_type)}, "
                                  f"expected {value_type_name(ref['value_type'])}"))
            continue
        key = "raw" if b.raw else hash_name
        expected = ref.get(key)
        if not isinstance(expected, str):
            out.append(Comparison(b.index, False, "MISMATCH",
                                  f"measurement {b.index}: the reference values have no "
                                  f"{'raw value' if b.raw else hash_name + ' digest'}"))
        elif bytes.fromhex(expected) != b.value:
            out.append(Comparison(b.index, False, "MISMATCH",
                                  f"measurement {b.index} does not match the reference value"
                                  f"{label}", expected))
        else:
            out.append(Comparison(b.index, True, "match"))
    reported = {b.index for b in blocks}
    for index in sorted(set(references) - reported):
        out.append(Comparison(index, False, "MISSING",
                              f"measurement {index} is in the reference values but the device "
                              "did not report it"))
    return out
