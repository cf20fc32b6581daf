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


def _fold(text: str) -> str:
    """Lower case without accents, the same length as the text (so a match masks the original)."""
    if text.isascii():  # most messages: one C call
        return text.lower()
    out = []
    for ch in text:
        base = unicodedata.normalize("NFD", ch)[0] if ch.isalpha() else ch
        out.append(base.lower() if len(base.lower()) == 1 else ch)
    return "".join(out)


class WordFilter(Plugin):
    name = "wordfilter"

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        words = [_fold(str(w)) for w in settings.get("words", []) if str(w).strip()]
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
            folded = _fold(send.content)
            if action == "off" or not self.pattern.search(folded):
                verdicts.append(None)
            elif action == "reject":
                verdicts.append(Reject("forbidden", "this message has a word this chat does not allow"))
            else:
                masked = list(send.content)
                for m in self.pattern.finditer(folded):
                    masked[m.start() : m.end()] = "*" * (m.end() - m.start())
                verdicts.append(Rewrite("".join(masked)))
        return verdicts
