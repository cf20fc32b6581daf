"""The embedded SQLite store: one file, WAL, one connection per thread.

Durability: `synchronous=FULL` by default, so a COMMIT returns only after the
WAL is fsynced; the engine acks only after COMMIT returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pychat.chain import genesis, link_stored
from pychat.errors import ApiError
from pychat.gateway import Failed, PointerMoved, Stored
from pychat.ids import new_ids, now_ms
from pychat.store import (
    USERNAME_END,
    BacklogRow,
    ChainedRow,
    Chat,
    Media,
    PointerRequest,
    PointerResult,
    SendRequest,
    SendResult,
    User,
    chat_created,
    follows,
    member_event,
    message_object,
    receipt_event,
)

log = logging.getLogger("pychat.store")
# How `events_after` tells a receipt event from a chat event (by the body's type).
_RECEIPT_TEST = {"receipt": "= 'receipt'", "chat": "!= 'receipt'"}

SCHEMA_VERSION = 7

# Messages name their chat and sender by the integer keys `chat_no` / `user_no` rather than
# the 29-character text ids: every message row and both of its per-chat indexes get smaller,
# so a batch dirties fewer pages (`benchmarks/store_keys.py`, 600k messages, against the text-id
# schema in the same hour: 71.8k -> 91.4k durable msgs/s with time-ordered keys, 411 -> 255 bytes
# per message). Text ids stay the public names.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_no INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE,
    username TEXT NOT NULL,
    username_key TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    display_name TEXT,
    created_at INTEGER NOT NULL,
    last_seen INTEGER
);
-- `last_chain` is the chain value (pychat/chain.py) of the message at `last_seq`, `messages.chain`
-- each message's (schema 6 -> 7, computed then for the messages stored before).
CREATE TABLE IF NOT EXISTS chats (
    chat_no INTEGER PRIMARY KEY,
    chat_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    title TEXT,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_activity INTEGER NOT NULL,
    direct_key TEXT UNIQUE,
    last_chain BLOB
);
CREATE TABLE IF NOT EXISTS user_chats (
    user_id TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    read_seq INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, chat_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS user_chats_by_chat ON user_chats (chat_id, user_id);
-- The pointers of those who left a chat, given back if they are added again: a pointer never
-- moves back, and a sync after re-joining starts where the member had read to (schema 4 -> 5).
CREATE TABLE IF NOT EXISTS former_members (
    user_id TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    delivered_seq INTEGER NOT NULL,
    read_seq INTEGER NOT NULL,
    PRIMARY KEY (user_id, chat_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    chat_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    sender_no INTEGER NOT NULL,
    content TEXT NOT NULL,
    attachments TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    client_msg_id TEXT NOT NULL,
    chain BLOB,
    PRIMARY KEY (chat_no, seq)
);
-- Idempotency across restarts: one message per (chat, sender, client_msg_id). The client's key
-- leads so that time-ordered keys (what the SDK and REST generate) all append at the right edge
-- of this index, where SQLite splits pages cheaply and leaves them full. Led by the chat, every
-- chat had its own insertion point inside the tree (schema 3 -> 4, time-ordered keys: 92.3k -> 124.3k
-- durable msgs/s in `benchmarks/store_keys.py` run on each, back to back).
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_client_key ON messages (client_msg_id, chat_no, sender_no);
CREATE TABLE IF NOT EXISTS media (
    media_id TEXT PRIMARY KEY,
    uploader_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT,
    width INTEGER,
    height INTEGER,
    thumb_sha256 TEXT,
    thumb_size INTEGER,
    -- Set by the first message that carries it: uploads never attached are collected.
    attached INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS media_by_uploader ON media (uploader_id, created_at);
CREATE INDEX IF NOT EXISTS media_by_sha ON media (sha256);
CREATE INDEX IF NOT EXISTS media_by_thumb ON media (thumb_sha256) WHERE thumb_sha256 IS NOT NULL;
CREATE INDEX IF NOT EXISTS media_unattached ON media (created_at) WHERE attached = 0;
-- Receipts and chat events for plugins' on_receipt / on_chat_event, written in the same
-- transaction as what they record (only while such a plugin is loaded), read in event_no order.
CREATE TABLE IF NOT EXISTS plugin_events (
    event_no INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL
);
-- How far each plugin's after_store has taken each chat (pychat/plugins/feed.py).
CREATE TABLE IF NOT EXISTS plugin_cursors (
    plugin TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (plugin, chat_id)
) WITHOUT ROWID;
-- The chats where a message carried the media: their members may read it (schema 5 -> 6).
CREATE TABLE IF NOT EXISTS media_posts (
    media_id TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    PRIMARY KEY (media_id, chat_id)
) WITHOUT ROWID;
"""

# Version 2 -> 3: the same rows, re-keyed (`user_no` / `chat_no` follow the old rowid order).
_MIGRATE_V2 = """
ALTER TABLE users RENAME TO users_v2;
ALTER TABLE chats RENAME TO chats_v2;
ALTER TABLE messages RENAME TO messages_v2;
DROP INDEX IF EXISTS messages_idempotency;
"""
_COPY_V2 = """
INSERT INTO users (user_id, username, username_key, password_hash, display_name, created_at, last_seen)
    SELECT user_id, username, username_key, password_hash, display_name, created_at, last_seen
    FROM users_v2 ORDER BY rowid;
INSERT INTO chats (chat_id, kind, title, created_by, created_at, last_seq, last_activity, direct_key)
    SELECT chat_id, kind, title, created_by, created_at, last_seq, last_activity, direct_key
    FROM chats_v2 ORDER BY rowid;
INSERT INTO messages (chat_no, seq, message_id, sender_no, content, attachments, created_at, client_msg_id)
    SELECT c.chat_no, m.seq, m.message_id, u.user_no, m.content, m.attachments, m.created_at, m.client_msg_id
    FROM messages_v2 m JOIN chats c ON c.chat_id = m.chat_id JOIN users u ON u.user_id = m.sender_id
    ORDER BY m.rowid;
DROP TABLE messages_v2;
DROP TABLE chats_v2;
DROP TABLE users_v2;
"""

_MESSAGE_COLUMNS = (
    "chat_no, seq, message_id, sender_no, content, attachments, created_at, client_msg_id, chain"
)
_MESSAGE_MARKS = ", ".join("?" * len(_MESSAGE_COLUMNS.split(", ")))
# A message as the API names it (text ids); `WHERE c.chat_id = ?` finds the chat first and then
# reads its messages through the (chat_no, seq) key.
_MESSAGE_SELECT = (
    "SELECT c.chat_id, m.seq, m.message_id, u.user_id, m.content, m.attachments, m.created_at, m.client_msg_id"
    " FROM messages m JOIN chats c ON c.chat_no = m.chat_no JOIN users u ON u.user_no = m.sender_no"
)

# The same with the message's chain value last (`ChainedRow`).
_CHAINED_SELECT = _MESSAGE_SELECT.replace(", m.client_msg_id FROM", ", m.client_msg_id, m.chain FROM")

# The rows of `list_chats`: chat, unread count, then the last message's columns as in
# `_CHAINED_SELECT` after its chat_id (all NULL without messages). The last message is one
# primary-key seek; the unread count one range of the same key, both inside this one statement.
_LIST_CHATS = (
    "SELECT c.chat_id, c.kind, c.title, c.created_by, c.created_at, c.last_seq,"
    " (SELECT COUNT(*) FROM messages n WHERE n.chat_no = c.chat_no AND n.seq > uc.read_seq"
    "  AND n.sender_no != COALESCE(me.user_no, -1)),"
    " m.seq, m.message_id, u.user_id, m.content, m.attachments, m.created_at, m.client_msg_id, m.chain"
    " FROM user_chats uc JOIN chats c ON c.chat_id = uc.chat_id"
    " LEFT JOIN users me ON me.user_id = uc.user_id"
    " LEFT JOIN messages m ON m.chat_no = c.chat_no AND m.seq = c.last_seq"
    " LEFT JOIN users u ON u.user_no = m.sender_no"
    " WHERE uc.user_id = ? ORDER BY c.last_activity DESC, c.chat_id"
)


_MEDIA_FIELDS = len(dataclasses.fields(Media))
_MEDIA_COLUMNS = ", ".join(f.name for f in dataclasses.fields(Media))

# A chat's messages in export order, for ADBC (`arrow_batches`).
_ARROW_EXPORT = (
    "SELECT m.message_id, c.chat_id, m.seq, u.user_id AS sender_id, m.content, m.attachments,"
    " m.created_at, m.client_msg_id, m.chain FROM messages m JOIN chats c ON c.chat_no = m.chat_no"
    " JOIN users u ON u.user_no = m.sender_no WHERE c.chat_id = ? AND m.seq > ? ORDER BY m.seq"
)

# Page cache per connection (KiB): the engine's inserts descend indexes far larger than the
# default 2 MiB (measured: ~5% more durable msgs/s once the store holds a few million messages).
CACHE_KIB = 16 * 1024

# How often the WAL is checkpointed into the database file.
CHECKPOINT_INTERVAL_S = 0.2


def private_database(path: Path) -> None:
    """Makes the SQLite file `path` (created if missing) and its -wal and -shm readable and
    writable by this user only: they hold messages and password hashes. SQLite gives the -wal
    and -shm files it creates later the mode of the database file."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            file.chmod(0o600)


class SqliteStore:
    # A local file: a failure is a fault to report, not an outage to wait out (a busy database
    # waits for its busy timeout inside the call).
    unavailable_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_database(self.path)
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        # What plugins' event hooks want recorded ("receipt", "chat"; `record_events`).
        self.event_kinds: frozenset[str] = frozenset()
        with self._write() as c:
            copy_v2 = self._migrate(c)
            unchained = self._add_chain_columns(c)
            for statement in SCHEMA.split(";"):
                c.execute(statement)
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            if copy_v2:
                for statement in _COPY_V2.split(";"):
                    c.execute(statement)
            if unchained or copy_v2:
                self._chain_stored(c)
        # Checkpoints (copying the WAL into the database file, with its own fsync) mostly run on
        # this thread, outside any commit. SQLite's own autocheckpoint stays on: it finds the
        # frames already copied, and it is what lets the WAL start over (without it the WAL grew
        # past 1 GB under sustained writes, because a concurrent checkpoint never catches up).
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="pychat-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    # PASSIVE: copies what no reader still needs, never waits for (or blocks) writers.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    continue  # e.g. busy: the next round catches up
        finally:
            conn.close()

    @staticmethod
    def _migrate(c: sqlite3.Connection) -> bool:
        """Brings a database written by an older version towards this schema, in the same
        transaction that creates it (a crash midway leaves the old version intact). True when
        version 2 rows wait in the *_v2 tables to be copied once the new tables exist."""
        user_columns = {row[1] for row in c.execute("PRAGMA table_info(users)")}
        if not user_columns:
            return False  # a new database
        # Versions 1 to 5 had a media table no version ever wrote to: replaced.
        media_columns = {row[1] for row in c.execute("PRAGMA table_info(media)")}
        if "thumbnail_media_id" in media_columns:
            c.execute("DROP TABLE media")
        if "last_seen" not in user_columns:  # version 1
            c.execute("ALTER TABLE users ADD COLUMN last_seen INTEGER")
        if "user_no" not in user_columns:  # version 2: text ids in messages
            for statement in _MIGRATE_V2.split(";"):
                c.execute(statement)
            return True
        # Version 3: the idempotency index led by the chat (rebuilt client key first).
        c.execute("DROP INDEX IF EXISTS messages_idempotency")
        return False

    @staticmethod
    def _add_chain_columns(c: sqlite3.Connection) -> bool:
        """Schema 6 -> 7: the chain columns. True when messages stored before need their values."""
        message_columns = {row[1] for row in c.execute("PRAGMA table_info(messages)")}
        if not message_columns or "chain" in message_columns:
            return False
        c.execute("ALTER TABLE messages ADD COLUMN chain BLOB")
        c.execute("ALTER TABLE chats ADD COLUMN last_chain BLOB")
        return True

    @staticmethod
    def _chain_stored(c: sqlite3.Connection) -> None:
        """Computes the chain values of the messages stored before there were any (in the
        upgrade's transaction), chat by chat in seq order."""
        chats = c.execute("SELECT chat_no, chat_id FROM chats ORDER BY chat_no").fetchall()
        started, total = time.monotonic(), 0
        for chat_no, chat_id in chats:
            prev, seq = genesis(chat_id), 0
            while True:
                rows = c.execute(
                    "SELECT m.seq, u.user_id, m.content, m.created_at, m.attachments FROM messages m"
                    " JOIN users u ON u.user_no = m.sender_no WHERE m.chat_no = ? AND m.seq > ?"
                    " ORDER BY m.seq LIMIT 5000",
                    (chat_no, seq),
                ).fetchall()
                if not rows:
                    break
                values = []
                for seq, sender_id, content, created_at, attachments in rows:
                    prev = link_stored(prev, seq, sender_id, content, created_at, attachments)
                    values.append((prev, chat_no, seq))
                c.executemany("UPDATE messages SET chain = ? WHERE chat_no = ? AND seq = ?", values)
                total += len(values)
            c.execute("UPDATE chats SET last_chain = ? WHERE chat_no = ?", (prev if seq else None, chat_no))
        log.info(
            "computed the chain values of %d stored messages in %d chats (%.1f s)",
            total,
            len(chats),
            time.monotonic() - started,
        )

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _write(self) -> _WriteTxn:
        return _WriteTxn(self._conn())

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not threading.current_thread():
            self._checkpointer.join(timeout=5)
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def ping(self) -> bool:
        return bool(self._conn().execute("SELECT 1").fetchone() == (1,))

    # users

    def create_user(self, user: User) -> None:
        try:
            with self._write() as c:
                c.execute(
                    "INSERT INTO users (user_id, username, username_key, password_hash, display_name, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        user.user_id,
                        user.username,
                        user.username.lower(),
                        user.password_hash,
                        user.display_name,
                        user.created_at,
                    ),
                )
        except sqlite3.IntegrityError:
            raise ApiError("conflict", "username is taken") from None

    def _user(self, where: str, value: str) -> User | None:
        row = (
            self._conn()
            .execute(
                f"SELECT user_id, username, display_name, password_hash, created_at FROM users WHERE {where} = ?",
                (value,),
            )
            .fetchone()
        )
        return User(*row) if row else None

    def user_by_name(self, username: str) -> User | None:
        return self._user("username_key", username.lower())

    def users_named(self, prefix: str, limit: int) -> list[User]:
        key = prefix.lower()
        rows = self._conn().execute(
            "SELECT user_id, username, display_name, password_hash, created_at FROM users"
            " WHERE username_key >= ? AND username_key < ? ORDER BY username_key LIMIT ?",
            (key, key + USERNAME_END, limit),
        )
        return [User(*r) for r in rows]

    def users_by_ids(self, user_ids: list[str]) -> list[User]:
        if not user_ids:
            return []
        marks = ",".join("?" * len(user_ids))
        rows = self._conn().execute(
            "SELECT user_id, username, display_name, password_hash, created_at FROM users"
            f" WHERE user_id IN ({marks})",
            user_ids,
        )
        return [User(*r) for r in rows]

    def user_by_id(self, user_id: str) -> User | None:
        return self._user("user_id", user_id)

    def all_users(self) -> list[User]:
        rows = self._conn().execute(
            "SELECT user_id, username, display_name, password_hash, created_at FROM users"
        )
        return [User(*r) for r in rows]

    def set_password_hash(self, user_id: str, password_hash: str) -> bool:
        with self._write() as c:
            changed = c.execute(
                "UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id)
            ).rowcount
        return bool(changed)

    def existing_users(self, user_ids: list[str]) -> set[str]:
        if not user_ids:
            return set()
        marks = ",".join("?" * len(user_ids))
        rows = self._conn().execute(f"SELECT user_id FROM users WHERE user_id IN ({marks})", user_ids)
        return {r[0] for r in rows}

    # chats

    def _members(self, c: sqlite3.Connection, chat_id: str) -> list[str]:
        rows = c.execute(
            "SELECT user_id FROM user_chats WHERE chat_id = ? ORDER BY joined_at, user_id", (chat_id,)
        )
        return [r[0] for r in rows]

    def create_chat(self, chat: Chat, direct_key: str | None) -> tuple[Chat, bool]:
        with self._write() as c:
            if direct_key is not None:
                row = c.execute("SELECT chat_id FROM chats WHERE direct_key = ?", (direct_key,)).fetchone()
                if row:
                    existing = self._get_chat(c, row[0])
                    assert existing is not None
                    return existing, False
            c.execute(
                "INSERT INTO chats (chat_id, kind, title, created_by, created_at, last_seq, last_activity,"
                " direct_key) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (
                    chat.chat_id,
                    chat.kind,
                    chat.title,
                    chat.created_by,
                    chat.created_at,
                    chat.created_at,
                    direct_key,
                ),
            )
            c.executemany(
                "INSERT INTO user_chats (user_id, chat_id, joined_at) VALUES (?, ?, ?)",
                [(m, chat.chat_id, chat.created_at) for m in chat.members],
            )
            self._event(c, "chat", chat_created(chat))
        return chat, True

    def _get_chat(self, c: sqlite3.Connection, chat_id: str) -> Chat | None:
        row = c.execute(
            "SELECT chat_id, kind, title, created_by, created_at, last_seq FROM chats WHERE chat_id = ?",
            (chat_id,),
        ).fetchone()
        if row is None:
            return None
        chat_id, kind, title, created_by, created_at, last_seq = row
        return Chat(chat_id, kind, title, created_by, created_at, last_seq, self._members(c, chat_id))

    def get_chat(self, chat_id: str) -> Chat | None:
        return self._get_chat(self._conn(), chat_id)

    def list_chats(self, user_id: str) -> list[dict[str, Any]]:
        """The user's chats, newest activity first, each with its members, last message and unread
        count (messages above the read pointer, the user's own not counted): two queries on one
        snapshot, whatever the number of chats."""
        c = self._conn()
        c.execute("BEGIN")
        try:
            rows = c.execute(_LIST_CHATS, (user_id,)).fetchall()
            members: dict[str, list[str]] = {}
            for chat_id, member in c.execute(
                "SELECT theirs.chat_id, theirs.user_id FROM user_chats mine"
                " JOIN user_chats theirs ON theirs.chat_id = mine.chat_id"
                " WHERE mine.user_id = ? ORDER BY theirs.joined_at, theirs.user_id",
                (user_id,),
            ):
                members.setdefault(chat_id, []).append(member)
        finally:
            c.execute("COMMIT")
        out = []
        for row in rows:
            chat_id, kind, title, created_by, created_at, last_seq, unread = row[:7]
            chat = Chat(chat_id, kind, title, created_by, created_at, last_seq, members.get(chat_id, []))
            item = chat.to_json()
            last = (chat_id, *row[7:])
            item["last_message"] = message_object(last) if last[2] is not None else None
            item["unread"] = unread
            out.append(item)
        return out

    def add_member(self, chat_id: str, user_id: str) -> bool:
        """Adds a member; one who was a member before gets its delivered and read pointers back."""
        with self._write() as c:
            former = c.execute(
                "SELECT delivered_seq, read_seq FROM former_members WHERE user_id = ? AND chat_id = ?",
                (user_id, chat_id),
            ).fetchone()
            delivered, read = former or (0, 0)
            cur = c.execute(
                "INSERT OR IGNORE INTO user_chats (user_id, chat_id, delivered_seq, read_seq, joined_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (user_id, chat_id, delivered, read, now_ms()),
            )
            if cur.rowcount == 1 and former:
                c.execute("DELETE FROM former_members WHERE user_id = ? AND chat_id = ?", (user_id, chat_id))
            if cur.rowcount == 1:
                self._event(
                    c,
                    "chat",
                    member_event("added", chat_id, user_id, now_ms()),
                )
            return cur.rowcount == 1

    def remove_member(self, chat_id: str, user_id: str) -> bool:
        """Removes a member, keeping its pointers for `add_member` to give back."""
        with self._write() as c:
            c.execute(
                "INSERT OR REPLACE INTO former_members (user_id, chat_id, delivered_seq, read_seq)"
                " SELECT user_id, chat_id, delivered_seq, read_seq FROM user_chats"
                " WHERE user_id = ? AND chat_id = ?",
                (user_id, chat_id),
            )
            cur = c.execute("DELETE FROM user_chats WHERE user_id = ? AND chat_id = ?", (user_id, chat_id))
            if cur.rowcount == 1:
                self._event(
                    c,
                    "chat",
                    member_event("removed", chat_id, user_id, now_ms()),
                )
            return cur.rowcount == 1

    def forget_members(self, chat_id: str) -> None:
        """Nothing to forget: every membership check reads the database."""

    def is_member(self, chat_id: str, user_id: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM user_chats WHERE user_id = ? AND chat_id = ?", (user_id, chat_id))
            .fetchone()
        )
        return row is not None

    def all_memberships(self) -> list[tuple[str, str, list[str]]]:
        chats: dict[str, tuple[str, list[str]]] = {}
        for chat_id, kind, user_id in self._conn().execute(
            "SELECT c.chat_id, c.kind, uc.user_id FROM chats c LEFT JOIN user_chats uc ON uc.chat_id = c.chat_id"
            " ORDER BY c.chat_id, uc.joined_at"
        ):
            _, members = chats.setdefault(chat_id, (kind, []))
            if user_id is not None:
                members.append(user_id)
        return [(chat_id, kind, members) for chat_id, (kind, members) in chats.items()]

    # presence

    def last_seen(self, user_id: str) -> int | None:
        row = self._conn().execute("SELECT last_seen FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return row[0] if row else None

    def last_seen_many(self, user_ids: list[str]) -> dict[str, int | None]:
        if not user_ids:
            return {}
        marks = ",".join("?" * len(user_ids))
        rows = self._conn().execute(
            f"SELECT user_id, last_seen FROM users WHERE user_id IN ({marks})", user_ids
        )
        return dict(rows.fetchall())

    def visible_users(self, viewer_id: str, user_ids: list[str]) -> set[str]:
        if not user_ids:
            return set()
        marks = ",".join("?" * len(user_ids))
        rows = self._conn().execute(
            "SELECT DISTINCT theirs.user_id FROM user_chats mine"
            " JOIN user_chats theirs ON theirs.chat_id = mine.chat_id"
            f" WHERE mine.user_id = ? AND theirs.user_id IN ({marks})",
            [viewer_id, *user_ids],
        )
        visible = {r[0] for r in rows}
        if viewer_id in user_ids:
            visible.add(viewer_id)
        return visible

    # messages

    def append_batch(
        self,
        sends: list[SendRequest],
        pointers: list[PointerRequest],
        seen: list[tuple[str, int]] | None = None,
    ) -> tuple[list[SendResult], list[PointerResult]]:
        """Stores the batch in one transaction. Each send is answered on its own: a send that
        cannot be stored gets an error while the others are stored, numbered without a gap."""
        pointer_results: list[PointerResult] = []
        with self._write() as c:
            # A few queries for the whole batch instead of two per chat: each chat's last seq and
            # whether each sender is (still) a member.
            chats = self._chats(c, {s.chat_id for s in sends} | {p.chat_id for p in pointers})
            last_seq = {chat_id: last for chat_id, (_, last, _) in chats.items()}
            last_chain = {chat_id: chain for chat_id, (_, _, chain) in chats.items()}
            members = self._memberships(c, {(s.sender_id, s.chat_id) for s in sends})
            # Senders who have left one of the chats (rare): a retry of what they sent while members
            # is answered from the idempotency index, anything else is refused.
            outsiders = [s for s in sends if s.chat_id in chats and (s.sender_id, s.chat_id) not in members]
            keys = _Keys(
                {chat_id: no for chat_id, (no, _, _) in chats.items()},
                members,
                self._user_nos(c, {s.sender_id for s in outsiders}),
            )

            created_at = now_ms()  # one commit, one time
            message_ids = new_ids("m", len(sends))
            # Retries the server has not seen since it started are rare (the gateway answers the
            # rest from memory), so first assume none is stored: insert all in one statement, and
            # only if a row did not go in undo that and store send by send (`_insert_one`).
            stored_before = self._stored_already(c, outsiders, keys) if outsiders else {}
            heads = _Heads(dict(last_seq), dict(last_chain))
            plan = self._plan_sends(c, sends, heads, keys, stored_before, created_at, message_ids)
            if not self._insert_fresh(c, plan.rows):
                existing = self._stored_already(c, sends, keys)
                heads = _Heads(dict(last_seq), dict(last_chain))
                plan = self._plan_sends(
                    c, sends, heads, keys, existing, created_at, message_ids, one_by_one=True
                )
            send_results, last_seq, touched = plan.results, heads.seq, plan.touched
            self._grant_media(c, sends, send_results)
            c.executemany(
                "UPDATE chats SET last_seq = ?, last_chain = ?, last_activity = ? WHERE chat_no = ?",
                [(last_seq[chat], heads.chain[chat], at, keys.chat_no[chat]) for chat, at in touched.items()],
            )
            for p in pointers:
                pointer_results.append(self._move_pointer(c, p, last_seq.get(p.chat_id)))
            if "receipt" in self.event_kinds:
                for p, moved in zip(pointers, pointer_results, strict=True):
                    if isinstance(moved, PointerMoved) and (moved.moved_delivered or moved.moved_read):
                        self._event(
                            c, "receipt", receipt_event(p.chat_id, p.user_id, moved.delivered, moved.read)
                        )
            if seen:
                c.executemany(
                    "UPDATE users SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE user_id = ?",
                    [(at, user_id) for user_id, at in seen],
                )
        return send_results, pointer_results

    @staticmethod
    def _insert_fresh(c: sqlite3.Connection, rows: list[list[Any]]) -> bool:
        """Inserts every row in one statement; False, with nothing inserted, if any row was
        refused (stored already, or any other conflict)."""
        before = c.total_changes
        c.execute("SAVEPOINT fresh")
        try:
            c.executemany(
                f"INSERT OR IGNORE INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_MARKS})", rows
            )
            inserted_all = c.total_changes - before == len(rows)
        except sqlite3.IntegrityError:  # e.g. a constraint OR IGNORE does not cover
            inserted_all = False
        if not inserted_all:
            c.execute("ROLLBACK TO fresh")
        c.execute("RELEASE fresh")
        return inserted_all

    def _plan_sends(
        self,
        c: sqlite3.Connection,
        sends: list[SendRequest],
        heads: _Heads,
        keys: _Keys,
        existing: dict[tuple[str, str, str], tuple[Any, ...]],
        created_at: int,
        message_ids: list[str],
        one_by_one: bool = False,
    ) -> _SendPlan:
        """Each send's result and row: stored already, refused, or the next seq of its chat.
        `one_by_one` also inserts each row as it is planned, so a row the store refuses takes no
        seq: the chat's later sends move down and its numbering stays gap-free."""
        plan = _SendPlan(rows=[], results=[], touched={})
        ids = iter(message_ids)
        planned: dict[tuple[str, str, str], Stored] = {}  # the same key twice in one batch
        for s in sends:
            key = (s.chat_id, s.sender_id, s.client_msg_id)
            dup = existing.get(key)
            if dup:
                plan.results.append(_stored_again(dup))
                continue
            if key in planned:
                p = planned[key]
                plan.results.append(Stored(p.message_id, p.seq, p.created_at, p.content, p.attachments, True))
                continue
            last = heads.seq.get(s.chat_id)
            if last is None:
                plan.results.append(Failed("not_found", "no such chat"))
                continue
            sender_no = keys.sender_no.get((s.sender_id, s.chat_id))
            if sender_no is None:  # removed while the send was queued, or before a retry
                plan.results.append(Failed("forbidden", "not a member of this chat"))
                continue
            attachments, error = self._resolve_attachments(c, s)
            if error:
                plan.results.append(error)
                continue
            row: list[Any] = [
                keys.chat_no[s.chat_id],
                last + 1,
                next(ids),
                sender_no,
                s.content,
                attachments,
                created_at,
                s.client_msg_id,
                link_stored(
                    heads.chain[s.chat_id], last + 1, s.sender_id, s.content, created_at, attachments
                ),
            ]
            if one_by_one:
                refused = self._insert_one(c, row, s.sender_id, s.chat_id)
                if refused is not None:
                    plan.results.append(refused)
                    if isinstance(refused, Stored):
                        planned[key] = refused
                    continue
            seq, message_id = row[1], row[2]  # `_insert_one` may have changed them (and the chain)
            plan.rows.append(row)
            heads.seq[s.chat_id] = seq
            heads.chain[s.chat_id] = row[8]
            plan.touched[s.chat_id] = created_at
            planned[key] = Stored(message_id, seq, created_at, s.content, attachments, False)
            plan.results.append(planned[key])
        return plan

    @staticmethod
    def _insert_one(c: sqlite3.Connection, row: list[Any], sender_id: str, chat_id: str) -> SendResult | None:
        """Inserts one message row in a savepoint of its own. Repairs what can be repaired safely
        and tries again: a message_id taken draws a new one; a seq taken (the chat's last_seq fell
        behind its messages, e.g. an old backup of `chats` restored) continues after the chat's
        highest stored seq, so no seq is ever used twice. None: stored (`row` holds the id and seq
        it was stored with); else the send's result: the stored original, or an error."""
        chat_no, _, _, sender_no, _, _, _, client_msg_id, _ = row
        for _ in range(_REPAIRS):
            c.execute("SAVEPOINT one")
            try:
                c.execute(f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_MARKS})", row)
            except sqlite3.IntegrityError as e:
                c.execute("ROLLBACK TO one")
                c.execute("RELEASE one")
                failure = e
            else:
                c.execute("RELEASE one")
                return None
            original = c.execute(
                "SELECT message_id, seq, created_at, content, attachments FROM messages"
                " WHERE client_msg_id = ? AND chat_no = ? AND sender_no = ?",
                (client_msg_id, chat_no, sender_no),
            ).fetchone()
            if original is not None:
                return _stored_again(original)
            if c.execute("SELECT 1 FROM messages WHERE message_id = ?", (row[2],)).fetchone():
                log.warning("message id %s is taken; drawing another", row[2])
                row[2] = new_ids("m", 1)[0]
                continue
            (top,) = c.execute("SELECT MAX(seq) FROM messages WHERE chat_no = ?", (chat_no,)).fetchone()
            if top is not None and top >= row[1]:
                log.warning(
                    "chat %s: seq %d is taken (last_seq is behind its messages); continuing after %d",
                    chat_no,
                    row[1],
                    top,
                )
                row[1] = top + 1
                (prev,) = c.execute(
                    "SELECT chain FROM messages WHERE chat_no = ? AND seq = ?", (chat_no, top)
                ).fetchone()
                row[8] = link_stored(prev or genesis(chat_id), top + 1, sender_id, row[4], row[6], row[5])
                continue
            break
        log.error("a message of chat %s could not be stored: %s", chat_no, failure)
        return Failed("internal", "the store refused this message; it was not stored")

    @staticmethod
    def _chats(c: sqlite3.Connection, chat_ids: set[str]) -> dict[str, tuple[int, int, bytes]]:
        """chat_id -> (chat_no, last seq, last chain value) of the chats that exist."""
        ids = list(chat_ids)
        found: dict[str, tuple[int, int, bytes]] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for chat_id, chat_no, last, chain in c.execute(
                f"SELECT chat_id, chat_no, last_seq, last_chain FROM chats WHERE chat_id IN ({marks})", chunk
            ):
                found[chat_id] = (chat_no, last, chain or genesis(chat_id))
        return found

    @staticmethod
    def _memberships(c: sqlite3.Connection, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """(user_id, chat_id) -> user_no of the pairs that are memberships."""
        items = list(pairs)
        found: dict[tuple[str, str], int] = {}
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            values = ",".join("(?, ?)" for _ in chunk)
            params = [v for pair in chunk for v in pair]
            # CROSS JOIN keeps this order: one primary-key seek per pair.
            for user_id, chat_id, user_no in c.execute(
                f"SELECT uc.user_id, uc.chat_id, u.user_no FROM (VALUES {values}) AS v"
                " CROSS JOIN user_chats uc ON uc.user_id = v.column1 AND uc.chat_id = v.column2"
                " JOIN users u ON u.user_id = uc.user_id",
                params,
            ):
                found[(user_id, chat_id)] = user_no
        return found

    @staticmethod
    def _user_nos(c: sqlite3.Connection, user_ids: set[str]) -> dict[str, int]:
        """user_id -> user_no of the users that exist."""
        ids = list(user_ids)
        found: dict[str, int] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(c.execute(f"SELECT user_id, user_no FROM users WHERE user_id IN ({marks})", chunk))
        return found

    @staticmethod
    def _stored_already(
        c: sqlite3.Connection, sends: list[SendRequest], keys: _Keys
    ) -> dict[tuple[str, str, str], tuple[Any, ...]]:
        """(chat_id, sender_id, client_msg_id) -> (message_id, seq, created_at, content, attachments) of
        the sends that are stored already, found through the idempotency index in a few queries;
        also those of senders who have left the chat since (`keys.former_no`)."""
        found: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        known = [(s, no) for s in sends if (no := keys.user_no(s)) is not None]
        for start in range(0, len(known), _CHUNK):
            chunk = known[start : start + _CHUNK]
            params = [
                v
                for s, sender_no in chunk
                for v in (s.chat_id, s.sender_id, s.client_msg_id, keys.chat_no[s.chat_id], sender_no)
            ]
            for row in c.execute(_stored_lookup_sql(len(chunk)), params):
                found[(row[0], row[1], row[2])] = row[3:]
        return found

    def _resolve_attachments(self, c: sqlite3.Connection, s: SendRequest) -> tuple[str, Failed | None]:
        """The attachment objects of a send, as JSON: media the sender uploaded or may see."""
        if not s.attachments:
            return "[]", None
        items = []
        for media_id in s.attachments:
            row = c.execute(f"SELECT {_MEDIA_COLUMNS} FROM media WHERE media_id = ?", (media_id,)).fetchone()
            if row is None:
                return "", Failed("not_found", f"no such media: {media_id}")
            media = Media(*row)
            if media.uploader_id != s.sender_id and not self._may_see(c, media_id, s.sender_id):
                return "", Failed("forbidden", f"you may not post media {media_id}")
            items.append(media.attachment())
        return json.dumps(items, separators=(",", ":")), None

    @staticmethod
    def _grant_media(c: sqlite3.Connection, sends: list[SendRequest], results: list[SendResult]) -> None:
        """The members of each chat where a message with media was stored may see that media (in
        the transaction that stores the messages, once their rows are in)."""
        posts = {
            (media_id, s.chat_id)
            for s, r in zip(sends, results, strict=True)
            if s.attachments and isinstance(r, Stored) and not r.duplicate
            for media_id in s.attachments
        }
        if posts:
            c.executemany(
                "INSERT OR IGNORE INTO media_posts (media_id, chat_id) VALUES (?, ?)", sorted(posts)
            )
            c.executemany(
                "UPDATE media SET attached = 1 WHERE media_id = ? AND attached = 0",
                sorted({(media_id,) for media_id, _ in posts}),
            )

    @staticmethod
    def _may_see(c: sqlite3.Connection, media_id: str, user_id: str) -> bool:
        row = c.execute(
            "SELECT 1 FROM media_posts p JOIN user_chats uc ON uc.chat_id = p.chat_id"
            " WHERE p.media_id = ? AND uc.user_id = ? LIMIT 1",
            (media_id, user_id),
        ).fetchone()
        return row is not None

    # media

    def add_media(self, media: Media) -> None:
        with self._write() as c:
            c.execute(
                f"INSERT INTO media ({_MEDIA_COLUMNS}) VALUES ({', '.join('?' * _MEDIA_FIELDS)})",
                dataclasses.astuple(media),
            )

    def get_media(self, media_id: str) -> Media | None:
        row = (
            self._conn()
            .execute(f"SELECT {_MEDIA_COLUMNS} FROM media WHERE media_id = ?", (media_id,))
            .fetchone()
        )
        return Media(*row) if row else None

    def may_see_media(self, media_id: str, user_id: str) -> bool:
        c = self._conn()
        row = c.execute("SELECT uploader_id FROM media WHERE media_id = ?", (media_id,)).fetchone()
        if row is None:
            return False
        return bool(row[0] == user_id) or self._may_see(c, media_id, user_id)

    def uploaded_since(self, user_id: str, since_ms: int) -> tuple[int, int | None]:
        total, oldest = (
            self._conn()
            .execute(
                "SELECT COALESCE(SUM(size), 0), MIN(created_at) FROM media"
                " WHERE uploader_id = ? AND created_at >= ?",
                (user_id, since_ms),
            )
            .fetchone()
        )
        return int(total), oldest

    def unattached_media(self, before_ms: int, limit: int) -> list[Media]:
        rows = (
            self._conn()
            .execute(
                f"SELECT {_MEDIA_COLUMNS} FROM media WHERE attached = 0 AND created_at < ?"
                " ORDER BY created_at LIMIT ?",
                (before_ms, limit),
            )
            .fetchall()
        )
        return [Media(*row) for row in rows]

    def remove_unattached(self, media_id: str) -> bool:
        with self._write() as c:
            return (
                c.execute("DELETE FROM media WHERE media_id = ? AND attached = 0", (media_id,)).rowcount > 0
            )

    def blob_in_use(self, sha256: str) -> bool:
        c = self._conn()
        return (
            c.execute(
                "SELECT 1 FROM media WHERE sha256 = ? UNION ALL SELECT 1 FROM media WHERE thumb_sha256 = ? LIMIT 1",
                (sha256, sha256),
            ).fetchone()
            is not None
        )

    def _move_pointer(self, c: sqlite3.Connection, p: PointerRequest, last: int | None) -> PointerResult:
        row = c.execute(
            "SELECT delivered_seq, read_seq FROM user_chats WHERE user_id = ? AND chat_id = ?",
            (p.user_id, p.chat_id),
        ).fetchone()
        if row is None or last is None:
            return Failed("forbidden", "not a member of this chat")
        if p.seq > last:
            return Failed("bad_request", f"seq {p.seq} is beyond the chat's last message ({last})")
        delivered, read = row
        new_delivered = max(delivered, p.seq)
        new_read = max(read, p.seq) if p.kind == "read" else read
        moved_d, moved_r = new_delivered != delivered, new_read != read
        if moved_d or moved_r:
            c.execute(
                "UPDATE user_chats SET delivered_seq = ?, read_seq = ? WHERE user_id = ? AND chat_id = ?",
                (new_delivered, new_read, p.user_id, p.chat_id),
            )
        return PointerMoved(new_delivered, new_read, moved_d, moved_r)

    def sync_chats(self, user_id: str, since: dict[str, int]) -> list[tuple[str, int, int]]:
        """(chat_id, cursor, last_seq) of each of the user's chats: the cursor is the client's
        (`since`) or else the user's read pointer."""
        rows = (
            self._conn()
            .execute(
                "SELECT uc.chat_id, uc.read_seq, c.last_seq FROM user_chats uc"
                " JOIN chats c ON c.chat_id = uc.chat_id WHERE uc.user_id = ?",
                (user_id,),
            )
            .fetchall()
        )
        return [(chat_id, since.get(chat_id, read_seq), last) for chat_id, read_seq, last in rows]

    def messages_after(self, chat_id: str, after: int, limit: int) -> list[BacklogRow]:
        """Up to `limit` messages of the chat with seq > `after`, in seq order."""
        return (
            self._conn()
            .execute(
                f"{_MESSAGE_SELECT} WHERE c.chat_id = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
                (chat_id, after, limit),
            )
            .fetchall()
        )

    def history(
        self, chat_id: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        c = self._conn()
        lo = after if after is not None else 0
        if after is not None and before is None:
            rows = self.chained_after(chat_id, lo, limit + 1)
            has_more = len(rows) > limit
            rows = rows[:limit]
        else:
            hi = before if before is not None else 2**62
            rows = c.execute(
                f"{_CHAINED_SELECT} WHERE c.chat_id = ? AND m.seq < ? AND m.seq > ?"
                " ORDER BY m.seq DESC LIMIT ?",
                (chat_id, hi, lo, limit + 1),
            ).fetchall()
            has_more = len(rows) > limit
            rows = rows[:limit][::-1]
        return [message_object(r) for r in rows], has_more

    def chained_after(self, chat_id: str, after: int, limit: int) -> list[ChainedRow]:
        return (
            self._conn()
            .execute(
                f"{_CHAINED_SELECT} WHERE c.chat_id = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
                (chat_id, after, limit),
            )
            .fetchall()
        )

    def restore_messages(self, chat_id: str, rows: list[ChainedRow]) -> None:
        if not rows:
            return
        with self._write() as c:
            found = self._chats(c, {chat_id})
            if chat_id not in found:
                raise ValueError(f"no chat {chat_id}")
            chat_no, last, _ = found[chat_id]
            if not follows(rows, last):
                raise ValueError(f"chat {chat_id}: the rows do not follow seq {last} without a gap")
            senders = self._user_nos(c, {r[3] for r in rows})
            missing = {r[3] for r in rows} - senders.keys()
            if missing:
                raise ValueError(f"chat {chat_id}: unknown senders {sorted(missing)}")
            c.executemany(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_MARKS})",
                [
                    (
                        chat_no,
                        seq,
                        message_id,
                        senders[sender],
                        content,
                        attachments,
                        at,
                        client_msg_id or message_id,
                        chain,
                    )
                    for _, seq, message_id, sender, content, attachments, at, client_msg_id, chain in rows
                ],
            )
            c.execute(
                "UPDATE chats SET last_seq = ?, last_chain = ?, last_activity = MAX(last_activity, ?)"
                " WHERE chat_no = ?",
                (rows[-1][1], rows[-1][8], rows[-1][6], chat_no),
            )

    def arrow_batches(self, chat_id: str, after: int, batch_rows: int) -> Iterator[Any]:
        """The chat's messages with seq > `after` as Arrow record batches, read by ADBC's SQLite
        driver straight into Arrow (no Python object per row): message_id, chat_id, seq,
        sender_id, content, attachments (JSON text), created_at (ms), client_msg_id."""
        import adbc_driver_sqlite.dbapi as adbc

        conn = adbc.connect(str(self.path))
        try:
            cur = conn.cursor()
            cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(batch_rows)})
            cur.execute(_ARROW_EXPORT, (chat_id, after))
            yield from cur.fetch_record_batch()
            cur.close()
        finally:
            conn.close()

    def chat_heads(self) -> list[tuple[str, int]]:
        return self._conn().execute("SELECT chat_id, last_seq FROM chats WHERE last_seq > 0").fetchall()

    # plugins' event hooks

    def record_events(self, kinds: set[str]) -> None:
        self.event_kinds = frozenset(kinds)

    def _event(self, c: sqlite3.Connection, kind: str, body: dict[str, Any]) -> None:
        if kind in self.event_kinds:
            c.execute(
                "INSERT INTO plugin_events (body) VALUES (?)", (json.dumps(body, separators=(",", ":")),)
            )

    # Event numbers are given in commit order (one writer): a reader never needs to look back.
    EVENT_SWEEP_S = 0.0
    EVENT_OVERLAP = 0

    def events_after(self, kind: str, after: int, limit: int) -> list[tuple[int, str, str]]:
        rows = self._conn().execute(
            "SELECT event_no, body FROM plugin_events WHERE event_no > ?"
            f" AND json_extract(body, '$.type') {_RECEIPT_TEST[kind]} ORDER BY event_no LIMIT ?",
            (after, limit),
        )
        return [(no, str(no), body) for no, body in rows]

    def events_settled(self) -> int:
        # The highest number ever given (AUTOINCREMENT's own record: deleting events keeps it).
        row = self._conn().execute("SELECT seq FROM sqlite_sequence WHERE name = 'plugin_events'").fetchone()
        return int(row[0]) if row else 0

    def forget_events(self, kind: str, upto: int) -> None:
        with self._write() as c:
            c.execute(
                "DELETE FROM plugin_events WHERE event_no <= ?"
                f" AND json_extract(body, '$.type') {_RECEIPT_TEST[kind]}",
                (upto,),
            )

    def hook_cursors(self, plugin: str) -> dict[str, int]:
        rows = self._conn().execute("SELECT chat_id, seq FROM plugin_cursors WHERE plugin = ?", (plugin,))
        return dict(rows.fetchall())

    def move_hook_cursors(self, plugin: str, cursors: dict[str, int]) -> None:
        if not cursors:
            return
        with self._write() as c:
            c.executemany(
                "INSERT INTO plugin_cursors (plugin, chat_id, seq) VALUES (?, ?, ?)"
                " ON CONFLICT (plugin, chat_id) DO UPDATE SET seq = max(seq, excluded.seq)",
                [(plugin, chat_id, seq) for chat_id, seq in cursors.items()],
            )

    def message_by_id(self, message_id: str) -> dict[str, Any] | None:
        row = self._conn().execute(f"{_CHAINED_SELECT} WHERE m.message_id = ?", (message_id,)).fetchone()
        return message_object(row) if row else None

    def pointers(self, chat_id: str) -> dict[str, tuple[int, int]]:
        rows = self._conn().execute(
            "SELECT user_id, delivered_seq, read_seq FROM user_chats WHERE chat_id = ? ORDER BY user_id",
            (chat_id,),
        )
        return {u: (d, r) for u, d, r in rows}


@dataclass
class _Keys:
    """The integer keys a batch's rows use: its chats' `chat_no`, and the `user_no` of each
    (sender, chat) that is a membership; `former_no` has the `user_no` of senders who are not
    (any longer) members of the chat they send to, for finding what they sent while they were."""

    chat_no: dict[str, int]
    sender_no: dict[tuple[str, str], int]
    former_no: dict[str, int]

    def user_no(self, s: SendRequest) -> int | None:
        """The sender's user_no if its send can be a retry of a stored one (the chat exists)."""
        if s.chat_id not in self.chat_no:
            return None
        no = self.sender_no.get((s.sender_id, s.chat_id))
        return no if no is not None else self.former_no.get(s.sender_id)


@dataclass
class _Heads:
    """Each chat's last seq and chain value, moved as a batch's sends are numbered."""

    seq: dict[str, int]
    chain: dict[str, bytes]


@dataclass
class _SendPlan:
    rows: list[list[Any]]
    results: list[SendResult]
    touched: dict[str, int]


def _stored_again(row: tuple[Any, ...]) -> Stored:
    """A send stored before, from its (message_id, seq, created_at, content, attachments)."""
    message_id, seq, created_at, content, attachments = row
    return Stored(message_id, seq, created_at, content, attachments, True)


def _stored_lookup_sql(n: int) -> str:
    """The lookup of `n` sends (chat_id, sender_id, client_msg_id, chat_no, sender_no) through the
    idempotency index; CROSS JOIN keeps this order: one index seek per send, never a scan."""
    values = ",".join("(?, ?, ?, ?, ?)" for _ in range(n))
    return (
        "SELECT v.column1, v.column2, v.column3, m.message_id, m.seq, m.created_at, m.content, m.attachments"
        f" FROM (VALUES {values}) AS v CROSS JOIN messages m"
        " ON m.client_msg_id = v.column3 AND m.chat_no = v.column4 AND m.sender_no = v.column5"
    )


# Rows per batched lookup: 3 parameters each stays far below SQLite's 32,766.
_CHUNK = 500

# Attempts to store one message on the slow path: a taken message_id and a taken seq are each
# repaired, then tried again (a freshly drawn id has 64 random bits: colliding twice is not expected).
_REPAIRS = 4


class _WriteTxn:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # A failed COMMIT may or may not have rolled back already; never leave the transaction open.
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
