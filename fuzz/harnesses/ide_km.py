"""IDE_KM objects (``teeio/ide_km.py``): IdeKmDecodeError or an object that re-encodes to
its bytes."""

from __future__ import annotations

from fuzz import templates
from fuzz.runner import check
from teeio.ide_km import IdeKmError, KpAck, decode_object

KIND = "decoder"


def seeds() -> list[bytes]:
    return templates.ide_km_objects() + [bytes((0, 6, 0, 0, 1, 0, 0, 0))]


def one_input(data: bytes) -> None:
    try:
        obj = decode_object(data)
    except IdeKmError:
        return
    again = obj.encode()
    check(again == data, f"{type(obj).__name__} re-encodes differently")
    check(decode_object(again) == obj, f"{type(obj).__name__} round trip")
    if isinstance(obj, KpAck):
        obj.status_code  # noqa: B018 - the property is part of the decoded value's contract
