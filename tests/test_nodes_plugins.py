"""Plugins on a cluster (issue 16): `before_send` runs on the node that received the send, and
`after_store` and `on_chat_event` reach their hooks once per deployment, not once per node,
also after the node feeding them is SIGKILLed (another takes its lease). Real nodes:
`make test-cluster`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pychat.client import ChatError
from services.cassandra import CassandraServer
from tests.nodekit import Nodes, running_cluster, users_on
from tests.test_plugins import Receiver

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver("cluster-secret")
    yield r
    r.close()


@pytest.fixture(scope="module")
def event_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the EventLog plugin of every node writes."""
    return tmp_path_factory.mktemp("plugin-events") / "events.jsonl"


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, cassandra: CassandraServer, receiver: Receiver, event_log: Path
) -> Iterator[Nodes]:
    directory = tmp_path_factory.mktemp("plugin-nodes")
    config = Path(directory) / "pychat.toml"
    config.write_text(
        '[[plugins]]\nuse = "tests.plugin_examples:Gatekeeper"\n'
        f'[[plugins]]\nuse = "webhook"\n[plugins.settings]\nurl = "{receiver.url}"\nsecret = "cluster-secret"\n'
        f'[[plugins]]\nuse = "tests.plugin_examples:EventLog"\n[plugins.settings]\npath = "{event_log}"\n'
    )
    with running_cluster(directory, cassandra, env={"PYCHAT_CONFIG": str(config)}) as running:
        yield running


def chat_events(path: Path, chat_id: str, count: int) -> list[str]:
    """The types of the chat's events the EventLog plugin has written once there are `count`."""
    deadline = time.monotonic() + 60
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        types = [e["type"] for e in map(json.loads, lines) if e.get("chat_id") == chat_id]
        if len(types) >= count or time.monotonic() > deadline:
            return types
        time.sleep(0.1)


async def test_before_send_on_the_receiving_node_and_after_store_once_per_deployment(
    nodes: Nodes, receiver: Receiver, event_log: Path
) -> None:
    clients = await users_on(nodes.urls, 3, "plug")  # one user on each node
    try:
        group = await clients[0].create_group("plugins", [c.user_id for c in clients[1:]])
        chat_id = group["chat_id"]
        acked: set[str] = set()
        for round_no in range(10):
            for c in clients:
                ack = await c.send(chat_id, f"shout: round {round_no}")
                acked.add(ack["message_id"])
        with pytest.raises(ChatError) as refused:
            await clients[2].send(chat_id, "this is forbidden")
        assert refused.value.code == "forbidden"
        history = await clients[1].history_all(chat_id)
        assert {m["content"] for m in history} == {f"ROUND {r}" for r in range(10)}
        assert len(history) == 30
        await asyncio.to_thread(receiver.wait_for, acked, 60)
        assert acked <= receiver.received()
        assert len(receiver.arrivals) == len(receiver.received()) == 30, (
            "each message once, not once per node"
        )
        await asyncio.to_thread(chat_events, event_log, chat_id, 1)
        await asyncio.sleep(1)  # time enough for other nodes to log it too, were they feeding
        assert chat_events(event_log, chat_id, 1) == ["chat.created"], (
            "the chat event once, not once per node"
        )

        # The node feeding the plugins dies: another takes the lease and goes on from the cursors.
        client = redis.Redis.from_url(nodes.redis.url)
        holder = (client.get("lease:plugin_feeds") or b"").decode()
        victims = [n for n in nodes.cluster.nodes if n.node_id == holder]
        assert victims, f"no node holds the lease ({holder!r})"
        victims[0].kill()
        survivors = [c for c, n in zip(clients, nodes.cluster.nodes, strict=True) if n.node_id != holder]
        later: set[str] = set()
        for i in range(10):
            later.add(
                (await survivors[i % len(survivors)].post_message(chat_id, f"after the kill {i}"))[
                    "message_id"
                ]
            )
        await asyncio.to_thread(receiver.wait_for, later, 90)
        assert later <= receiver.received(), f"{len(later - receiver.received())} never arrived"
        new_holder = (client.get("lease:plugin_feeds") or b"").decode()
        assert new_holder and new_holder != holder
        # Chat events go on from the new holder too (those above the cursor may come twice).
        after = await survivors[0].create_group("after the kill", [survivors[1].user_id])
        logged = await asyncio.to_thread(chat_events, event_log, after["chat_id"], 1)
        assert logged[:1] == ["chat.created"]
    finally:
        for c in clients:
            await c.close()
