"""Find the Debian archive mirror the host's apt already uses (docs/design.md decision 3).

Reads one-line and deb822 sources and keeps the entry whose Release file says Origin and
Label Debian; the rules and the fallback: docs/design.md, "Mirrors from the host's apt".
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEBIAN_SUITES = {
    "buster", "bullseye", "bookworm", "trixie", "forky", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable",
}


class MirrorNotFound(RuntimeError):
    """No Debian archive entry in the host's apt configuration."""


@dataclass(frozen=True)
class SourceEntry:
    uri: str
    suite: str
    components: tuple[str, ...]
    origin_file: str


def parse_one_line(text: str, origin_file: str = "<text>") -> list[SourceEntry]:
    """Parse one-line ``sources.list`` text; ``deb-src`` and comments are skipped."""
    entries: list[SourceEntry] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # Options in brackets may contain spaces: remove them first.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        fields = line.split()
        if len(fields) < 3 or fields[0] != "deb":
            continue
        entries.append(SourceEntry(fields[1].rstrip("/"), fields[2], tuple(fields[3:]),
                                   origin_file))
    return entries


def parse_deb822(text: str, origin_file: str = "<text>") -> list[SourceEntry]:
    """Parse deb822 ``.sources`` text (stanzas separated by blank lines)."""
    entries: list[SourceEntry] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key is not None:
                fields[key] += " " + raw.strip()
                continue
            if ":" not in raw:
                continue
            key, value = raw.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
        if not fields:
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        comps = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                entries.append(SourceEntry(uri.rstrip("/"), suite, comps, origin_file))
    return entries


def read_host_sources(etc_apt: Path = Path("/etc/apt")) -> list[SourceEntry]:
    entries: list[SourceEntry] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        entries += parse_one_line(main.read_text(errors="replace"), str(main))
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.suffix == ".list":
                entries += parse_one_line(f.read_text(errors="replace"), str(f))
            elif f.suffix == ".sources":
                entries += parse_deb822(f.read_text(errors="replace"), str(f))
    return entries


def list_file_prefix(uri: str, suite: str) -> str:
    """apt's name for the lists of (uri, suite): scheme dropped, '/' turned into '_'."""
    bare = re.sub(r"^[a-z0-9+]+://", "", uri).rstrip("/")
    bare = re.sub(r"^[^@/]*@", "", bare)  # user:password@
    return f"{bare}/dists/{suite}".replace("/", "_")


def release_fields(uri: str, suite: str, lists_dir: Path) -> dict[str, str] | None:
    prefix = list_file_prefix(uri, suite)
    for name in (f"{prefix}_InRelease", f"{prefix}_Release"):
        path = lists_dir / name
        if path.is_file():
            out: dict[str, str] = {}
            for line in path.read_text(errors="replace").splitlines():
                if not line.strip() or line.startswith(" "):
                    continue
                if line.startswith("-----BEGIN PGP SIGNATURE"):
                    break
                if ":" in line:
                    k, v = line.split(":", 1)
                    out.setdefault(k.strip(), v.strip())
            return out
    return None


def choose_debian_archive(entries: Iterable[SourceEntry],
                          lists_dir: Path = Path("/var/lib/apt/lists")) -> str:
    """Return the URI of the Debian archive among *entries*."""
    fallback: str | None = None
    for e in entries:
        rel = release_fields(e.uri, e.suite, lists_dir)
        if rel is not None:
            if rel.get("Origin") == "Debian" and rel.get("Label") == "Debian":
                return e.uri
            continue
        if e.suite in DEBIAN_SUITES and fallback is None and "security" not in e.uri:
            fallback = e.uri
    if fallback is not None:
        return fallback
    raise MirrorNotFound(
        "the host's apt configuration names no Debian archive (Origin/Label Debian); "
        "add one to /etc/apt/sources.list(.d) or set TEEIO_DEBIAN_MIRROR")


def host_apt_proxy_options() -> list[str]:
    """apt proxy settings of the host, as mmdebstrap --aptopt values (it doesn't inherit them)."""
    opts: list[str] = []
    try:
        out = subprocess.run(["apt-config", "dump"], capture_output=True, text=True,
                             check=False).stdout
    except FileNotFoundError:
        return opts
    for line in out.splitlines():
        m = re.match(r'^(Acquire::(?:http|https|ftp)::Proxy(?:::[^ ]+)?) "(.*)";$', line)
        if m and m.group(2):
            opts.append(f'{m.group(1)} "{m.group(2)}"')
    return opts


def host_debian_mirror() -> str:
    import os

    env = os.environ.get("TEEIO_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    return choose_debian_archive(read_host_sources())
