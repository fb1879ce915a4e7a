"""Every relative link in README.md and docs/ leads somewhere: the file exists and, with an #anchor, so does the heading."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _prose(page: Path) -> str:
    """The page without its code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text(encoding="utf-8")))


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines() if line.startswith("#")}


def _relative_links(page: Path) -> list[str]:
    targets = [a or b for a, b in LINK.findall(_prose(page))]
    return [t for t in targets if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not checked here


def test_the_pages_have_links_to_check() -> None:
    assert len(PAGES) > 5 and len(_relative_links(REPO / "README.md")) > 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _relative_links(page):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_anchor_rule_matches_githubs() -> None:
    assert _anchor(" img2img, inpaint, outpaint") == "img2img-inpaint-outpaint"
    assert _anchor("Install: the extras") == "install-the-extras"
    assert _anchor("`sdrt serve` (one process)") == "sdrt-serve-one-process"
