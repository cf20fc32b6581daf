"""The SQLite store on a real file, where its data or its callers misbehave: one bad send must
not fail a batch, pointers must survive leaving a chat, a retry from a former member must get
its original ack, and `list_chats` must not cost queries per chat."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pychat.store import Chat, Media, PointerRequest, SendRequest, User, receipts_at
from pychat.store import sqlite as sqlite_store
from pychat.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.storekit import TupleSqliteStore, assert_chained


def _store(tmp_path: Path) -> SqliteStore:
    store = TupleSqliteStore(tmp_path / "t.db")
    for u in ("ua", "ub", "uc"):
        store.create_user(User(u, u, None, "scrypt$x", 1))
    store.create_chat(Chat("c1", "group", None, "ua", 1, 0, ["ua", "ub"]), None)
    store.create_chat(Chat("c2", "group", None, "ua", 1, 0, ["ua", "ub"]), None)
    return store


def _seqs(db: Path, chat_id: str) -> list[int]:
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT m.seq FROM messages m JOIN chats c ON c.chat_no = m.chat_no WHERE c.chat_id = ? ORDER BY m.seq",
            (chat_id,),
        )
        return [r[0] for r in rows]


def _last_seq(db: Path, chat_id: str) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT last_seq FROM chats WHERE chat_id = ?", (chat_id,)).fetchone()[0])


def test_a_chat_whose_last_seq_fell_behind_continues_after_its_highest_seq_and_fails_nobody(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    db = tmp_path / "t.db"
    first, _ = store.append_batch([SendRequest("ua", "c1", f"old{i}", f"m{i}", []) for i in range(5)], [])
    assert [r[2] for r in first] == [1, 2, 3, 4, 5]
    # As after restoring an old copy of `chats`: last_seq says 2, messages 3..5 are stored.
    damage = sqlite3.connect(db, isolation_level=None)
    damage.execute(
        "UPDATE chats SET last_seq = 2, last_chain = (SELECT chain FROM messages WHERE chat_no = chats.chat_no"
        " AND seq = 2) WHERE chat_id = 'c1'"
    )
    damage.close()
    sends, _ = store.append_batch(
        [
            SendRequest("ub", "c2", "other1", "other chat", []),
            SendRequest("ub", "c1", "new1", "after the damage", []),
            SendRequest("ua", "c2", "other2", "other chat again", []),
            SendRequest("ub", "c1", "new2", "and again", []),
        ],
        [],
    )
    assert [r[0] for r in sends] == ["stored"] * 4, sends
    assert [r[2] for r in sends] == [1, 6, 2, 7], "c1 continues after its highest seq, c2 unaffected"
    assert _seqs(db, "c1") == [1, 2, 3, 4, 5, 6, 7], "no gap, no seq used twice"
    assert _seqs(db, "c2") == [1, 2]
    assert _last_seq(db, "c1") == 7, "the chat's last_seq is repaired"
    history, _ = store.history("c1", None, None, 10)
    assert [m["content"] for m in history] == [f"m{i}" for i in range(5)] + ["after the damage", "and again"]
    # The next batch takes the fast path again, numbering on.
    again, _ = store.append_batch([SendRequest("ua", "c1", "new3", "fast", [])], [])
    assert again[0][:3] == ("stored", again[0][1], 8)
    assert_chained(store.history("c1", None, None, 10)[0])  # the repaired sends chain after seq 5
    store.close()


def test_a_taken_message_id_is_replaced_and_the_batch_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A message_id collision cannot be provoked through the id generator (64 random bits):
    # hand the store an id that is taken.
    store = _store(tmp_path)
    first, _ = store.append_batch([SendRequest("ua", "c1", "k1", "first", [])], [])
    taken = first[0][1]
    real = sqlite_store.new_ids
    drawn: list[list[str]] = []

    def names_taken_first(prefix: str, n: int) -> list[str]:  # the batch's ids; later draws are real
        ids = [taken, *real(prefix, n - 1)] if not drawn else real(prefix, n)
        drawn.append(ids)
        return ids

    monkeypatch.setattr(sqlite_store, "new_ids", names_taken_first)
    sends, _ = store.append_batch(
        [SendRequest("ub", "c2", "k2", "collides", []), SendRequest("ub", "c1", "k3", "fine", [])], []
    )
    monkeypatch.setattr(sqlite_store, "new_ids", real)
    # The store drew the batch's ids from the patched generator (the taken one first), then one
    # more in place of the taken one: the collision really happened and was repaired.
    assert len(drawn) == 2 and drawn[0][0] == taken and len(drawn[0]) == 2 and len(drawn[1]) == 1, drawn
    assert sends[0][1] == drawn[1][0] and sends[1][1] == drawn[0][1]
    assert [r[0] for r in sends] == ["stored", "stored"], sends
    assert sends[0][1] != taken and sends[0][2] == 1
    assert sends[1][2] == 2
    assert store.message_by_id(taken)["content"] == "first"  # type: ignore[index]
    assert store.message_by_id(sends[0][1])["content"] == "collides"  # type: ignore[index]
    store.close()


def test_a_send_the_store_refuses_fails_alone_and_the_chats_later_sends_move_down(tmp_path: Path) -> None:
    store = _store(tmp_path)
    db = tmp_path / "t.db"
    # A fault that none of the store's repairs can fix: a trigger refusing one content.
    other = sqlite3.connect(db, isolation_level=None)
    other.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.content = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
    )
    other.close()
    sends, _ = store.append_batch(
        [
            SendRequest("ua", "c1", "a", "one", []),
            SendRequest("ub", "c1", "b", "poison", []),
            SendRequest("ua", "c2", "c", "other chat", []),
            SendRequest("ub", "c1", "d", "three", []),
        ],
        [],
    )
    assert sends[1] == ("error", "internal", "the store refused this message; it was not stored")
    assert [(r[0], r[2]) for i, r in enumerate(sends) if i != 1] == [
        ("stored", 1),
        ("stored", 1),
        ("stored", 2),
    ]
    assert _seqs(db, "c1") == [1, 2] and _last_seq(db, "c1") == 2, "no gap where the refused send was"
    store.close()


def test_a_retry_by_a_sender_who_left_gets_the_original_ack_and_a_new_send_is_forbidden(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    db = tmp_path / "t.db"
    first, _ = store.append_batch(
        [SendRequest("ub", "c1", "k1", "before leaving", []), SendRequest("ua", "c1", "k2", "x", [])], []
    )
    store.remove_member("c1", "ub")
    sends, _ = store.append_batch(
        [
            SendRequest("ub", "c1", "k1", "before leaving (retry)", []),
            SendRequest("ub", "c1", "k9", "after leaving", []),
            SendRequest("ua", "c1", "k3", "a member", []),
        ],
        [],
    )
    assert sends[0] == (*first[0][:5], True), "the original ack: same message_id and seq"
    assert sends[1] == ("error", "forbidden", "not a member of this chat")
    assert sends[2][:3] == ("stored", sends[2][1], 3)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT client_msg_id FROM messages ORDER BY seq").fetchall() == [
            ("k1",),
            ("k2",),
            ("k3",),
        ], "nothing stored for the former member"
    # Alone in its batch too (no member's send beside it), and on the slow path.
    alone, _ = store.append_batch([SendRequest("ub", "c1", "k1", "again", [])], [])
    assert alone[0] == (*first[0][:5], True)
    mixed, _ = store.append_batch(
        [SendRequest("ua", "c1", "k2", "retry", []), SendRequest("ub", "c1", "k1", "again", [])], []
    )
    assert mixed == [(*first[1][:5], True), (*first[0][:5], True)]
    store.close()


def test_pointers_are_kept_when_a_member_leaves_and_is_added_again(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append_batch([SendRequest("ua", "c1", f"k{i}", "m", []) for i in range(4)], [])
    _, moves = store.append_batch(
        [], [PointerRequest("ub", "c1", "delivered", 4), PointerRequest("ub", "c1", "read", 3)]
    )
    assert moves[-1] == ("pointer", 4, 3, False, True)
    store.remove_member("c1", "ub")
    store.append_batch([SendRequest("ua", "c1", "k9", "while away", [])], [])
    assert store.add_member("c1", "ub")
    assert receipts_at(store.pointers("c1"), 3) == (["ub"], ["ub"])
    assert receipts_at(store.pointers("c1"), 4) == (["ub"], [])
    chats = {c["chat_id"]: c for c in store.list_chats("ub")}
    assert chats["c1"]["unread"] == 2, "messages 4 and 5, not the whole history"
    # A pointer move that would go back is still refused after the return.
    _, moves = store.append_batch([], [PointerRequest("ub", "c1", "read", 1)])
    assert moves[0] == ("pointer", 4, 3, False, False)
    # Someone never in the chat starts at 0.
    assert store.add_member("c1", "uc")
    assert {c["chat_id"]: c for c in store.list_chats("uc")}["c1"]["unread"] == 5
    store.close()


def test_a_version_4_database_gets_the_former_members_table(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append_batch([SendRequest("ua", "c1", "k1", "m", [])], [])
    c = store._conn()
    c.execute("DROP TABLE former_members")
    c.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    store.close()
    upgraded = TupleSqliteStore(tmp_path / "t.db")
    c = upgraded._conn()
    assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert SCHEMA_VERSION == 7
    upgraded.append_batch([], [PointerRequest("ub", "c1", "read", 1)])
    upgraded.remove_member("c1", "ub")
    upgraded.add_member("c1", "ub")
    assert receipts_at(upgraded.pointers("c1"), 1) == (["ub"], ["ub"])
    upgraded.close()


def test_a_version_5_database_gets_the_media_tables(tmp_path: Path) -> None:
    store = _store(tmp_path)
    c = store._conn()
    c.execute("DROP TABLE media")
    c.execute("DROP TABLE media_posts")
    # Version 5's media table, which no version ever wrote to.
    c.execute(
        "CREATE TABLE media (media_id TEXT PRIMARY KEY, uploader_id TEXT NOT NULL, content_type TEXT NOT NULL,"
        " size INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL, thumbnail_media_id TEXT)"
    )
    c.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    store.close()
    upgraded = TupleSqliteStore(tmp_path / "t.db")
    upgraded.add_media(Media("md1", "ua", "ab" * 32, "image/png", 10, 1, "a.png", 4, 2, "cd" * 32, 3))
    [stored], _ = upgraded.append_batch([SendRequest("ua", "c1", "k1", "look", ["md1"])], [])
    assert stored[0] == "stored" and '"media_id":"md1"' in stored[4]
    assert upgraded.may_see_media("md1", "ub") and not upgraded.may_see_media("md1", "nobody")
    assert upgraded.blob_in_use("cd" * 32) and not upgraded.blob_in_use("ef" * 32)
    upgraded.close()


def test_list_chats_costs_the_same_few_statements_for_any_number_of_chats(tmp_path: Path) -> None:
    store = TupleSqliteStore(tmp_path / "t.db")
    for u in ("me", "p1", "p2"):
        store.create_user(User(u, u, None, "scrypt$x", 1))
    n = 60
    for i in range(n):
        members = ["me", "p1"] if i % 2 else ["me", "p1", "p2"]
        store.create_chat(Chat(f"c{i:02d}", "group", f"t{i}", "me", 1, 0, members), None)
    # Chat i gets i % 4 messages, alternating senders; every 4th stays empty.
    expected_unread: dict[str, int] = {}
    for i in range(n):
        sends = [
            SendRequest("p1" if k % 2 == 0 else "me", f"c{i:02d}", f"k{k}", f"c{i} m{k}", [])
            for k in range(i % 4)
        ]
        if sends:
            store.append_batch(sends, [])
        expected_unread[f"c{i:02d}"] = sum(1 for s in sends if s.sender_id != "me")
    # me has read chat 3's first message: 1 of its 2 from p1 stays unread.
    store.append_batch([], [PointerRequest("me", "c03", "read", 1)])
    expected_unread["c03"] -= 1
    # Distinct activity times in a scrambled order (batches within one millisecond would tie).
    activity = {f"c{i:02d}": 1000 + (i * 37) % n for i in range(n)}
    with sqlite3.connect(tmp_path / "t.db") as db:
        db.executemany(
            "UPDATE chats SET last_activity = ? WHERE chat_id = ?", [(t, c) for c, t in activity.items()]
        )

    statements: list[str] = []
    conn = store._conn()
    conn.set_trace_callback(statements.append)
    chats = store.list_chats("me")
    conn.set_trace_callback(None)
    assert len(statements) <= 5, statements

    assert len(chats) == n
    by_id = {c["chat_id"]: c for c in chats}
    assert {cid: c["unread"] for cid, c in by_id.items()} == expected_unread
    for i in range(n):
        c = by_id[f"c{i:02d}"]
        assert c["members"] == (["me", "p1"] if i % 2 else ["me", "p1", "p2"])
        assert (c["title"], c["kind"], c["created_by"], c["last_seq"]) == (f"t{i}", "group", "me", i % 4)
        last = c["last_message"]
        if i % 4 == 0:
            assert last is None
        else:
            k = i % 4 - 1
            assert (last["chat_id"], last["seq"], last["content"]) == (f"c{i:02d}", i % 4, f"c{i} m{k}")
            assert last["sender_id"] == ("p1" if k % 2 == 0 else "me")
            assert last == store.message_by_id(last["message_id"])
    assert [c["chat_id"] for c in chats] == sorted(activity, key=activity.__getitem__, reverse=True)

    # One chat or sixty: the same statements.
    statements.clear()
    conn.set_trace_callback(statements.append)
    store.list_chats("p2")
    conn.set_trace_callback(None)
    assert len(statements) <= 5, statements
    store.close()
