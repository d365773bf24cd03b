"""The project as a user installs it, for start-up benchmarks: its wheel's files (``pip
install --no-deps --target``, the optional C accelerator built as for any install) in a
virtual environment of their own, whose only other path is this environment's
site-packages for the dependencies.  A development checkout's editable install adds an
import hook to every process's start-up (setuptools' finder, loaded by a ``.pth``); this
copy has none, as an installed wheel has none."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

INSTALL_TIMEOUT = 900.0     # seconds: a wheel build with the C accelerator


@dataclass(frozen=True)
class InstalledCopy:
    python: Path            # the environment's interpreter
    scripts: Path           # where the console scripts are
    site: Path              # its site-packages

    def script(self, name: str) -> list[str]:
        """The command running console script *name* (by this copy's interpreter)."""
        return [str(self.python), str(self.scripts / name)]


def install_copy(dest: Path, project: Path) -> InstalledCopy | str:
    """The copy under *dest* (made now), or why there is none (one line)."""
    venv = dest / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                       check=True, capture_output=True, timeout=120)
        sites = sorted((venv / "lib").glob("python*/site-packages"))
        if not sites:
            return f"python -m venv made no site-packages under {venv}"
        site = sites[0]
        target = dest / "target"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                               "--no-warn-script-location",
                               "--target", str(target), str(project)],
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot make the installed copy: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"pip install --target failed (exit status {proc.returncode}): {last}"
    # The package's files go to site-packages; the dependencies stay where they are,
    # reached by a plain path line (a directory named by a .pth gets no .pth of its own
    # processed: the checkout's editable hook there stays out).
    for entry in target.iterdir():
        if entry.name != "bin":
            entry.rename(site / entry.name)
    (site / "teeio-bench-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    return InstalledCopy(venv / "bin" / "python", target / "bin", site)
