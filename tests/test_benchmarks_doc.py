"""docs/benchmarks.md stays usable: it opens with the headline table, each row links to an existing diary file under
docs/benchmarks/ and names a bench script that exists; every diary file is listed; every bench script appears in the
headline table, a diary file or the page its figures illustrate."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "benchmarks.md"
DIARY = REPO / "docs" / "benchmarks"
COLUMNS = ["benchmark", "current figure", "anchor (same run)", "goal", "met", "machine, date (UTC)", "command"]


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _rows() -> list[list[str]]:
    lines = PAGE.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    assert not any(ln.startswith("## ") for ln in lines[:start]), "the headline table comes first"
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header == COLUMNS
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split(" | ")])
    return rows


def test_headline_rows_link_diaries_and_name_bench_scripts() -> None:
    rows = _rows()
    assert len(rows) >= 10
    for row in rows:
        assert len(row) == len(COLUMNS), row[0]
        link = re.search(r"\]\((benchmarks/[^)#]+)(?:#([^)]+))?\)", row[0])
        assert link, f"row {row[0]!r} links no diary file"
        diary = REPO / "docs" / link.group(1)
        assert diary.is_file(), diary
        if link.group(2):
            anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", diary.read_text(), re.M)}
            assert link.group(2) in anchors, (diary.name, link.group(2))
        script = re.search(r"`(bench/[\w]+\.py)\b", row[-1])
        assert script, row[-1]
        assert (REPO / script.group(1)).is_file(), row[-1]
        assert re.search(r"20\d\d-\d\d-\d\d", row[5]), f"{row[0]}: no date"


def test_every_diary_file_is_listed_and_every_bench_script_reported() -> None:
    page = PAGE.read_text()
    diaries = sorted(DIARY.glob("*.md"))
    assert diaries
    for d in diaries:
        assert f"(benchmarks/{d.name})" in page, f"{d.name} is not linked from docs/benchmarks.md"
    # a script that renders figures rather than measuring (bench/imaging_figures.py) is documented where its figures are
    text = "".join(d.read_text() for d in (REPO / "docs").rglob("*.md"))
    for script in sorted((REPO / "bench").glob("*.py")):
        if script.name == "__init__.py":
            continue
        assert f"bench/{script.name}" in text or script.stem in text, f"{script.name} reports nowhere"
