"""Device measurements as the SPDM responder reports them (DSP0274 §10.11, DMTF format).

A :class:`MeasurementSource` is one measurement's content.  The responder turns it
into a DMTF measurement block: a digest of ``data`` with the negotiated measurement
hash (``as_digest``), or the raw bit stream (DMTF value type bit 7 set) —
:func:`measurement_block`; a requester decodes a record with
:func:`parse_measurement_blocks`.  :func:`measure_elf` derives the sources from the
device firmware image and :func:`reference_values` what a verifier expects of them.

The firmware measurements (the table before :func:`measure_elf` has the exact bytes):
index 1 code (the executable sections), 2 read-only configuration (``.rodata``), 3 version
string (raw), 4 manifest, 5 the load image (ELF header, program header table and every
PT_LOAD segment's bytes: entry point, segment layout, sizes and permissions).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

from teeio.lite_dataclass import dataclass


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


# --- DMTF measurement blocks (DSP0274 1.2 §10.11.1, Tables "Measurement block format" and
# "DMTF measurement specification format") ------------------------------------------------
#
#   +0  Index                          u8    1..0xEF, 0xFD (manifest), 0xFE (device mode)
#   +1  MeasurementSpecification       u8    bit 0 = DMTF (0x01)
#   +2  MeasurementSize                u16   size of what follows: 3 + ValueSize
#   +4  DMTFSpecMeasurementValueType   u8    bits 6:0 type, bit 7 = raw bit stream
#   +5  DMTFSpecMeasurementValueSize   u16
#   +7  DMTFSpecMeasurementValue       ValueSize bytes: a digest (measurement hash) or raw

MEASUREMENT_SPEC_DMTF = 0x01
BLOCK_HEADER = struct.Struct("<BBH")   # Index, MeasurementSpecification, MeasurementSize
DMTF_HEADER = struct.Struct("<BH")     # DMTFSpecMeasurementValueType, ...ValueSize
MAX_VALUE_SIZE = 0xFFFF - DMTF_HEADER.size  # MeasurementSize is a u16

# Measurement hash algorithms by hashlib name (ALGORITHMS.MeasurementHashAlgo, §10.4).
MEASUREMENT_HASHES: dict[str, Callable[[bytes], hashlib._Hash]] = {
    "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512,
    "sha3_256": hashlib.sha3_256, "sha3_384": hashlib.sha3_384, "sha3_512": hashlib.sha3_512,
}


class MeasurementDecodeError(ValueError):
    """A malformed measurement record; keeps the record bytes and the offending offset."""

    def __init__(self, message: str, data: bytes, offset: int) -> None:
        super().__init__(f"{message} (at offset {offset} of a {len(data)}-byte record)")
        self.data = data
        self.offset = offset


def valid_index(index: int) -> bool:
    """Block indices DSP0274 1.2 allows: 1..0xEF, 0xFD and 0xFE (0xF0..0xFC reserved)."""
    return 1 <= index <= 0xEF or index in (0xFD, 0xFE)


@dataclass(frozen=True)
class MeasurementBlock:
    """One DMTF-format measurement block as carried in a MEASUREMENTS record."""

    index: int
    value_type: int    # bits 6:0 of DMTFSpecMeasurementValueType
    raw: bool          # bit 7: the value is the raw bit stream, not a digest
    value: bytes

    def encode(self) -> bytes:
        if not valid_index(self.index):
            raise ValueError(f"measurement index {self.index:#x} is not allowed")
        if not 0 <= self.value_type <= 0x7F:
            raise ValueError(f"DMTF value type {self.value_type:#x} does not fit 7 bits")
        if len(self.value) > MAX_VALUE_SIZE:
            raise ValueError(f"measurement value of {len(self.value)} bytes exceeds "
                             f"{MAX_VALUE_SIZE}")
        vtype = self.value_type | (RAW_BIT_STREAM if self.raw else 0)
        return (BLOCK_HEADER.pack(self.index, MEASUREMENT_SPEC_DMTF,
                                  DMTF_HEADER.size + len(self.value))
                + DMTF_HEADER.pack(vtype, len(self.value)) + self.value)

    @classmethod
    def from_source(cls, src: MeasurementSource, hash_name: str) -> MeasurementBlock:
        """The block a responder reports for *src* with measurement hash *hash_name*."""
        if not src.as_digest:
            return cls(src.index, src.value_type, True, src.data)
        return cls(src.index, src.value_type, False, _hash(hash_name)(src.data).digest())


def measurement_block(src: MeasurementSource, hash_name: str) -> bytes:
    """Encode *src* as a DMTF measurement block (digest with *hash_name*, or raw)."""
    return MeasurementBlock.from_source(src, hash_name).encode()


def parse_measurement_blocks(data: bytes, count: int,
                             hash_name: str | None = None) -> list[MeasurementBlock]:
    """Decode a MEASUREMENTS record: exactly *count* DMTF blocks filling *data* exactly.

    With *hash_name*, digest-form values must have that hash's size.  Raises
    :class:`MeasurementDecodeError` on anything malformed: truncation, trailing bytes,
    a specification other than DMTF, inconsistent sizes, a disallowed or repeated index.
    """
    digest_size = _hash(hash_name)(b"").digest_size if hash_name is not None else None
    blocks: list[MeasurementBlock] = []
    seen: set[int] = set()
    pos = 0
    for n in range(count):
        if len(data) - pos < BLOCK_HEADER.size + DMTF_HEADER.size:
            raise MeasurementDecodeError(f"block {n} of {count}: truncated header", data, pos)
        index, spec, size = BLOCK_HEADER.unpack_from(data, pos)
        vtype, vsize = DMTF_HEADER.unpack_from(data, pos + BLOCK_HEADER.size)
        if not valid_index(index):
            raise MeasurementDecodeError(f"block {n}: index {index:#x} is not allowed",
                                         data, pos)
        if index in seen:
            raise MeasurementDecodeError(f"block {n}: index {index} repeated", data, pos)
        if spec != MEASUREMENT_SPEC_DMTF:
            raise MeasurementDecodeError(f"block {n}: MeasurementSpecification {spec:#04x} "
                                         "is not DMTF (0x01)", data, pos + 1)
        if size != DMTF_HEADER.size + vsize:
            raise MeasurementDecodeError(f"block {n}: MeasurementSize {size} != 3 + "
                                         f"DMTFSpecMeasurementValueSize {vsize}", data, pos + 2)
        start = pos + BLOCK_HEADER.size + DMTF_HEADER.size
        if start + vsize > len(data):
            raise MeasurementDecodeError(f"block {n}: value of {vsize} bytes truncated to "
                                         f"{len(data) - start}", data, start)
        raw = bool(vtype & RAW_BIT_STREAM)
        if not raw and digest_size is not None and vsize != digest_size:
            raise MeasurementDecodeError(f"block {n}: digest of {vsize} bytes, {hash_name} "
                                         f"gives {digest_size}", data, pos + 5)
        blocks.append(MeasurementBlock(index, vtype & ~RAW_BIT_STREAM, raw,
                                       data[start:start + vsize]))
        seen.add(index)
        pos = start + vsize
    if pos != len(data):
        raise MeasurementDecodeError(f"{len(data) - pos} bytes after the last of {count} "
                                     "blocks", data, pos)
    return blocks


def _hash(name: str) -> Callable[[bytes], hashlib._Hash]:
    try:
        return MEASUREMENT_HASHES[name]
    except KeyError:
        raise ValueError(f"unknown measurement hash {name!r} (choose from "
                         f"{', '.join(MEASUREMENT_HASHES)})") from None


# --- Firmware image measurements --------------------------------------------------------
#
# measure_elf() turns the device firmware ELF (vfio_user_dev/firmware_src/fw.c) into these
# measurements.
# "Section bytes" are a section's file contents (sh_size bytes at sh_offset), exactly as
# stored: the image is a static executable, nothing is relocated at load time.
#
#   index 1  MUTABLE_FIRMWARE, digest      the bytes of every allocated SHF_EXECINSTR section
#                                          of type PROGBITS, in ascending sh_addr order,
#                                          concatenated without the gaps between them
#   index 2  FIRMWARE_CONFIG, digest       the bytes of ".rodata" and any ".rodata.*"
#                                          sections, in ascending sh_addr order, concatenated
#   index 3  VERSION, raw bit stream       ".teeio_version" up to (not including) its first
#                                          NUL: printable ASCII, e.g. b"teeio-fw 1.0.0"
#   index 4  MEASUREMENT_MANIFEST, digest  all bytes of ".teeio_manifest" (28 bytes; see
#                                          FirmwareManifest), after checking its layout
#   index 5  MUTABLE_FIRMWARE, digest      the loadable image, as a loader sees it: the ELF
#                                          header (e_ehsize bytes at 0), then the whole
#                                          program header table (e_phnum * e_phentsize
#                                          bytes at e_phoff), then the file bytes of every
#                                          PT_LOAD segment (p_filesz bytes at p_offset) in
#                                          program header table order, concatenated
#
# Indices 1..4 name parts of the image by section; index 5 covers what is loaded and how:
# the entry point and every other ELF header field, each segment's addresses, p_memsz
# (the zero-filled .bss) and p_flags (a writable or executable segment), and segment bytes
# no section names (.data among them).  Each field of index 5 is sized by what precedes
# it, so the concatenation is unambiguous.  The ELF header's section header fields
# (e_shoff, e_shnum, e_shstrndx) are part of it, so relinking or stripping changes index 5
# even where the loaded bytes stay the same.  Section headers are required: they name what
# indices 1..4 measure.  Nothing else (symbols, .comment, the section header table) is
# measured.

#: The measurement indices measure_elf() produces, in order.
FIRMWARE_INDICES = (1, 2, 3, 4, 5)

VERSION_SECTION = ".teeio_version"
MANIFEST_SECTION = ".teeio_manifest"


class FirmwareImageError(ValueError):
    """The firmware image is not an ELF, or lacks what measure_elf() measures."""


@dataclass(frozen=True)
class FirmwareManifest:
    """The ``.teeio_manifest`` section (``struct teeio_fw_manifest`` in
    vfio_user_dev/firmware_src/fw.c).

    ``magic u32 "TIOM" | format u16 = 1 | reserved u16 = 0 | fw_version u32
    (major << 16 | minor << 8 | patch) | build_id u8[16] (ASCII, NUL padded)``, LE.
    """

    fw_version: int
    build_id: bytes     # 16 bytes

    MAGIC = 0x4D4F4954  # b"TIOM" read as a little-endian u32
    FORMAT = 1
    LAYOUT = struct.Struct("<IHHI16s")

    def encode(self) -> bytes:
        if len(self.build_id) != 16:
            raise ValueError(f"build_id must be 16 bytes, not {len(self.build_id)}")
        return self.LAYOUT.pack(self.MAGIC, self.FORMAT, 0, self.fw_version, self.build_id)

    @classmethod
    def decode(cls, data: bytes) -> FirmwareManifest:
        if len(data) != cls.LAYOUT.size:
            raise FirmwareImageError(f"{MANIFEST_SECTION} is {len(data)} bytes, expected "
                                     f"{cls.LAYOUT.size}")
        magic, fmt, reserved, version, build_id = cls.LAYOUT.unpack(data)
        if magic != cls.MAGIC:
            raise FirmwareImageError(f"{MANIFEST_SECTION}: bad magic {magic:#010x}")
        if fmt != cls.FORMAT or reserved != 0:
            raise FirmwareImageError(f"{MANIFEST_SECTION}: unsupported format {fmt} "
                                     f"(reserved {reserved:#x})")
        return cls(version, build_id)

    @property
    def version_text(self) -> str:
        v = self.fw_version
        return f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}"


class _ElfSection(NamedTuple):
    name: str
    type: str       # pyelftools' name of sh_type, e.g. "SHT_PROGBITS"
    flags: int
    addr: int
    contents: bytes  # the sh_size bytes at sh_offset (empty unless SHT_PROGBITS)


def _elf_sections(data: bytes) -> list[_ElfSection]:
    """Every section header of the ELF *data*, read eagerly (pyelftools is lazy)."""
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile
    try:
        elf = ELFFile(io.BytesIO(data))
        out = []
        for s in elf.iter_sections():
            if s["sh_type"] == "SHT_NULL":
                continue
            off, size = int(s["sh_offset"]), int(s["sh_size"])
            contents = b""
            if s["sh_type"] == "SHT_PROGBITS":
                if off + size > len(data):
                    raise FirmwareImageError(f"section {s.name} ({size} bytes at {off:#x}) "
                                             f"extends past the {len(data)}-byte image")
                contents = data[off:off + size]
            out.append(_ElfSection(s.name, str(s["sh_type"]), int(s["sh_flags"]),
                                   int(s["sh_addr"]), contents))
    except FirmwareImageError:
        raise
    except (ELFError, ConstructError, ValueError, OverflowError) as exc:
        raise FirmwareImageError(f"not a readable ELF image: {exc}") from None
    if not out:
        raise FirmwareImageError("the ELF image has no section headers")
    return out


def _load_image(data: bytes) -> bytes:
    """Index 5: ELF header || program header table || every PT_LOAD segment's file bytes."""
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile

    def span(what: str, off: int, size: int) -> bytes:
        if off < 0 or size < 0 or off + size > len(data):
            raise FirmwareImageError(f"{what} ({size} bytes at {off:#x}) extends past the "
                                     f"{len(data)}-byte image")
        return data[off:off + size]

    try:
        elf = ELFFile(io.BytesIO(data))
        hdr = elf.header
        ehsize, phoff = int(hdr["e_ehsize"]), int(hdr["e_phoff"])
        phnum, phentsize = int(hdr["e_phnum"]), int(hdr["e_phentsize"])
        if not phnum:
            raise FirmwareImageError("the ELF image has no program headers")
        parts = [span("the ELF header", 0, ehsize),
                 span("the program header table", phoff, phnum * phentsize)]
        for i in range(phnum):
            seg = elf.get_segment(i)
            if seg["p_type"] == "PT_LOAD":
                parts.append(span(f"PT_LOAD segment {i}", int(seg["p_offset"]),
                                  int(seg["p_filesz"])))
    except FirmwareImageError:
        raise
    except (ELFError, ConstructError, ValueError, OverflowError) as exc:
        raise FirmwareImageError(f"not a readable ELF image: {exc}") from None
    if len(parts) == 2:
        raise FirmwareImageError("the ELF image has no PT_LOAD segment")
    return b"".join(parts)


def measure_elf(image: bytes | str | os.PathLike[str]) -> list[MeasurementSource]:
    """Measurements 1..5 (:data:`FIRMWARE_INDICES`) of a firmware ELF (bytes, or a path to
    read); see the table above."""
    from elftools.elf.constants import SH_FLAGS
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    sections = _elf_sections(data)
    by_addr = sorted(sections, key=lambda s: s.addr)
    code = [s for s in by_addr if s.type == "SHT_PROGBITS"
            and s.flags & SH_FLAGS.SHF_ALLOC and s.flags & SH_FLAGS.SHF_EXECINSTR]
    if not code:
        raise FirmwareImageError("no executable (SHF_EXECINSTR) section")
    rodata = [s for s in by_addr if s.name == ".rodata" or s.name.startswith(".rodata.")]
    if not rodata:
        raise FirmwareImageError("no .rodata section")
    version = _section(sections, VERSION_SECTION).split(b"\0", 1)[0]
    if not version or not all(0x20 <= b < 0x7F for b in version):
        raise FirmwareImageError(f"{VERSION_SECTION} is not a printable ASCII string: "
                                 f"{version!r}")
    manifest = _section(sections, MANIFEST_SECTION)
    FirmwareManifest.decode(manifest)
    return [
        MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"".join(s.contents for s in code),
                          label="firmware code (" + " ".join(s.name for s in code) + ")"),
        MeasurementSource(2, DmtfValueType.FIRMWARE_CONFIG,
                          b"".join(s.contents for s in rodata),
                          label="firmware configuration (.rodata)"),
        MeasurementSource(3, DmtfValueType.VERSION, version, as_digest=False,
                          label="firmware version"),
        MeasurementSource(4, DmtfValueType.MEASUREMENT_MANIFEST, manifest,
                          label="firmware manifest"),
        MeasurementSource(5, DmtfValueType.MUTABLE_FIRMWARE, _load_image(data),
                          label="firmware load image (ELF header, program headers, "
                                "PT_LOAD segments)"),
    ]


def _section(sections: list[_ElfSection], name: str) -> bytes:
    found = [s for s in sections if s.name == name]
    if len(found) != 1:
        raise FirmwareImageError(f"expected one {name} section, found {len(found)}")
    if found[0].type != "SHT_PROGBITS":
        raise FirmwareImageError(f"{name} has no contents ({found[0].type})")
    return found[0].contents


REFERENCE_HASHES = ("sha256", "sha384")
REFERENCE_FORMAT = "teeio-reference-values/1"


def reference_values(image: bytes | str | os.PathLike[str],
                     extra: Sequence[MeasurementSource] = ()) -> dict[str, Any]:
    """JSON-ready reference values of a firmware image, what a verifier compares against;
    *extra*: the device's other measurements (its configuration,
    :func:`teeio.personality.configuration_measurements`).

    ``{"format": ..., "measurement_specification": "DMTF", "measurements": {"<index>":
    {"value_type": int, "value_type_name": str, "label": str, "raw": hex}}}`` for raw
    bit streams, ``{..., "sha256": hex, "sha384": hex}`` (digests of the measured bytes)
    for the others.
    """
    out: dict[str, dict[str, Any]] = {}
    for src in (*measure_elf(image), *extra):
        entry: dict[str, Any] = {"value_type": int(src.value_type),
                                 "value_type_name": DmtfValueType(src.value_type).name,
                                 "label": src.label}
        if src.as_digest:
            entry.update({h: _hash(h)(src.data).hexdigest() for h in REFERENCE_HASHES})
        else:
            entry["raw"] = src.data.hex()
        out[str(src.index)] = entry
    return {"format": REFERENCE_FORMAT, "measurement_specification": "DMTF",
            "measurements": out}
