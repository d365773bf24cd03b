"""Reference values of a device firmware image, as JSON for a verifier's policy.

    python -m tsm.refvalues --elf out/firmware/teeio-fw.elf [--personality nvme]
                            [--out refvalues.json]

Writes teeio.measurements.reference_values() of the image (to stdout without --out), with
the configuration measurement a device of that personality reports
(teeio.personality.configuration_measurements; none for the accelerator).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from teeio import options
from teeio.measurements import FirmwareImageError, reference_values
from teeio.personality import DEFAULT, PERSONALITIES, configuration_measurements


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-refvalues",
                                 description="Reference measurement values of a firmware ELF.")
    ap.add_argument("--elf", type=Path, required=True, help="firmware image (ELF)")
    ap.add_argument("--personality", choices=tuple(PERSONALITIES), default=DEFAULT,
                    help="the device's personality (teeio-device --personality; default "
                         f"{DEFAULT}): an NVMe device also reports its configuration")
    ap.add_argument("--out", type=Path, help="JSON file to write (default: stdout)")
    opts = ap.parse_args(argv)
    if opts.out is not None:
        try:
            options.writable_file("--out", opts.out)
        except options.OptionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        values = reference_values(opts.elf, configuration_measurements(opts.personality))
    except (OSError, FirmwareImageError) as exc:
        print(f"error: {opts.elf}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    if opts.out is None:
        sys.stdout.write(text)
    else:
        try:
            opts.out.write_text(text)
        except OSError as exc:
            print(f"error: --out {opts.out}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
