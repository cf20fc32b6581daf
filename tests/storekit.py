"""Store test helpers: results as plain tuples, so assertions read as data."""

from __future__ import annotations

from typing import Any

from pychat.chain import genesis, link
from pychat.gateway import Failed, PointerMoved, Stored
from pychat.store import PointerRequest, SendRequest
from pychat.store.sqlite import SqliteStore


def as_tuple(r: Stored | PointerMoved | Failed) -> tuple[Any, ...]:
    """("stored", message_id, seq, created_at, attachments, duplicate) | ("pointer", delivered,
    read, moved_delivered, moved_read) | ("error", code, message)."""
    if isinstance(r, Stored):
        return ("stored", r.message_id, r.seq, r.created_at, r.attachments, r.duplicate)
    if isinstance(r, PointerMoved):
        return ("pointer", r.delivered, r.read, r.moved_delivered, r.moved_read)
    return ("error", r.code, r.message)


class TupleSqliteStore(SqliteStore):
    """A SQLite store whose `append_batch` answers with `as_tuple`s."""

    def append_batch(  # type: ignore[override]
        self,
        sends: list[SendRequest],
        pointers: list[PointerRequest],
        seen: list[tuple[str, int]] | None = None,
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        send_results, pointer_results = super().append_batch(sends, pointers, seen)
        return [as_tuple(r) for r in send_results], [as_tuple(r) for r in pointer_results]


def assert_chained(history: list[dict[str, Any]]) -> None:
    """Each message's chain value follows from the one before (from the chat's first message)."""
    prev = genesis(history[0]["chat_id"]) if history else b""
    for m in history:
        prev = link(
            prev,
            m["seq"],
            m["sender_id"],
            m["content"],
            m["created_at"],
            [a["media_id"] for a in m["attachments"]],
        )
        assert m["chain"] == prev.hex(), m
