"""Where the project's files live: the folder holding its packages, the source checkout
(if the packages run from one) and the user's cache.

Run from an installed package, nothing is ever written next to the packages: what a
checkout keeps in ``out/`` goes to the cache instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

#: The folder holding ``teeio``, ``tsm``, ``vfio_user_dev``, ``guest_agent`` and
#: ``qemu_configs``: the checkout's root, or the installed site-packages.
PACKAGES_DIR = Path(__file__).resolve().parent.parent


def checkout_root() -> Path | None:
    """The source checkout the packages run from (editable installs included), or None
    when they run from an installed wheel."""
    return PACKAGES_DIR if (PACKAGES_DIR / "pyproject.toml").is_file() else None


def cache_root() -> Path:
    """``$TEEIO_CACHE``, else ``$XDG_CACHE_HOME/teeio``, else ``~/.cache/teeio``."""
    env = os.environ.get("TEEIO_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "teeio"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A fresh temporary path beside *final* (not created) to write; it replaces *final* in
    one rename when the block ends without an exception, and is removed otherwise."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["PACKAGES_DIR", "atomic_path", "cache_root", "checkout_root"]
