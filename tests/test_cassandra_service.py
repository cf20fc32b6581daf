"""The Cassandra that the project installs and runs by itself (services/cassandra.py): a real node,
a real driver, and a real SIGKILL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster, Session
from cassandra.concurrent import execute_concurrent_with_args

from services.cassandra import CASSANDRA_VERSION, CassandraServer
from tests.conftest import free_port

# The first run downloads Cassandra (about a minute) while setting up the first test.
pytestmark = pytest.mark.timeout(600)


def test_node_answers_cql_with_its_version(cassandra: CassandraServer) -> None:
    assert cassandra.release_version() == CASSANDRA_VERSION
    assert cassandra.status() == "running"


def test_write_and_read_a_row(cassandra_session: Session) -> None:
    cassandra_session.execute(
        "CREATE TABLE messages (chat_id bigint, seq bigint, body text, PRIMARY KEY (chat_id, seq))"
    )
    cassandra_session.execute(
        "INSERT INTO messages (chat_id, seq, body) VALUES (%s, %s, %s)", (7, 1, "hello")
    )
    row = cassandra_session.execute("SELECT body FROM messages WHERE chat_id = %s AND seq = %s", (7, 1)).one()
    assert row.body == "hello"


def test_insert_if_not_exists_applies_once(cassandra_session: Session) -> None:
    cassandra_session.execute("CREATE TABLE users (name text PRIMARY KEY, user_id bigint)")
    insert = "INSERT INTO users (name, user_id) VALUES (%s, %s) IF NOT EXISTS"
    first = cassandra_session.execute(insert, ("ada", 1))
    assert first.was_applied
    second = cassandra_session.execute(insert, ("ada", 2))
    assert not second.was_applied
    assert second.one().user_id == 1  # a refused LWT returns the row that won
    assert cassandra_session.execute("SELECT user_id FROM users WHERE name = 'ada'").one().user_id == 1


@contextmanager
def connected(node: CassandraServer) -> Iterator[Session]:
    cluster = Cluster([node.host], port=node.port, protocol_version=5)
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def replayed_mutations(log: Path) -> int:
    """Mutations that the last start replayed from the commit log, as its log reports them."""
    counts = re.findall(r"Log replay complete, (\d+) replayed mutations", log.read_text())
    return int(counts[-1]) if counts else 0


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    node = CassandraServer(
        tmp_path / "node", port=free_port(), storage_port=free_port(), exit_with_parent=True
    )
    rows = [(chat_id, seq, f"message {chat_id}/{seq}") for chat_id in range(10) for seq in range(100)]
    try:
        node.start()
        with connected(node) as session:
            session.execute(
                "CREATE KEYSPACE chat WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
            )
            session.execute(
                "CREATE TABLE chat.messages (chat_id int, seq int, body text, PRIMARY KEY (chat_id, seq))"
            )
            insert = session.prepare("INSERT INTO chat.messages (chat_id, seq, body) VALUES (?, ?, ?)")
            insert.consistency_level = ConsistencyLevel.ONE
            # Raises on the first write that is not acknowledged.
            execute_concurrent_with_args(session, insert, rows, concurrency=32)

        node.kill()  # no drain, no flush: the rows are only in the commit log
        assert node.pid() is None
        node.start()

        assert replayed_mutations(node.log_file) >= len(rows)
        with connected(node) as session:
            found = {(r.chat_id, r.seq, r.body) for r in session.execute("SELECT * FROM chat.messages")}
        assert found == set(rows)
    finally:
        node.stop()
