"""The embedded SQLite store: one file, WAL, one connection per thread.

Durability: `synchronous=FULL` by default, so a COMMIT returns only after the
WAL is fsynced; the engine acks only after COMMIT returns.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pychat.errors import ApiError
from pychat.ids import new_ids, now_ms
from pychat.store import BacklogRow, Chat, EngineResult, PointerRequest, SendRequest, User

SCHEMA_VERSION = 4

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
CREATE TABLE IF NOT EXISTS chats (
    chat_no INTEGER PRIMARY KEY,
    chat_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    title TEXT,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_activity INTEGER NOT NULL,
    direct_key TEXT UNIQUE
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
CREATE TABLE IF NOT EXISTS messages (
    chat_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    sender_no INTEGER NOT NULL,
    content TEXT NOT NULL,
    attachments TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    client_msg_id TEXT NOT NULL,
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
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    thumbnail_media_id TEXT
);
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

_MESSAGE_COLUMNS = "chat_no, seq, message_id, sender_no, content, attachments, created_at, client_msg_id"
_MESSAGE_MARKS = ", ".join("?" * len(_MESSAGE_COLUMNS.split(", ")))
# A message as the API names it (text ids); `WHERE c.chat_id = ?` finds the chat first and then
# reads its messages through the (chat_no, seq) key.
_MESSAGE_SELECT = (
    "SELECT c.chat_id, m.seq, m.message_id, u.user_id, m.content, m.attachments, m.created_at, m.client_msg_id"
    " FROM messages m JOIN chats c ON c.chat_no = m.chat_no JOIN users u ON u.user_no = m.sender_no"
)


def _message_json(row: tuple[Any, ...]) -> dict[str, Any]:
    chat_id, seq, message_id, sender_id, content, attachments, created_at, client_msg_id = row
    return {
        "message_id": message_id,
        "chat_id": chat_id,
        "seq": seq,
        "sender_id": sender_id,
        "content": content,
        "attachments": json.loads(attachments),
        "created_at": created_at,
        "client_msg_id": client_msg_id,
    }


# Page cache per connection (KiB): the engine's inserts descend indexes far larger than the
# default 2 MiB (measured: ~5% more durable msgs/s once the store holds a few million messages).
CACHE_KIB = 16 * 1024

# How often the WAL is checkpointed into the database file.
CHECKPOINT_INTERVAL_S = 0.2


class SqliteStore:
    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        with self._write() as c:
            copy_v2 = self._migrate(c)
            for statement in SCHEMA.split(";"):
                c.execute(statement)
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            if copy_v2:
                for statement in _COPY_V2.split(";"):
                    c.execute(statement)
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
        if "last_seen" not in user_columns:  # version 1
            c.execute("ALTER TABLE users ADD COLUMN last_seen INTEGER")
        if "user_no" not in user_columns:  # version 2: text ids in messages
            for statement in _MIGRATE_V2.split(";"):
                c.execute(statement)
            return True
        # Version 3: the idempotency index led by the chat (rebuilt client key first).
        c.execute("DROP INDEX IF EXISTS messages_idempotency")
        return False

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

    def user_by_id(self, user_id: str) -> User | None:
        return self._user("user_id", user_id)

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
        c = self._conn()
        rows = c.execute(
            "SELECT c.chat_no, c.chat_id, c.kind, c.title, c.created_by, c.created_at, c.last_seq, uc.read_seq"
            " FROM user_chats uc JOIN chats c ON c.chat_id = uc.chat_id"
            " WHERE uc.user_id = ? ORDER BY c.last_activity DESC, c.chat_id",
            (user_id,),
        ).fetchall()
        user_no = c.execute("SELECT user_no FROM users WHERE user_id = ?", (user_id,)).fetchone()
        out = []
        for chat_no, chat_id, kind, title, created_by, created_at, last_seq, read_seq in rows:
            chat = Chat(chat_id, kind, title, created_by, created_at, last_seq, self._members(c, chat_id))
            item = chat.to_json()
            last = c.execute(
                f"{_MESSAGE_SELECT} WHERE m.chat_no = ? AND m.seq = ?", (chat_no, last_seq)
            ).fetchone()
            item["last_message"] = _message_json(last) if last else None
            (unread,) = c.execute(
                "SELECT COUNT(*) FROM messages WHERE chat_no = ? AND seq > ? AND sender_no != ?",
                (chat_no, read_seq, user_no[0] if user_no else -1),
            ).fetchone()
            item["unread"] = unread
            out.append(item)
        return out

    def add_member(self, chat_id: str, user_id: str) -> bool:
        with self._write() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO user_chats (user_id, chat_id, joined_at) VALUES (?, ?, ?)",
                (user_id, chat_id, now_ms()),
            )
            return cur.rowcount == 1

    def remove_member(self, chat_id: str, user_id: str) -> bool:
        with self._write() as c:
            cur = c.execute("DELETE FROM user_chats WHERE user_id = ? AND chat_id = ?", (user_id, chat_id))
            return cur.rowcount == 1

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
    ) -> tuple[list[EngineResult], list[EngineResult]]:
        pointer_results: list[EngineResult] = []
        with self._write() as c:
            # A few queries for the whole batch instead of two per chat: each chat's last seq and
            # whether each sender is (still) a member.
            chats = self._chats(c, {s.chat_id for s in sends} | {p.chat_id for p in pointers})
            last_seq = {chat_id: last for chat_id, (_, last) in chats.items()}
            members = self._memberships(c, {(s.sender_id, s.chat_id) for s in sends})
            keys = _Keys({chat_id: no for chat_id, (no, _) in chats.items()}, members)

            created_at = now_ms()  # one commit, one time
            message_ids = new_ids("m", len(sends))
            # Retries the server has not seen since it started are rare (the gateway answers the
            # rest from memory), so first assume none is stored: insert, and only if a row was
            # ignored as a duplicate undo that and look every send up through the idempotency index.
            plan = self._plan_sends(c, sends, dict(last_seq), keys, {}, created_at, message_ids)
            before = c.total_changes
            c.execute("SAVEPOINT fresh")
            c.executemany(
                f"INSERT OR IGNORE INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_MARKS})", plan.rows
            )
            if c.total_changes - before == len(plan.rows):
                c.execute("RELEASE fresh")
            else:
                c.execute("ROLLBACK TO fresh")
                c.execute("RELEASE fresh")
                existing = self._stored_already(c, sends, keys)
                plan = self._plan_sends(c, sends, dict(last_seq), keys, existing, created_at, message_ids)
                c.executemany(
                    f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_MARKS})", plan.rows
                )
            send_results, last_seq, touched = plan.results, plan.last_seq, plan.touched
            c.executemany(
                "UPDATE chats SET last_seq = ?, last_activity = ? WHERE chat_no = ?",
                [(last_seq[chat], at, keys.chat_no[chat]) for chat, at in touched.items()],
            )
            for p in pointers:
                pointer_results.append(self._move_pointer(c, p, last_seq.get(p.chat_id)))
            if seen:
                c.executemany(
                    "UPDATE users SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE user_id = ?",
                    [(at, user_id) for user_id, at in seen],
                )
        return send_results, pointer_results

    def _plan_sends(
        self,
        c: sqlite3.Connection,
        sends: list[SendRequest],
        last_seq: dict[str, int],
        keys: _Keys,
        existing: dict[tuple[str, str, str], tuple[Any, ...]],
        created_at: int,
        message_ids: list[str],
    ) -> _SendPlan:
        """Each send's result and row: stored already, refused, or the next seq of its chat."""
        plan = _SendPlan(rows=[], results=[], last_seq=last_seq, touched={})
        ids = iter(message_ids)
        planned: dict[tuple[str, str, str], EngineResult] = {}  # the same key twice in one batch
        for s in sends:
            key = (s.chat_id, s.sender_id, s.client_msg_id)
            dup = existing.get(key)
            if dup:
                plan.results.append(("stored", dup[0], dup[1], dup[2], dup[3], True))
                continue
            if key in planned:
                plan.results.append((*planned[key][:5], True))
                continue
            last = last_seq.get(s.chat_id)
            if last is None:
                plan.results.append(("error", "not_found", "no such chat"))
                continue
            sender_no = keys.sender_no.get((s.sender_id, s.chat_id))
            if sender_no is None:  # removed while the send was queued
                plan.results.append(("error", "forbidden", "not a member of this chat"))
                continue
            attachments, error = self._resolve_attachments(c, s)
            if error:
                plan.results.append(error)
                continue
            seq = last + 1
            message_id = next(ids)
            plan.rows.append(
                (
                    keys.chat_no[s.chat_id],
                    seq,
                    message_id,
                    sender_no,
                    s.content,
                    attachments,
                    created_at,
                    s.client_msg_id,
                )
            )
            last_seq[s.chat_id] = seq
            plan.touched[s.chat_id] = created_at
            planned[key] = ("stored", message_id, seq, created_at, attachments, False)
            plan.results.append(planned[key])
        return plan

    @staticmethod
    def _chats(c: sqlite3.Connection, chat_ids: set[str]) -> dict[str, tuple[int, int]]:
        """chat_id -> (chat_no, last seq) of the chats that exist."""
        ids = list(chat_ids)
        found: dict[str, tuple[int, int]] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for chat_id, chat_no, last in c.execute(
                f"SELECT chat_id, chat_no, last_seq FROM chats WHERE chat_id IN ({marks})", chunk
            ):
                found[chat_id] = (chat_no, last)
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
    def _stored_already(
        c: sqlite3.Connection, sends: list[SendRequest], keys: _Keys
    ) -> dict[tuple[str, str, str], tuple[Any, ...]]:
        """(chat_id, sender_id, client_msg_id) -> (message_id, seq, created_at, attachments) of
        the sends that are stored already, found through the idempotency index in a few queries.
        (A message's sender is a member when it is stored: other sends cannot be retries.)"""
        found: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        known = [s for s in sends if (s.sender_id, s.chat_id) in keys.sender_no]
        for start in range(0, len(known), _CHUNK):
            chunk = known[start : start + _CHUNK]
            params = [
                v
                for s in chunk
                for v in (
                    s.chat_id,
                    s.sender_id,
                    s.client_msg_id,
                    keys.chat_no[s.chat_id],
                    keys.sender_no[(s.sender_id, s.chat_id)],
                )
            ]
            for row in c.execute(_stored_lookup_sql(len(chunk)), params):
                found[(row[0], row[1], row[2])] = row[3:]
        return found

    def _resolve_attachments(self, c: sqlite3.Connection, s: SendRequest) -> tuple[str, EngineResult | None]:
        if not s.attachments:
            return "[]", None
        items = []
        for media_id in s.attachments:
            row = c.execute(
                "SELECT media_id, content_type, size, thumbnail_media_id FROM media WHERE media_id = ?",
                (media_id,),
            ).fetchone()
            if row is None:
                return "", ("error", "not_found", f"no such media: {media_id}")
            item: dict[str, Any] = {
                "media_id": row[0],
                "content_type": row[1],
                "size": row[2],
                "url": f"/api/media/{row[0]}",
            }
            if row[3]:
                item["thumbnail_url"] = f"/api/media/{row[3]}"
            items.append(item)
        return json.dumps(items, separators=(",", ":")), None

    def _move_pointer(self, c: sqlite3.Connection, p: PointerRequest, last: int | None) -> EngineResult:
        row = c.execute(
            "SELECT delivered_seq, read_seq FROM user_chats WHERE user_id = ? AND chat_id = ?",
            (p.user_id, p.chat_id),
        ).fetchone()
        if row is None or last is None:
            return ("error", "forbidden", "not a member of this chat")
        if p.seq > last:
            return ("error", "bad_request", f"seq {p.seq} is beyond the chat's last message ({last})")
        delivered, read = row
        new_delivered = max(delivered, p.seq)
        new_read = max(read, p.seq) if p.kind == "read" else read
        moved_d, moved_r = new_delivered != delivered, new_read != read
        if moved_d or moved_r:
            c.execute(
                "UPDATE user_chats SET delivered_seq = ?, read_seq = ? WHERE user_id = ? AND chat_id = ?",
                (new_delivered, new_read, p.user_id, p.chat_id),
            )
        return ("pointer", new_delivered, new_read, moved_d, moved_r)

    def sync_backlog(
        self, user_id: str, since: dict[str, int]
    ) -> tuple[list[BacklogRow], list[tuple[str, int]]]:
        c = self._conn()
        c.execute("BEGIN")  # one snapshot for the pointers and the messages
        try:
            chats = c.execute(
                "SELECT uc.chat_id, uc.read_seq, c.last_seq FROM user_chats uc"
                " JOIN chats c ON c.chat_id = uc.chat_id WHERE uc.user_id = ?",
                (user_id,),
            ).fetchall()
            backlog: list[BacklogRow] = []
            for chat_id, read_seq, last in chats:
                cursor = since.get(chat_id, read_seq)
                if last <= cursor:
                    continue  # only chats with something new cost a query
                backlog.extend(
                    c.execute(
                        f"{_MESSAGE_SELECT} WHERE c.chat_id = ? AND m.seq > ? ORDER BY m.seq",
                        (chat_id, cursor),
                    ).fetchall()
                )
        finally:
            c.execute("COMMIT")
        return backlog, [(chat_id, last) for chat_id, _, last in chats]

    def history(
        self, chat_id: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        c = self._conn()
        lo = after if after is not None else 0
        if after is not None and before is None:
            rows = c.execute(
                f"{_MESSAGE_SELECT} WHERE c.chat_id = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
                (chat_id, lo, limit + 1),
            ).fetchall()
            has_more = len(rows) > limit
            rows = rows[:limit]
        else:
            hi = before if before is not None else 2**62
            rows = c.execute(
                f"{_MESSAGE_SELECT} WHERE c.chat_id = ? AND m.seq < ? AND m.seq > ?"
                " ORDER BY m.seq DESC LIMIT ?",
                (chat_id, hi, lo, limit + 1),
            ).fetchall()
            has_more = len(rows) > limit
            rows = rows[:limit][::-1]
        return [_message_json(r) for r in rows], has_more

    def message_by_id(self, message_id: str) -> dict[str, Any] | None:
        row = self._conn().execute(f"{_MESSAGE_SELECT} WHERE m.message_id = ?", (message_id,)).fetchone()
        return _message_json(row) if row else None

    def receipts(self, chat_id: str, seq: int) -> tuple[list[str], list[str]]:
        rows = (
            self._conn()
            .execute(
                "SELECT user_id, delivered_seq, read_seq FROM user_chats WHERE chat_id = ? ORDER BY user_id",
                (chat_id,),
            )
            .fetchall()
        )
        return [u for u, d, _ in rows if d >= seq], [u for u, _, r in rows if r >= seq]


@dataclass
class _Keys:
    """The integer keys a batch's rows use: its chats' `chat_no`, and the `user_no` of each
    (sender, chat) that is a membership."""

    chat_no: dict[str, int]
    sender_no: dict[tuple[str, str], int]


@dataclass
class _SendPlan:
    rows: list[tuple[Any, ...]]
    results: list[EngineResult]
    last_seq: dict[str, int]
    touched: dict[str, int]


def _stored_lookup_sql(n: int) -> str:
    """The lookup of `n` sends (chat_id, sender_id, client_msg_id, chat_no, sender_no) through the
    idempotency index; CROSS JOIN keeps this order: one index seek per send, never a scan."""
    values = ",".join("(?, ?, ?, ?, ?)" for _ in range(n))
    return (
        "SELECT v.column1, v.column2, v.column3, m.message_id, m.seq, m.created_at, m.attachments"
        f" FROM (VALUES {values}) AS v CROSS JOIN messages m"
        " ON m.client_msg_id = v.column3 AND m.chat_no = v.column4 AND m.sender_no = v.column5"
    )


# Rows per batched lookup: 3 parameters each stays far below SQLite's 32,766.
_CHUNK = 500


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
