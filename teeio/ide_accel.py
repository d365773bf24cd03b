"""Which implementation protects runs of IDE TLPs (PCIe 6.x §6.33.4-§6.33.6): the optional
C accelerator ``teeio._ide_accel`` (built at install time against the system OpenSSL's
libcrypto, when a compiler and the headers are there) or the pure-Python reference in
:mod:`teeio.ide_runs`.  Both give the same bytes; ``TEEIO_IDE_ACCEL=0`` in the environment
(or :func:`set_enabled`) selects the reference.  docs/ide-and-link.md, "The accelerator".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import Protocol, cast

__all__ = ["GcmEngine", "available", "backend", "enabled", "gcm", "openssl_version",
           "set_enabled"]


class GcmEngine(Protocol):
    """The accelerator's AES-256-GCM engine for one key (``teeio._ide_accel.Gcm``): the
    C twins of :func:`teeio.ide_runs.seal_units` and :func:`teeio.ide_runs.open_units`."""

    def seal(self, counter: int, prefix: bytes, headers: list[bytes],
             payloads: list[bytes | memoryview], unit_tlps: int
             ) -> tuple[list[bytes], int]: ...

    def open(self, wires: Sequence[bytes], start: int, stop: int, counter: int,
             unit_tlps: int, joined: bool = False
             ) -> tuple[list[bytes] | bytes, int, int]: ...


def _load() -> ModuleType | None:
    try:
        from . import _ide_accel  # type: ignore[attr-defined]
    except ImportError:
        return None
    module: ModuleType = _ide_accel
    return module


_module = _load()
_enabled = _module is not None and os.environ.get("TEEIO_IDE_ACCEL", "1") != "0"


def available() -> bool:
    """Whether the C accelerator was built and imports."""
    return _module is not None


def enabled() -> bool:
    """Whether runs of TLPs go through the C accelerator now."""
    return _enabled


def set_enabled(on: bool) -> bool:
    """Use the C accelerator (if it is available) or the pure-Python reference; returns
    the previous setting."""
    global _enabled
    before = _enabled
    _enabled = bool(on) and _module is not None
    return before


def backend() -> str:
    """``"c"`` or ``"python"``: what protects runs of TLPs now."""
    return "c" if _enabled else "python"


def openssl_version() -> str | None:
    """The libcrypto the accelerator was built against (None: not available)."""
    if _module is None:
        return None
    return str(_module.OPENSSL_VERSION)


def gcm(key: bytes) -> GcmEngine:
    """The accelerator's engine for one key (ImportError if it is not available)."""
    if _module is None:
        raise ImportError("teeio._ide_accel is not built")
    return cast(GcmEngine, _module.Gcm(key))
