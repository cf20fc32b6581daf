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
