"""What only the Cassandra store has: keys written beside the fenced batch (a failure between
them), and keyspaces of an older schema. On a real node (the session's `cassandra`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.query import BatchStatement, SimpleStatement

from pychat.gateway import Failed, Stored
from pychat.store import Chat, SendRequest, User, open_store
from pychat.store.cassandra import SCHEMA_VERSION, CassandraStore
from services.cassandra import CassandraServer
from tests.storekit import assert_chained

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def keyspace(cassandra: CassandraServer) -> Iterator[str]:
    name = f"cs_{uuid.uuid4().hex[:12]}"
    yield f"cassandra://{cassandra.host}:{cassandra.port}/{name}"


def open_cassandra(url: str, tmp_path: Path) -> CassandraStore:
    store = open_store(url, tmp_path)
    assert isinstance(store, CassandraStore)
    return store


def setup_chat(store: CassandraStore) -> tuple[str, str]:
    a, b = f"a_{uuid.uuid4().hex[:6]}", f"b_{uuid.uuid4().hex[:6]}"
    for u in (a, b):
        store.create_user(User(u, u, None, "hash", 1))
    chat_id = f"c_{uuid.uuid4().hex[:8]}"
    store.create_chat(Chat(chat_id, "group", "g", a, 1, 0, [a, b]), None)
    return a, chat_id


def send(store: CassandraStore, sender: str, chat_id: str, keys: list[str]) -> list[Stored | Failed]:
    results, _ = store.append_batch([SendRequest(sender, chat_id, k, f"body {k}", []) for k in keys], [])
    return results


def refused_by_cassandra(store: CassandraStore) -> None:
    """The store's key batches get a statement Cassandra refuses (an unknown column): the real
    server refuses each batch whole, as if the process had died before writing it."""
    writes = store._key_writes

    def refused(rows: list[tuple[object, ...]]) -> list[BatchStatement]:
        batches = writes(rows)
        for batch in batches:
            batch.add(
                SimpleStatement("INSERT INTO send_keys (chat_id, day, no_such_column) VALUES ('x', 0, 1)")
            )
        return batches

    store._key_writes = refused  # type: ignore[method-assign]


def test_messages_whose_keys_did_not_land_are_unacked_and_their_retries_get_the_original(
    keyspace: str, tmp_path: Path
) -> None:
    writer = open_cassandra(keyspace, tmp_path)
    try:
        a, chat_id = setup_chat(writer)
        first = send(writer, a, chat_id, ["k1"])[0]
        assert isinstance(first, Stored) and first.seq == 1
        refused_by_cassandra(writer)
        lost = send(writer, a, chat_id, ["k2", "k3"])
        assert all(isinstance(r, Failed) and r.code == "unavailable" for r in lost), lost
        del writer._key_writes
        landed = writer.session.execute(
            "SELECT client_msg_id FROM messages WHERE chat_id = %s AND bucket = 0", (chat_id,)
        )
        assert [r.client_msg_id for r in landed] == ["k1", "k2", "k3"], "the rows did land (above the hint)"
        assert not list(
            writer.session.execute("SELECT * FROM send_keys WHERE client_msg_id = 'k2' ALLOW FILTERING")
        )

        # A restarted process answers the retries with the rows that landed: it writes their
        # keys on its first touch of the chat.
        restarted = open_cassandra(keyspace, tmp_path)
        try:
            again = send(restarted, a, chat_id, ["k3", "k2"])
            assert [(r.seq, r.duplicate) for r in again if isinstance(r, Stored)] == [(3, True), (2, True)], (
                again
            )
        finally:
            restarted.close()
        # The first writer, still running, read the truth again after its failure.
        later = send(writer, a, chat_id, ["k2", "k4"])
        assert [(r.seq, r.duplicate) for r in later if isinstance(r, Stored)] == [(2, True), (4, False)], (
            later
        )
        page = writer.history(chat_id, None, None, 50)[0]
        assert [(m["seq"], m["client_msg_id"]) for m in page] == [(1, "k1"), (2, "k2"), (3, "k3"), (4, "k4")]
        assert_chained(page)  # k4 chains after the rows the first writer caught up on
        chat = writer.get_chat(chat_id)
        assert chat is not None and chat.last_seq == 4
    finally:
        writer.close()


def test_a_schema_1_keyspace_is_upgraded_and_its_keys_still_answer_retries(
    keyspace: str, tmp_path: Path
) -> None:
    old = open_cassandra(keyspace, tmp_path)
    try:
        a, chat_id = setup_chat(old)
        original = send(old, a, chat_id, ["old-key"])[0]
        assert isinstance(original, Stored)
        # Made into what schema 1 left: the key in `idempotency` (one partition per key) only.
        s = old.session
        s.execute("TRUNCATE send_keys")
        s.execute(
            "CREATE TABLE idempotency (chat_id text, sender_id text, client_msg_id text, message_id text,"
            " seq bigint, PRIMARY KEY ((chat_id, sender_id, client_msg_id)))"
        )
        s.execute(
            "INSERT INTO idempotency (chat_id, sender_id, client_msg_id, message_id, seq) VALUES (%s, %s, %s, %s, %s)",
            (chat_id, a, "old-key", original.message_id, original.seq),
        )
        s.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        s.execute("DELETE FROM meta WHERE key = 'legacy_keys_until'")
    finally:
        old.close()
    upgraded = open_cassandra(keyspace, tmp_path)
    try:
        assert (
            upgraded.session.execute("SELECT value FROM meta WHERE key = 'schema_version'").one().value
            == str(SCHEMA_VERSION)
            == "5"
        )
        retry, new = send(upgraded, a, chat_id, ["old-key", "new-key"])
        assert isinstance(retry, Stored) and (retry.message_id, retry.seq, retry.duplicate) == (
            original.message_id,
            original.seq,
            True,
        )
        assert isinstance(new, Stored) and new.seq == 2
    finally:
        upgraded.close()


def test_a_fence_that_fails_on_rows_of_the_same_sends_answers_them_with_the_originals(
    keyspace: str, tmp_path: Path
) -> None:
    """A writer's fence fails because the chat moved on, and what moved it is these very sends
    (a batch whose answer was lost: a node killed mid-Paxos completes it at the next conditional
    write, after this writer read the chat's last seq), with no keys: they get their original
    answer, not a second copy. Here another store's batch, whose keys Cassandra refused, plays
    the lost batch: its rows land and are never acked."""
    writer = open_cassandra(keyspace, tmp_path)
    lost = open_cassandra(keyspace, tmp_path)
    try:
        a, chat_id = setup_chat(writer)
        assert [r.seq for r in send(writer, a, chat_id, ["k1"]) if isinstance(r, Stored)] == [1]
        refused_by_cassandra(lost)
        assert all(isinstance(r, Failed) for r in send(lost, a, chat_id, ["k2", "k3"]))
        # The writer still believes the chat ends at 1; the retries meet a failed fence.
        again = send(writer, a, chat_id, ["k2", "k3", "k4"])
        assert [(r.seq, r.duplicate) for r in again if isinstance(r, Stored)] == [
            (2, True),
            (3, True),
            (4, False),
        ], again
        page = writer.history(chat_id, None, None, 50)[0]
        assert [(m["seq"], m["client_msg_id"]) for m in page] == [(1, "k1"), (2, "k2"), (3, "k3"), (4, "k4")]
        assert_chained(page)
    finally:
        lost.close()
        writer.close()


def test_a_schema_3_keyspace_gets_chain_values_equal_to_those_the_message_path_computes(
    keyspace: str, tmp_path: Path
) -> None:
    old = open_cassandra(keyspace, tmp_path)
    try:
        a, chat_id = setup_chat(old)
        _, other = setup_chat(old)
        old.add_member(other, a)
        send(old, a, chat_id, [f"k{i}" for i in range(12)])
        send(old, a, other, ["x1", "x2"])
        live = old.history(chat_id, None, None, 50)[0]
        assert_chained(live)
        old.session.execute("ALTER TABLE messages DROP chain")
        old.session.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '3')")
    finally:
        old.close()
    upgraded = open_cassandra(keyspace, tmp_path)
    try:
        assert upgraded.history(chat_id, None, None, 50)[0] == live
        assert_chained(upgraded.history(other, None, None, 50)[0])
        assert [r.seq for r in send(upgraded, a, chat_id, ["after"]) if isinstance(r, Stored)] == [13]
        assert_chained(upgraded.history(chat_id, None, None, 50)[0])
    finally:
        upgraded.close()


def test_a_schema_4_keyspace_finds_its_users_by_prefix_after_the_upgrade(
    keyspace: str, tmp_path: Path
) -> None:
    old = open_cassandra(keyspace, tmp_path)
    try:
        for name in ("Ann1", "anna2", "bob3"):
            old.create_user(User(f"u_{name}", name, None, "hash", 1))
        old.session.execute("TRUNCATE usernames_by_prefix")
        old.session.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '4')")
        assert old.users_named("ann", 10) == []
    finally:
        old.close()
    upgraded = open_cassandra(keyspace, tmp_path)
    try:
        assert [u.username for u in upgraded.users_named("ANN", 10)] == ["Ann1", "anna2"]
        version = upgraded.session.execute("SELECT value FROM meta WHERE key = 'schema_version'").one()
        assert version.value == str(SCHEMA_VERSION) == "5"
    finally:
        upgraded.close()


def test_a_plugin_event_that_lands_late_reaches_the_hook_once(keyspace: str, tmp_path: Path) -> None:
    """Events are placed by the writer's clock; one whose write lands after later ones (older
    than the feed's overlap, newer than its cursor) is found by the next sweep, and handed over
    once; the cursor stays at what is settled."""
    import json
    import time

    from pychat.metrics import Metrics
    from pychat.plugins.feed import EventFeed
    from pychat.plugins.host import PluginHost, PluginSpec
    from pychat.store.cassandra import EVENT_MINUTE_US, EVENT_SETTLE_US

    store = open_cassandra(keyspace, tmp_path)
    store.record_events({"chat"})
    store.EVENT_SWEEP_S = 0.5
    log_path = tmp_path / "events.jsonl"
    spec = {"use": "tests.plugin_examples:EventLog", "settings": {"path": str(log_path)}}
    host = PluginHost([PluginSpec.parse(spec, "t")], Metrics(), 1024, 10)
    feeds: list[EventFeed] = []
    feed = EventFeed(host, host.plugins[0], "on_chat_event", store, feeds)
    feeds.append(feed)

    def logged() -> list[dict[str, object]]:
        return [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []

    def until(n: int) -> list[dict[str, object]]:
        deadline = time.monotonic() + 30
        while len(events := logged()) < n:
            assert time.monotonic() < deadline, events
            time.sleep(0.05)
        return events

    try:
        feed.start()
        _, chat_id = setup_chat(store)
        store.add_member(chat_id, "carol")
        assert [e["type"] for e in until(2)] == ["chat.created", "member.added"]
        # A write that took 10 s to land (past the 2 s overlap the feed reads behind its last one).
        at = time.time_ns() // 1000 - 10_000_000
        late = {"type": "member.removed", "chat_id": chat_id, "user_id": "carol", "at": at // 1000}
        store.session.execute(
            "INSERT INTO plugin_events (kind, minute, at, event_id, body) VALUES ('chat', %s, %s, now(), %s)",
            (at // EVENT_MINUTE_US, at, json.dumps(late)),
        )
        store.session.execute(
            "INSERT INTO plugin_event_minutes (kind, minute) VALUES ('chat', %s)", (at // EVENT_MINUTE_US,)
        )
        assert until(3)[2] == late
        time.sleep(2)  # a few more sweeps: nothing is handed over twice
        assert len(logged()) == 3
        cursor = store.hook_cursors("EventLog")["#chat_events"]
        assert cursor <= time.time_ns() // 1000 - EVENT_SETTLE_US, "the cursor waits for late writes"
    finally:
        feed.stop()
        host.close()
        store.close()
