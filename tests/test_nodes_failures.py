"""A cluster of three pychat nodes under failure (issue 13): Redis restarted, the Kafka broker
stopped, a node SIGKILLed, each while clients on every node send. What must hold: nothing acked is
lost or stored twice, every chat stays gap-free, and service comes back. `make test-cluster`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest

from pychat.client import ChatClient, ChatError
from services.cassandra import CassandraServer
from tests.conftest import PASSWORD
from tests.nodekit import Nodes, Sender, check_chat, running_cluster, users_on

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, cassandra: CassandraServer) -> Iterator[Nodes]:
    with running_cluster(tmp_path_factory.mktemp("failing"), cassandra) as running:
        yield running


async def _send_many(sender: Sender, prefix: str, count: int, pause: float = 0.03) -> None:
    for k in range(count):
        await sender.send(f"{prefix}-{k}", f"{prefix} {k}")
        await asyncio.sleep(pause)


async def _received(client: ChatClient, chat_id: str, count: int, timeout: float = 30.0) -> list[int]:
    seqs: list[int] = []
    while len(seqs) < count:
        frame = await client.next_event("msg", timeout=timeout)
        if frame["chat_id"] == chat_id:
            seqs.append(frame["seq"])
    return seqs


def _acks(senders: list[Sender]) -> dict[str, dict[str, Any]]:
    return {k: v for s in senders for k, v in s.acks.items()}


async def test_redis_restarted_under_load_delays_delivery_and_loses_nothing(nodes: Nodes) -> None:
    clients = await users_on(nodes.urls, 3, "redis")
    group = await clients[0].create_group("redis", [c.user_id for c in clients[1:]])
    senders = [Sender(c, group["chat_id"]) for c in clients]
    load = asyncio.gather(*[_send_many(s, f"r{i}", 30) for i, s in enumerate(senders)])
    await asyncio.sleep(0.5)
    nodes.redis.stop()
    await asyncio.sleep(2)
    nodes.redis.start()
    await load
    # One more message each: a message whose relay was lost reaches a live connection with its
    # chat's next one (the gap is read from the store) or when its node catches up; the last of
    # these has no next one.
    for i, s in enumerate(senders):
        await s.send(f"after-{i}", "after")
    total = 31 * 3
    history = await clients[0].history_all(group["chat_id"])
    assert len(history) == total
    check_chat(history, _acks(senders))
    for client in clients:
        seqs = await _received(client, group["chat_id"], total - 31)
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "in order, once"
    # Once on the wire too: the SDK drops a repeated (chat, seq) before `_received` sees it (a
    # node catching up from the store must not send again what its connections already had).
    assert [c.duplicates_dropped for c in clients] == [0] * len(clients), "a msg frame came twice"
    # Every node saw its subscription break, listened again, and caught up from the store (what
    # its relay lost with nothing after it in its chat would otherwise wait for a reconnect).
    for client in clients:
        metrics = (await client.http.get("/metrics")).text
        relinked = re.search(r"^pychat_cluster_relinked (\d+)$", metrics, re.MULTILINE)
        assert relinked is not None and int(relinked.group(1)) >= 1, metrics
    for c in clients:
        await c.close()


async def test_kafka_stopped_sends_are_unavailable_then_work_again(nodes: Nodes) -> None:
    a, b = await users_on(nodes.urls[:2], 2, "kafka")
    group = await a.create_group("kafka", [b.user_id])
    before = await a.send(group["chat_id"], "before", client_msg_id="before")
    nodes.kafka.stop()
    try:
        with pytest.raises(ChatError) as refused:
            await a.send(group["chat_id"], "while down", client_msg_id="during", timeout=30)
        assert refused.value.code == "unavailable"
        assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms > 0
    finally:
        nodes.kafka.start()
    sender = Sender(a, group["chat_id"])
    await sender.send("during", "while down", give_up_s=120)
    await sender.send("after", "after")
    history = await b.history_all(group["chat_id"])
    check_chat(history, {"before": before} | sender.acks)
    assert [m["client_msg_id"] for m in history][1:] == ["during", "after"]
    assert history[0]["seq"] == before["seq"]
    for c in (a, b):
        await c.close()


async def test_a_node_sigkilled_under_load_loses_nothing_and_its_clients_sync_elsewhere(nodes: Nodes) -> None:
    clients = await users_on(nodes.urls, 6, "kill")  # 0, 3 on node 1; 1, 4 on node 2; 2, 5 on node 3
    group = await clients[0].create_group("kill", [c.user_id for c in clients[1:]])
    directs = [await clients[i].create_direct(clients[i + 1].user_id) for i in (0, 2, 4)]
    in_group = [Sender(c, group["chat_id"]) for c in clients]
    in_direct = [Sender(clients[i], directs[i // 2]["chat_id"]) for i in (0, 2, 4)]
    load = asyncio.gather(
        *[_send_many(s, f"g{i}", 40) for i, s in enumerate(in_group)],
        *[_send_many(s, f"d{i}", 40) for i, s in enumerate(in_direct)],
    )
    # A user only on the node that dies, and its direct partner on node 1, who follows it.
    lone, partner = await users_on([nodes.urls[2], nodes.urls[0]], 2, "lone")
    await partner.create_direct(lone.user_id)
    assert (await partner.presence(lone.user_id))["status"] == "online"
    await asyncio.sleep(1.0)
    victim = nodes.cluster.nodes[2]
    victim.kill()
    killed_at = asyncio.get_running_loop().time()
    lone.auto_reconnect = False
    # Its clients reconnect to the other nodes and go on (their unacked sends are retried there).
    for i, sender in enumerate(s for s in [*in_group, *in_direct] if s.client.base_url == victim.url):
        await sender.move(nodes.urls[i % 2])
    await load
    survivor = in_group[0].client
    group_history = await survivor.history_all(group["chat_id"])
    assert len(group_history) == 6 * 40
    check_chat(group_history, _acks(in_group))
    for sender, direct in zip(in_direct, directs, strict=True):
        history = await sender.client.history_all(direct["chat_id"])
        assert len(history) == 40
        check_chat(history, sender.acks)
    # The dead node's user, on a new device on a survivor, syncs the whole chat: in order, no gap.
    device = await ChatClient.login(nodes.urls[0], clients[2].username, PASSWORD)  # type: ignore[attr-defined]
    await device.connect()
    synced = await device.sync({group["chat_id"]: 0})
    assert synced["chats"][group["chat_id"]] == 6 * 40
    got = [
        f["seq"]
        for f in device.pending_events()
        if f.get("type") == "msg" and f["chat_id"] == group["chat_id"]
    ]
    assert got == list(range(1, 6 * 40 + 1))
    await device.close()
    # Its users go offline for their followers once its routes lapse (15 s) and a survivor claims it.
    while True:
        frame = await partner.next_event("presence", timeout=60)
        if frame["user_id"] == lone.user_id and frame["status"] == "offline":
            break
    assert asyncio.get_running_loop().time() - killed_at < 45
    assert (await partner.presence(lone.user_id))["status"] == "offline"
    await lone.close()
    await partner.close()
    # The dead node's partitions moved: every chat still takes sends.
    for s in [*in_group, *in_direct]:
        await s.send(f"{s.chat_id}-later-{s.client.user_id}", "later")
    for s in [*in_group, *in_direct]:
        await s.client.close()
