"""What the cluster tests share: a cluster of real `pychat serve` nodes on a Kafka broker and a
Redis of its own (so a test may stop them) and the session's Cassandra (a keyspace of its own),
and a sender that keeps re-sending one client_msg_id, moving to another node when its node dies,
until it has the ack."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pychat.client import ChatClient, ChatError
from services.cassandra import CassandraServer
from services.cluster import PychatCluster
from services.kafka import KafkaServer
from services.redis import RedisServer
from tests.conftest import PASSWORD, free_port, started, unique_name


@dataclass
class Nodes:
    cluster: PychatCluster
    kafka: KafkaServer
    redis: RedisServer

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.cluster.nodes]


@contextmanager
def running_cluster(
    directory: Path, cassandra: CassandraServer, nodes: int = 3, env: dict[str, str] | None = None
) -> Iterator[Nodes]:
    """Kafka, Redis and `nodes` pychat nodes, stopped afterwards (whatever a test did to them)."""
    kafka = started(
        KafkaServer(directory / "kafka", port=free_port(), controller_port=free_port(), exit_with_parent=True)
    )
    redis = started(RedisServer(directory / "redis", port=free_port(), exit_with_parent=True))
    cluster = PychatCluster(
        directory / "nodes",
        nodes=nodes,
        store=f"cassandra://{cassandra.host}:{cassandra.port}/nodes_{uuid.uuid4().hex[:12]}",
        kafka=kafka.bootstrap_servers,
        redis=redis.url,
        env=env,
    )
    try:
        cluster.start()
        yield Nodes(cluster, kafka, redis)
    finally:
        cluster.stop()
        redis.stop()
        kafka.stop()


async def users_on(urls: list[str], count: int, prefix: str = "n") -> list[ChatClient]:
    """`count` new users, user i logged in (and connected) on node i % len(urls)."""
    clients = []
    for i in range(count):
        url = urls[i % len(urls)]
        name = unique_name(prefix)
        await ChatClient.register(url, name, PASSWORD)
        client = await ChatClient.login(url, name, PASSWORD)
        client.username = name  # type: ignore[attr-defined]
        await client.connect()
        clients.append(client)
    return clients


@dataclass
class Sender:
    """One user's sends, each retried under its client_msg_id until acked; `move()` reconnects the
    user to another node (its own died)."""

    client: ChatClient
    chat_id: str
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    async def send(self, cmid: str, content: str, timeout: float = 8.0, give_up_s: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_s
        while True:
            try:
                self.acks[cmid] = await self.client.send(
                    self.chat_id, content, client_msg_id=cmid, timeout=timeout
                )
                return
            except (TimeoutError, ChatError, ConnectionError) as e:
                self.errors.append(getattr(e, "code", type(e).__name__))
                if loop.time() > deadline:
                    raise
                retry = getattr(e, "retry_after_ms", None)
                await asyncio.sleep((retry or 200) / 1000)

    async def move(self, url: str) -> None:
        name = self.client.username  # type: ignore[attr-defined]
        old = self.client
        self.client = await ChatClient.login(url, name, PASSWORD)
        self.client.username = name  # type: ignore[attr-defined]
        await self.client.connect()
        old.auto_reconnect = False
        await old.close()


def check_chat(history: list[dict[str, Any]], acks: dict[str, dict[str, Any]]) -> None:
    """Every ack is in the chat's history as acked; seqs 1..n without a gap; no key twice."""
    seqs = [m["seq"] for m in history]
    assert seqs == list(range(1, len(seqs) + 1)), "seqs 1..n, no gap, no repeat"
    by_key: dict[str, dict[str, Any]] = {}
    for m in history:
        assert m["client_msg_id"] not in by_key, f"stored twice: {m['client_msg_id']}"
        by_key[m["client_msg_id"]] = m
    for cmid, ack in acks.items():
        stored = by_key.get(cmid)
        assert stored is not None, f"acked, not stored: {cmid}"
        assert (stored["seq"], stored["message_id"]) == (ack["seq"], ack["message_id"])


async def history_when_up(client: ChatClient, chat_id: str, give_up_s: float = 90.0) -> list[dict[str, Any]]:
    """The chat's whole history, retried while the store is answered `unavailable` (restarting)."""
    deadline = asyncio.get_running_loop().time() + give_up_s
    while True:
        try:
            return await client.history_all(chat_id)
        except ChatError as e:
            if e.code != "unavailable" or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep((e.retry_after_ms or 1000) / 1000)
