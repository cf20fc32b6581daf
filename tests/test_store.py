"""The SQLite store on its own, on a real file: what the engine relies on."""

from __future__ import annotations

from pathlib import Path

from pychat.store import Chat, PointerRequest, SendRequest, User
from pychat.store.sqlite import SqliteStore


def _store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "t.db")
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
