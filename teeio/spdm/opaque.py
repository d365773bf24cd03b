"""KEY_EXCHANGE opaque data: DSP0277 secured-message version negotiation (SPDM 1.2+ OpaqueDataFmt1).

DSP0274 1.2 Table "General opaque data table format" and DSP0277 Tables
"Secured message opaque data element" (libspdm ``libspdm_com_opaque_data.c``)::

    TotalElements(1) | Reserved(3)
    element:  ID(1)=0 DMTF | VendorLen(1)=0 | OpaqueElementDataLen(2) |
              SMDataVersion(1)=1 | SMDataID(1) | SM data ... | zero pad to 4 bytes
      SMDataID 1 SupportedVersion (requester): VersionCount(1), VersionNumberEntry(2) x n
      SMDataID 0 VersionSelection (responder): SelectedVersion(2)

A version number entry is major[15:12] minor[11:8] update[7:4] alpha[3:0].
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from teeio.lite_dataclass import dataclass

from .defs import SM_DATA_VERSION, RegistryId, SmDataId
from .errors import DecodeError


@dataclass(frozen=True)
class OpaqueElement:
    registry_id: int
    vendor_id: bytes
    data: bytes


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def encode_opaque(elements: Sequence[OpaqueElement]) -> bytes:
    out = bytes((len(elements), 0, 0, 0))
    for e in elements:
        body = (bytes((e.registry_id, len(e.vendor_id))) + e.vendor_id
                + struct.pack("<H", len(e.data)) + e.data)
        out += body + bytes(_pad4(len(body)))
    return out


def decode_opaque(data: bytes) -> list[OpaqueElement]:
    """Parse OpaqueDataFmt1; alignment, element bounds and zero padding are checked."""
    if len(data) % 4:
        raise DecodeError(data, len(data), "opaque data length is not a multiple of 4")
    if len(data) < 4:
        raise DecodeError(data, 0, "opaque data shorter than its 4-byte header")
    total = data[0]
    if total < 1:
        raise DecodeError(data, 0, "opaque data has no element")
    pos = 4
    elements: list[OpaqueElement] = []
    for i in range(total):
        if pos + 2 > len(data):
            raise DecodeError(data, pos, f"opaque element {i} truncated")
        reg, vlen = data[pos], data[pos + 1]
        if reg > RegistryId.DMTF_DSP:
            raise DecodeError(data, pos, f"opaque element {i} registry ID {reg} unknown")
        if pos + 2 + vlen + 2 > len(data):
            raise DecodeError(data, pos, f"opaque element {i} header truncated")
        vendor = data[pos + 2:pos + 2 + vlen]
        (dlen,) = struct.unpack_from("<H", data, pos + 2 + vlen)
        start = pos + 4 + vlen
        end = start + dlen
        padded = end + _pad4(end - pos)
        if padded > len(data):
            raise DecodeError(data, start, f"opaque element {i} data truncated")
        if any(data[end:padded]):
            raise DecodeError(data, end, f"opaque element {i} padding is not zero")
        elements.append(OpaqueElement(reg, vendor, data[start:end]))
        pos = padded
    if pos != len(data):
        raise DecodeError(data, pos, f"{len(data) - pos} bytes after {total} opaque elements")
    return elements


def _sm_element(sm_id: int, payload: bytes) -> OpaqueElement:
    return OpaqueElement(RegistryId.DMTF, b"", bytes((SM_DATA_VERSION, sm_id)) + payload)


def _find_sm(data: bytes, sm_id: int) -> bytes:
    for e in decode_opaque(data):
        if (e.registry_id == RegistryId.DMTF and not e.vendor_id and len(e.data) >= 2
                and e.data[0] == SM_DATA_VERSION and e.data[1] == sm_id):
            return e.data[2:]
    raise DecodeError(data, 0,
                      f"opaque data has no secured-message element {SmDataId(sm_id).name}")


def supported_versions(versions: Sequence[int]) -> bytes:
    """Requester's SupportedVersion element; *versions* as 0x10, 0x11, ..."""
    entries = b"".join(struct.pack("<H", v << 8) for v in versions)
    return encode_opaque([_sm_element(SmDataId.SUPPORTED_VERSION,
                                      bytes((len(versions),)) + entries)])


def version_selection(version: int) -> bytes:
    """Responder's VersionSelection element; *version* as 0x10, 0x11, ..."""
    return encode_opaque([_sm_element(SmDataId.VERSION_SELECTION, struct.pack("<H", version << 8))])


def parse_supported_versions(data: bytes) -> list[int]:
    """Versions (0x10, 0x11, ...) a KEY_EXCHANGE offers; DecodeError if malformed/absent."""
    body = _find_sm(data, SmDataId.SUPPORTED_VERSION)
    if not body or len(body) != 1 + 2 * body[0] or body[0] == 0:
        raise DecodeError(data, 0, "malformed SupportedVersion element")
    return [struct.unpack_from("<H", body, 1 + 2 * i)[0] >> 8 for i in range(body[0])]


def parse_version_selection(data: bytes) -> int:
    body = _find_sm(data, SmDataId.VERSION_SELECTION)
    if len(body) != 2:
        raise DecodeError(data, 0, "malformed VersionSelection element")
    return int(struct.unpack("<H", body)[0]) >> 8
