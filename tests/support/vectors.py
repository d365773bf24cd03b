"""Known-answer vectors kept as data in tests/vectors/*.json, each file naming its source
(an RFC, libspdm, or -- said so -- data this project generated).  Byte strings are hex;
spaces inside them only separate fields.  Integers may be written as "0x..." strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
