"""DMTF measurement blocks (DSP0274 1.2 §10.11.1) and the firmware image's measurements."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teeio.measurements import (
    FIRMWARE_INDICES,
    RAW_BIT_STREAM,
    DmtfValueType,
    FirmwareImageError,
    FirmwareManifest,
    MeasurementBlock,
    MeasurementDecodeError,
    MeasurementSource,
    measure_elf,
    measurement_block,
    parse_measurement_blocks,
    reference_values,
)
from tsm import refvalues
from vfio_user_dev.firmware_build import FirmwareBuildError, build

# --- measurement blocks -----------------------------------------------------------------

indices = st.one_of(st.integers(1, 0xEF), st.sampled_from([0xFD, 0xFE]))
blocks = st.builds(MeasurementBlock, index=indices, value_type=st.integers(0, 0x7F),
                   raw=st.booleans(), value=st.binary(max_size=128))


def test_known_answer_raw_version_block() -> None:
    # Index 3 | DMTF | MeasurementSize 6 | type VERSION|raw | ValueSize 3 | "1.0"
    src = MeasurementSource(3, DmtfValueType.VERSION, b"1.0", as_digest=False)
    assert measurement_block(src, "sha384") == bytes.fromhex("03 01 0600 86 0300 312e30")


def test_known_answer_digest_block() -> None:
    src = MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"abc")
    digest = hashlib.sha256(b"abc").digest()
    assert measurement_block(src, "sha256") == (bytes.fromhex("01 01 2300 01 2000") + digest)
    assert len(measurement_block(src, "sha384")) == 7 + 48


@given(blocks)
def test_block_round_trip(block: MeasurementBlock) -> None:
    data = block.encode()
    index, spec, size = struct.unpack_from("<BBH", data)
    assert (index, spec, size) == (block.index, 0x01, 3 + len(block.value))
    assert data[4] == block.value_type | (RAW_BIT_STREAM if block.raw else 0)
    assert parse_measurement_blocks(data, 1) == [block]


@given(st.lists(blocks, max_size=8, unique_by=lambda b: b.index))
def test_record_round_trip(record: list[MeasurementBlock]) -> None:
    data = b"".join(b.encode() for b in record)
    assert parse_measurement_blocks(data, len(record)) == record


@given(indices, st.sampled_from(list(DmtfValueType)), st.binary(max_size=256), st.booleans(),
       st.sampled_from(["sha256", "sha384", "sha512"]))
def test_source_to_block(index: int, vtype: DmtfValueType, data: bytes, as_digest: bool,
                         hash_name: str) -> None:
    src = MeasurementSource(index, vtype, data, as_digest=as_digest)
    (block,) = parse_measurement_blocks(measurement_block(src, hash_name), 1,
                                        hash_name=hash_name)
    assert (block.index, block.value_type, block.raw) == (index, vtype, not as_digest)
    assert block.value == (hashlib.new(hash_name, data).digest() if as_digest else data)


@given(st.binary(max_size=64), st.integers(0, 4))
def test_garbage_rejected_or_exactly_consumed(data: bytes, count: int) -> None:
    try:
        parsed = parse_measurement_blocks(data, count)
    except MeasurementDecodeError:
        return
    assert b"".join(b.encode() for b in parsed) == data


def _two_blocks() -> bytes:
    return (MeasurementBlock(1, 1, False, bytes(32)).encode()
            + MeasurementBlock(3, 6, True, b"v1").encode())


def test_every_truncation_rejected() -> None:
    data = _two_blocks()
    for n in range(len(data)):
        with pytest.raises(MeasurementDecodeError):
            parse_measurement_blocks(data[:n], 2)


@pytest.mark.parametrize(("mutate", "count", "message"), [
    (lambda d: d + b"\0", 2, "bytes after the last"),
    (lambda d: d, 3, "truncated header"),
    (lambda d: d, 1, "bytes after the last"),
    (lambda d: d[:1] + b"\x02" + d[2:], 2, "is not DMTF"),
    (lambda d: d[:2] + b"\x24\x00" + d[4:], 2, "MeasurementSize 36"),
    (lambda d: d[:5] + b"\x21\x00" + d[7:], 2, "MeasurementSize 35"),
    (lambda d: b"\x00" + d[1:], 2, "index 0x0 is not allowed"),
    (lambda d: b"\xff" + d[1:], 2, "index 0xff is not allowed"),
    (lambda d: b"\xf0" + d[1:], 2, "index 0xf0 is not allowed"),
    (lambda d: d[:39] + b"\x01" + d[40:], 2, "index 1 repeated"),
])
def test_malformed_record_rejected(mutate: Callable[[bytes], bytes], count: int,
                                  message: str) -> None:
    with pytest.raises(MeasurementDecodeError, match=message) as exc:
        parse_measurement_blocks(mutate(_two_blocks()), count)
    assert 0 <= exc.value.offset <= len(exc.value.data)


def test_decode_error_keeps_bytes_and_offset() -> None:
    data = _two_blocks()[:-1]
    with pytest.raises(MeasurementDecodeError) as exc:
        parse_measurement_blocks(data, 2)
    assert exc.value.data == data and exc.value.offset == 39 + 7


def test_digest_size_checked_against_hash() -> None:
    data = _two_blocks()
    assert len(parse_measurement_blocks(data, 2, hash_name="sha256")) == 2
    with pytest.raises(MeasurementDecodeError, match="sha384 gives 48"):
        parse_measurement_blocks(data, 2, hash_name="sha384")


@pytest.mark.parametrize("block", [
    MeasurementBlock(0, 1, False, b""),
    MeasurementBlock(0xF5, 1, False, b""),
    MeasurementBlock(0xFF, 1, False, b""),
    MeasurementBlock(1, 0x80, False, b""),
    MeasurementBlock(1, 6, True, bytes(0xFFFD)),
])
def test_encode_rejects_invalid(block: MeasurementBlock) -> None:
    with pytest.raises(ValueError):
        block.encode()


def test_largest_raw_value() -> None:
    block = MeasurementBlock(0xFE, DmtfValueType.DEVICE_MODE, True, bytes(0xFFFC))
    assert parse_measurement_blocks(block.encode(), 1) == [block]


def test_unknown_hash_rejected() -> None:
    with pytest.raises(ValueError, match="unknown measurement hash 'md5'"):
        measurement_block(MeasurementSource(1, 1, b""), "md5")


# --- the firmware image -----------------------------------------------------------------

BUILD_ID = b"teeio-fw-dev".ljust(16, b"\0")


@pytest.fixture(scope="session")
def fw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("firmware")


@pytest.fixture(scope="session")
def fw_elf(fw_dir: Path) -> Path:
    return build(fw_dir / "teeio-fw.elf")


@pytest.fixture(scope="session")
def fw_patched(fw_dir: Path) -> Path:
    return build(fw_dir / "teeio-fw-patched.elf", {"TEEIO_FW_PATCH": "1"})


def _objcopy_section(elf: Path, name: str, tmp: Path) -> bytes:
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        pytest.skip("objcopy (binutils) not installed")
    out = tmp / (name.strip(".") + ".bin")
    subprocess.run([objcopy, "-O", "binary", f"--only-section={name}", str(elf), str(out)],
                   check=True)
    return out.read_bytes()


def test_measure_elf_documented_content(fw_elf: Path, tmp_path: Path) -> None:
    ms = measure_elf(fw_elf)
    assert [(m.index, m.value_type, m.as_digest) for m in ms] == [
        (1, DmtfValueType.MUTABLE_FIRMWARE, True),
        (2, DmtfValueType.FIRMWARE_CONFIG, True),
        (3, DmtfValueType.VERSION, False),
        (4, DmtfValueType.MEASUREMENT_MANIFEST, True),
        (5, DmtfValueType.MUTABLE_FIRMWARE, True),
    ]
    assert [m.index for m in ms] == list(FIRMWARE_INDICES)
    # Cross-checked with binutils rather than with pyelftools again.
    assert ms[0].data == _objcopy_section(fw_elf, ".text", tmp_path)
    assert ms[1].data == _objcopy_section(fw_elf, ".rodata", tmp_path)
    assert ms[2].data == b"teeio-fw 1.0.0"
    assert _objcopy_section(fw_elf, ".teeio_version", tmp_path) == b"teeio-fw 1.0.0\0"
    assert ms[3].data == FirmwareManifest(0x010000, BUILD_ID).encode()
    assert FirmwareManifest.decode(ms[3].data).version_text == "1.0.0"
    assert ms[0].label == "firmware code (.text)"


def test_measure_elf_bytes_or_path(fw_elf: Path) -> None:
    assert measure_elf(fw_elf.read_bytes()) == measure_elf(fw_elf) == measure_elf(str(fw_elf))


def test_config_table_is_measured(fw_elf: Path) -> None:
    # fw_config starts .rodata: ring_base 0xFED00000, 64 entries, max_dma_len 0x10000, ...
    config = measure_elf(fw_elf)[1].data
    assert config.startswith(struct.pack("<QIIII", 0xFED00000, 64, 0x10000, 64, 2))


def test_build_is_reproducible(fw_elf: Path, tmp_path: Path) -> None:
    assert build(tmp_path / "again.elf").read_bytes() == fw_elf.read_bytes()


def test_patched_code_measures_differently(fw_elf: Path, fw_patched: Path) -> None:
    base, patched = measure_elf(fw_elf), measure_elf(fw_patched)
    code, patched_code = base[0].data, patched[0].data
    assert len(code) == len(patched_code)
    assert sum(a != b for a, b in zip(code, patched_code, strict=True)) == 1
    for hash_name in ("sha256", "sha384"):
        assert measurement_block(base[0], hash_name) != measurement_block(patched[0], hash_name)
        for i in (1, 2, 3):
            assert measurement_block(base[i], hash_name) == measurement_block(patched[i],
                                                                              hash_name)
        # the load image holds .text too
        assert measurement_block(base[4], hash_name) != measurement_block(patched[4], hash_name)


def test_build_id_changes_only_the_manifest(fw_elf: Path, tmp_path: Path) -> None:
    other = measure_elf(build(tmp_path / "id.elf", {"TEEIO_FW_BUILD_ID": '"ci-build-42"'}))
    base = measure_elf(fw_elf)
    assert [m.data for m in base[:3]] == [m.data for m in other[:3]]
    assert base[4].data != other[4].data      # the load image holds the manifest too
    assert FirmwareManifest.decode(other[3].data).build_id == b"ci-build-42".ljust(16, b"\0")


def test_reference_values_match_measurements(fw_elf: Path) -> None:
    values = reference_values(fw_elf)
    assert json.loads(json.dumps(values)) == values
    assert values["format"] == "teeio-reference-values/1"
    expected = {}
    for m in measure_elf(fw_elf):
        entry: dict[str, object] = {"value_type": int(m.value_type),
                                    "value_type_name": DmtfValueType(m.value_type).name,
                                    "label": m.label}
        if m.as_digest:
            entry["sha256"] = hashlib.sha256(m.data).hexdigest()
            entry["sha384"] = hashlib.sha384(m.data).hexdigest()
        else:
            entry["raw"] = m.data.hex()
        expected[str(m.index)] = entry
    assert values["measurements"] == expected
    assert values["measurements"]["3"]["raw"] == b"teeio-fw 1.0.0".hex()


def test_refvalues_cli(fw_elf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "ref.json"
    assert refvalues.main(["--elf", str(fw_elf), "--out", str(out)]) == 1   # no such folder
    assert capsys.readouterr().err == f"error: --out {out}: folder {out.parent} does not exist\n"
    out.parent.mkdir()
    assert refvalues.main(["--elf", str(fw_elf), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == reference_values(fw_elf)
    assert capsys.readouterr().out.strip() == str(out)
    assert refvalues.main(["--elf", str(fw_elf)]) == 0
    assert json.loads(capsys.readouterr().out) == reference_values(fw_elf)
    assert refvalues.main(["--elf", str(tmp_path / "missing.elf")]) == 1
    assert "missing.elf" in capsys.readouterr().err


@pytest.mark.parametrize("image", [b"", b"\x7fELF", b"not an elf at all" * 10])
def test_measure_elf_rejects_garbage(image: bytes) -> None:
    with pytest.raises(FirmwareImageError):
        measure_elf(image)


def test_measure_elf_rejects_truncated(fw_elf: Path) -> None:
    data = fw_elf.read_bytes()
    for n in (64, 0x1000, len(data) // 2, len(data) - 1):
        with pytest.raises(FirmwareImageError):
            measure_elf(data[:n])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["ELF header", "section headers", "anywhere"]),
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                max_size=4))
def test_measure_elf_corrupted_image(fw_elf: Path, region: str,
                                     edits: list[tuple[int, int]]) -> None:
    """Either still measurable, or FirmwareImageError: nothing else escapes pyelftools."""
    data = bytearray(fw_elf.read_bytes())
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    start, end = {"ELF header": (0, 64), "section headers": (e_shoff, len(data)),
                  "anywhere": (0, len(data))}[region]
    for pos, value in edits:
        data[start + pos % (end - start)] = value
    try:
        ms = measure_elf(bytes(data))
    except FirmwareImageError:
        return
    assert [m.index for m in ms] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("section", "message"), [
    (".teeio_version", "expected one .teeio_version section, found 0"),
    (".teeio_manifest", "expected one .teeio_manifest section, found 0"),
    (".rodata", "no .rodata section"),
    (".text", "no executable"),
])
def test_measure_elf_requires_sections(fw_elf: Path, tmp_path: Path, section: str,
                                       message: str) -> None:
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        pytest.skip("objcopy (binutils) not installed")
    out = tmp_path / "stripped.elf"
    subprocess.run([objcopy, f"--remove-section={section}", str(fw_elf), str(out)], check=True)
    with pytest.raises(FirmwareImageError, match=message):
        measure_elf(out)


def test_measure_elf_checks_manifest_magic(fw_elf: Path) -> None:
    data = fw_elf.read_bytes()
    good = FirmwareManifest(0x010000, BUILD_ID).encode()
    assert data.count(good) == 1
    with pytest.raises(FirmwareImageError, match="bad magic"):
        measure_elf(data.replace(good, b"XIOM" + good[4:]))


@pytest.mark.parametrize("data", [b"TIOM", bytes(28), b"TIOM\x02\0\0\0" + bytes(20),
                                  b"TIOM\x01\0\x01\0" + bytes(20)])
def test_manifest_decode_rejects(data: bytes) -> None:
    with pytest.raises(FirmwareImageError):
        FirmwareManifest.decode(data)


def test_manifest_encode_round_trip() -> None:
    manifest = FirmwareManifest(0x010203, b"x".ljust(16, b"\0"))
    assert FirmwareManifest.decode(manifest.encode()) == manifest
    assert manifest.version_text == "1.2.3"
    with pytest.raises(ValueError, match="16 bytes"):
        FirmwareManifest(1, b"short").encode()


def test_build_without_compiler(tmp_path: Path) -> None:
    with pytest.raises(FirmwareBuildError, match="not found on PATH.*needs gcc"):
        build(tmp_path / "fw.elf", cc="no-such-gcc-teeio")


def test_build_failure_reports_compiler_output(tmp_path: Path) -> None:
    with pytest.raises(FirmwareBuildError, match="TEEIO_FW_BUILD_ID is at most 16 bytes"):
        build(tmp_path / "fw.elf", {"TEEIO_FW_BUILD_ID": '"' + "x" * 16 + '"'})


def test_build_rejects_bad_define_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a C macro name"):
        build(tmp_path / "fw.elf", {"-O0 X": "1"})


# --- the load image (index 5): ELF header, program header table, PT_LOAD segments -------

def _elf64(data: bytes) -> tuple[int, int, int, int]:
    """(e_entry, e_phoff, e_phentsize, e_phnum) of a little-endian ELF64 image."""
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 0x18)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    return e_entry, e_phoff, e_phentsize, e_phnum


def _text_phdr(data: bytes) -> int:
    """File offset of the program header of the executable PT_LOAD segment."""
    _, phoff, phentsize, phnum = _elf64(data)
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, p_flags = struct.unpack_from("<II", data, off)
        if p_type == 1 and p_flags & 1:     # PT_LOAD, PF_X
            return off
    raise AssertionError("no executable PT_LOAD segment")


def _changed(base: list[MeasurementSource], other: list[MeasurementSource]) -> list[int]:
    return [a.index for a, b in zip(base, other, strict=True)
            if measurement_block(a, "sha384") != measurement_block(b, "sha384")]


def test_load_image_is_header_program_headers_and_segments(fw_elf: Path,
                                                           tmp_path: Path) -> None:
    data = fw_elf.read_bytes()
    _, phoff, phentsize, phnum = _elf64(data)
    expected = data[:64] + data[phoff:phoff + phnum * phentsize]
    for i in range(phnum):
        p_type, _, p_offset = struct.unpack_from("<IIQ", data, phoff + i * phentsize)
        p_filesz = struct.unpack_from("<Q", data, phoff + i * phentsize + 0x20)[0]
        if p_type == 1:
            expected += data[p_offset:p_offset + p_filesz]
    assert measure_elf(data)[4].data == expected
    # the text segment as loaded holds the code (index 1) that binutils extracts
    assert _objcopy_section(fw_elf, ".text", tmp_path) in expected


def test_changed_entry_point_measures_differently(fw_elf: Path) -> None:
    data = bytearray(fw_elf.read_bytes())
    entry = _elf64(bytes(data))[0]
    struct.pack_into("<Q", data, 0x18, entry + 4)
    base, moved = measure_elf(fw_elf), measure_elf(bytes(data))
    assert _changed(base, moved) == [5]
    assert reference_values(bytes(data)) != reference_values(fw_elf)


def test_writable_text_segment_measures_differently(fw_elf: Path) -> None:
    data = bytearray(fw_elf.read_bytes())
    off = _text_phdr(bytes(data))
    p_flags = struct.unpack_from("<I", data, off + 4)[0]
    struct.pack_into("<I", data, off + 4, p_flags | 2)     # PF_W: text made writable
    base, writable = measure_elf(fw_elf), measure_elf(bytes(data))
    assert _changed(base, writable) == [5]
    assert reference_values(bytes(data)) != reference_values(fw_elf)


def test_bss_size_measures_differently(fw_elf: Path) -> None:
    data = bytearray(fw_elf.read_bytes())
    _, phoff, phentsize, phnum = _elf64(bytes(data))
    bss = next(phoff + i * phentsize for i in range(phnum)
               if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 1
               and struct.unpack_from("<Q", data, phoff + i * phentsize + 0x20)[0] == 0)
    memsz = struct.unpack_from("<Q", data, bss + 0x28)[0]
    struct.pack_into("<Q", data, bss + 0x28, memsz + 0x1000)   # p_memsz
    assert _changed(measure_elf(fw_elf), measure_elf(bytes(data))) == [5]


def test_load_image_requires_program_headers(fw_elf: Path) -> None:
    data = bytearray(fw_elf.read_bytes())
    struct.pack_into("<H", data, 0x38, 0)          # e_phnum = 0
    with pytest.raises(FirmwareImageError, match="no program headers"):
        measure_elf(bytes(data))
    data = bytearray(fw_elf.read_bytes())
    struct.pack_into("<Q", data, 0x20, len(data))  # e_phoff past the end
    with pytest.raises(FirmwareImageError):
        measure_elf(bytes(data))
