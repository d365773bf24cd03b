"""Build the device firmware image (firmware_src/fw.c + firmware_src/link.ld) with gcc.

The image is what the emulated device measures (teeio.measurements.measure_elf), so the
build is reproducible: no build id note, no unwind tables, no timestamps — the same
source, defines and compiler give the same bytes.  Variants for tests come from
``defines`` (see the top of vfio_user_dev/firmware_src/fw.c, e.g. ``TEEIO_FW_PATCH=1``).

The default image (what ``teeio-device`` loads without ``--firmware``) is
``out/firmware/teeio-fw.elf`` in a source checkout, and
``<cache>/firmware/<key>/teeio-fw.elf`` when the packages run installed (the cache of
teeio.paths.cache_root; the key hashes the sources and flags).  Every build writes a
temporary file and renames it into place, so a reader never sees half an image.

    teeio-firmware [--out ELF] [-D NAME=VALUE]     (python -m vfio_user_dev.firmware_build)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

from teeio import paths

log = logging.getLogger(__name__)

FIRMWARE_DIR = Path(__file__).resolve().parent / "firmware_src"
SOURCES = ("fw.c",)
LINKER_SCRIPT = "link.ld"
IMAGE_NAME = "teeio-fw.elf"

CFLAGS = (
    "-ffreestanding", "-nostdlib", "-static", "-O2", "-fno-pie", "-no-pie",
    "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-fcf-protection=none",
    "-mno-red-zone", "-Wall", "-Wextra", "-Werror", "-Wl,--build-id=none",
)

_DEFINE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FirmwareBuildError(RuntimeError):
    """The firmware could not be built; the message (one line) says why: the compiler's
    first error.  Its whole output is logged at debug level."""


def build(out: Path, defines: dict[str, str] | None = None, *, cc: str = "gcc",
          src_dir: Path = FIRMWARE_DIR) -> Path:
    """Compile and link the firmware into *out* (x86-64 ELF executable); return *out*.

    *defines* become ``-DNAME=VALUE`` (C string values need their quotes, e.g.
    ``{"TEEIO_FW_BUILD_ID": '"ci-42"'}``).  *out* is replaced atomically.
    """
    compiler = shutil.which(cc)
    if compiler is None:
        raise FirmwareBuildError(f"C compiler {cc!r} not found on PATH: the device firmware "
                                 "needs gcc (Debian/Ubuntu: apt-get install gcc)")
    missing = [n for n in (LINKER_SCRIPT, *SOURCES) if not (src_dir / n).is_file()]
    if missing:
        raise FirmwareBuildError(f"firmware sources missing in {src_dir}: {', '.join(missing)}")
    args = [compiler, *CFLAGS]
    for name, value in sorted((defines or {}).items()):
        if not _DEFINE_NAME.fullmatch(name):
            raise ValueError(f"not a C macro name: {name!r}")
        args.append(f"-D{name}={value}")
    with paths.atomic_path(out) as tmp:
        args += ["-T", str(src_dir / LINKER_SCRIPT), "-o", str(tmp)]
        args += [str(src_dir / s) for s in SOURCES]
        log.debug("building firmware: %s", " ".join(args))
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["(no output)"]
            first = next((ln for ln in lines if "error" in ln), lines[-1])
            log.debug("firmware build failed:\n$ %s\n%s", " ".join(args), proc.stderr)
            raise FirmwareBuildError(f"firmware build failed ({cc} exit {proc.returncode}): "
                                     f"{first.strip()}")
    return out


def source_key(src_dir: Path = FIRMWARE_DIR) -> str:
    """A short hash of the sources, the linker script and the flags: the cache key."""
    h = hashlib.sha256()
    for name in (LINKER_SCRIPT, *SOURCES):
        data = (src_dir / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    h.update("\0".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def default_image() -> Path:
    """Where the default image lives: ``out/firmware/`` of the checkout, or the cache."""
    root = paths.checkout_root()
    if root is not None:
        return root / "out" / "firmware" / IMAGE_NAME
    return paths.cache_root() / "firmware" / source_key() / IMAGE_NAME


def ensure_default_image() -> Path:
    """The default image, built first if it is missing."""
    elf = default_image()
    if not elf.exists():
        log.warning("the default firmware image %s is missing: building it", elf)
        try:
            build(elf)
        except OSError as exc:
            raise FirmwareBuildError(f"cannot write {elf}: {exc.strerror or exc}") from None
        log.info("built the default firmware image %s", elf)
    return elf


def _define(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    return name, value if sep else "1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-firmware",
                                 description="Build the device firmware image (the ELF the "
                                             "device measures) and print its path.")
    ap.add_argument("--out", type=Path,
                    help="ELF file to write (default: the default image, built only if "
                         "missing: out/firmware/teeio-fw.elf in a checkout, else the cache)")
    ap.add_argument("-D", dest="defines", action="append", type=_define, default=[],
                    metavar="NAME[=VALUE]", help="preprocessor define (repeatable; needs --out)")
    ap.add_argument("--cc", default="gcc", help="C compiler (default: gcc)")
    opts = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if opts.out is None:
            if opts.defines or opts.cc != "gcc":
                ap.error("-D and --cc build a variant: give --out")
            path = ensure_default_image()
        else:
            path = build(opts.out, dict(opts.defines), cc=opts.cc)
    except (FirmwareBuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {opts.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
