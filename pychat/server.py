"""`pychat.Server`: one node, wiring store, gateway, engine and REST together.

Threads: the gateway's tokio runtime (sockets, fan-out); the engine thread
(store batches); the asyncio loop (REST through granian's embedded server).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pychat.auth import TokenIssuer
from pychat.blobs import open_blob_store
from pychat.config import Config
from pychat.control import ControlSocket
from pychat.engine import Engine
from pychat.extras import missing
from pychat.gateway import Gateway
from pychat.metrics import Metrics
from pychat.plugins.feed import EVENT_HOOKS, AfterStoreFeed, EventFeed
from pychat.plugins.host import PluginHost, PluginSpec
from pychat.presence import Presence
from pychat.presence.answers import PresenceAnswers
from pychat.presence.local import ClusterPresence, LocalPresence
from pychat.rest import RestApi
from pychat.rest_port import cut_stalled_readers, rest_server
from pychat.search import CLUSTER_RESCAN_S, SearchIndex
from pychat.search.worker import Indexer
from pychat.store import open_store

if TYPE_CHECKING:
    from pychat.cluster.lease import Lease
    from pychat.cluster.node import ClusterNode

log = logging.getLogger("pychat")


# Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 20_000

# Stopping (SIGTERM or SIGINT; docs/operator.md): plugin calls in progress, and the sends waiting
# for them, get STOP_GRACE_S, then those sends are answered `unavailable` (clients retry them);
# whatever still runs STOP_LIMIT_S after the signal is abandoned and the process exits with
# status 1. A second signal exits at once.
STOP_GRACE_S = 5.0
STOP_LIMIT_S = 20.0


def _always() -> bool:
    return True


def _tell_all(listeners: list[Callable[[dict[str, int]], None]]) -> Callable[[dict[str, int]], None]:
    """One callback for the engine (or the cluster) that tells each listener which chats moved."""

    def tell(heads: dict[str, int]) -> None:
        for listener in listeners:
            listener(heads)

    return tell


# Open files kept out of the WebSocket's reach: REST connections, the store, logs and media.
FILE_HEADROOM = 1024


def connection_limit(cfg: Config) -> int:
    """WebSocket connections the gateway may hold: as configured, else what the open-files
    limit leaves after the headroom and the sockets in their upgrade (one attacker who opens
    sockets until the process runs out of files must not take REST and the store with it)."""
    if cfg.max_connections:
        return cfg.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(64, soft - FILE_HEADROOM - min(cfg.max_handshakes, soft // 4))


class Server:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.metrics = Metrics()
        self._http: object | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.plugins: PluginHost | None = None
        self.feeds: list[AfterStoreFeed] = []
        self.event_feeds: list[EventFeed] = []
        self._lease: Lease | None = None
        self.control: ControlSocket | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.gateway.port}/ws"

    async def start(self) -> None:
        """Opens the store, starts the gateway and engine, then serves REST; returns once all accept."""
        cfg = self.config
        # Plugins first: one that fails to import stops the server before it opens anything.
        specs = [PluginSpec.parse(raw, f"plugins[{i}]") for i, raw in enumerate(cfg.plugins)]
        self.plugins = (
            PluginHost(specs, self.metrics, cfg.limits.max_content_bytes, cfg.limits.max_attachments)
            if specs
            else None
        )
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        # It holds messages, password hashes and the token key: this user's only (also when an
        # older version made it readable by all).
        cfg.data_dir.chmod(0o700)
        # Opening a store may block (a network store connects): off the event loop.
        self.store = await asyncio.to_thread(open_store, cfg.store, cfg.data_dir, cfg.sqlite_synchronous)
        blobs = await asyncio.to_thread(open_blob_store, cfg.media_store, cfg.data_dir)
        secret = cfg.secret_bytes()
        memberships = await asyncio.to_thread(self.store.all_memberships)
        self.gateway = Gateway(
            host=cfg.host,
            port=cfg.ws_port,
            secret=secret,
            settings={**cfg.for_gateway(), "max_connections": connection_limit(cfg)},
            limits=cfg.limits.for_gateway(),
            allowed_origins=cfg.origins,
            cluster=cfg.clustered,
        )
        # At once: the gateway accepts connections from its start, and a send to a chat it has
        # not been told of is refused `not_found` (a client reconnecting into a restart did).
        for chat_id, kind, members in memberships:
            self.gateway.set_chat_members(chat_id, members, kind == "direct")
        self.presence: Presence = LocalPresence(self.gateway, self.store)
        self.engine = Engine(self.gateway, self.store, self.metrics, cfg.batch_max)
        self.cluster: ClusterNode | None = None
        if cfg.clustered:
            try:
                from pychat.cluster.node import ClusterNode
            except ModuleNotFoundError as e:
                raise missing("cluster", e) from None

            from pychat.cluster.sequencer import TopicSettings

            topic = TopicSettings(
                cfg.kafka_partitions, cfg.kafka_replication, cfg.kafka_min_insync, cfg.kafka_retention_ms
            )
            self.cluster = await asyncio.to_thread(
                ClusterNode, cfg.node_name, cfg.kafka, cfg.redis, self.gateway, self.store, topic
            )
            self.cluster.start()
            self.engine.cluster = self.cluster
            self.presence = ClusterPresence(self.gateway, self.store, self.cluster.online)
        self.engine.plugins = self.plugins
        self.presence_answers = PresenceAnswers(
            self.gateway,
            self.store,
            lambda: self.presence,
            self.cluster.online if self.cluster is not None else None,
        )
        self.engine.presence_answers = self.presence_answers
        if self.cluster is not None:
            self.cluster.on_membership_change = self.presence.membership_changed
        if self.plugins is not None and self.plugins.connectors:
            self.gateway.set_connect_gate(max(1, int(cfg.plugin_connect_cache_s * 1000)))
        self.search: SearchIndex | None = None
        self.indexer: Indexer | None = None
        listeners: list[Callable[[dict[str, int]], None]] = []
        if self.plugins is not None:
            # after_store: on a cluster, only the node holding the lease feeds the plugins
            # (each stored message once per deployment); every node hears which chats moved.
            active: Callable[[], bool] = _always
            if self.cluster is not None:
                from pychat.cluster.lease import Lease

                self._lease = Lease(self.cluster.redis, "plugin_feeds", cfg.node_name)
                active = self._lease.held
            kinds = {EVENT_HOOKS[h][0] for p in self.plugins.plugins for h in p.hooks if h in EVENT_HOOKS}
            if kinds:
                self.store.record_events(kinds)
            for p in self.plugins.plugins:
                for hook in (h for h in p.hooks if h in EVENT_HOOKS):
                    self.event_feeds.append(
                        EventFeed(self.plugins, p, hook, self.store, self.event_feeds, active)
                    )
                if "after_store" in p.hooks:
                    feed = AfterStoreFeed(self.plugins, p, self.store, active)
                    feed.start()
                    self.feeds.append(feed)
                    listeners.append(feed.notify)
        if cfg.search:
            # Queries here; indexing in a process of its own (pychat.search.worker). A cluster
            # node keeps an index of every chat: the sequencers tell every node which chats
            # moved, and a periodic rescan of the store covers what such a word lost.
            self.search = await asyncio.to_thread(SearchIndex, cfg.data_dir / "search.db", self.store)
            self.indexer = Indexer(
                cfg.store,
                cfg.data_dir,
                cfg.sqlite_synchronous,
                rescan_s=CLUSTER_RESCAN_S if self.cluster else 0,
            )
            self.indexer.start()
            listeners.append(self.indexer.notify)
        for event_feed in self.event_feeds:
            event_feed.start()
        if listeners:
            if self.cluster is not None:
                self.cluster.on_heads = _tell_all(listeners)
            else:
                self.engine.on_stored = _tell_all(listeners)
        self.engine.start(asyncio.get_running_loop())
        self.api = RestApi(
            cfg,
            self.store,
            self.engine,
            self.gateway,
            self.presence,
            TokenIssuer(secret, cfg.token_ttl_s),
            self.metrics,
            blobs,
            self.cluster,
            self.search,
        )
        self._collector = asyncio.create_task(self.api.media.collect_forever())
        http = rest_server(self.api, cfg)
        self._http = http
        self._http_task = asyncio.create_task(http.serve())
        await self._wait_listening(cfg.host, cfg.port)
        if cfg.rest_send_timeout_ms > 0 and not cut_stalled_readers(cfg.port, cfg.rest_send_timeout_ms):
            log.warning("REST: no TCP_USER_TIMEOUT here: a client that stops reading keeps its slot")
        # Admin commands run on this data dir tell the server what they wrote (pychat.control).
        self.control = ControlSocket(cfg.data_dir, self._control)
        if not await self.control.open():
            self.control = None

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") != "chats_written":
            raise ValueError(f"unknown request {request.get('op')!r}")
        chat_ids = request.get("chat_ids")
        if not isinstance(chat_ids, list) or not all(isinstance(c, str) for c in chat_ids):
            raise ValueError("chat_ids must be a list of chat ids")
        return {"applied": await self.publish_written_chats(chat_ids)}

    async def publish_written_chats(self, chat_ids: list[str]) -> int:
        """Makes chats that another process (an admin command) wrote to the store live as a REST
        write does: this gateway (every node's, on a cluster) takes their members, and the members
        hear of them. Returns how many of them the store holds."""
        applied = 0
        for chat_id in chat_ids:
            self.store.forget_members(chat_id)  # a cache of them would predate the write
            chat = await asyncio.to_thread(self.store.get_chat, chat_id)
            if chat is None:
                continue
            await self.api._publish_chat(chat)
            applied += 1
        return applied

    async def _wait_listening(self, host: str, port: int, wait_s: float = 15.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            if self._http_task is not None and self._http_task.done():
                self._http_task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not listen on {host}:{port}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self.plugins is not None:
            self.plugins.begin_stop(STOP_GRACE_S)
        if self._collector is not None:
            self._collector.cancel()
        if self._http is not None:
            self._http.stop()  # type: ignore[attr-defined]
        if self._http_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 10)
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
        self.gateway.shutdown()
        await asyncio.to_thread(self.engine.join)
        await asyncio.to_thread(self.presence_answers.stop)
        await self.engine.stop_syncs()
        if self.indexer is not None:
            await asyncio.to_thread(self.indexer.stop)
        for feed in self.feeds:
            await asyncio.to_thread(feed.stop)
        for event_feed in self.event_feeds:
            await asyncio.to_thread(event_feed.stop)
        if self._lease is not None:
            await asyncio.to_thread(self._lease.release)
        if self.plugins is not None:
            await asyncio.to_thread(self.plugins.close)
        self.store.close()
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Starts, prints where it listens, and runs until SIGINT or SIGTERM."""
        await self.start()
        # Everything loaded so far lives for the process: keep it out of every collection, and
        # collect the young generation less often (the engine allocates a tuple per event).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
        print(f"pychat {self.config.data_dir.resolve()}", flush=True)
        print(f"  Chat page  {self.http_url}/   (API docs: {self.http_url}/docs)", flush=True)
        print(f"  REST       {self.http_url}/api   (health: {self.http_url}/healthz)", flush=True)
        print(f"  WebSocket  {self.ws_url}", flush=True)
        if self.cluster is not None:
            print(
                f"  node       {self.cluster.node_id} (Kafka {self.config.kafka}, Redis {self.config.redis})",
                flush=True,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # From here on a second signal ends the process at once, and so does STOP_LIMIT_S: a
        # thread that never returns (a plugin's, the store driver's) cannot hold the exit.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, _exit_at_once)
        limit = threading.Timer(STOP_LIMIT_S, _exit_now, [f"still stopping after {STOP_LIMIT_S:g} s"])
        limit.daemon = True
        limit.start()
        log.info("stopping (at most %g s; a second SIGINT or SIGTERM exits at once)", STOP_LIMIT_S)
        await self.stop()


def _exit_at_once(signum: int, frame: object) -> None:
    _exit_now(f"{signal.Signals(signum).name} while stopping")


def _exit_now(why: str) -> None:
    """Ends the process without waiting for anything: what is acked is committed already, and
    what is not is retried by its client."""
    log.warning("%s: exiting now, without waiting for the rest", why)  # its handler flushes
    os._exit(1)
