"""The `Store` seam: everything pychat keeps durably.

Two halves: `MessageStore` is what the message path needs (append a batch with
idempotency and per-chat seq, history pages, sync backlog pages); `MetadataStore`
holds users, chats, members, read/delivered pointers and last_seen. A backend
implements both (`Store`), one module each, picked by the `store` setting:

- `sqlite:///path/to/file.db` (or `sqlite://`, the file in the data dir): the
  embedded default, `pychat.store.sqlite`;
- `cassandra://host:port/keyspace`: Apache Cassandra 5 / ScyllaDB,
  `pychat.store.cassandra`.

Every method is synchronous and may block: callers run them on the engine thread
or a thread pool, never on the asyncio loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from pychat.extras import missing
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


@dataclass(frozen=True, slots=True)
class Media:
    """One upload: its own id, the blob it points to (by sha256) and what was read from the bytes."""

    media_id: str
    uploader_id: str
    sha256: str
    content_type: str
    size: int
    created_at: int
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    thumb_sha256: str | None = None
    thumb_size: int | None = None

    @property
    def url(self) -> str:
        return f"/api/media/{self.media_id}"

    def attachment(self) -> dict[str, Any]:
        """The attachment object of PROTOCOL.md (plus what a client needs to lay it out)."""
        out: dict[str, Any] = {
            "media_id": self.media_id,
            "content_type": self.content_type,
            "size": self.size,
            "url": self.url,
        }
        if self.thumb_sha256:
            out["thumbnail_url"] = f"{self.url}/thumbnail"
        if self.width is not None:
            out["width"], out["height"] = self.width, self.height
        if self.filename:
            out["filename"] = self.filename
        return out


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
# A `BacklogRow` and the message's chain value (pychat/chain.py): what history and export carry.
ChainedRow = tuple[str, int, str, str, str, str, int, str | None, bytes | None]


def follows(rows: Sequence[Sequence[Any]], last: int) -> bool:
    """Whether the rows' seqs (second field) run on from `last` without a gap."""
    return all(row[1] == last + 1 + k for k, row in enumerate(rows))


def receipts_at(pointers: dict[str, tuple[int, int]], seq: int) -> tuple[list[str], list[str]]:
    """(members whose delivered pointer >= seq, members whose read pointer >= seq), in the
    pointers' order."""
    return [u for u, (d, _) in pointers.items() if d >= seq], [
        u for u, (_, r) in pointers.items() if r >= seq
    ]


# Above every username character ([A-Za-z0-9_.-], lowercased): the end of a prefix's range.
USERNAME_END = "~"


# The events plugins' `on_chat_event` and `on_receipt` get (pychat/plugins), built here so that
# both stores record the same shapes.


def chat_created(chat: Chat) -> dict[str, Any]:
    """`chat.created`: a chat and its first members."""
    return {
        "type": "chat.created",
        "chat_id": chat.chat_id,
        "kind": chat.kind,
        "members": list(chat.members),
        "by": chat.created_by,
        "at": chat.created_at,
    }


def member_event(change: str, chat_id: str, user_id: str, at: int) -> dict[str, Any]:
    """`member.added` or `member.removed` (`change`: "added" or "removed")."""
    return {"type": f"member.{change}", "chat_id": chat_id, "user_id": user_id, "at": at}


def receipt_event(chat_id: str, user_id: str, delivered: int, read: int) -> dict[str, Any]:
    """A member's pointers in a chat after one of them moved."""
    return {"type": "receipt", "chat_id": chat_id, "user_id": user_id, "delivered": delivered, "read": read}


def message_object(row: Sequence[Any]) -> dict[str, Any]:
    """PROTOCOL.md's message object from a row in `BacklogRow` order, with `chain` (hex) when the
    row is a `ChainedRow`."""
    chat_id, seq, message_id, sender_id, content, attachments, created_at, client_msg_id = row[:8]
    out = {
        "message_id": message_id,
        "chat_id": chat_id,
        "seq": seq,
        "sender_id": sender_id,
        "content": content,
        "attachments": json.loads(attachments),
        "created_at": created_at,
        "client_msg_id": client_msg_id,
    }
    if len(row) > 8 and row[8] is not None:
        out["chain"] = row[8].hex()
    return out


class MessageStore(Protocol):
    """Messages. `append_batch` is the only writer of messages and chat sequence numbers;
    it is called from one engine thread at a time (and fenced against any other writer)."""

    def append_batch(
        self,
        sends: list[SendRequest],
        pointers: list[PointerRequest],
        seen: list[tuple[str, int]] | None = None,
    ) -> tuple[list[SendResult], list[PointerResult]]:
        """Stores every send, moves every pointer and records every (user_id, last_seen), with
        one result per send and per pointer; an ack may be sent for a `Stored` result (it is
        durable). A send the store cannot take gets an error result of its own (the others are
        stored, each chat numbered without a gap); a retry, also by a sender who has left the
        chat since, gets the original message. SQLite does the batch in one transaction; on a
        failure of the store itself nothing is acked and the exception propagates."""

    def messages_after(self, chat_id: str, after: int, limit: int) -> list[BacklogRow]:
        """Up to `limit` messages of the chat with seq > `after`, in seq order."""

    def chained_after(self, chat_id: str, after: int, limit: int) -> list[ChainedRow]:
        """`messages_after` with each message's chain value (export, verify, import)."""

    def restore_messages(self, chat_id: str, rows: list[ChainedRow]) -> None:
        """Writes messages read from an export as they were (ids, seqs, times, chain values),
        after the chat's last one; `pychat import` into an empty server. The rows follow the
        chat's last seq without a gap (ValueError otherwise)."""

    def history(
        self, chat_id: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of message objects (with `chain`) in ascending seq, and whether there are more."""

    def message_by_id(self, message_id: str) -> dict[str, Any] | None: ...

    def chat_heads(self) -> list[tuple[str, int]]:
        """(chat_id, last_seq) of every chat with messages (the search index catches up from it)."""

    def hook_cursors(self, plugin: str) -> dict[str, int]:
        """How far a plugin's `after_store` has taken each chat (pychat/plugins/feed.py)."""

    def move_hook_cursors(self, plugin: str, cursors: dict[str, int]) -> None:
        """Moves a plugin's cursors forward (never back), durably."""

    # Plugins' receipt and chat events (`on_receipt`, `on_chat_event`; pychat/plugins/feed.py):
    # an outbox written with the change it records, read by position. SQLite numbers events in
    # commit order; Cassandra places them by time, where a write may land up to `EVENT_SETTLE`
    # positions after its place, so a reader re-reads the last `EVENT_SETTLE` positions every
    # `EVENT_SWEEP_S` seconds, and `EVENT_OVERLAP` positions on every read.
    EVENT_SWEEP_S: float
    EVENT_OVERLAP: int

    def record_events(self, kinds: set[str]) -> None:
        """Records events of these kinds ("receipt", "chat") from now on."""

    def events_after(self, kind: str, after: int, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` events of the kind at positions > `after` (more if the last position has
        more: a page never ends inside a position), ordered by position, each as (position,
        event id, body as JSON text); ids are unique, positions may repeat."""

    def events_settled(self) -> int:
        """A position at or below which no event is still to appear."""

    def forget_events(self, kind: str, upto: int) -> None:
        """Events of the kind at positions <= `upto` may be deleted (every reader has them)."""


class MetadataStore(Protocol):
    """Users, chats, members, pointers and presence."""

    # users
    def create_user(self, user: User) -> None:
        """Raises ApiError(conflict) if the username is taken (case-insensitively)."""

    def user_by_name(self, username: str) -> User | None: ...
    def user_by_id(self, user_id: str) -> User | None: ...
    def existing_users(self, user_ids: list[str]) -> set[str]: ...
    def users_named(self, prefix: str, limit: int) -> list[User]:
        """Users whose username starts with `prefix` (any case), in username order."""

    def users_by_ids(self, user_ids: list[str]) -> list[User]:
        """The users of these ids that exist."""

    def all_users(self) -> list[User]:
        """Every user, in no particular order (`pychat user list`)."""

    def set_password_hash(self, user_id: str, password_hash: str) -> bool:
        """Replaces the user's password hash (`pychat user passwd`); False if there is no such user."""

    # chats
    def create_chat(self, chat: Chat, direct_key: str | None) -> tuple[Chat, bool]:
        """Stores the chat and its members; for a direct chat whose key exists,
        returns the existing one and False."""

    def get_chat(self, chat_id: str) -> Chat | None: ...
    def list_chats(self, user_id: str) -> list[dict[str, Any]]:
        """The user's chats, newest activity first, each with `last_message` and `unread`."""

    def add_member(self, chat_id: str, user_id: str) -> bool:
        """Adds a member; one who was a member before gets its delivered/read pointers back."""

    def remove_member(self, chat_id: str, user_id: str) -> bool:
        """Removes a member, keeping its pointers for a later `add_member`."""

    def is_member(self, chat_id: str, user_id: str) -> bool: ...
    def forget_members(self, chat_id: str) -> None:
        """Drops what is cached of the chat's members (another node changed them)."""

    def all_memberships(self) -> list[tuple[str, str, list[str]]]:
        """(chat_id, kind, members) of every chat."""

    def sync_chats(self, user_id: str, since: dict[str, int]) -> list[tuple[str, int, int]]:
        """(chat_id, cursor, last_seq) of each of the user's chats; the cursor is `since`'s
        entry for the chat, or else the user's read pointer."""

    def pointers(self, chat_id: str) -> dict[str, tuple[int, int]]:
        """Each member's (delivered, read) pointer, by user id in id order."""

    # presence
    def last_seen(self, user_id: str) -> int | None: ...
    def visible_users(self, viewer_id: str, user_ids: list[str]) -> set[str]:
        """Those of `user_ids` that share a chat with `viewer_id` (and the viewer itself)."""

    def last_seen_many(self, user_ids: list[str]) -> dict[str, int | None]: ...


class MediaStore(Protocol):
    """What is known of uploads (the bytes are in a `BlobStore`), who may see them, and which
    blobs are still pointed to. Sends resolve their attachments in `append_batch`: only media the
    sender uploaded or may see; storing the message lets the chat's members see them."""

    def add_media(self, media: Media) -> None: ...
    def get_media(self, media_id: str) -> Media | None: ...
    def may_see_media(self, media_id: str, user_id: str) -> bool:
        """The uploader, and the members of every chat where a message with it was posted."""

    def uploaded_since(self, user_id: str, since_ms: int) -> tuple[int, int | None]:
        """(bytes the user uploaded since then, created_at of the oldest of those uploads)."""

    def unattached_media(self, before_ms: int, limit: int) -> list[Media]:
        """Uploads older than `before_ms` never posted in a message."""

    def remove_unattached(self, media_id: str) -> bool:
        """Deletes an upload's row unless a message has taken it meanwhile (False then)."""

    def blob_in_use(self, sha256: str) -> bool:
        """Whether any upload (or its thumbnail) points to this blob."""


class Store(MessageStore, MetadataStore, MediaStore, Protocol):
    """A backend: both halves, opened by `open_store`."""

    # What the store raises when it is out of reach for now (a network store down or timing
    # out): callers answer `unavailable` (retry) instead of `internal`.
    unavailable_errors: tuple[type[BaseException], ...]

    def close(self) -> None: ...
    def ping(self) -> bool: ...


def sqlite_file(url: str, data_dir: Path) -> Path | None:
    """The SQLite file a `store` setting names (None: not SQLite)."""
    parts = urlsplit(url or "sqlite://")
    if parts.scheme != "sqlite":
        return None
    return Path(parts.path) if parts.path not in ("", "/") else data_dir / "pychat.db"


def open_store(url: str, data_dir: Path, sqlite_synchronous: str = "FULL") -> Store:
    """Opens (creating or upgrading its schema) the store a `store` setting names."""
    parts = urlsplit(url or "sqlite://")
    if parts.scheme == "sqlite":
        from pychat.store.sqlite import SqliteStore

        path = sqlite_file(url, data_dir)
        assert path is not None
        return SqliteStore(path, sqlite_synchronous)
    if parts.scheme == "cassandra":
        try:
            from pychat.store.cassandra import CassandraStore
        except ModuleNotFoundError as e:
            raise missing("cassandra", e) from None
        return CassandraStore.from_url(url)
    raise ValueError(f"unknown store {url!r}: use sqlite:///path or cassandra://host:port/keyspace")
