"""`pychat doctor`: what stands between a configuration and a working server, one line per check:
the configuration (it parses, its values make sense), the data dir, the store (it opens, its
schema is this pychat's), the two ports (free, or held by a pychat server that answers), and on
a cluster node the services it needs (Kafka and Redis; Cassandra is its store).

It only looks: no data dir, database or keyspace is made, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from pychat.config import Config, Limits, load_config
from pychat.extras import missing
from pychat.store import sqlite_file

# How long one probe (a connection, an HTTP request, a query) may take.
PROBE_TIMEOUT_S = 3.0
# Shorter token keys are guessable: a guessed key signs tokens for any user.
SECRET_KEY_MIN = 32
# Settings a server cannot work with at 0 (a negative number is wrong for every setting).
POSITIVE = {
    "port",
    "ws_port",
    "token_ttl_s",
    "heartbeat_s",
    "batch_max",
    "queue_capacity",
    "sync_hold_capacity",
    "engine_queue_capacity",
    "read_buffer_bytes",
    "runtime_threads",
    "side_tick_ms",
    "upgrades_per_s",
    "upgrade_burst",
    "max_connections_per_user",
    "max_connections_per_address",
    "max_handshakes",
    "handshakes_per_address",
    "handshake_timeout_ms",
    "send_per_s",
    "send_burst",
    "requests_per_s",
    "requests_burst",
    "login_per_min",
    "register_per_min",
    "rest_threads",
    "rest_max_connections",
    "rest_header_timeout_ms",
    "exports_at_once",
    "exports_per_user",
    "thumbnail_px",
    "max_image_pixels",
    "media_gc_interval_s",
    *(f.name for f in dataclasses.fields(Limits)),
}


@dataclass(frozen=True)
class Finding:
    """One check's outcome: what was found, and for a problem how to fix it."""

    check: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.check}: {self.detail}"
        return f"FAIL  {self.check}: {self.detail}; fix: {self.fix}"


def _ok(check: str, detail: str) -> Finding:
    return Finding(check, True, detail)


def _bad(check: str, detail: str, fix: str) -> Finding:
    return Finding(check, False, detail, fix)


def diagnose(path: str | None, overrides: dict[str, Any]) -> list[Finding]:
    """Every check's finding, for the configuration `pychat serve` would load from `path`, the
    environment and `overrides` (its flags)."""
    try:
        config = load_config(path, overrides=overrides)
    except (OSError, ValueError) as e:  # a TOML syntax error is a ValueError too
        return [
            _bad(
                "config",
                str(e),
                "correct it (docs/operator.md lists every setting); the other checks need a configuration that loads",
            )
        ]
    source = path or os.environ.get("PYCHAT_CONFIG")
    findings = _config_findings(config, f"{source}, " if source else "")
    findings += [_data_dir_finding(config.data_dir), _store_finding(config)]
    findings += [
        _port_finding("REST port", config.host, config.port, _rest_is_pychat),
        _port_finding("WebSocket port", config.host, config.ws_port, _gateway_is_pychat),
    ]
    if config.clustered:
        findings += [_kafka_finding(config.kafka), _redis_finding(config.redis)]
    return findings


# configuration


def _where(name: str) -> str:
    flag = {"port": ", --port", "ws_port": ", --ws-port", "host": ", --host", "data_dir": ", --data-dir"}
    table, _, key = name.rpartition(".")  # limits.x: `x` in [limits], PYCHAT_LIMITS_X
    where = f"under [{table}] in the TOML file" if table else "in the TOML file"
    return f"{key} {where}, PYCHAT_{name.upper().replace('.', '_')}{flag.get(name, '')}"


def _config_findings(config: Config, source: str) -> list[Finding]:
    problems: list[tuple[str, str, str]] = []  # (setting, what is wrong, what to set)
    for target, prefix in ((config, ""), (config.limits, "limits.")):
        for f in dataclasses.fields(target):
            value = getattr(target, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if value < 0 or (value == 0 and f.name in POSITIVE):
                least = "above 0" if f.name in POSITIVE else "0 or more"
                problems.append((prefix + f.name, f"{value!r} is not usable", f"a number {least}"))
    for name in ("port", "ws_port"):
        if getattr(config, name) > 65535:
            problems.append((name, f"{getattr(config, name)} is not a port", "a port from 1 to 65535"))
    if config.port == config.ws_port:
        problems.append(("ws_port", f"{config.ws_port} is also the REST port", "another port than `port`"))
    if not isinstance(logging.getLevelNamesMapping().get(config.log_level.upper()), int):
        problems.append(
            ("log_level", f"{config.log_level!r} is not a log level", "debug, info, warning or error")
        )
    if config.secret_key and len(config.secret_key) < SECRET_KEY_MIN:
        problems.append(
            (
                "secret_key",
                f"{len(config.secret_key)} characters: short enough to guess (and forge tokens with)",
                f"at least {SECRET_KEY_MIN} random characters"
                " (python -c 'import secrets; print(secrets.token_urlsafe(48))'), or none: a key is made in the data dir",
            )
        )
    if config.public_ws_url and urlsplit(config.public_ws_url).scheme not in ("ws", "wss"):
        problems.append(
            ("public_ws_url", f"{config.public_ws_url!r} is not a ws:// or wss:// URL", "wss://host/ws")
        )
    for origin in config.origins:
        if urlsplit(origin).scheme not in ("http", "https"):
            problems.append(
                ("allowed_origins", f"{origin!r} is not an origin", "https://host[:port], comma-separated")
            )
    if config.limits.username_min > config.limits.username_max:
        problems.append(("limits.username_min", "above limits.username_max", "at most limits.username_max"))
    if config.limits.max_content_bytes > config.limits.max_frame_bytes:
        problems.append(
            ("limits.max_content_bytes", "above limits.max_frame_bytes: such a message fits no frame", "less")
        )
    if not problems:
        return [_ok("config", f"{source}environment and defaults load, values make sense")]
    return [
        _bad("config", f"{name}: {detail}", f"set {name} to {what} ({_where(name)})")
        for name, detail, what in problems
    ]


# data dir and store


def _creatable(path: Path) -> bool:
    """Whether this user can make `path` (its nearest existing folder is writable)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return os.access(parent, os.W_OK | os.X_OK)


def _data_dir_finding(data_dir: Path) -> Finding:
    shown = data_dir.absolute()
    if not data_dir.exists():
        if _creatable(data_dir):
            return _ok(
                "data dir", f"{shown} is not made yet (the first `pychat serve` or `pychat migrate` makes it)"
            )
        return _bad(
            "data dir",
            f"{shown} does not exist and cannot be made by this user",
            "make it, owned by the user that runs pychat",
        )
    if not data_dir.is_dir():
        return _bad("data dir", f"{shown} is not a folder", "point data_dir (--data-dir) at a folder")
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return _bad(
            "data dir", f"{shown} is not writable by this user", "chown it to the user that runs pychat"
        )
    return _ok("data dir", str(shown))


def _store_finding(config: Config) -> Finding:
    database = sqlite_file(config.store, config.data_dir)
    if database is not None:
        return _sqlite_finding(database)
    return _cassandra_finding(config.store)


def _schema(check: str, where: str, found: int, current: int) -> Finding:
    if found == current:
        return _ok(check, f"{where}, schema {found} (current)")
    if found < current:
        return _bad(
            check,
            f"{where} has schema {found}, older than this pychat's {current}",
            "`pychat migrate` upgrades it (a starting server does too)",
        )
    return _bad(check, f"{where} has schema {found}, newer than this pychat's {current}", "upgrade pychat")


def _sqlite_finding(database: Path) -> Finding:
    from pychat.store.sqlite import SCHEMA_VERSION

    where = f"sqlite {database.absolute()}"
    if not database.exists():
        if _creatable(database):
            return _ok(
                "store", f"{where} is not made yet (the first `pychat serve` or `pychat migrate` makes it)"
            )
        return _bad(
            "store",
            f"{where} does not exist and cannot be made",
            "point store or data_dir at a writable place",
        )
    try:
        conn = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return _bad(
            "store",
            f"{where} does not open as a pychat database ({e})",
            "point store or data_dir at pychat's database, or restore one (`pychat import`)",
        )
    if row is None:
        return _bad("store", f"{where} records no schema version", "`pychat migrate` sets up its schema")
    return _schema("store", where, int(row[0]), SCHEMA_VERSION)


def _connect_error(host: str, port: int) -> str | None:
    """Why a TCP connection to host:port fails (None: it opens)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return e.strerror or str(e)


def _cassandra_finding(url: str) -> Finding:
    try:
        from cassandra.cluster import Cluster

        from pychat.store.cassandra import SCHEMA_VERSION, CassandraUrl
    except ModuleNotFoundError as e:
        return _bad("store", str(missing("cassandra", e)), "install the extra")
    u = CassandraUrl.parse(url)  # load_config checked the scheme; a bad keyspace raises here
    where = f"cassandra {','.join(u.hosts)}:{u.port} keyspace {u.keyspace}"
    errors = [_connect_error(h, u.port) for h in u.hosts]
    if all(errors):
        return _bad(
            "store",
            f"{where}: nothing answers ({errors[0]})",
            "start Cassandra (`make cassandra` runs a local node) or correct `store` (--store, PYCHAT_STORE)",
        )
    logging.getLogger("cassandra").setLevel(logging.ERROR)  # the driver's reconnect warnings
    cluster = Cluster(
        u.hosts,
        port=u.port,
        protocol_version=5,
        connect_timeout=PROBE_TIMEOUT_S,
        control_connection_timeout=PROBE_TIMEOUT_S,
    )
    try:
        session = cluster.connect()
        known = session.execute(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s", (u.keyspace,)
        ).one()
        if known is None:
            return _ok(
                "store", f"{where} is not made yet (the first `pychat serve` or `pychat migrate` makes it)"
            )
        row = session.execute(f"SELECT value FROM {u.keyspace}.meta WHERE key = 'schema_version'").one()
    except Exception as e:  # the driver's errors have no common base worth naming
        return _bad("store", f"{where}: {e}", "check that Cassandra runs and answers CQL there")
    finally:
        cluster.shutdown()
    if row is None:
        return _bad(
            "store", f"{where} records no schema version", "`pychat migrate --store ...` sets up its schema"
        )
    return _schema("store", where, int(row.value), SCHEMA_VERSION)


# ports


def _probe_host(host: str) -> str:
    """Where to reach a server listening on `host` from here (all addresses: the loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# Who holds a port in use: (a pychat server that answers, what it is).
Holder = Callable[[str, int], tuple[bool, str]]

NOT_PYCHAT = "another program (it does not answer as pychat)"


def _rest_is_pychat(host: str, port: int) -> tuple[bool, str]:
    base = f"http://{_probe_host(host)}:{port}"
    try:
        health = httpx.get(f"{base}/healthz", timeout=PROBE_TIMEOUT_S)
        config = httpx.get(f"{base}/api/config", timeout=PROBE_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError):
        return False, NOT_PYCHAT
    if not isinstance(config, dict) or "ws_url" not in config:
        return False, NOT_PYCHAT
    if health.status_code != 200:
        return False, f"a pychat server whose /healthz answers {health.status_code} {health.text[:200]}"
    return True, f"a pychat server (version {config.get('version')}) that answers /healthz"


def _gateway_is_pychat(host: str, port: int) -> tuple[bool, str]:
    # pychat's gateway answers a plain GET with its error object.
    try:
        answer = httpx.get(f"http://{_probe_host(host)}:{port}/ws", timeout=PROBE_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError):
        return False, NOT_PYCHAT
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict) and "code" in answer["error"]:
        return True, "a pychat WebSocket gateway"
    return False, NOT_PYCHAT


def _port_finding(check: str, host: str, port: int, is_pychat: Holder) -> Finding:
    check = f"{check} {host}:{port}"
    setting = (
        "port (--port, PYCHAT_PORT)" if check.startswith("REST") else "ws_port (--ws-port, PYCHAT_WS_PORT)"
    )
    if not 0 < port < 65536:
        return _bad(check, "not a port", f"set {setting} from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        return _bad(
            check,
            f"host {host!r} does not resolve ({e.strerror})",
            "set host (--host) to an address of this machine",
        )
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind(address)
            return _ok(check, "free")
        except OSError as e:
            error = e
    if error.errno == errno.EADDRINUSE:
        pychat, what = is_pychat(host, port)
        if pychat:
            return _ok(check, f"in use by {what}")
        return _bad(check, f"in use by {what}", f"stop what holds it, or set {setting} to a free port")
    if error.errno == errno.EACCES:
        return _bad(
            check, "ports below 1024 need root", f"set {setting} above 1023 (a proxy in front can take 443)"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return _bad(
            check,
            f"{host} is not an address of this machine",
            "set host (--host) to one of its addresses, or 0.0.0.0",
        )
    return _bad(check, f"cannot listen there ({error.strerror})", f"check host and {setting}")


# cluster services


def _kafka_finding(bootstrap: str) -> Finding:
    check = f"kafka {bootstrap}"
    fix = "start Kafka (`make cluster` runs one for development) or correct kafka (--kafka, PYCHAT_KAFKA)"
    errors = []
    for server in (s.strip() for s in bootstrap.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            return _bad(check, f"{server!r} is not host:port", "set kafka to host:port[,host:port...]")
        errors.append(_connect_error(host, int(port)))
    if all(errors):
        return _bad(check, f"nothing answers ({errors[0]})", fix)
    try:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient
    except ModuleNotFoundError as e:
        return _bad(check, str(missing("cluster", e)), "install the extra")
    try:
        brokers = (
            AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
            .list_topics(timeout=PROBE_TIMEOUT_S)
            .brokers
        )
    except KafkaException as e:
        return _bad(check, f"a port answers, but not as Kafka ({e})", fix)
    return _ok(check, f"Kafka answers ({len(brokers)} broker{'s' if len(brokers) != 1 else ''})")


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"***@{parts.hostname}:{parts.port}"))


def _redis_finding(url: str) -> Finding:
    check = f"redis {_redacted(url)}"
    try:
        import redis
    except ModuleNotFoundError as e:
        return _bad(check, str(missing("cluster", e)), "install the extra")
    client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
    except redis.RedisError as e:
        return _bad(check, f"no answer ({e})", "start Redis or correct redis (--redis, PYCHAT_REDIS)")
    finally:
        client.close()
    return _ok(check, f"Redis {version} answers")
