"""Configuration precedence and the admin CLI against a real data dir and server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pychat.client import ChatClient
from pychat.config import load_config
from tests.conftest import ServerProcess
from tests.wsraw import RawWs


def test_defaults_then_toml_then_env_then_arguments(tmp_path: Path) -> None:
    toml = tmp_path / "pychat.toml"
    toml.write_text("port = 9000\nws_port = 9001\nheartbeat_s = 10\n[limits]\nmax_content_bytes = 1000\n")
    config = load_config(
        toml,
        env={"PYCHAT_WS_PORT": "9101", "PYCHAT_LIMITS_MAX_ATTACHMENTS": "3", "HOME": "/x"},
        overrides={"ws_port": 9201, "host": None},
    )
    assert (config.host, config.port, config.ws_port, config.heartbeat_s) == ("127.0.0.1", 9000, 9201, 10)
    assert (config.limits.max_content_bytes, config.limits.max_attachments) == (1000, 3)
    assert load_config(None, env={}).port == 8080


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("nonsense = 1\n", {}),
        ("port = 'abc'\n", {}),
        ("", {"PYCHAT_PORT": "x"}),
        ("", {"PYCHAT_SQLITE_SYNCHRONOUS": "OFF"}),
        # A cluster node needs both Kafka and Redis, and a shared store.
        ("kafka = 'k:9092'\nstore = 'cassandra://c:9042/ks'\n", {}),
        ("", {"PYCHAT_REDIS": "redis://r:6379/0", "PYCHAT_STORE": "cassandra://c:9042/ks"}),
        ("kafka = 'k:9092'\nredis = 'redis://r:6379/0'\n", {}),
        # ... and a media store every node shares.
        ("kafka = 'k:9092'\nredis = 'redis://r:6379/0'\nstore = 'cassandra://c:9042/ks'\n", {}),
        ("", {"PYCHAT_MEDIA_STORE": "ftp://somewhere"}),
        # The sends topic: a retention past the idempotency keys' day, or min.insync above the
        # replication, or no partitions.
        ("kafka_retention_ms = 172800000\n", {}),
        ("kafka_replication = 2\nkafka_min_insync = 3\n", {}),
        ("", {"PYCHAT_KAFKA_PARTITIONS": "0"}),
    ],
)
def test_bad_configuration_is_refused(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ValueError):
        load_config(toml, env=env)


def test_cluster_settings_from_toml_env_and_arguments(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        "store = 'cassandra://c:9042/ks'\nkafka = 'k1:9092'\nredis = 'redis://r:6379/0'\n"
        "media_store = 's3://media?endpoint=http://s3:7070'\n"
    )
    config = load_config(toml, env={"PYCHAT_KAFKA": "k2:9092", "PYCHAT_NODE_ID": "n7"})
    assert (config.kafka, config.redis, config.node_name, config.clustered) == (
        "k2:9092",
        "redis://r:6379/0",
        "n7",
        True,
    )
    config = load_config(toml, env={}, overrides={"node_id": None, "port": 9100, "redis": "redis://s:1/0"})
    assert (config.node_name, config.redis) == ("127.0.0.1-9100", "redis://s:1/0")
    assert not load_config(None, env={}).clustered, "one node unless told"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pychat", *args], capture_output=True, text=True, timeout=60)


async def test_cli_user_add_prints_a_working_token_and_chat_create(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = _cli("user", "add", "cli_alice", "--password", "password123", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    alice = json.loads(made.stdout)
    assert alice["username"] == "cli_alice" and alice["token"]
    bob = json.loads(
        _cli("user", "add", "cli_bob", "--password", "password123", "--data-dir", str(data)).stdout
    )
    dup = _cli("user", "add", "cli_bob", "--password", "password123", "--data-dir", str(data))
    assert dup.returncode == 1 and "conflict" in dup.stderr
    chat = _cli("chat", "create", "--kind", "direct", "cli_alice", "cli_bob", "--data-dir", str(data))
    assert chat.returncode == 0, chat.stderr
    chat_id = json.loads(chat.stdout)["chat_id"]
    srv = ServerProcess(data)
    srv.start()
    try:
        ws = await RawWs.open(srv.ws_url, alice["token"])
        await ws.send({"type": "send", "chat_id": chat_id, "client_msg_id": "cli", "content": "from the cli"})
        assert (await ws.until("ack"))["seq"] == 1
        await ws.close()
        bob_client = ChatClient(srv.url, bob["token"], bob["user_id"])
        assert (await bob_client.history(chat_id))["messages"][0]["content"] == "from the cli"
        await bob_client.close()
    finally:
        srv.stop()


@pytest.mark.timeout(600)
def test_migrate_creates_the_schema_on_each_store(tmp_path: Path, cassandra: object) -> None:
    from pychat.store import cassandra as cassandra_store
    from services.cassandra import CassandraServer

    assert isinstance(cassandra, CassandraServer)
    sqlite = _cli("migrate", "--data-dir", str(tmp_path), "--store", f"sqlite://{tmp_path / 'm.db'}")
    assert sqlite.returncode == 0, sqlite.stderr
    assert (tmp_path / "m.db").exists()
    url = f"cassandra://{cassandra.host}:{cassandra.port}/migrated"
    first = _cli("migrate", "--data-dir", str(tmp_path), "--store", url)
    again = _cli("migrate", "--data-dir", str(tmp_path), "--store", url)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    from cassandra.cluster import Cluster

    cluster = Cluster([cassandra.host], port=cassandra.port, protocol_version=5)
    try:
        session = cluster.connect("migrated")
        row = session.execute("SELECT value FROM meta WHERE key = 'schema_version'").one()
        assert row.value == str(cassandra_store.SCHEMA_VERSION) == "5"
        tables = {
            r.table_name
            for r in session.execute(
                "SELECT table_name FROM system_schema.tables WHERE keyspace_name = 'migrated'"
            )
        }
        assert {"messages", "send_keys", "chats", "user_chats", "users"} <= tables
        assert "idempotency" not in tables, "schema 1's key table is only kept by keyspaces upgraded from it"
    finally:
        cluster.shutdown()
    bad = _cli("migrate", "--data-dir", str(tmp_path), "--store", "mysql://x")
    assert bad.returncode != 0 and "unknown store" in bad.stderr
