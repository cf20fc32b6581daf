"""One contract for every store (pychat.store): each test runs against SQLite (a real file) and
against Cassandra (a real node, services/cassandra.py). A backend is done when this passes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pychat.errors import ApiError
from pychat.gateway import Failed, PointerMoved, Stored
from pychat.store import Chat, PointerRequest, SendRequest, Store, User, open_store, receipts_at
from pychat.store import cassandra as cassandra_store
from services.cassandra import CassandraServer

pytestmark = pytest.mark.timeout(600)


def open_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest, keyspace: str = "") -> Store:
    if kind == "sqlite":
        return open_store(f"sqlite://{tmp_path / 'store.db'}", tmp_path)
    node: CassandraServer = request.getfixturevalue("cassandra")
    keyspace = keyspace or f"contract_{uuid.uuid4().hex[:12]}"
    return open_store(f"cassandra://{node.host}:{node.port}/{keyspace}", tmp_path)


@pytest.fixture(params=["sqlite", "cassandra"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = open_backend(request.param, tmp_path, request)
    yield s
    s.close()


def user(store: Store, name: str) -> str:
    user_id = f"u_{name}_{uuid.uuid4().hex[:6]}"
    store.create_user(User(user_id, f"{name}{uuid.uuid4().hex[:6]}", None, "hash", 1))
    return user_id


def group(store: Store, members: list[str], chat_id: str | None = None) -> str:
    chat = Chat(chat_id or f"c_{uuid.uuid4().hex[:8]}", "group", "g", members[0], 1, 0, members)
    store.create_chat(chat, None)
    return chat.chat_id


def sends(store: Store, items: list[tuple[str, str, str, str]]) -> list[Stored | Failed]:
    """(sender, chat, client_msg_id, content) each, in one batch."""
    results, _ = store.append_batch([SendRequest(s, c, k, body, []) for s, c, k, body in items], [])
    return results


def stored(r: Any) -> Stored:
    assert isinstance(r, Stored), r
    return r


def failed(r: Any, code: str) -> None:
    assert isinstance(r, Failed) and r.code == code, r


def test_users_are_unique_by_name_case_insensitively(store: Store) -> None:
    name = f"Alice{uuid.uuid4().hex[:6]}"
    store.create_user(User("u1" + name, name, "Alice", "h", 5))
    with pytest.raises(ApiError) as e:
        store.create_user(User("u2" + name, name.lower(), None, "h", 6))
    assert e.value.code == "conflict"
    found = store.user_by_name(name.upper())
    assert found is not None and (found.user_id, found.display_name) == ("u1" + name, "Alice")
    assert store.user_by_id("u1" + name) == found
    assert store.user_by_id("u2" + name) is None
    assert store.existing_users(["u1" + name, "nobody"]) == {"u1" + name}


def test_chats_members_and_direct_uniqueness(store: Store) -> None:
    a, b, c = user(store, "a"), user(store, "b"), user(store, "c")
    chat_id = group(store, [a, b])
    chat = store.get_chat(chat_id)
    assert chat is not None and chat.members == [a, b] and chat.last_seq == 0
    assert store.is_member(chat_id, a) and not store.is_member(chat_id, c)
    assert store.add_member(chat_id, c) and not store.add_member(chat_id, c)
    assert store.remove_member(chat_id, b) and not store.remove_member(chat_id, b)
    assert sorted(store.get_chat(chat_id).members) == sorted([a, c])  # type: ignore[union-attr]
    key = "|".join(sorted([a, b]))
    first, created = store.create_chat(
        Chat(f"d_{uuid.uuid4().hex[:8]}", "direct", None, a, 2, 0, [a, b]), key
    )
    again, created_again = store.create_chat(
        Chat(f"d_{uuid.uuid4().hex[:8]}", "direct", None, b, 3, 0, [b, a]), key
    )
    assert created and not created_again and again.chat_id == first.chat_id
    memberships = {cid: (kind, members) for cid, kind, members in store.all_memberships()}
    assert memberships[chat_id][0] == "group" and sorted(memberships[chat_id][1]) == sorted([a, c])
    assert memberships[first.chat_id] == ("direct", [a, b])


def test_seqs_are_gap_free_per_chat_and_a_retry_gets_the_original(store: Store) -> None:
    a, b = user(store, "a"), user(store, "b")
    c1, c2 = group(store, [a, b]), group(store, [a, b])
    first = sends(
        store, [(a, c1, "k1", "one"), (b, c2, "k1", "x"), (a, c1, "k2", "two"), (a, c1, "k2", "two")]
    )
    assert [stored(r).seq for r in first] == [1, 1, 2, 2]
    assert [stored(r).duplicate for r in first] == [False, False, False, True], (
        "a key twice in a batch is one message"
    )
    assert stored(first[3]).message_id == stored(first[2]).message_id
    # A retry (other content: the stored content wins) gets the same message; numbering goes on.
    second = sends(store, [(a, c1, "k1", "changed"), (a, c1, "k3", "three")])
    r = stored(second[0])
    assert (r.message_id, r.seq, r.content, r.duplicate) == (stored(first[0]).message_id, 1, "one", True)
    assert stored(second[1]).seq == 3
    page, more = store.history(c1, None, None, 50)
    assert [(m["seq"], m["content"], m["client_msg_id"]) for m in page] == [
        (1, "one", "k1"),
        (2, "two", "k2"),
        (3, "three", "k3"),
    ]
    assert not more
    chat = store.get_chat(c1)
    assert chat is not None and chat.last_seq == 3


def test_refusals_and_a_former_members_retry(store: Store) -> None:
    a, b, c = user(store, "a"), user(store, "b"), user(store, "c")
    chat_id = group(store, [a, b])
    ok = stored(sends(store, [(a, chat_id, "k1", "hello")])[0])
    results = sends(store, [(c, chat_id, "k1", "stranger"), (a, "c_nope", "k1", "x")])
    failed(results[0], "forbidden")
    failed(results[1], "not_found")
    store.remove_member(chat_id, a)
    again = sends(store, [(a, chat_id, "k1", "hello"), (a, chat_id, "k2", "new")])
    assert (stored(again[0]).message_id, stored(again[0]).seq) == (ok.message_id, ok.seq)
    failed(again[1], "forbidden")
    assert [m["seq"] for m in store.history(chat_id, None, None, 50)[0]] == [1]


def test_pointers_move_up_only_and_survive_leaving(store: Store) -> None:
    a, b = user(store, "a"), user(store, "b")
    chat_id = group(store, [a, b])
    sends(store, [(a, chat_id, f"k{i}", "m") for i in range(4)])
    _, moves = store.append_batch(
        [],
        [
            PointerRequest(b, chat_id, "read", 2),
            PointerRequest(b, chat_id, "delivered", 1),
            PointerRequest(b, chat_id, "delivered", 3),
            PointerRequest(b, chat_id, "read", 9),
        ],
    )
    assert isinstance(moves[0], PointerMoved) and (moves[0].delivered, moves[0].read) == (2, 2)
    assert (moves[0].moved_delivered, moves[0].moved_read) == (True, True)
    assert isinstance(moves[1], PointerMoved) and (
        moves[1].delivered,
        moves[1].read,
        moves[1].moved_delivered,
    ) == (2, 2, False)
    assert isinstance(moves[2], PointerMoved) and (moves[2].delivered, moves[2].read) == (3, 2)
    failed(moves[3], "bad_request")
    assert receipts_at(store.pointers(chat_id), 2) == ([b], [b])
    assert receipts_at(store.pointers(chat_id), 3) == ([b], [])
    assert store.pointers(chat_id)[b] == (3, 2)
    store.remove_member(chat_id, b)
    assert b not in store.pointers(chat_id), "only current members"
    _, gone = store.append_batch([], [PointerRequest(b, chat_id, "read", 3)])
    failed(gone[0], "forbidden")
    store.add_member(chat_id, b)
    assert receipts_at(store.pointers(chat_id), 2) == ([b], [b]), "pointers are kept across remove and re-add"
    assert {c: (cursor, last) for c, cursor, last in store.sync_chats(b, {})}[chat_id] == (2, 4)


def test_last_seen_keeps_the_latest(store: Store) -> None:
    a = user(store, "a")
    store.append_batch([], [], [(a, 500)])
    store.append_batch([], [], [(a, 300)])
    assert store.last_seen(a) == 500
    assert store.last_seen_many([a, "nobody"]).get(a) == 500


def test_history_sync_and_lookups(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cassandra_store, "BUCKET_SIZE", 7)  # Cassandra: pages cross buckets
    a, b = user(store, "a"), user(store, "b")
    chat_id = group(store, [a, b])
    acks = []
    for start in range(0, 30, 10):
        acks += sends(
            store, [(a if i % 3 else b, chat_id, f"k{i:02}", f"m{i}") for i in range(start, start + 10)]
        )
    assert [stored(r).seq for r in acks] == list(range(1, 31))
    page, more = store.history(chat_id, 25, None, 10)
    assert [m["seq"] for m in page] == list(range(15, 25)) and more
    page, more = store.history(chat_id, None, 20, 50)
    assert [m["seq"] for m in page] == list(range(21, 31)) and not more
    page, more = store.history(chat_id, 12, 3, 50)
    assert [m["seq"] for m in page] == list(range(4, 12)) and not more
    for past_the_end in (31, 40, 10**12):  # the newest page, found without a walk down to it
        page, more = store.history(chat_id, past_the_end, None, 4)
        assert [m["seq"] for m in page] == [27, 28, 29, 30] and more
    page, more = store.history(chat_id, None, None, 4)
    assert [m["seq"] for m in page] == [27, 28, 29, 30] and more
    rows = store.messages_after(chat_id, 5, 9)
    assert [r[1] for r in rows] == list(range(6, 15))
    assert rows[0][:2] == (chat_id, 6) and rows[0][4] == "m5"
    m = store.message_by_id(stored(acks[6]).message_id)
    assert m is not None and (m["chat_id"], m["seq"], m["content"]) == (chat_id, 7, "m6")
    assert store.message_by_id("m-nothing") is None
    assert {c: (cursor, last) for c, cursor, last in store.sync_chats(a, {chat_id: 12})}[chat_id] == (12, 30)
    listed = {c["chat_id"]: c for c in store.list_chats(b)}
    assert listed[chat_id]["last_message"]["seq"] == 30
    # b sent every third message: unread are the others.
    assert listed[chat_id]["unread"] == sum(1 for i in range(30) if i % 3)


def test_two_writers_never_share_a_seq(store: Store, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A second process on the same store (a mistake, or a stale owner): the fence makes it
    number after the first, never over it."""
    kind = "sqlite" if "sqlite" in request.node.callspec.id else "cassandra"
    keyspace = getattr(store, "session", None) and store.session.keyspace  # type: ignore[attr-defined]
    other = open_backend(kind, tmp_path, request, keyspace=keyspace or "")
    try:
        a, b = user(store, "a"), user(store, "b")
        chat_id = group(store, [a, b])
        seqs = []
        for round_ in range(4):
            for writer in (store, other):
                got = sends(writer, [(a, chat_id, f"k{round_}-{id(writer)}-{i}", "x") for i in range(3)])
                seqs += [stored(r).seq for r in got]
        assert sorted(seqs) == list(range(1, 25)), seqs
        assert [m["seq"] for m in store.history(chat_id, None, None, 100)[0]] == list(range(1, 25))
    finally:
        other.close()


def test_empty_ids_find_nothing(store: Store) -> None:
    """REST passes ids through unchecked; Cassandra refuses an empty key, which must read as absent."""
    assert store.user_by_name("") is None and store.user_by_id("") is None
    assert store.existing_users(["", ""]) == set()
    assert store.get_chat("") is None and not store.is_member("", "")
    assert store.message_by_id("") is None and store.last_seen("") is None


def test_users_are_found_by_username_prefix_in_any_case_and_by_ids(store: Store) -> None:
    tag = uuid.uuid4().hex[:6]
    made = {}
    for name in (f"Zed{tag}a", f"zed{tag}B", f"zed{tag}c.d", f"zee{tag}", f"z{tag}"):
        user_id = f"u_{uuid.uuid4().hex[:8]}"
        store.create_user(User(user_id, name, None, "hash", 1))
        made[name] = user_id
    for prefix in (f"zed{tag}", f"ZED{tag}", f"Zed{tag}"):
        assert [u.username for u in store.users_named(prefix, 10)] == [
            f"Zed{tag}a",
            f"zed{tag}B",
            f"zed{tag}c.d",
        ]
    assert [u.username for u in store.users_named(f"zed{tag}", 2)] == [f"Zed{tag}a", f"zed{tag}B"]
    assert [u.username for u in store.users_named(f"zed{tag}c.", 10)] == [f"zed{tag}c.d"]
    assert store.users_named(f"zed{tag}x", 10) == []
    # Short prefixes too (a partition per first characters on Cassandra).
    assert f"z{tag}" in {u.username for u in store.users_named("z", 1000)}
    found = store.users_by_ids([made[f"zee{tag}"], "u_nobody", made[f"z{tag}"]])
    assert sorted(u.username for u in found) == sorted([f"zee{tag}", f"z{tag}"])
    assert store.users_by_ids([]) == []
