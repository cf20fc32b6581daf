"""The `Store` seam: everything pychat keeps durably, behind one protocol.

Implementations: `pychat.store.sqlite.SqliteStore` (embedded default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from pychat.gateway import Failed, PointerMoved, Stored


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str
    display_name: str | None
    password_hash: str
    created_at: int

    def public(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "username": self.username, "display_name": self.display_name}


@dataclass(slots=True)
class Chat:
    chat_id: str
    kind: str
    title: str | None
    created_by: str
    created_at: int
    last_seq: int
    members: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "chat_id": self.chat_id,
            "kind": self.kind,
            "title": self.title,
            "members": list(self.members),
            "created_at": self.created_at,
            "last_seq": self.last_seq,
            "created_by": self.created_by,
        }


class SendRequest(NamedTuple):
    sender_id: str
    chat_id: str
    client_msg_id: str
    content: str
    attachments: list[str]


class PointerRequest(NamedTuple):
    user_id: str
    chat_id: str
    kind: str  # "delivered" | "read"
    seq: int


# What the store answers for each send and each pointer move (the bridge's own classes, so the
# engine hands them to the gateway as they are; see pychat/_core.pyi).
SendResult = Stored | Failed
PointerResult = PointerMoved | Failed
# (chat_id, seq, message_id, sender_id, content, attachments_json, created_at, client_msg_id)
BacklogRow = tuple[str, int, str, str, str, str, int, str | None]


class Store(Protocol):
    """Durable state. `append_batch` is the only writer of messages and chat
    sequence numbers; it is called from one engine thread at a time."""

    def close(self) -> None: ...
    def ping(self) -> bool: ...

    # users
    def create_user(self, user: User) -> None:
        """Raises ApiError(conflict) if the username is taken (case-insensitively)."""

    def user_by_name(self, username: str) -> User | None: ...
    def user_by_id(self, user_id: str) -> User | None: ...
    def existing_users(self, user_ids: list[str]) -> set[str]: ...

    # chats
    def create_chat(self, chat: Chat, direct_key: str | None) -> tuple[Chat, bool]:
        """Stores the chat and its members; for a direct chat whose key exists,
        returns the existing one and False."""

    def get_chat(self, chat_id: str) -> Chat | None: ...
    def list_chats(self, user_id: str) -> list[dict[str, Any]]: ...
    def add_member(self, chat_id: str, user_id: str) -> bool:
        """Adds a member; one who was a member before gets its delivered/read pointers back."""

    def remove_member(self, chat_id: str, user_id: str) -> bool:
        """Removes a member, keeping its pointers for a later `add_member`."""

    def is_member(self, chat_id: str, user_id: str) -> bool: ...
    def all_memberships(self) -> list[tuple[str, str, list[str]]]:
        """(chat_id, kind, members) of every chat."""

    # messages
    def append_batch(
        self,
        sends: list[SendRequest],
        pointers: list[PointerRequest],
        seen: list[tuple[str, int]] | None = None,
    ) -> tuple[list[SendResult], list[PointerResult]]:
        """Stores every send, moves every pointer and records every (user_id, last_seen)
        in ONE transaction, with one result per send and per pointer. A send the store cannot
        take gets an error result of its own (the others are stored, each chat numbered without
        a gap); a retry, also by a sender who has left the chat since, gets the original
        message. On a failure of the store itself nothing of the batch is written and the
        exception propagates."""

    # presence
    def last_seen(self, user_id: str) -> int | None: ...
    def visible_users(self, viewer_id: str, user_ids: list[str]) -> set[str]:
        """Those of `user_ids` that share a chat with `viewer_id` (and the viewer itself)."""

    def last_seen_many(self, user_ids: list[str]) -> dict[str, int | None]: ...

    def sync_chats(self, user_id: str, since: dict[str, int]) -> list[tuple[str, int, int]]:
        """(chat_id, cursor, last_seq) of each of the user's chats; the cursor is `since`'s
        entry for the chat, or else the user's read pointer."""

    def messages_after(self, chat_id: str, after: int, limit: int) -> list[BacklogRow]:
        """Up to `limit` messages of the chat with seq > `after`, in seq order."""

    def history(
        self, chat_id: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]: ...

    def message_by_id(self, message_id: str) -> dict[str, Any] | None: ...
    def receipts(self, chat_id: str, seq: int) -> tuple[list[str], list[str]]: ...
