"""Admin commands against a running server: a chat that `pychat chat create` or `pychat import`
writes is live on the server of that data dir at once (through its control socket, with no
restart), and a command that finds no server running says so. Real servers as subprocesses,
real CLI subprocesses, the SDK over real sockets; on each store of PYCHAT_TEST_STORES, and on a
cluster of two nodes (Kafka, Redis, Cassandra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pychat.auth import hash_password
from pychat.client import ChatClient
from pychat.store import Chat, SendRequest, User, open_store
from services.cassandra import CassandraServer
from tests.conftest import ServerProcess
from tests.nodekit import running_cluster, users_on

pytestmark = pytest.mark.timeout(300)

PASSWORD = "password123"


def _pychat(env: dict[str, str], data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`pychat ARGS --data-dir DATA_DIR` with the environment `env` added."""
    return subprocess.run(
        [sys.executable, "-m", "pychat", *args, "--data-dir", str(data_dir)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _cli(srv: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`pychat ARGS` on the server's data dir and store."""
    return _pychat(srv.env, srv.data_dir, *args)


async def test_a_chat_made_with_the_cli_is_live_on_the_running_server(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory()
    assert srv.proc is not None
    for name in ("live_alice", "live_bob"):
        await ChatClient.register(srv.url, name, PASSWORD)
    bob = await ChatClient.login(srv.url, "live_bob", PASSWORD)
    alice = await ChatClient.login(srv.url, "live_alice", PASSWORD)
    try:
        await bob.connect()
        made = _cli(srv, "chat", "create", "--kind", "group", "--title", "ops", "live_alice", "live_bob")
        assert made.returncode == 0, made.stderr
        chat_id = json.loads(made.stdout)["chat_id"]
        # As a chat made over REST: sends to it are acked, and its members hear of it.
        assert (await bob.send(chat_id, "first"))["seq"] == 1
        heard = await bob.next_event("chat")
        assert heard["chat"]["chat_id"] == chat_id
        assert f"pid {srv.proc.pid}" in made.stderr, made.stderr
        await alice.connect()
        assert (await alice.send(chat_id, "second"))["seq"] == 2
        got = await bob.next_event("msg")
        assert (got["chat_id"], got["seq"], got["content"]) == (chat_id, 2, "second")
    finally:
        await bob.close()
        await alice.close()
    # A server that died without cleaning up leaves its socket file: nothing answers there.
    srv.kill()
    alone = _cli(srv, "chat", "create", "--kind", "direct", "live_alice", "live_bob")
    assert alone.returncode == 0, alone.stderr
    assert "no server running" in alone.stderr, alone.stderr


def _export_of_a_chat(tmp_path: Path, messages: int) -> Path:
    """An export (`pychat export`) of one group chat of imp_alice and imp_bob, made on a
    SQLite data dir of its own."""
    source, out = tmp_path / "source", tmp_path / "export"
    store = open_store("", source)
    try:
        for name in ("imp_alice", "imp_bob"):
            store.create_user(User(f"u-{name}", name, None, hash_password(PASSWORD), 1))
        store.create_chat(
            Chat("c-imported", "group", "old", "u-imp_alice", 1, 0, ["u-imp_alice", "u-imp_bob"]), None
        )
        store.append_batch(
            [SendRequest("u-imp_alice", "c-imported", f"k{i}", f"old {i}", []) for i in range(messages)], []
        )
    finally:
        store.close()
    done = subprocess.run(
        [sys.executable, "-m", "pychat", "export", str(out), "--data-dir", str(source), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


async def test_an_import_into_the_running_servers_store_is_live_at_once(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    out = _export_of_a_chat(tmp_path, 5)
    srv = server_factory()
    assert srv.proc is not None
    done = _cli(srv, "import", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["messages"] == 5
    bob = await ChatClient.login(srv.url, "imp_bob", PASSWORD)
    try:
        await bob.connect()
        assert (await bob.send("c-imported", "after the import"))["seq"] == 6, "the history goes on"
        assert f"pid {srv.proc.pid}" in done.stderr, done.stderr
        history = await bob.history_all("c-imported")
        assert [m["seq"] for m in history] == [1, 2, 3, 4, 5, 6]
        # The same export again, into a chat the server now serves (its next seq is the
        # server's): refused before anything is written, and the chat goes on as it was.
        again = _cli(srv, "import", str(out), "--quiet")
        assert again.returncode == 1 and "import refused" in again.stderr, again.stderr
        assert (await bob.send("c-imported", "still here"))["seq"] == 7
    finally:
        await bob.close()


@pytest.mark.nodes
@pytest.mark.timeout(600)
async def test_a_chat_made_with_the_cli_on_one_nodes_data_dir_is_live_on_every_node(
    tmp_path: Path, cassandra: CassandraServer
) -> None:
    with running_cluster(tmp_path / "cluster", cassandra, nodes=2) as running:
        first = running.cluster.nodes[0]
        alice, bob = await users_on(running.urls, 2, prefix="cli")  # alice on node1, bob on node2
        try:
            names = [alice.username, bob.username]  # type: ignore[attr-defined]
            made = _pychat(first.env, first.directory / "data", "chat", "create", "--kind", "direct", *names)
            assert made.returncode == 0, made.stderr
            chat_id = json.loads(made.stdout)["chat_id"]
            # node1 published it to every node: node2's gateway takes bob's send, node1 delivers it.
            assert (await bob.send(chat_id, "from node 2"))["seq"] == 1
            got = await alice.next_event("msg", timeout=20)
            assert (got["chat_id"], got["content"]) == (chat_id, "from node 2")
            assert (await alice.send(chat_id, "from node 1"))["seq"] == 2
            assert "serves the chat now" in made.stderr, made.stderr
        finally:
            await alice.close()
            await bob.close()
