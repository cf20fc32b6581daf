"""The routing table and the relay between nodes (pychat/cluster/routes.py) on a real Redis: users
on several nodes, a dead node's entries expiring by themselves, and frames between nodes that
resume by themselves after Redis restarts."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pychat.cluster.routes import Relay, Routes
from services.redis import RedisServer
from tests.conftest import free_port, started

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own (one test restarts it)."""
    server = RedisServer(tmp_path / "redis", port=free_port(), exit_with_parent=True)
    server.directory.mkdir()
    yield started(server)
    server.stop()


@pytest.fixture
def client(redis_node: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis(host=redis_node.host, port=redis_node.port)
    yield c
    c.close()


def test_users_are_routed_to_every_node_they_are_connected_to(client: redis.Redis) -> None:
    a, b = Routes(client, "node-a"), Routes(client, "node-b")
    u1, u2, u3 = (f"u{uuid.uuid4().hex[:6]}" for _ in range(3))
    a.connected([u1, u2])
    b.connected([u2])
    assert a.nodes_of([u1, u2, u3]) == {u1: {"node-a"}, u2: {"node-a", "node-b"}, u3: set()}
    b.disconnected([u2])
    assert b.nodes_of([u2]) == {u2: {"node-a"}}


def test_a_node_that_stops_heartbeating_drops_out_within_the_ttl(client: redis.Redis) -> None:
    alive, dead = Routes(client, "alive", ttl_s=1.5), Routes(client, "dead", ttl_s=1.5)
    user = f"u{uuid.uuid4().hex[:6]}"
    lonely = f"u{uuid.uuid4().hex[:6]}"
    alive.connected([user])
    dead.connected([user, lonely])
    for _ in range(4):  # 2 s: only `alive` keeps refreshing
        time.sleep(0.5)
        alive.heartbeat([user])
    assert alive.nodes_of([user, lonely]) == {user: {"alive"}, lonely: set()}
    time.sleep(1.0)
    assert client.exists(f"route:{lonely}") == 0, "a set nobody refreshes expires with its entries"


def test_frames_between_nodes_resume_after_redis_restarts(
    redis_node: RedisServer, client: redis.Redis
) -> None:
    got: list[bytes] = []
    arrived = threading.Event()

    def handler(payload: bytes) -> None:
        got.append(payload)
        arrived.set()

    listener = Relay(redis.Redis(host=redis_node.host, port=redis_node.port), "b")
    listener.listen(handler)
    sender = Relay(client, "a")
    try:
        assert deliver(sender, arrived, b"before"), "a frame reaches the listening node"
        assert not listener.lost.is_set()
        redis_node.stop()
        assert wait_for(listener.lost.is_set), "the listener knows frames may have been lost"
        redis_node.start()
        arrived.clear()
        assert deliver(sender, arrived, b"after"), "the listener subscribed again by itself"
        assert got[0] == b"before" and got[-1] == b"after"
    finally:
        listener.close()


def deliver(sender: Relay, arrived: threading.Event, payload: bytes, within: float = 15.0) -> bool:
    """Sends until a subscriber takes it (pub/sub drops what nobody listens to)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sender.send("b", payload) and arrived.wait(2.0):
                return True
        except redis.ConnectionError:
            pass
        time.sleep(0.2)
    return False


def wait_for(condition: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
