"""Every relative link of the README, the docs pages and the experiments' RESULTS.md resolves: the file exists and,
for a markdown target, the #anchor is one of its headings (GitHub's anchor rule)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES += sorted((REPO / "experiments").glob("*/RESULTS.md"))


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (lower case, punctuation dropped, spaces to hyphens)."""
    found, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return found


def test_anchor_rule_known_answers():
    assert anchors("# The paper's run\n## Know when AFT helps\n```\n# not a heading\n```") == {
        "the-papers-run",
        "know-when-aft-helps",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", link):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"
