"""Device measurements as the SPDM responder reports them (DSP0274 §10.11, DMTF format).

A :class:`MeasurementSource` is one measurement's content.  The responder turns it
into a DMTF measurement block: a digest of ``data`` with the negotiated measurement
hash (``as_digest``), or the raw bit stream (DMTF value type bit 7 set).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class DmtfValueType(IntEnum):
    """DMTFSpecMeasurementValueType bits 6:0 (DSP0274 1.2 Table "DMTF measurement")."""

    IMMUTABLE_ROM = 0x00
    MUTABLE_FIRMWARE = 0x01
    HARDWARE_CONFIG = 0x02
    FIRMWARE_CONFIG = 0x03
    MEASUREMENT_MANIFEST = 0x04
    DEVICE_MODE = 0x05
    VERSION = 0x06
    SECURE_VERSION_NUMBER = 0x07


RAW_BIT_STREAM = 0x80  # value type bit 7: the value is the raw bit stream, not a digest


@dataclass(frozen=True)
class MeasurementSource:
    index: int            # 1..0xEF
    value_type: int       # DmtfValueType
    data: bytes
    as_digest: bool = True
    label: str = ""
