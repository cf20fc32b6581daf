"""Where users are connected, across nodes (issue 13): the routing table in Redis that acks and
messages follow from the sequencer that stored them to the nodes holding the sockets.

Each user has a sorted set `route:<user_id>` of node ids scored by when that entry expires (Redis
7.0 has no expiry per hash field: a score per member does the same, and the key's own TTL removes
the set once every entry would have expired). A node adds its users when they connect, refreshes
all of them with one pipelined heartbeat every `heartbeat_s`, and removes a user when its last
connection there closes. A node that dies stops refreshing: its entries count as gone once their
score passes, within `ttl_s`, with nothing to clean up.

Between nodes, `Relay` publishes on a channel per node (`node:<node_id>`): Redis pub/sub is at most
once, which is enough because nothing lives only there: a node that sees a seq jump in a chat reads
the gap from the store before delivering, and a node whose subscription broke (`Relay.lost`) reads
what its connections' chats stored meanwhile once it listens again (`ClusterNode._relink`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import redis

# How long an entry lives without a heartbeat, and how often a node refreshes its entries.
ROUTE_TTL_S = 15.0
HEARTBEAT_S = 5.0


def _key(user_id: str) -> str:
    return f"route:{user_id}"


class Routes:
    """One node's view of the routing table."""

    def __init__(self, client: redis.Redis, node_id: str, ttl_s: float = ROUTE_TTL_S) -> None:
        self.client = client
        self.node_id = node_id
        self.ttl_s = ttl_s

    def _expiry(self) -> float:
        return time.time() + self.ttl_s

    def connected(self, user_ids: Iterable[str]) -> None:
        """These users have a connection on this node (first ones, or the heartbeat of all of them)."""
        expiry = self._expiry()
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.zadd(_key(user_id), {self.node_id: expiry})
            # The set outlives its newest entry by nothing: a user nobody refreshes leaves no key.
            pipe.expire(_key(user_id), int(self.ttl_s) + 1)
        pipe.execute()

    heartbeat = connected

    def disconnected(self, user_ids: Iterable[str]) -> None:
        """These users have no connection left on this node."""
        self.forget_node(self.node_id, user_ids)

    def forget_node(self, node_id: str, user_ids: Iterable[str]) -> None:
        """A dead node's entries for these users, removed now (not when their scores pass)."""
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.zrem(_key(user_id), node_id)
        pipe.execute()

    def nodes_of(self, user_ids: Iterable[str]) -> dict[str, set[str]]:
        """The nodes each user is connected to now (live entries only), in one round trip."""
        users = list(dict.fromkeys(user_ids))
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        for user_id in users:
            pipe.zrangebyscore(_key(user_id), now, "+inf")
        return {
            u: {n.decode() if isinstance(n, bytes) else str(n) for n in nodes}
            for u, nodes in zip(users, pipe.execute(), strict=True)
        }


def channel(node_id: str) -> str:
    return f"node:{node_id}"


# What every node hears (membership changes, presence).
BROADCAST = "nodes"


class Relay:
    """Frames between nodes: `send` to a node's channel; `listen` runs a node's handler on every
    payload that reaches it (at most once: see the module's docstring)."""

    def __init__(self, client: redis.Redis, node_id: str) -> None:
        self.client = client
        self.node_id = node_id
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._handler: Callable[[bytes], None] | None = None
        self._thread: redis.client.PubSubWorkerThread | None = None
        # Set when the subscription broke: what was published to this node meanwhile is gone.
        self.lost = threading.Event()

    def send(self, node_id: str, payload: bytes) -> int:
        """Publishes to a node; how many subscribers got it (0: that node is not listening now)."""
        return int(self.client.publish(channel(node_id), payload))

    def broadcast(self, payload: bytes) -> int:
        """Publishes to every node listening (this one too); how many got it."""
        return int(self.client.publish(BROADCAST, payload))

    def listen(self, handler: Callable[[bytes], None]) -> None:
        def on_message(message: dict[str, object]) -> None:
            data = message["data"]
            handler(data if isinstance(data, bytes) else str(data).encode())

        def on_error(error: BaseException, pubsub: object, thread: object) -> None:
            # Redis is gone for now: keep the thread, and the next read reconnects and subscribes again.
            self.lost.set()
            time.sleep(0.2)

        self._pubsub.subscribe(**{channel(self.node_id): on_message, BROADCAST: on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True, exception_handler=on_error)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread.join(5)
        self._pubsub.close()
