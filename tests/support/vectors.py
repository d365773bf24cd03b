"""Known-answer vectors kept as data in tests/vectors/*.json, each file naming its source
(an RFC, libspdm, or -- said so -- data this project generated).  Byte strings are hex;
spaces inside them only separate fields.  Integers may be written as "0x..." strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from teeio.tlp import Tlp

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def load(name: str) -> dict[str, Any]:
    """tests/vectors/*name*.json; fails unless it names its source."""
    doc = json.loads((VECTORS / f"{name}.json").read_text())
    assert isinstance(doc, dict) and doc.get("source"), f"{name}.json names no source"
    return doc


def unhex(text: str) -> bytes:
    """Hex bytes (whitespace between fields ignored)."""
    return bytes.fromhex(text)


def number(value: int | str) -> int:
    """An integer, or one written as a string ("0x1234", "42")."""
    return value if isinstance(value, int) else int(value, 0)


def build_tlp(spec: dict[str, Any]) -> Tlp:
    """The TLP a vector describes: a ``memory_write`` of ``data`` (hex) or a
    ``memory_read`` of ``length`` bytes, by ``requester_id`` with ``tag`` at ``address``."""
    head = (number(spec["requester_id"]), number(spec["tag"]), number(spec["address"]))
    t_bit = bool(spec.get("t_bit", False))
    if spec["kind"] == "memory_write":
        return Tlp.memory_write(*head, unhex(spec["data"]), t_bit=t_bit)
    if spec["kind"] == "memory_read":
        return Tlp.memory_read(*head, number(spec["length"]), t_bit=t_bit)
    raise ValueError(f"no TLP kind {spec['kind']!r}")
