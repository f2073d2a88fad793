"""Every relative link in README.md and docs/*.md points at a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(doc: Path) -> list[str]:
    """The targets of the document's markdown links that are not URLs or in-page anchors."""
    targets = [t.split("#")[0] for t in LINK.findall(doc.read_text())]
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_every_relative_link_points_at_a_file() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked, broken = 0, []
    for doc in docs:
        for target in relative_links(doc):
            checked += 1
            if not (doc.parent / target).resolve().is_file():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist: " + ", ".join(broken)
    assert checked >= 20  # the README's docs index and the docs' links to each other


def test_readme_names_no_file_outside_the_repository() -> None:
    text = (ROOT / "README.md").read_text()
    for name in re.findall(r"`([\w./-]+\.md)`", text):
        assert (ROOT / name).is_file(), name
    assert "SPEC.md" not in text and "ARCHITECTURE.md" not in text


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](https://example.org) [anchor](#x) [file](other.md#part) [gone](missing.md)")
    (tmp_path / "other.md").write_text("")
    assert relative_links(doc) == ["other.md", "missing.md"]
    assert [t for t in relative_links(doc) if not (tmp_path / t).is_file()] == ["missing.md"]
