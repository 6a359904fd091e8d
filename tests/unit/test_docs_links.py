"""The README's and docs' relative links resolve inside the repository (a clone has nothing else)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|`(\.\./[^`]+)`")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_stay_in_the_repository_and_exist(doc):
    for m in LINK.finditer(doc.read_text()):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"


def test_the_readme_points_at_the_architecture_document():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
    text = (ROOT / "docs/architecture.md").read_text()
    for heading in ("## Services", "## One prediction", "## Jobs", "## Contracts"):
        assert heading in text
    assert text.count("```mermaid") >= 3
