"""Server configuration: defaults, then a TOML file, then `PYCHAT_*` environment
variables, then command-line flags (each overrides the one before)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pychat.gateway import FRAME_LIMIT_DEFAULTS, GATEWAY_DEFAULTS

# Where a `[[plugins]]` table was read from: the directory of its configuration file (set by
# load_config, not a setting).
CONFIG_DIR = "_config_dir"

# Settings the Rust gateway enforces take their defaults from it (`pychat.gateway`): one copy.
_G = GATEWAY_DEFAULTS
_L = FRAME_LIMIT_DEFAULTS


@dataclass
class Limits:
    max_content_bytes: int = _L["max_content_bytes"]
    max_attachments: int = _L["max_attachments"]
    max_frame_bytes: int = _L["max_frame_bytes"]
    max_client_msg_id_bytes: int = _L["max_client_msg_id_bytes"]
    max_id_bytes: int = _L["max_id_bytes"]
    max_sync_chats: int = _L["max_sync_chats"]
    max_upload_bytes: int = 100 * 1024 * 1024
    max_request_bytes: int = 1024 * 1024
    max_group_members: int = 10_000
    username_min: int = 3
    username_max: int = 32
    history_max: int = 200
    max_subscribe: int = _L["max_subscribe"]

    def for_gateway(self) -> dict[str, int]:
        """The limits the gateway enforces, by their names there."""
        return {name: getattr(self, name) for name in FRAME_LIMIT_DEFAULTS}


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    ws_port: int = 8081
    # What clients are told to connect to (GET /api/config); derived from the request if empty.
    public_ws_url: str = ""
    data_dir: Path = Path("pychat-data")
    # Where messages and metadata live: sqlite:///path (empty or sqlite://: data_dir/pychat.db)
    # or cassandra://host:port/keyspace (see pychat.store).
    store: str = ""
    # Many nodes as one service (docs/operator.md, "A cluster"): the Kafka bootstrap servers and
    # the Redis URL every node shares, and this node's id (empty: host-port). Both empty: one node.
    kafka: str = ""
    redis: str = ""
    node_id: str = ""
    # The sends topic, created by the first node with these (docs/operator.md, "A cluster"). Its
    # partition count is fixed for good: a chat's partition is its single writer, and adding
    # partitions to a live topic would give a chat two. Replication 0: 3, or every broker if
    # there are fewer; min.insync.replicas 0: one less than the replication (at least 1).
    # Retention is at most a day: a record older than the idempotency keys must not come back.
    kafka_partitions: int = 256
    kafka_replication: int = 0
    kafka_min_insync: int = 0
    kafka_retention_ms: int = 24 * 3600 * 1000
    # Where the bytes of media live: empty (data_dir/media), file:///path, or
    # s3://bucket?endpoint=http://host:port (see pychat.blobs and docs/operator.md, "Media").
    media_store: str = ""
    # Bytes one user may upload per rolling 24 hours (0: no quota); past it, `rate_limited`.
    media_quota_bytes_per_day: int = 2 * 1024 * 1024 * 1024
    # Uploads never posted in a message are removed after this long; the collector runs this often.
    media_unattached_age_s: int = 24 * 3600
    media_gc_interval_s: int = 3600
    # Thumbnails: the longest side, in pixels; images with more pixels than this are refused
    # (a decompression bomb: a small file that decodes into gigabytes).
    thumbnail_px: int = 320
    max_image_pixels: int = 50_000_000
    # Full-text search over messages (GET /api/search), indexed in data_dir/search.db off the
    # message path (see pychat.search); on a cluster, every node keeps an index of every chat.
    search: bool = True
    # Shared by the token issuer (Python) and verifier (Rust). Empty: kept in data_dir/secret.key.
    secret_key: str = ""
    token_ttl_s: int = 7 * 24 * 3600
    heartbeat_s: int = int(_G["heartbeat_s"])
    # FULL: an acked message survives power loss too; NORMAL: survives a process kill only.
    sqlite_synchronous: str = "FULL"
    batch_max: int = 1024
    # Acked sends the gateway answers a retry of from memory (~110 bytes each); older retries
    # are answered by the store's idempotency index, for 24 h and across restarts.
    idempotency_window: int = int(_G["idempotency_window"])
    idempotency_ttl_ms: int = int(_G["idempotency_ttl_ms"])
    # A retry of a send still in flight after this is told `unavailable` (its batch was lost).
    in_flight_deadline_ms: int = int(_G["in_flight_deadline_ms"])
    # Frames queued for a connection before it is closed as too slow (a sync backlog fills
    # at most half of it and waits for room).
    queue_capacity: int = int(_G["queue_capacity"])
    # Live messages held back while a connection's `sync` is answered; past it they are dropped
    # and the sync runs again from the store (no gap, no growth).
    sync_hold_capacity: int = int(_G["sync_hold_capacity"])
    # Events waiting for the engine; when full, connections stop reading until there is room.
    engine_queue_capacity: int = int(_G["engine_queue_capacity"])
    read_buffer_bytes: int = int(_G["read_buffer_bytes"])
    runtime_threads: int = int(_G["runtime_threads"])
    max_bad_frames: int = int(_G["max_bad_frames"])
    # Presence and typing (side paths in the gateway; never wait for the store).
    presence_grace_ms: int = int(_G["presence_grace_ms"])
    typing_ttl_ms: int = int(_G["typing_ttl_ms"])
    typing_min_interval_ms: int = int(_G["typing_min_interval_ms"])
    side_tick_ms: int = int(_G["side_tick_ms"])
    # Overload and abuse: answered with `rate_limited` and `retry_after_ms`.
    upgrades_per_s: float = _G["upgrades_per_s"]
    upgrade_burst: float = _G["upgrade_burst"]
    # WebSocket connections at once: in all (0: the open-files limit less FILE_HEADROOM, kept for
    # REST, the store and logs), per user and per client address; past them, upgrades are refused.
    max_connections: int = int(_G["max_connections"])
    max_connections_per_user: int = int(_G["max_connections_per_user"])
    max_connections_per_address: int = int(_G["max_connections_per_address"])
    # Sockets in their upgrade at once, in all and per client address, and how long one may take.
    max_handshakes: int = int(_G["max_handshakes"])
    handshakes_per_address: int = int(_G["handshakes_per_address"])
    handshake_timeout_ms: int = int(_G["handshake_timeout_ms"])
    send_per_s: float = _G["send_per_s"]  # per user: over all its WebSocket connections, and over REST
    send_burst: float = _G["send_burst"]
    # Other frames (sync, read/delivered, typing, presence.subscribe) per user.
    requests_per_s: float = _G["requests_per_s"]
    requests_burst: float = _G["requests_burst"]
    # Users named in presence.subscribe frames per user (each costs a membership lookup).
    presence_ids_per_s: float = _G["presence_ids_per_s"]
    presence_ids_burst: float = _G["presence_ids_burst"]
    login_per_min: int = 10  # attempts per username
    login_failures_per_min: int = 60  # failed attempts per client address
    # Registrations (POST /api/users) per client address, also the burst: each costs a ~50 ms
    # password hash, so one address can keep at most a tenth of a core busy with them.
    register_per_min: int = 120
    # Threads REST handlers read the store on (writes have two of their own), off the event loop.
    rest_threads: int = 8
    # The REST port: connections served at once (past it they wait in the listen backlog; the
    # backlog 0 is the kernel's somaxconn); how long a client may take to send a request head,
    # which also closes a keep-alive connection idle that long (hyper has no idle timeout of its
    # own), or leave a request body unsent; how long a response may wait for a client that takes
    # none of its bytes before the connection is cut.
    rest_max_connections: int = 512
    rest_backlog: int = 0
    rest_header_timeout_ms: int = 10_000
    rest_send_timeout_ms: int = 30_000
    # Chat exports streaming at once, in all and per user; past them `unavailable` / `rate_limited`.
    exports_at_once: int = 8
    exports_per_user: int = 2
    # Browser origins allowed to open the WebSocket or call REST, comma-separated; empty: any.
    allowed_origins: str = ""
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    # `[[plugins]]` tables (pychat.plugins, docs/plugins.md): each `use`, `settings`, `budget_ms`,
    # `after_store_budget_ms`, `policy`. Only in the TOML file.
    plugins: list[dict[str, Any]] = field(default_factory=list)
    # How long the gateway keeps a plugin's `on_connect` verdict on a user (a reconnect storm
    # asks once per user per this).
    plugin_connect_cache_s: float = 60.0

    @property
    def clustered(self) -> bool:
        return bool(self.kafka)

    @property
    def node_name(self) -> str:
        return self.node_id or f"{self.host}-{self.port}"

    def for_gateway(self) -> dict[str, int | float]:
        """The gateway's settings, by their names there."""
        return {name: getattr(self, name) for name in GATEWAY_DEFAULTS}

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]

    def secret_bytes(self) -> bytes:
        """The token key: configured, or created once in the data dir (so tokens survive restarts)."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(48))
            tmp.chmod(0o600)
            os.replace(tmp, path)
        return path.read_text().strip().encode()


def _coerce(kind: Any, raw: Any, name: str) -> Any:
    if kind in (bool, "bool"):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"{name} must be true or false")
        return text in ("1", "true", "yes", "on")
    if kind in (int, "int"):
        return int(raw)
    if kind in (float, "float"):
        return float(raw)
    if kind in (Path, "Path"):
        return Path(raw)
    if kind in (str, "str"):
        if isinstance(raw, list):  # e.g. allowed_origins = ["https://a", "https://b"]
            return ",".join(str(x) for x in raw)
        return str(raw)
    raise ValueError(f"cannot set {name}")


def _apply(target: Any, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, raw in values.items():
        f = fields.get(key)
        if f is None:
            raise ValueError(f"{where}: unknown setting {key!r}")
        if key == "plugins":
            if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
                raise ValueError(f"{where}: plugins are [[plugins]] tables in the configuration file")
            target.plugins = [dict(p) for p in raw]
            continue
        if key == "limits":
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: [limits] must be a table")
            _apply(target.limits, raw, f"{where} [limits]")
            continue
        try:
            setattr(target, key, _coerce(f.type, raw, key))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad value for {key!r}: {raw!r}") from e


def load_config(
    path: str | Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Builds the configuration. Environment: PYCHAT_<SETTING> and PYCHAT_LIMITS_<LIMIT>."""
    config = Config()
    env = dict(os.environ) if env is None else env
    path = path or env.get("PYCHAT_CONFIG")
    if path:
        with open(path, "rb") as f:
            _apply(config, tomllib.load(f), str(path))
        # A plugin named `module:Class` may be a module beside the file (pychat.plugins.host).
        for plugin in config.plugins:
            plugin[CONFIG_DIR] = str(Path(path).resolve().parent)
    top = {f.name for f in dataclasses.fields(Config)} - {"limits", "plugins"}
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    from_env: dict[str, Any] = {}
    limits_env: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith("PYCHAT_") or key == "PYCHAT_CONFIG":
            continue
        name = key[len("PYCHAT_") :].lower()
        if name.startswith("limits_") and name[len("limits_") :] in limit_names:
            limits_env[name[len("limits_") :]] = value
        elif name in top:
            from_env[name] = value
    if limits_env:
        from_env["limits"] = limits_env
    _apply(config, from_env, "environment")
    _apply(config, {k: v for k, v in (overrides or {}).items() if v is not None}, "arguments")
    if config.store and config.store.split("://", 1)[0] not in ("sqlite", "cassandra"):
        raise ValueError(
            f"unknown store {config.store!r}: use sqlite:///path or cassandra://host:port/keyspace"
        )
    if bool(config.kafka) != bool(config.redis):
        raise ValueError("a cluster node needs both kafka and redis (or neither, for one node)")
    if config.kafka and not config.store.startswith("cassandra://"):
        raise ValueError("a cluster node needs a shared store: store = cassandra://host:port/keyspace")
    if config.kafka and not config.media_store:
        raise ValueError(
            "a cluster node needs a media store every node shares: media_store = s3://bucket?endpoint=URL"
            " (or file:///a/folder/every/node/mounts)"
        )
    if not 1 <= config.kafka_partitions <= 10_000:
        raise ValueError("kafka_partitions must be 1..10000 (fixed when the topic is created)")
    if not 60_000 <= config.kafka_retention_ms <= 24 * 3600 * 1000:
        raise ValueError(
            "kafka_retention_ms must be 60000..86400000: a send older than the idempotency keys"
            " (a day) must not be read again as a new one"
        )
    if config.kafka_replication < 0 or config.kafka_min_insync < 0:
        raise ValueError("kafka_replication and kafka_min_insync are 0 (derived) or more")
    if config.kafka_replication and config.kafka_min_insync > config.kafka_replication:
        raise ValueError("kafka_min_insync cannot be above kafka_replication")
    if config.media_store and config.media_store.split("://", 1)[0] not in ("file", "s3"):
        raise ValueError(f"unknown media store {config.media_store!r}: use file:///path or s3://bucket")
    if config.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError("sqlite_synchronous must be FULL, NORMAL or EXTRA")
    return config
