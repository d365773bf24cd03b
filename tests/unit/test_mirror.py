"""Debian mirror discovery from the host's apt configuration (qemu_configs/mirror.py).

Only example.org / example.com / example.net hosts appear here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_configs import mirror
from qemu_configs.mirror import (
    MirrorNotFound,
    SourceEntry,
    choose_debian_archive,
    host_debian_mirror,
    list_file_prefix,
    parse_deb822,
    parse_one_line,
    read_host_sources,
    release_fields,
)

ARCHIVE = "http://deb.example.org/debian"
SECURITY = "http://security.example.org/debian-security"
THIRD_PARTY = "https://repo.example.com/apt"

# --- parse_one_line -----------------------------------------------------------------------


def test_one_line_basic() -> None:
    text = "deb http://deb.example.org/debian trixie main contrib\n"
    assert parse_one_line(text, "sources.list") == [
        SourceEntry(ARCHIVE, "trixie", ("main", "contrib"), "sources.list"),
    ]


def test_one_line_comments_blank_lines_and_deb_src() -> None:
    text = """
# deb http://commented.example.org/debian trixie main
   # indented comment
deb-src http://deb.example.org/debian trixie main

deb http://deb.example.org/debian/ trixie main  # trailing comment
deb http://deb.example.org/debian trixie-updates main
"""
    entries = parse_one_line(text)
    assert [(e.uri, e.suite, e.components) for e in entries] == [
        (ARCHIVE, "trixie", ("main",)),          # trailing '/' dropped, comment cut
        (ARCHIVE, "trixie-updates", ("main",)),
    ]
    assert all(e.origin_file == "<text>" for e in entries)


def test_one_line_options_with_spaces() -> None:
    text = ("deb [ arch=amd64 signed-by=/usr/share/keyrings/example archive.gpg ] "
            "http://deb.example.org/debian bookworm main non-free-firmware\n"
            "deb [signed-by=/k.gpg]   https://repo.example.com/apt   stable   main\n")
    entries = parse_one_line(text)
    assert [(e.uri, e.suite, e.components) for e in entries] == [
        (ARCHIVE, "bookworm", ("main", "non-free-firmware")),
        (THIRD_PARTY, "stable", ("main",)),
    ]


def test_one_line_ignores_short_and_foreign_lines() -> None:
    text = ("deb http://deb.example.org/debian\n"     # no suite
            "deb\n"
            "rpm http://deb.example.org/x y z\n"
            "debx http://deb.example.org/debian trixie main\n")
    assert parse_one_line(text) == []


def test_one_line_suite_without_components() -> None:
    entries = parse_one_line("deb http://flat.example.net/repo ./\n")
    assert entries == [SourceEntry("http://flat.example.net/repo", "./", (), "<text>")]


# --- parse_deb822 -----------------------------------------------------------------------

DEB822 = """\
# Debian archive
Types: deb deb-src
URIs: http://deb.example.org/debian/ http://mirror2.example.net/debian
Suites: trixie trixie-updates
Components: main
  contrib
\tnon-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example.org/debian
Suites: trixie
Components: main

Types: deb
URIs: http://disabled.example.org/debian
Suites: trixie
Components: main
Enabled: no

Types: deb
URIs: http://security.example.org/debian-security
Suites: trixie-security
Components: main
Enabled: yes
"""


def test_deb822_stanzas() -> None:
    entries = parse_deb822(DEB822, "debian.sources")
    comps = ("main", "contrib", "non-free-firmware")  # continuation lines joined
    assert entries == [
        SourceEntry(ARCHIVE, "trixie", comps, "debian.sources"),
        SourceEntry(ARCHIVE, "trixie-updates", comps, "debian.sources"),
        SourceEntry("http://mirror2.example.net/debian", "trixie", comps, "debian.sources"),
        SourceEntry("http://mirror2.example.net/debian", "trixie-updates", comps,
                    "debian.sources"),
        SourceEntry(SECURITY, "trixie-security", ("main",), "debian.sources"),
    ]


def test_deb822_keys_case_insensitive_and_enabled_no_any_case() -> None:
    text = ("types: deb\nuris: http://deb.example.org/debian\nsuites: sid\ncomponents: main\n"
            "\n"
            "Types: deb\nURIs: http://off.example.org/debian\nSuites: sid\nEnabled: No\n")
    assert parse_deb822(text) == [SourceEntry(ARCHIVE, "sid", ("main",), "<text>")]


def test_deb822_embedded_key_continuation_does_not_leak_fields() -> None:
    # Signed-By may embed an armored key: continuation lines with ':' inside
    # must stay part of Signed-By, not become fields of their own.
    text = """\
Types: deb
URIs: https://repo.example.com/apt
Suites: stable
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 Comment: Suites: bogus
 .
 mQINBGexample
 -----END PGP PUBLIC KEY BLOCK-----
"""
    assert parse_deb822(text) == [SourceEntry(THIRD_PARTY, "stable", ("main",), "<text>")]


def test_deb822_blank_lines_with_whitespace_separate_stanzas() -> None:
    text = ("Types: deb\nURIs: http://a.example.org/debian\nSuites: trixie\n"
            "   \n"
            "Types: deb\nURIs: http://b.example.org/debian\nSuites: sid\n")
    assert [(e.uri, e.suite) for e in parse_deb822(text)] == [
        ("http://a.example.org/debian", "trixie"),
        ("http://b.example.org/debian", "sid"),
    ]


def test_deb822_incomplete_stanzas() -> None:
    text = ("# only a comment\n\n"
            "Types: deb\nSuites: trixie\n\n"            # no URIs
            "Types: deb\nURIs: http://x.example.org/debian\n\n"  # no Suites
            "URIs: http://y.example.org/debian\nSuites: trixie\n")  # no Types
    assert parse_deb822(text) == []


# --- read_host_sources ------------------------------------------------------------------


def _etc_apt(tmp_path: Path, sources_list: str | None = None,
             parts: dict[str, str] | None = None) -> Path:
    etc = tmp_path / "etc" / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (etc / "sources.list").write_text(sources_list)
    for name, text in (parts or {}).items():
        (etc / "sources.list.d" / name).write_text(text)
    return etc


def test_read_host_sources_both_formats(tmp_path: Path) -> None:
    etc = _etc_apt(
        tmp_path,
        "deb http://deb.example.org/debian trixie main\n",
        {
            "b.list": "deb https://repo.example.com/apt stable main\n",
            "a.sources": "Types: deb\nURIs: http://a.example.net/debian\nSuites: sid\n",
            "c.list.save": "deb http://ignored.example.org/debian trixie main\n",
            "d.disabled": "deb http://ignored.example.org/debian trixie main\n",
        },
    )
    entries = read_host_sources(etc)
    assert [(e.uri, e.suite) for e in entries] == [
        (ARCHIVE, "trixie"),                       # sources.list first
        ("http://a.example.net/debian", "sid"),    # then .d in name order
        (THIRD_PARTY, "stable"),
    ]
    assert entries[0].origin_file == str(etc / "sources.list")
    assert entries[1].origin_file == str(etc / "sources.list.d" / "a.sources")


def test_read_host_sources_missing_dir(tmp_path: Path) -> None:
    assert read_host_sources(tmp_path / "nothing") == []


# --- list_file_prefix / release_fields --------------------------------------------------


@pytest.mark.parametrize(("uri", "suite", "prefix"), [
    ("http://example.org/debian", "trixie", "example.org_debian_dists_trixie"),
    ("http://example.org/debian/", "trixie", "example.org_debian_dists_trixie"),
    ("https://deb.example.org/debian", "bookworm-updates",
     "deb.example.org_debian_dists_bookworm-updates"),
    ("http://user:secret@example.org/debian", "sid", "example.org_debian_dists_sid"),
    ("http://example.org:8080/debian", "sid", "example.org:8080_debian_dists_sid"),
    ("http://example.org", "sid", "example.org_dists_sid"),
])
def test_list_file_prefix(uri: str, suite: str, prefix: str) -> None:
    assert list_file_prefix(uri, suite) == prefix


IN_RELEASE = """\
-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA512

Origin: {origin}
Label: {label}
Suite: {suite}
Codename: {suite}
Date: Sat, 01 Jun 2024 00:00:00 UTC
SHA256:
 0123456789abcdef 1234 main/binary-amd64/Packages
Origin: Not-This-One
-----BEGIN PGP SIGNATURE-----
Label: inside-signature
-----END PGP SIGNATURE-----
"""


def _release(lists: Path, uri: str, suite: str, origin: str, label: str,
             name: str = "InRelease") -> None:
    lists.mkdir(parents=True, exist_ok=True)
    path = lists / f"{list_file_prefix(uri, suite)}_{name}"
    path.write_text(IN_RELEASE.format(origin=origin, label=label, suite=suite))


def test_release_fields_reads_first_values(tmp_path: Path) -> None:
    _release(tmp_path, ARCHIVE, "trixie", "Debian", "Debian")
    fields = release_fields(ARCHIVE, "trixie", tmp_path)
    assert fields is not None
    assert fields["Origin"] == "Debian"       # first value wins
    assert fields["Label"] == "Debian"        # the signature block is not read
    assert fields["Codename"] == "trixie"
    assert release_fields(ARCHIVE, "sid", tmp_path) is None


def test_release_fields_plain_release_file(tmp_path: Path) -> None:
    _release(tmp_path, ARCHIVE, "trixie", "Debian", "Debian", name="Release")
    fields = release_fields(ARCHIVE, "trixie", tmp_path)
    assert fields is not None and fields["Origin"] == "Debian"


# --- choose_debian_archive --------------------------------------------------------------


def _populate_lists(lists: Path) -> None:
    _release(lists, THIRD_PARTY, "stable", "Example Corp", "Example")
    _release(lists, SECURITY, "trixie-security", "Debian", "Debian-Security")
    _release(lists, ARCHIVE, "trixie-updates", "Debian", "Debian")
    _release(lists, ARCHIVE, "trixie", "Debian", "Debian")


def test_choose_from_one_line_sources_list(tmp_path: Path) -> None:
    etc = _etc_apt(tmp_path, (
        "deb [signed-by=/k.gpg] https://repo.example.com/apt stable main\n"
        "deb http://security.example.org/debian-security trixie-security main\n"
        "deb http://deb.example.org/debian/ trixie main\n"
    ))
    lists = tmp_path / "var" / "lib" / "apt" / "lists"
    _populate_lists(lists)
    entries = read_host_sources(etc)
    assert len(entries) == 3
    assert choose_debian_archive(entries, lists) == ARCHIVE


def test_choose_from_deb822_tree(tmp_path: Path) -> None:
    etc = _etc_apt(tmp_path, None, {
        "example.sources": ("Types: deb\nURIs: https://repo.example.com/apt\n"
                            "Suites: stable\nComponents: main\n"),
        "debian.sources": (
            "Types: deb\nURIs: http://security.example.org/debian-security\n"
            "Suites: trixie-security\nComponents: main\n\n"
            "Types: deb\nURIs: http://deb.example.org/debian\n"
            "Suites: trixie trixie-updates\nComponents: main\n"),
    })
    lists = tmp_path / "lists"
    _populate_lists(lists)
    entries = read_host_sources(etc)
    assert {e.uri for e in entries} == {ARCHIVE, SECURITY, THIRD_PARTY}
    assert entries[0].uri == SECURITY  # debian.sources sorts first; security comes first
    assert choose_debian_archive(entries, lists) == ARCHIVE


def test_choose_prefers_release_info_over_order(tmp_path: Path) -> None:
    # A third-party entry with a Debian suite name comes first but its Release
    # file says otherwise; the labelled Debian archive wins.
    entries = parse_one_line(
        "deb https://repo.example.com/apt trixie main\n"
        "deb http://deb.example.org/debian trixie main\n")
    _release(tmp_path, THIRD_PARTY, "trixie", "Example Corp", "Example")
    _release(tmp_path, ARCHIVE, "trixie", "Debian", "Debian")
    assert choose_debian_archive(entries, tmp_path) == ARCHIVE


def test_choose_origin_and_label_both_required(tmp_path: Path) -> None:
    entries = parse_one_line(
        "deb http://a.example.org/debian trixie main\n"       # Origin wrong
        "deb http://b.example.org/debian trixie main\n"       # Label wrong
        "deb http://c.example.org/debian trixie main\n")      # right
    _release(tmp_path, "http://a.example.org/debian", "trixie", "Example", "Debian")
    _release(tmp_path, "http://b.example.org/debian", "trixie", "Debian", "Debian-Security")
    _release(tmp_path, "http://c.example.org/debian", "trixie", "Debian", "Debian")
    assert choose_debian_archive(entries, tmp_path) == "http://c.example.org/debian"


def test_choose_labelled_archive_beats_earlier_fallback(tmp_path: Path) -> None:
    # The first entry has no lists (fallback candidate); a later one is known Debian.
    entries = parse_one_line(
        "deb http://nolists.example.org/debian trixie main\n"
        "deb http://deb.example.org/debian trixie main\n")
    _release(tmp_path, ARCHIVE, "trixie", "Debian", "Debian")
    assert choose_debian_archive(entries, tmp_path) == ARCHIVE


def test_choose_fallback_without_lists(tmp_path: Path) -> None:
    entries = parse_one_line(
        "deb https://repo.example.com/apt focal main\n"                       # not Debian
        "deb http://security.example.org/debian-security trixie main\n"        # security
        "deb http://deb.example.org/debian trixie-updates main\n"              # suffix
        "deb http://deb.example.org/debian bookworm main\n"                    # fallback
        "deb http://later.example.org/debian trixie main\n")                   # not first
    assert choose_debian_archive(entries, tmp_path / "no-lists") == ARCHIVE


def test_choose_no_fallback_from_entries_with_non_debian_release(tmp_path: Path) -> None:
    entries = parse_one_line("deb https://repo.example.com/apt trixie main\n")
    _release(tmp_path, THIRD_PARTY, "trixie", "Example Corp", "Example")
    with pytest.raises(MirrorNotFound):
        choose_debian_archive(entries, tmp_path)


def test_choose_nothing_fits(tmp_path: Path) -> None:
    entries = parse_one_line(
        "deb https://repo.example.com/apt stable-custom main\n"
        "deb http://security.example.org/debian-security trixie-security main\n")
    _release(tmp_path, SECURITY, "trixie-security", "Debian", "Debian-Security")
    with pytest.raises(MirrorNotFound, match="TEEIO_DEBIAN_MIRROR"):
        choose_debian_archive(entries, tmp_path)


def test_choose_empty() -> None:
    with pytest.raises(MirrorNotFound):
        choose_debian_archive([], Path("/nonexistent-lists-dir"))


# --- host_debian_mirror -----------------------------------------------------------------


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> object:
        raise AssertionError("apt configuration must not be read")

    monkeypatch.setenv("TEEIO_DEBIAN_MIRROR", "http://override.example.org/debian///")
    monkeypatch.setattr(mirror, "read_host_sources", boom)
    monkeypatch.setattr(mirror, "choose_debian_archive", boom)
    assert host_debian_mirror() == "http://override.example.org/debian"


@pytest.mark.parametrize("env", [None, ""])
def test_no_override_uses_host_config(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is None:
        monkeypatch.delenv("TEEIO_DEBIAN_MIRROR", raising=False)
    else:
        monkeypatch.setenv("TEEIO_DEBIAN_MIRROR", env)
    fake = [SourceEntry(ARCHIVE, "trixie", ("main",), "fake")]
    seen: list[list[SourceEntry]] = []

    def choose(entries: list[SourceEntry]) -> str:
        seen.append(list(entries))
        return "http://chosen.example.org/debian"

    monkeypatch.setattr(mirror, "read_host_sources", lambda: fake)
    monkeypatch.setattr(mirror, "choose_debian_archive", choose)
    assert host_debian_mirror() == "http://chosen.example.org/debian"
    assert seen == [fake]
