"""Every relative link in README.md and docs/*.md names a file that exists, without an anchor.

Anchors break silently when a heading is reworded, so the docs link to whole pages only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(text: str) -> list[str]:
    """The link targets of a markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE.findall(text) + REFERENCE.findall(text)


def problems(doc: Path) -> list[str]:
    """One line per relative link of *doc* that has an anchor or names no existing file."""
    out = []
    for target in links(doc.read_text()):
        if SCHEME.match(target):
            continue                                  # https:, mailto: ...
        if "#" in target:
            out.append(f"{doc.name}: {target}: link to the page, not an anchor")
            continue
        if not (doc.parent / target).exists():
            out.append(f"{doc.name}: {target}: no such file")
    return out


def test_the_docs_are_there() -> None:
    names = {p.name for p in doc_files()}
    assert {"README.md", "design.md", "by-hand.md", "attestation.md", "ide-and-link.md",
            "tdisp-and-tsm.md", "libvfio-user.md", "testing.md", "benchmarks.md",
            "limits.md", "hardening.md", "ghcx.md"} <= names


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_relative_links_resolve_without_anchors(doc: Path) -> None:
    assert problems(doc) == []


def test_the_readme_links_every_doc() -> None:
    readme = set(links((ROOT / "README.md").read_text()))
    missing = [p.name for p in doc_files()[1:] if f"docs/{p.name}" not in readme]
    assert missing == []


def test_the_checker_catches_bad_links(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# there\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](there.md) [gone](missing.md) [anchored](there.md#there) "
                   "[bare](#top) [web](https://example.org/x#y) `[code](nothere.md)`\n"
                   "```\n[fenced](nothere.md)\n```\n[ref]: gone-too.md\n")
    assert problems(doc) == [
        "doc.md: missing.md: no such file",
        "doc.md: there.md#there: link to the page, not an anchor",
        "doc.md: #top: link to the page, not an anchor",
        "doc.md: gone-too.md: no such file",
    ]
