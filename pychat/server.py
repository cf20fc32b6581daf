"""`pychat.Server`: one node, wiring store, gateway, engine and REST together.

Threads: the gateway's tokio runtime (sockets, fan-out); the engine thread
(store batches); the asyncio loop (REST through granian's embedded server).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pychat.auth import TokenIssuer
from pychat.blobs import open_blob_store
from pychat.config import Config
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

            self.cluster = await asyncio.to_thread(
                ClusterNode, cfg.node_name, cfg.kafka, cfg.redis, self.gateway, self.store
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
        await self.stop()
