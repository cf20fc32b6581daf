"""The published figures and the results files behind them: every results file the README and
docs/ name is committed, and a paragraph quoting a run of a dirty tree or a stale extension says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAMED = re.compile(r"\b([a-z][a-z_0-9]*-\d{8}-\d{6}\.json)")
DISCLOSED = re.compile(r"dirty|uncommitted|stale|older_than_source", re.IGNORECASE)


def paragraphs() -> list[tuple[str, str]]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [(d.name, p) for d in docs for p in re.split(r"\n\s*\n", d.read_text())]


def flaws(name: str) -> list[str]:
    """What the results file says was wrong with the code it measured."""
    data = json.loads((RESULTS / name).read_text())
    code = data.get("code_under_test") or {}
    out = []
    if code.get("dirty"):
        out.append("dirty tree")
    if (code.get("extension") or {}).get("older_than_source"):
        out.append("extension older than its sources")
    return out


def test_every_results_file_the_docs_name_is_committed() -> None:
    named = {(doc, f) for doc, p in paragraphs() for f in NAMED.findall(p)}
    assert named, "the docs name results files"
    missing = sorted(f"{doc}: {f}" for doc, f in named if not (RESULTS / f).is_file())
    assert not missing, missing


def test_a_figure_from_a_dirty_tree_or_a_stale_build_says_so_where_it_is_quoted() -> None:
    silent = []
    for doc, p in paragraphs():
        for f in sorted(set(NAMED.findall(p))):
            bad = flaws(f) if (RESULTS / f).is_file() else []
            if bad and not DISCLOSED.search(p):
                silent.append(f"{doc}: {f} ({', '.join(bad)}) in: {p[:120]!r}")
    assert not silent, "\n".join(silent)
