"""A cluster of three nodes whose Cassandra is SIGKILLed under load and restarted (issue 13): senders
are told `unavailable` with `retry_after_ms`, nothing acked is lost, each send is stored once and
the chat stays gap-free; the nodes recover by themselves. Cassandra is this module's own (it dies).
`make test-cluster`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cassandra import CassandraServer
from tests.conftest import started
from tests.nodekit import Nodes, Sender, check_chat, history_when_up, running_cluster, users_on

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(500)]


@pytest.fixture(scope="module")
def own_cassandra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraServer]:
    node = started(CassandraServer.on_free_ports(tmp_path_factory.mktemp("cassandra") / "node"))
    yield node
    node.stop()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, own_cassandra: CassandraServer) -> Iterator[Nodes]:
    with running_cluster(Path(tmp_path_factory.mktemp("store-crash")), own_cassandra) as running:
        yield running


async def test_cassandra_sigkilled_under_load_loses_no_ack_and_the_cluster_recovers(
    nodes: Nodes, own_cassandra: CassandraServer
) -> None:
    clients = await users_on(nodes.urls, 3, "crash")
    group = await clients[0].create_group("crash", [c.user_id for c in clients[1:]])
    senders = [Sender(c, group["chat_id"]) for c in clients]
    for i, s in enumerate(senders):
        for k in range(20):
            await s.send(f"before-{i}-{k}", "before")
    acked_before = {k: v for s in senders for k, v in s.acks.items()}

    async def load(i: int, s: Sender) -> None:
        for k in range(60):
            await s.send(f"during-{i}-{k}", "during", timeout=5, give_up_s=240)
            await asyncio.sleep(0.02)

    sending = asyncio.gather(*[load(i, s) for i, s in enumerate(senders)])
    await asyncio.sleep(0.5)
    own_cassandra.kill()
    await asyncio.sleep(3)
    own_cassandra.start()
    await sending
    errors = [e for s in senders for e in s.errors]
    assert "unavailable" in errors, "senders were told, not left waiting"
    assert set(errors) <= {"unavailable", "TimeoutError"}, errors
    # The REST read right after the restart may find the driver still reconnecting: `unavailable`.
    history = await history_when_up(clients[1], group["chat_id"])
    assert len(history) == 3 * 80
    acks = {k: v for s in senders for k, v in s.acks.items()}
    check_chat(history, acks)
    for key, ack in acked_before.items():
        assert acks[key]["seq"] == ack["seq"]
    for c in clients:
        await c.close()
