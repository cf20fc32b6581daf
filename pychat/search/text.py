"""Text for the search index and its queries, in any language.

The index tokenizes with SQLite FTS5's `unicode61` (`remove_diacritics 2`): words are split on
spaces and punctuation, case and diacritics are folded ("Café" is found by "cafe"). Chinese,
Japanese and Korean write without spaces between words, so before indexing each run of their
characters becomes overlapping bigrams plus its last character ("東京都" -> "東京 京都 都"): a
query's run is searched as the phrase of its bigrams, which finds it anywhere inside a run, and a
single character as the prefix of a token.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

# Han (with extensions A and compatibility), Hiragana, Katakana, Hangul syllables and jamo.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
CJK_RUN = re.compile(f"[{_CJK}]+")
# A word of a query: letters, digits, marks (and the CJK runs, split apart later).
WORD = re.compile(r"[^\W_]+", re.UNICODE)
QUOTED = re.compile(r'"([^"]*)"')


def _grams(run: str) -> list[str]:
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)] + [run[-1]]


def index_text(content: str) -> str:
    """What the index tokenizes for a message's content."""
    return CJK_RUN.sub(lambda m: " " + " ".join(_grams(m.group())) + " ", content)


@dataclass(frozen=True)
class Query:
    """A parsed query: the FTS5 expression and the pieces to highlight."""

    expression: str
    terms: tuple[str, ...]


def _fts_string(token: str) -> str:
    return '"' + token.replace('"', '""') + '"'


def _phrase(text: str, prefix_last: bool) -> tuple[str | None, list[str]]:
    """One FTS5 phrase for `text` (its words and CJK runs as tokens, in order), and the words to
    highlight. None if `text` has no word."""
    tokens: list[str] = []
    shown: list[str] = []
    for m in WORD.finditer(text):
        word = m.group()
        pos = 0
        for run in CJK_RUN.finditer(word):
            if run.start() > pos:
                tokens.append(word[pos : run.start()])
            grams = _grams(run.group())
            # A run's last character is indexed alone too: a query run's own last one is not
            # needed in the phrase (its bigram ends there).
            tokens.extend(grams[:-1] if len(run.group()) > 1 else grams)
            pos = run.end()
        if pos < len(word):
            tokens.append(word[pos:])
        shown.append(word)
    if not tokens:
        return None, []
    body = " ".join(t.replace('"', '""') for t in tokens)
    star = "*" if prefix_last and len(tokens) == 1 else ""
    return f'"{body}"{star}', shown


def parse_query(q: str) -> Query | None:
    """`"exact phrase"` parts and words, all required; a lone word also matches as a prefix
    ("conf" finds "conference"). None if the query has no word at all."""
    parts: list[str] = []
    terms: list[str] = []
    for m in QUOTED.finditer(q):
        phrase, shown = _phrase(m.group(1), prefix_last=False)
        if phrase:
            parts.append(phrase)
            terms.append(" ".join(shown))
    rest = QUOTED.sub(" ", q)
    for m in WORD.finditer(rest):
        phrase, shown = _phrase(m.group(), prefix_last=True)
        if phrase:
            parts.append(phrase)
            terms.extend(shown)
    if not parts:
        return None
    return Query(" AND ".join(parts), tuple(dict.fromkeys(terms)))


def fold(text: str) -> tuple[str, list[int]]:
    """`text` without case and diacritics, and for each character of the result the index of the
    character of `text` it came from (to mark matches in the original)."""
    if text.isascii():
        return text.lower(), list(range(len(text)))
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKD", ch):
            if unicodedata.combining(c):
                continue
            for f in c.casefold():
                out.append(f)
                origin.append(i)
    return "".join(out), origin


# Characters of context kept around the first match in a highlight.
CONTEXT = 80


def highlight(content: str, terms: tuple[str, ...]) -> str:
    """The content around its first match, HTML-escaped, each match in `<mark>`...`</mark>`."""
    folded, origin = fold(content)
    spans: list[tuple[int, int]] = []
    for term in terms:
        needle, _ = fold(term)
        needle = " ".join(needle.split())
        if not needle:
            continue
        start = folded.find(needle)
        while start != -1:
            end = start + len(needle)
            spans.append((origin[start], origin[end - 1] + 1))
            start = folded.find(needle, end)
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    first = merged[0][0] if merged else 0
    lo = max(0, first - CONTEXT)
    hi = min(len(content), (merged[0][1] if merged else 0) + 2 * CONTEXT)
    out = ["…" if lo > 0 else ""]
    pos = lo
    for s, e in merged:
        if e <= lo or s >= hi:
            continue
        s, e = max(s, lo), min(e, hi)
        out.append(html.escape(content[pos:s]))
        out.append("<mark>" + html.escape(content[s:e]) + "</mark>")
        pos = e
    out.append(html.escape(content[pos:hi]))
    if hi < len(content):
        out.append("…")
    return "".join(out)
