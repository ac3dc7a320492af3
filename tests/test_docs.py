"""The README and docs/ hold together: every relative link resolves, anchors name real headings,
every docs page is reachable from the README, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped,
    spaces turned into '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code, external ones included."""
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("code", line)
        found.extend((number, m.group(1)) for m in LINK.finditer(line))
    return found


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def broken_links(files: list[Path]) -> list[str]:
    """'file:line: target (why)' for every relative link whose file is missing or whose anchor is
    not a heading of its target. http(s), mailto and other URLs with a scheme are not checked."""
    problems = []
    for source in files:
        for number, target in links(source):
            if SCHEME.match(target):
                continue
            where = f"{_shown(source)}:{number}"
            file_part, _, anchor = target.partition("#")
            dest = (source.parent / unquote(file_part)).resolve() if file_part else source
            if not dest.exists():
                problems.append(f"{where}: {target} (no such file: {dest})")
                continue
            if anchor:
                if dest.suffix.lower() != ".md" or not dest.is_file():
                    problems.append(f"{where}: {target} (anchor into a file that is not Markdown)")
                elif unquote(anchor).lower() not in anchors(dest):
                    problems.append(f"{where}: {target} (no heading '#{anchor}' in {dest.name})")
    return problems


def doc_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines; keep it under {README_MAX_LINES} and move reference into docs/")


def test_relative_links_and_anchors_resolve() -> None:
    files = doc_files()
    assert len(files) > 1, "docs/*.md is missing"
    assert sum(1 for f in files for _, t in links(f) if not SCHEME.match(t)) > 20, "too few links checked"
    problems = broken_links(files)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if not SCHEME.match(t)}
    missing = [p.name for p in doc_files()[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_checker_reports_broken_links(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "target.md").write_text("# Target page\n\n## Cache format (v2)\n\ntext\n\n## Cache format (v2)\n",
                                    encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Page\n\n"
        "[ok](docs/target.md) [ok anchor](docs/target.md#cache-format-v2) [repeat](docs/target.md#cache-format-v2-1)\n"
        "[self](#page) [web](https://example.com/missing.md) [mail](mailto:a@b.c)\n"
        "[missing file](docs/nope.md)\n"
        "[missing anchor](docs/target.md#no-such-heading)\n"
        "[missing self anchor](#nowhere)\n"
        "`[in code](docs/also-nope.md)`\n"
        "```\n[in a fence](docs/fenced-nope.md)\n```\n",
        encoding="utf-8")
    problems = broken_links([page])
    assert len(problems) == 3, problems
    assert "docs/nope.md" in problems[0] and ":5:" in problems[0]
    assert "#no-such-heading" in problems[1]
    assert "#nowhere" in problems[2]


def test_slug_matches_github() -> None:
    assert slug("Views (augmentation-aware caches)") == "views-augmentation-aware-caches"
    assert slug("`cache:` keys") == "cache-keys"
    assert slug("bench/scale.py") == "benchscalepy"
    assert slug("Tokenize a corpus once") == "tokenize-a-corpus-once"
