"""Build the device firmware image (firmware/fw.c + firmware/link.ld) with gcc.

The image is what the emulated device measures (teeio.measurements.measure_elf), so the
build is reproducible: no build id note, no unwind tables, no timestamps — the same
source, defines and compiler give the same bytes.  Variants for tests come from
``defines`` (see the top of firmware/fw.c, e.g. ``TEEIO_FW_PATCH=1``).

    python -m vfio_user_dev.firmware_build --out out/firmware/teeio-fw.elf [-D NAME=VALUE]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"
SOURCES = ("fw.c",)
LINKER_SCRIPT = "link.ld"

CFLAGS = (
    "-ffreestanding", "-nostdlib", "-static", "-O2", "-fno-pie", "-no-pie",
    "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-fcf-protection=none",
    "-mno-red-zone", "-Wall", "-Wextra", "-Werror", "-Wl,--build-id=none",
)

_DEFINE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FirmwareBuildError(RuntimeError):
    """The firmware could not be built; the message says why (and carries gcc's output)."""


def build(out: Path, defines: dict[str, str] | None = None, *, cc: str = "gcc",
          src_dir: Path = FIRMWARE_DIR) -> Path:
    """Compile and link the firmware into *out* (x86-64 ELF executable); return *out*.

    *defines* become ``-DNAME=VALUE`` (C string values need their quotes, e.g.
    ``{"TEEIO_FW_BUILD_ID": '"ci-42"'}``).
    """
    compiler = shutil.which(cc)
    if compiler is None:
        raise FirmwareBuildError(f"C compiler {cc!r} not found on PATH: the device firmware "
                                 "needs gcc (Debian/Ubuntu: apt-get install gcc)")
    args = [compiler, *CFLAGS]
    for name, value in sorted((defines or {}).items()):
        if not _DEFINE_NAME.fullmatch(name):
            raise ValueError(f"not a C macro name: {name!r}")
        args.append(f"-D{name}={value}")
    args += ["-T", str(src_dir / LINKER_SCRIPT), "-o", str(out)]
    args += [str(src_dir / s) for s in SOURCES]
    out.parent.mkdir(parents=True, exist_ok=True)
    log.debug("building firmware: %s", " ".join(args))
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FirmwareBuildError(f"firmware build failed (exit {proc.returncode}):\n"
                                 f"$ {' '.join(args)}\n{proc.stderr.strip()}")
    return out


def _define(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    return name, value if sep else "1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vfio_user_dev.firmware_build",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="ELF file to write")
    ap.add_argument("-D", dest="defines", action="append", type=_define, default=[],
                    metavar="NAME[=VALUE]", help="preprocessor define (repeatable)")
    ap.add_argument("--cc", default="gcc", help="C compiler (default: gcc)")
    opts = ap.parse_args(argv)
    try:
        path = build(opts.out, dict(opts.defines), cc=opts.cc)
    except (FirmwareBuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
