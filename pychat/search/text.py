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

# Scripts written without spaces between words: Han (with extension A and compatibility), kana,
# Hangul (syllables and jamo), Thai, Lao, Khmer and Myanmar.
_RUNS = (
    "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
    "\u0e00-\u0eff\u1780-\u17ff\u1000-\u109f"
)
CJK_RUN = re.compile(f"[{_RUNS}]+")
QUOTED = re.compile(r'"([^"]*)"')
# Most query words a search takes (each one is a lookup in the index).
MAX_TERMS = 16
# Letters that Unicode does not decompose into a base letter and a mark.
_LETTERS = str.maketrans(
    {"ł": "l", "ø": "o", "đ": "d", "ħ": "h", "\u0131": "i", "æ": "ae", "œ": "oe", "ß": "ss", "þ": "th"}
)


def _grams(run: str) -> list[str]:
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)] + [run[-1]]


def fold_text(text: str) -> str:
    """Case, marks (accents, Arabic and Hebrew vowel signs, Indic vowel signs) and a few letters
    folded: what is indexed and what is searched."""
    if text.isascii():
        return text.lower()
    out: list[str] = []
    kana = False
    for c in unicodedata.normalize("NFKD", text.casefold()):
        if unicodedata.category(c).startswith("M"):
            if kana:  # the voicing marks of kana tell words apart (ハ, バ, パ)
                out.append(c)
            continue
        out.append(c)
        kana = "\u3040" <= c <= "\u30ff"
    # Composed again: Hangul syllables and voiced kana are one character each, as typed.
    return unicodedata.normalize("NFC", "".join(out)).translate(_LETTERS)


def _words(text: str) -> list[str]:
    """The words of folded text: runs of letters and digits."""
    out: list[str] = []
    current: list[str] = []
    for ch in text:
        if ch.isalnum():
            current.append(ch)
        elif current:
            out.append("".join(current))
            current = []
    if current:
        out.append("".join(current))
    return out


def index_text(content: str) -> str:
    """What the index tokenizes for a message's content."""
    return CJK_RUN.sub(lambda m: " " + " ".join(_grams(m.group())) + " ", fold_text(content))


@dataclass(frozen=True)
class Query:
    """A parsed query: the FTS5 expression and the pieces to highlight."""

    expression: str
    terms: tuple[str, ...]


def _phrase(text: str, prefix_word: bool) -> tuple[str | None, list[str]]:
    """One FTS5 phrase for `text` (its words and runs as tokens, in order), and the words to
    highlight. None if `text` has no word."""
    tokens: list[str] = []
    prefix = False
    words = _words(fold_text(text))
    for w, word in enumerate(words):
        pos = 0
        runs = list(CJK_RUN.finditer(word))
        for r, run in enumerate(runs):
            if run.start() > pos:
                tokens.append(word[pos : run.start()])
            grams = _grams(run.group())
            last = w == len(words) - 1 and r == len(runs) - 1 and run.end() == len(word)
            if last and len(grams) > 1:
                # The phrase ends inside the run: its last bigram ends where the query does.
                tokens.extend(grams[:-1])
            else:
                # Followed by more, the run ends here in the text too (its last character is
                # indexed alone); a phrase ending on one character takes any bigram it starts.
                tokens.extend(grams)
                prefix = prefix or (last and len(grams) == 1)
            pos = run.end()
        if pos < len(word):
            tokens.append(word[pos:])
            # A lone word matches as a prefix ("conf" finds "conference"), from two characters.
            prefix = prefix_word and len(words) == 1 and len(word) - pos >= 2 and w == len(words) - 1
    if not tokens:
        return None, []
    body = " ".join(t.replace('"', '""') for t in tokens)
    return f'"{body}"' + ("*" if prefix else ""), [text.strip()]


def parse_query(q: str) -> Query | None:
    """`"exact phrase"` parts and words, all required (at most MAX_TERMS); a lone word also
    matches as a prefix. None if the query has no word at all."""
    parts: list[str] = []
    terms: list[str] = []
    for m in QUOTED.finditer(q):
        phrase, shown = _phrase(m.group(1), prefix_word=False)
        if phrase:
            parts.append(phrase)
            terms.extend(shown)
    for word in QUOTED.sub(" ", q).split():
        phrase, shown = _phrase(word, prefix_word=True)
        if phrase:
            parts.append(phrase)
            terms.extend(shown)
    if not parts:
        return None
    parts = list(dict.fromkeys(parts))[:MAX_TERMS]
    return Query(" AND ".join(parts), tuple(dict.fromkeys(terms)))


def fold(text: str) -> tuple[str, list[int]]:
    """`text` folded like `fold_text`, and for each character of the result the index of the
    character of `text` it came from (to mark matches in the original)."""
    if text.isascii():
        return text.lower(), list(range(len(text)))
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        for f in fold_text(ch):
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
