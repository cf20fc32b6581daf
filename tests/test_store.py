"""The SQLite store on its own, on a real file: what the engine relies on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pychat.chain import genesis, link
from pychat.store import Chat, PointerRequest, SendRequest, User
from pychat.store.sqlite import SCHEMA_VERSION, SqliteStore, _stored_lookup_sql
from tests.storekit import TupleSqliteStore, assert_chained


def _store(tmp_path: Path) -> SqliteStore:
    store = TupleSqliteStore(tmp_path / "t.db")
    for u in ("ua", "ub"):
        store.create_user(User(u, u, None, "scrypt$x", 1))
    store.create_chat(Chat("c1", "group", None, "ua", 1, 0, ["ua", "ub"]), None)
    return store


def test_a_send_from_someone_removed_meanwhile_is_refused_and_numbering_stays_gap_free(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    store.remove_member("c1", "ub")
    sends, _ = store.append_batch(
        [SendRequest("ub", "c1", "x", "late", []), SendRequest("ua", "c1", "y", "on time", [])], []
    )
    assert sends[0] == ("error", "forbidden", "not a member of this chat")
    assert sends[1][0] == "stored" and sends[1][2] == 1
    store.close()


def test_pointers_never_move_back_and_never_past_the_last_message(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append_batch([SendRequest("ua", "c1", str(i), "m", []) for i in range(3)], [])
    _, moves = store.append_batch(
        [],
        [
            PointerRequest("ub", "c1", "read", 2),
            PointerRequest("ub", "c1", "read", 1),
            PointerRequest("ub", "c1", "delivered", 3),
            PointerRequest("ub", "c1", "read", 4),
        ],
    )
    assert moves[0] == ("pointer", 2, 2, True, True)
    assert moves[1] == ("pointer", 2, 2, False, False)
    assert moves[2] == ("pointer", 3, 2, True, False)
    assert moves[3][:2] == ("error", "bad_request")
    store.close()


def test_a_failed_commit_never_leaves_the_write_transaction_open(tmp_path: Path) -> None:
    store = _store(tmp_path)
    conn = store._conn()
    try:
        with store._write() as c:
            c.execute(
                "INSERT INTO users (user_id, username, username_key, password_hash, created_at) VALUES ('u9', 'n', 'n', 'h', 1)"
            )
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not conn.in_transaction
    assert store.user_by_id("u9") is None
    store.create_user(User("u8", "u8", None, "scrypt$x", 1))  # the store still writes
    store.close()


def test_a_batch_mixing_stored_retries_and_new_sends_keeps_original_acks_and_gap_free_seqs(
    tmp_path: Path,
) -> None:
    # The fast path assumes nothing in a batch is stored yet; a stored retry (a resend after a
    # restart) must undo that attempt and answer with the original message, numbering unchanged.
    store = _store(tmp_path)
    first, _ = store.append_batch([SendRequest("ua", "c1", f"k{i}", f"m{i}", []) for i in range(3)], [])
    mixed, _ = store.append_batch(
        [
            SendRequest("ub", "c1", "new1", "n1", []),
            SendRequest("ua", "c1", "k1", "m1 again", []),
            SendRequest("ub", "c1", "new2", "n2", []),
            SendRequest("ub", "c1", "new2", "n2 twice in one batch", []),
        ],
        [],
    )
    assert mixed[1] == (*first[1][:5], True), "the retry gets the original message"
    assert [r[2] for r in mixed] == [4, 2, 5, 5], "the same key twice in a batch is one message"
    assert mixed[3] == (*mixed[2][:5], True)
    rows = store._conn().execute("SELECT seq, client_msg_id FROM messages ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "no gap"
    assert [r[1] for r in rows].count("k1") == 1
    fresh, _ = store.append_batch([SendRequest("ua", "c1", "k9", "fast path", [])], [])
    assert fresh[0][0] == "stored" and fresh[0][2] == rows[-1][0] + 1 and fresh[0][5] is False
    store.close()


# The tables version 2 wrote (text ids in every message row), to check the upgrade in place.
_V2_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE users (user_id TEXT PRIMARY KEY, username TEXT NOT NULL, username_key TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL, display_name TEXT, created_at INTEGER NOT NULL, last_seen INTEGER);
CREATE TABLE chats (chat_id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    title TEXT, created_by TEXT NOT NULL, created_at INTEGER NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0,
    last_activity INTEGER NOT NULL, direct_key TEXT UNIQUE);
CREATE TABLE user_chats (user_id TEXT NOT NULL, chat_id TEXT NOT NULL, delivered_seq INTEGER NOT NULL DEFAULT 0,
    read_seq INTEGER NOT NULL DEFAULT 0, joined_at INTEGER NOT NULL, PRIMARY KEY (user_id, chat_id)) WITHOUT ROWID;
CREATE INDEX user_chats_by_chat ON user_chats (chat_id, user_id);
CREATE TABLE messages (chat_id TEXT NOT NULL, seq INTEGER NOT NULL, message_id TEXT NOT NULL UNIQUE,
    sender_id TEXT NOT NULL, content TEXT NOT NULL, attachments TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL, client_msg_id TEXT NOT NULL, PRIMARY KEY (chat_id, seq));
CREATE UNIQUE INDEX messages_idempotency ON messages (chat_id, sender_id, client_msg_id);
CREATE TABLE media (media_id TEXT PRIMARY KEY, uploader_id TEXT NOT NULL, content_type TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL, thumbnail_media_id TEXT);
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO users VALUES ('ua', 'Ann', 'ann', 'scrypt$x', NULL, 1, 5), ('ub', 'Bob', 'bob', 'scrypt$y', 'B', 2, NULL);
INSERT INTO chats VALUES ('c1', 'direct', NULL, 'ua', 3, 2, 4, 'ua|ub'), ('c2', 'group', 'G', 'ub', 3, 1, 4, NULL);
INSERT INTO user_chats VALUES ('ua', 'c1', 2, 1, 3), ('ub', 'c1', 0, 0, 3), ('ub', 'c2', 1, 1, 3);
INSERT INTO messages VALUES ('c1', 1, 'm-old-1', 'ua', 'hello', '[]', 4, 'k1'),
    ('c1', 2, 'm-old-2', 'ub', 'hi', '[]', 4, 'k2'), ('c2', 1, 'm-old-3', 'ub', 'note', '[]', 4, 'k1');
"""


def test_a_version_2_database_is_upgraded_in_place_keeping_every_message_and_its_idempotency(
    tmp_path: Path,
) -> None:
    db = sqlite3.connect(tmp_path / "t.db")
    db.executescript(_V2_TABLES)
    db.close()
    store = TupleSqliteStore(tmp_path / "t.db")
    history, more = store.history("c1", None, None, 10)
    assert not more
    assert [(m["seq"], m["message_id"], m["sender_id"], m["content"]) for m in history] == [
        (1, "m-old-1", "ua", "hello"),
        (2, "m-old-2", "ub", "hi"),
    ]
    assert store.message_by_id("m-old-3") == {
        "message_id": "m-old-3",
        "chat_id": "c2",
        "seq": 1,
        "sender_id": "ub",
        "content": "note",
        "attachments": [],
        "created_at": 4,
        "client_msg_id": "k1",
        "chain": link(genesis("c2"), 1, "ub", "note", 4, []).hex(),
    }
    assert store.user_by_id("ub") == User("ub", "Bob", "B", "scrypt$y", 2)
    assert store.last_seen("ua") == 5
    sends, _ = store.append_batch(
        [SendRequest("ub", "c1", "k2", "hi again", []), SendRequest("ua", "c1", "k3", "new", [])], []
    )
    assert sends[0] == ("stored", "m-old-2", 2, 4, "[]", True), (
        "a retry of an old send is answered, not stored"
    )
    assert sends[1][:3] == ("stored", sends[1][1], 3)
    chats = {c["chat_id"]: c for c in store.list_chats("ub")}
    assert chats["c1"]["last_message"]["content"] == "new" and chats["c1"]["unread"] == 2  # ua's 1 and 3
    assert chats["c2"]["unread"] == 0 and chats["c2"]["title"] == "G"
    tables = {r[0] for r in store._conn().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {t for t in tables if t.endswith("_v2")}
    assert store._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    store.close()
    again = TupleSqliteStore(tmp_path / "t.db")  # reopening an upgraded store changes nothing
    assert [m["seq"] for m in again.history("c1", None, None, 10)[0]] == [1, 2, 3]
    assert_chained(again.history("c1", None, None, 10)[0])
    again.close()


def test_a_version_6_database_gets_chain_values_equal_to_those_the_message_path_computes(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    store.append_batch(
        [SendRequest("ua" if i % 2 else "ub", "c1", f"k{i}", f"m{i} é", []) for i in range(7)], []
    )
    live = store.history("c1", None, None, 20)[0]
    assert_chained(live)
    c = store._conn()
    c.execute("ALTER TABLE messages DROP COLUMN chain")
    c.execute("ALTER TABLE chats DROP COLUMN last_chain")
    c.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    store.close()
    upgraded = TupleSqliteStore(tmp_path / "t.db")
    assert upgraded.history("c1", None, None, 20)[0] == live
    sends, _ = upgraded.append_batch([SendRequest("ua", "c1", "k-new", "after the upgrade", [])], [])
    assert sends[0][2] == 8
    assert_chained(upgraded.history("c1", None, None, 20)[0])
    upgraded.close()


def test_a_version_3_database_gets_the_client_key_led_idempotency_index_and_keeps_answering_retries(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    first, _ = store.append_batch([SendRequest("ua", "c1", f"k{i}", f"m{i}", []) for i in range(3)], [])
    c = store._conn()
    # Put back what version 3 had: the same tables, the index led by the chat.
    c.execute("DROP INDEX messages_by_client_key")
    c.execute("CREATE UNIQUE INDEX messages_idempotency ON messages (chat_no, sender_no, client_msg_id)")
    c.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store.close()
    upgraded = TupleSqliteStore(tmp_path / "t.db")
    c = upgraded._conn()
    indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "messages_idempotency" not in indexes and "messages_by_client_key" in indexes
    assert [r[2] for r in c.execute("PRAGMA index_info(messages_by_client_key)")] == [
        "client_msg_id",
        "chat_no",
        "sender_no",
    ]
    assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + _stored_lookup_sql(2), ["x"] * 10)]
    assert any("USING INDEX messages_by_client_key" in step for step in plan), plan
    assert not any(step.startswith("SCAN m") for step in plan), plan
    sends, _ = upgraded.append_batch(
        [
            SendRequest("ua", "c1", "k1", "again", []),
            SendRequest("ub", "c1", "k1", "same key, other sender", []),
        ],
        [],
    )
    assert sends[0] == (*first[1][:5], True), "a retry from before the upgrade is answered"
    assert sends[1][0] == "stored" and sends[1][2] == 4 and sends[1][5] is False
    upgraded.close()


def test_a_version_1_database_without_last_seen_is_upgraded_too(tmp_path: Path) -> None:
    v1 = _V2_TABLES.replace(", last_seen INTEGER)", ")").replace(
        "('ua', 'Ann', 'ann', 'scrypt$x', NULL, 1, 5), ('ub', 'Bob', 'bob', 'scrypt$y', 'B', 2, NULL)",
        "('ua', 'Ann', 'ann', 'scrypt$x', NULL, 1), ('ub', 'Bob', 'bob', 'scrypt$y', 'B', 2)",
    )
    assert v1 != _V2_TABLES and "last_seen" not in v1
    db = sqlite3.connect(tmp_path / "t.db")
    db.executescript(v1)
    db.close()
    store = TupleSqliteStore(tmp_path / "t.db")
    assert [m["message_id"] for m in store.history("c1", None, None, 10)[0]] == ["m-old-1", "m-old-2"]
    assert store.last_seen("ua") is None
    sends, _ = store.append_batch([SendRequest("ua", "c1", "k1", "again", [])], [])
    assert sends[0] == ("stored", "m-old-1", 1, 4, "[]", True)
    store.close()
