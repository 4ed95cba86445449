"""Every relative link in README.md and docs/*.md leads to a file that exists, and every #anchor to a
heading of that page, as GitHub renders it: the text moves between pages, and a link left behind
would otherwise fail silently."""

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(page: Path) -> str:
    """The page without code: a link or heading inside a fence or a code span is only text."""
    return FENCE.sub("", page.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped (letters, digits, _ and - stay),
    lower case, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The page's anchors; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(prose(page)):
        base = slug(heading)
        result.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return result


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(page))
    return INLINE.findall(text) + REFERENCE.findall(text)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"[a-zA-Z][\w+.-]*:", target):
            continue  # https:, mailto: (not checked: no network in the tests)
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.relative_to(root)}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.relative_to(root)}: {target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("heading, expected", [
    ("Quick start (a fresh machine)", "quick-start-a-fresh-machine"),
    ("Input pipeline (scripts/bench_data.py)", "input-pipeline-scriptsbench_datapy"),
    ("What involution learned: kernel heat-maps", "what-involution-learned-kernel-heat-maps"),
    ("Hyper-parameter search (Optuna)", "hyper-parameter-search-optuna"),
    ("`impl=\"auto\"` and the option's default", "implauto-and-the-options-default"),
    ("Predictions for version 1 on the H200 (bf16, batch 128)", "predictions-for-version-1-on-the-h200-bf16-batch-128"),
])
def test_slug_is_githubs(heading, expected):
    assert slug(heading) == expected


def test_the_pages_have_links_to_check():
    # Guards the regexes: a pattern that matched nothing would pass every page.
    readme = links(ROOT / "README.md")
    assert "docs/scaling.md" in readme and "#quick-start-a-fresh-machine" in readme
    assert "docs/kernels_digits.png" in readme
    assert "quick-start-a-fresh-machine" in anchors(ROOT / "README.md")


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-section) [ok](#page) `[code](missing.md)`\n\n"
                    "```bash\n[fenced](missing.md)\n```\n\n"
                    "[gone](missing.md) [no heading](other.md#b-section) [here](#nowhere)\n\n[ref]: missing-too.md\n")
    found = broken_links(page, root=tmp_path)
    assert [line.split(": ")[1] for line in found] == ["missing.md", "other.md#b-section", "#nowhere", "missing-too.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = broken_links(page)
    assert not broken, "\n".join(broken)
