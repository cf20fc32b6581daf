"""Chats that moved, and up to which seq: what the engine (or a cluster's sequencers) tells the
followers of the store (the search index, the plugins' after_store feeds)."""

from __future__ import annotations

import threading


class PendingHeads:
    """Heads merged as they are told (the highest seq per chat) until a follower takes them; `wake`
    is set whenever some wait. Thread-safe."""

    def __init__(self) -> None:
        self._heads: dict[str, int] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()

    def add(self, heads: dict[str, int]) -> None:
        with self._lock:
            for chat_id, seq in heads.items():
                if seq > self._heads.get(chat_id, 0):
                    self._heads[chat_id] = seq
        self.wake.set()

    def take(self, limit: int | None = None) -> dict[str, int]:
        """Up to `limit` chats (all by default); `wake` stays set if more wait."""
        with self._lock:
            if limit is None or len(self._heads) <= limit:
                taken, self._heads = self._heads, {}
                return taken
            chats = list(self._heads)[:limit]
            self.wake.set()
            return {c: self._heads.pop(c) for c in chats}
