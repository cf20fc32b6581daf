"""One node of a cluster (issue 13): what `pychat serve --kafka ... --redis ...` adds to a server.

The paths, and what carries them:
- a send: the engine produces it to the sends log (Kafka, keyed by chat) and leaves it in flight
  in the gateway; the chat's sequencer (the node the consumer group gave its partition) stores it
  and publishes the stored rows to every node where a member is connected, and to the sending
  node; that node's gateway acks it there (`Gateway.deliver_stored`). A send the store refused
  comes back as an answer (`Gateway.answer_sends`). A send whose row has not come back after
  `RESEND_S` is produced again: the store answers it with the same row (a lost relay message
  delays an ack, never loses one).
- membership: the node that changed it tells every node (broadcast) and waits for each to
  apply it to its gateway and store caches before the REST call returns.
- typing and receipts: the gateway hands frames for members elsewhere to `_events`, relayed to
  the nodes where they are connected (best effort).
- presence: a user is online while any node holds a connection of it (the routing table). Each
  node reports its own users' changes; the cluster's word goes to every node's followers. A node
  that stops heartbeating is claimed by one survivor, which takes its users offline.

Relay messages are JSON objects with a type `t`; they are handled in order on one worker thread
(never on the Redis reader, so a store read for a gap does not stall the subscription).

Redis restarted (or out of reach) under a node: what was published to it meanwhile is gone, and a
restarted Redis has forgotten the routes, so rows stored next reach only their sending nodes. Once
the node's subscription is back, `_relink` writes its routes again, then has the worker read from
the store what its connections' chats stored past what it fanned out (`RemoteDelivery.catch_up`):
without that, a lost message that no later one in its chat follows would wait for a reconnect.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis

from pychat.bus.records import SendRecord
from pychat.cluster.delivery import RemoteDelivery
from pychat.cluster.routes import HEARTBEAT_S, ROUTE_TTL_S, Relay, Routes
from pychat.cluster.sequencer import SendLog, Sequencer, TopicSettings, ensure_sends_topic
from pychat.gateway import Deferred, Failed, Gateway, Stored
from pychat.store import BacklogRow, SendRequest, SendResult, Store

log = logging.getLogger("pychat.cluster")

# The consumer group of every node's sequencer.
SEQUENCER_GROUP = "pychat-sequencers"
# A send whose row has not come back after this is produced again (the store answers a second
# record with the first one's row).
RESEND_S = 3.0
# ... for at most this long (the gateway forgets a send in flight after its deadline).
RESEND_FOR_S = 30.0
# How long a membership change waits for every node to apply it.
APPLY_TIMEOUT_S = 2.0
# How often a node whose relay subscription broke checks whether it listens again.
RELINK_S = 0.2
# Live nodes: a sorted set scored by when each node's entry expires.
NODES_KEY = "nodes"


def _users_key(node_id: str) -> str:
    """The users online on a node, for whoever claims it when it dies."""
    return f"node_users:{node_id}"


class _Change:
    """A membership change being applied: how many nodes heard it, how many applied it."""

    def __init__(self) -> None:
        self.expected: int | None = None  # known once the broadcast returns
        self.applied = 0
        self.done = threading.Event()

    def check(self) -> None:
        if self.expected is not None and self.applied >= self.expected:
            self.done.set()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class ClusterNode:
    def __init__(
        self,
        node_id: str,
        kafka: str,
        redis_url: str,
        gateway: Gateway,
        store: Store,
        topic: TopicSettings | None = None,
    ) -> None:
        self.node_id = node_id
        self.gateway = gateway
        self.store = store
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.routes = Routes(self.redis, node_id)
        self.relay = Relay(self.redis, node_id)
        ensure_sends_topic(kafka, topic)
        self.sends = SendLog(kafka)
        self.sequencer = Sequencer(store, kafka, SEQUENCER_GROUP, self._publish, node_id)
        self.delivery = RemoteDelivery(gateway, store)
        # Told when a chat's members change (the presence lookups it caches).
        self.on_membership_change: Callable[[], None] | None = None
        self._request_ids = itertools.count(1)
        self._stop = threading.Event()
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        # Sends produced and not answered yet: key -> (record, first produced, last produced).
        self._pending: dict[tuple[str, str, str], tuple[SendRecord, float, float]] = {}
        self._pending_lock = threading.Lock()
        # Users with a connection here, and since when.
        self._online: dict[str, int] = {}
        # Membership changes waiting for the nodes to apply them.
        self._applying: dict[str, _Change] = {}
        self._applying_lock = threading.Lock()
        self.counters = {"resent": 0, "relay_errors": 0, "nodes_claimed": 0, "relinked": 0}
        # Told of the chats that moved anywhere in the cluster (the search indexer).
        self.on_heads: Callable[[dict[str, int]], None] | None = None

    # lifecycle

    def start(self) -> None:
        self.relay.listen(self._received)
        for name, target in [
            ("sequencer", lambda: self.sequencer.run(self._stop)),
            ("inbox", self._work),
            ("events", self._events),
            ("producer", self._produce_reports),
            ("heartbeat", self._heartbeat),
            ("relink", self._relink),
        ]:
            t = threading.Thread(target=target, name=f"pychat-cluster-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Leaves the cluster: users online here go offline (unless elsewhere), partitions move."""
        self._stop.set()
        self._inbox.put(None)
        for t in self._threads:
            t.join(5)
        with contextlib.suppress(Exception):
            users = list(self._online)
            self._left(users, int(time.time() * 1000))
            self.redis.zrem(NODES_KEY, self.node_id)
            self.redis.delete(_users_key(self.node_id))
        with contextlib.suppress(Exception):
            self.sequencer.close()
        with contextlib.suppress(Exception):
            self.sends.close()
        self.relay.close()

    # sends (engine thread)

    def submit_sends(self, sends: Sequence[SendRequest]) -> list[Deferred | Failed]:
        """Produces each send to the sends log; `Deferred` (answered later) or why not now."""
        results: list[Deferred | Failed] = []
        now = time.monotonic()
        for send in sends:
            record = SendRecord(self.node_id, next(self._request_ids), send)
            why = self.sends.produce(record, self._produce_failed)
            if why is None:
                with self._pending_lock:
                    self._pending[(send.sender_id, send.chat_id, send.client_msg_id)] = (record, now, now)
                results.append(Deferred())
            else:
                results.append(Failed("unavailable", "the sends log did not take it; retry"))
        return results

    def _produce_failed(self, record: SendRecord, why: str) -> None:
        s = record.send
        with self._pending_lock:
            self._pending.pop((s.sender_id, s.chat_id, s.client_msg_id), None)
        log.warning("a send was not produced (%s); its sender is told to retry", why)
        self.gateway.answer_sends(
            [(s.sender_id, s.chat_id, s.client_msg_id, None, ("unavailable", "the sends log is down; retry"))]
        )

    def _produce_reports(self) -> None:
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            self.sends.poll(0.1)
            if time.monotonic() - last_sweep >= 1.0:
                last_sweep = time.monotonic()
                self._resend()

    def _resend(self) -> None:
        now = time.monotonic()
        again: list[SendRecord] = []
        with self._pending_lock:
            for key, (record, first, last) in list(self._pending.items()):
                if now - first > RESEND_FOR_S:
                    del self._pending[key]
                elif now - last > RESEND_S:
                    again.append(record)
                    self._pending[key] = (record, first, now)
        for record in again:
            if self.sends.produce(record, self._produce_failed) is None:
                self.counters["resent"] += 1

    # the sequencer's results (sequencer thread)

    def _publish(self, answered: Sequence[tuple[SendRecord, SendResult]]) -> None:
        """Every stored row to the nodes where its chat's members are connected and to its sending
        node (a retry's too: the order guard drops what a node already has); a refusal to the
        sending node only. Raises when Redis is gone: the sequencer then consumes the batch
        again and the store answers it with the same rows."""
        rows: dict[str, list[BacklogRow]] = {}
        refused: dict[str, list[list[Any]]] = {}
        origins: dict[str, set[str]] = {}
        for record, result in answered:
            s = record.send
            if isinstance(result, Stored):
                rows.setdefault(s.chat_id, []).append(
                    (
                        s.chat_id,
                        result.seq,
                        result.message_id,
                        s.sender_id,
                        result.content,
                        result.attachments,
                        result.created_at,
                        s.client_msg_id,
                    )
                )
                origins.setdefault(s.chat_id, set()).add(record.node_id)
            else:
                refused.setdefault(record.node_id, []).append(
                    [s.sender_id, s.chat_id, s.client_msg_id, result.code, result.message]
                )
        members = {chat: self._members(chat) for chat in rows}
        where = self.routes.nodes_of(u for who in members.values() for u in who)
        out: dict[str, dict[str, Any]] = {}
        for chat, chat_rows in rows.items():
            nodes = set(origins[chat])
            for user in members[chat]:
                nodes |= where.get(user, set())
            chat_rows.sort(key=lambda r: r[1])
            for node in nodes:
                out.setdefault(node, {"t": "rows", "rows": [], "refused": []})["rows"] += chat_rows
        for node, answers in refused.items():
            out.setdefault(node, {"t": "rows", "rows": [], "refused": []})["refused"] += answers
        for node, message in out.items():
            if node == self.node_id:
                self._inbox.put(message)
            else:
                self.relay.send(node, _dumps(message))
        if rows:
            # Every node's search indexer reads these chats (best effort: each also rescans).
            heads = {chat: chat_rows[-1][1] for chat, chat_rows in rows.items()}
            with contextlib.suppress(redis.RedisError):
                self.relay.broadcast(_dumps({"t": "heads", "heads": heads}))

    def _members(self, chat_id: str) -> list[str]:
        members = self.gateway.chat_members(chat_id)
        if members is not None:
            return members
        chat = self.store.get_chat(chat_id)
        return chat.members if chat is not None else []

    # what other nodes send (Redis reader thread: queued, handled on the worker)

    def _received(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            self.counters["relay_errors"] += 1
            return
        if isinstance(message, dict):
            self._inbox.put(message)

    def _work(self) -> None:
        while True:
            message = self._inbox.get()
            if message is None:
                return
            try:
                self._handle(message)
            except Exception:
                self.counters["relay_errors"] += 1
                log.exception("a relayed %r message failed", message.get("t"))

    def _handle(self, m: dict[str, Any]) -> None:
        kind = m.get("t")
        if kind == "rows":
            rows: list[BacklogRow] = [tuple(r) for r in m["rows"]]
            with self._pending_lock:
                for r in rows:
                    if r[7] is not None:
                        self._pending.pop((r[3], r[0], r[7]), None)
                for sender, chat, cmid, _, _ in m["refused"]:
                    self._pending.pop((sender, chat, cmid), None)
            self.delivery.deliver(rows)
            if m["refused"]:
                self.gateway.answer_sends(
                    [
                        (sender, chat, cmid, None, (code, msg))
                        for sender, chat, cmid, code, msg in m["refused"]
                    ]
                )
        elif kind == "frame":
            self.gateway.push_to_chat(m["chat"], m["frame"], m["skip"])
        elif kind == "presence":
            self.gateway.cluster_presence(m["user"], m["online"], m["at"])
        elif kind == "chat":
            self.gateway.set_chat_members(m["chat_id"], m["members"], m["kind"] == "direct")
            self.store.forget_members(m["chat_id"])
            if self.on_membership_change is not None:
                self.on_membership_change()
            self.gateway.push_to_users(m["users"], m["frame"])
            if m["from"] == self.node_id:
                self._applied(m["id"])
            else:
                self.relay.send(m["from"], _dumps({"t": "applied", "id": m["id"]}))
        elif kind == "applied":
            self._applied(m["id"])
        elif kind == "catch_up":
            try:
                self.delivery.catch_up()
            except Exception:
                self.relay.lost.set()  # the store failed: try again
                raise
        elif kind == "heads" and self.on_heads is not None:
            self.on_heads({str(c): int(s) for c, s in m["heads"].items()})

    # membership (REST, on a thread)

    def publish_chat(self, chat_id: str, kind: str, members: list[str], users: list[str], frame: str) -> None:
        """Every node's gateway and store take the chat's new members (and its members hear of
        it) before this returns, or `APPLY_TIMEOUT_S` passes (a node that did not answer has
        died or lost Redis: the store, which checks every send, forgets its cached members
        within its own short TTL)."""
        change = uuid.uuid4().hex
        message = {
            "t": "chat",
            "id": change,
            "from": self.node_id,
            "chat_id": chat_id,
            "kind": kind,
            "members": members,
            "users": users,
            "frame": frame,
        }
        waiting = _Change()
        with self._applying_lock:
            self._applying[change] = waiting
        try:
            heard = self.relay.broadcast(_dumps(message))
        except redis.RedisError:
            log.warning("Redis is gone: chat %s's members changed on this node only for now", chat_id)
            heard = 0
            self._handle(message | {"from": self.node_id})
        with self._applying_lock:
            waiting.expected = heard
            waiting.check()
        waiting.done.wait(APPLY_TIMEOUT_S)
        with self._applying_lock:
            self._applying.pop(change, None)

    def _applied(self, change: str) -> None:
        with self._applying_lock:
            waiting = self._applying.get(change)
            if waiting is not None:
                waiting.applied += 1
                waiting.check()

    # typing, receipts, presence out of the gateway

    def _events(self) -> None:
        while not self._stop.is_set():
            events = self.gateway.take_cluster_events(200)
            if not events:
                continue
            try:
                self._relay_events(events)
            except redis.RedisError as e:
                # Best effort: typing and receipts are dropped; presence is re-sent by the heartbeat.
                log.warning("relaying %d events failed: %s", len(events), e)

    def _relay_events(self, events: list[Any]) -> None:
        frames = [e for e in events if e[0] == "chat"]
        if frames:
            members = {chat: self.gateway.chat_members(chat) or [] for _, chat, _, _ in frames}
            where = self.routes.nodes_of(u for who in members.values() for u in who)
            for _, chat, user, frame in frames:
                nodes = {n for u in members[chat] if u != user for n in where.get(u, ())} - {self.node_id}
                payload = _dumps({"t": "frame", "chat": chat, "skip": user, "frame": frame})
                for node in nodes:
                    self.relay.send(node, payload)
        for _, user, online, at in (e for e in events if e[0] == "presence"):
            if online:
                self._online[user] = at
                self.routes.connected([user])
                self.redis.sadd(_users_key(self.node_id), user)
                self.relay.broadcast(_dumps({"t": "presence", "user": user, "online": True, "at": at}))
            else:
                self._online.pop(user, None)
                self._left([user], at)

    def _left(self, users: list[str], at: int) -> None:
        """These users have no connection here any more: offline for all unless elsewhere."""
        if not users:
            return
        self.routes.disconnected(users)
        self.redis.srem(_users_key(self.node_id), *users)
        self._gone(users, at)

    def _gone(self, users: list[str], at: int) -> list[str]:
        """Those of `users` connected to no node now are offline for everyone; returns them."""
        where = self.routes.nodes_of(users)
        offline = [u for u in users if not where.get(u)]
        for user in offline:
            self.relay.broadcast(_dumps({"t": "presence", "user": user, "online": False, "at": at}))
        return offline

    # heartbeat: routes, the node's own entry, and the claim on dead nodes

    def _heartbeat(self) -> None:
        while True:
            try:
                self._beat()
            except redis.RedisError as e:
                log.warning("heartbeat failed: %s", e)
            if self._stop.wait(HEARTBEAT_S):
                return

    def _announce(self, now: float) -> None:
        """This node's entry, its users' routes and the set of its users, written (again)."""
        self.redis.zadd(NODES_KEY, {self.node_id: now + ROUTE_TTL_S})
        users = list(self._online)
        if users:
            self.routes.heartbeat(users)
            # After a Redis restart the set is empty: fill it again.
            self.redis.sadd(_users_key(self.node_id), *users)

    def _beat(self) -> None:
        now = time.time()
        self._announce(now)
        for dead in self.redis.zrangebyscore(NODES_KEY, "-inf", now):
            dead_id = dead.decode() if isinstance(dead, bytes) else str(dead)
            if dead_id == self.node_id or not self.redis.zrem(NODES_KEY, dead_id):
                continue  # another survivor claimed it
            self.counters["nodes_claimed"] += 1
            gone = [
                u.decode() if isinstance(u, bytes) else str(u)
                for u in self.redis.smembers(_users_key(dead_id))
            ]
            self.redis.delete(_users_key(dead_id))
            log.warning("node %s stopped heartbeating: %d of its users checked", dead_id, len(gone))
            at = int((now - ROUTE_TTL_S) * 1000)
            # Its route entries first: refreshed by the same heartbeat as its node entry, they may
            # outlive it by a moment, and its users would look connected to it still.
            self.routes.forget_node(dead_id, gone)
            offline = self._gone(gone, at)
            if offline:
                with contextlib.suppress(Exception):
                    self.store.append_batch([], [], [(u, at) for u in offline])

    def _relink(self) -> None:
        """After the relay's subscription broke: once this node listens again (a publish to its own
        channel reaches a subscriber), its routes are written again and the worker catches up. A row
        stored before the catch-up reads the store is read there; one stored after it finds the
        routes and comes by relay; the order guard drops what comes both ways."""
        while not self._stop.wait(RELINK_S):
            if not self.relay.lost.is_set():
                continue
            self.relay.lost.clear()  # before the check: a break during it sets it again
            try:
                self._announce(time.time())
                listening = self.relay.send(self.node_id, _dumps({"t": "catch_up"}))
            except redis.RedisError:
                listening = 0
            if listening:
                self.counters["relinked"] += 1
                log.warning("the relay listens again: catching up from the store")
            else:
                self.relay.lost.set()

    def route_here(self, user_ids: list[str]) -> None:
        """Routes these users' messages to this node now, before their `sync` reads the store: the
        presence event that also does it comes a tick later, and a message stored in between would
        reach neither the sync nor this node (a gap after `synced`)."""
        try:
            self.routes.connected(user_ids)
        except redis.RedisError as e:
            log.warning("routing %d users here before their sync failed: %s", len(user_ids), e)

    # presence questions (engine thread, REST)

    def online(self, user_ids: list[str]) -> set[str]:
        """Who of these has a connection on some node now (none known while Redis is down: the
        callers fall back to what this node's gateway knows)."""
        try:
            return {u for u, nodes in self.routes.nodes_of(user_ids).items() if nodes}
        except redis.RedisError as e:
            log.warning("presence of %d users not read from Redis: %s", len(user_ids), e)
            return set()

    def metrics(self) -> dict[str, int]:
        with self._pending_lock:
            pending = len(self._pending)
        return self.counters | {
            "pending_sends": pending,
            "gaps_filled": self.delivery.filled,
            "caught_up": self.delivery.caught_up,
        }
