"""A word filter (a shipped example plugin): rejects or masks messages with listed words.

    [[plugins]]
    use = "wordfilter"
    [plugins.settings]
    words = ["darn", "heck"]        # matched as whole words, any case, accents ignored
    action = "mask"                 # or "reject" (the sender gets `forbidden`)
    [plugins.settings.chats]        # per chat: "mask", "reject" or "off"
    "c-0194...-kids" = "reject"

One compiled pattern, one pass over the batch: the hook costs a regular expression search per
message, on the plugin's thread.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from pychat.plugins import Plugin, Reject, Rewrite, Send

ACTIONS = ("mask", "reject", "off")


def _fold(text: str) -> tuple[str, list[int] | None]:
    """Lower case without accents (combining marks dropped, letters decomposed to their base),
    and where each folded character is in `text` (None: the same places, for ASCII text)."""
    if text.isascii():  # most messages: one C call
        return text.lower(), None
    chars: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if unicodedata.combining(ch):
            continue
        base = unicodedata.normalize("NFD", ch)[0] if ch.isalpha() else ch
        low = base.lower()
        chars.append(low if len(low) == 1 else ch)
        where.append(i)
    return "".join(chars), where


class WordFilter(Plugin):
    name = "wordfilter"

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        words = [_fold(str(w))[0] for w in settings.get("words", []) if str(w).strip()]
        if not words:
            raise ValueError("settings.words: list the words to filter")
        self.action = str(settings.get("action", "mask"))
        self.chats = {str(c): str(a) for c, a in dict(settings.get("chats", {})).items()}
        for action in (self.action, *self.chats.values()):
            if action not in ACTIONS:
                raise ValueError(f"an action is one of {ACTIONS}, not {action!r}")
        alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")

    def before_send(self, batch: list[Send]) -> list[Reject | Rewrite | None]:
        verdicts: list[Reject | Rewrite | None] = []
        for send in batch:
            action = self.chats.get(send.chat_id, self.action)
            if action == "off":
                verdicts.append(None)
                continue
            folded, where = _fold(send.content)
            matches = list(self.pattern.finditer(folded))
            if not matches:
                verdicts.append(None)
            elif action == "reject":
                verdicts.append(Reject("forbidden", "this message has a word this chat does not allow"))
            else:
                verdicts.append(Rewrite(_masked(send.content, matches, where)))
        return verdicts


def _masked(text: str, matches: list[re.Match[str]], where: list[int] | None) -> str:
    """`text` with each match's letters (and their accents) replaced by one `*` per letter."""
    out: list[str] = []
    done = 0
    for m in matches:
        if where is None:
            start, end = m.start(), m.end()
        else:
            start, end = where[m.start()], where[m.end() - 1] + 1
            while end < len(text) and unicodedata.combining(text[end]):
                end += 1
        out.append(text[done:start])
        out.append("*" * (m.end() - m.start()))
        done = end
    out.append(text[done:])
    return "".join(out)
