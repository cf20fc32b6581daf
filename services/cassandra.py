"""Apache Cassandra 5.0 for development and tests: installed from Maven Central by the project
itself, one single-token node per instance directory, on 127.0.0.1 only.

    python -m services.cassandra start|stop|status|wait|install [--dir DIR] [--port N]

The jars (`cassandra-all` and its dependencies) are copied by Maven once into
`~/.cache/pychat/cassandra/<version>/lib/` (`$PYCHAT_CACHE` moves `~/.cache/pychat`). Each instance
directory holds everything else of its node: `conf/` (cassandra.yaml, logback.xml), `data/`,
`commitlog/`, `hints/`, `saved_caches/`, `cdc_raw/`, `triggers/`, `logs/` and `cassandra.pid`, so instances on
different ports share nothing and a restart on the same directory replays its commit log.
"""

from __future__ import annotations

import ctypes
import json
import logging
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from services.process import (
    CACHE_DIR,
    HOST,
    ServiceError,
    ServiceProcess,
    cli_parser,
    die_with_parent,
    free_port,
    java,
    maven_jars,
    port_is_open,
    run_cli,
)

__all__ = [
    "CASSANDRA_VERSION",
    "CassandraError",
    "CassandraServer",
    "install",
]

CASSANDRA_VERSION = "5.0.6"
# The agent Cassandra needs to measure object sizes; it comes with cassandra-all's dependencies.
JAMM_JAR = "jamm-0.4.0.jar"
MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"

DEV_DIR = CACHE_DIR / "cassandra-dev"
DEFAULT_PORT = 9042
DEFAULT_STORAGE_PORT = 7000
DEFAULT_HEAP_MB = 768
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0

# Cassandra 5.0's own conf/jvm17-server.options (apache/cassandra, 5.0 line): its GC, JPMS and Netty
# options, each --add-exports/--add-opens written as one `--opt=value` argument.
JVM17_SERVER_OPTIONS = (
    "-XX:+UseG1GC",
    "-XX:+ParallelRefProcEnabled",
    "-XX:MaxTenuringThreshold=1",
    "-XX:G1HeapRegionSize=16m",
    "-XX:G1RSetUpdatingPauseTimePercent=5",
    "-XX:MaxGCPauseMillis=300",
    "-XX:InitiatingHeapOccupancyPercent=70",
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
)

# The general part of Cassandra's conf/jvm-server.options that still applies on Java 17, less
# -XX:+AlwaysPreTouch (it would make every test node resident at its full heap at once).
JVM_SERVER_OPTIONS = (
    "-ea",
    "-da:net.openhft...",
    "-XX:+UseThreadPriorities",
    "-Xss256k",
    "-XX:+PerfDisableSharedMem",
    "-Djava.net.preferIPv4Stack=true",
)

_YAML = """\
# Written by services/cassandra.py on every start of this instance: edits here are lost.
cluster_name: {cluster_name}
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{host}:{storage_port}"
listen_address: {host}
rpc_address: {host}
storage_port: {storage_port}
native_transport_port: {port}
start_native_transport: true
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer

data_file_directories:
  - {data}
commitlog_directory: {commitlog}
saved_caches_directory: {saved_caches}
hints_directory: {hints}
cdc_raw_directory: {cdc_raw}

# Durability: in group mode Cassandra acknowledges a write only once the commit log segment that
# holds it has been fsynced (syncs are grouped over at most this window), so every acknowledged
# write survives a SIGKILL or a power cut and is replayed from the commit log on the next start.
commitlog_sync: group
commitlog_sync_group_window: 2ms
commitlog_segment_size: 32MiB

# Lightweight transactions (the store's per-chat fence): Paxos v2 needs fewer round trips and
# writes per transaction than v1 (v1 stays the default in 5.0 for mixed-version clusters).
paxos_variant: v2

# Sized for a 2-core, 24 GiB machine that runs this node beside the chat server and its tests.
concurrent_reads: 16
concurrent_writes: 32
concurrent_counter_writes: 4
concurrent_materialized_view_writes: 2
concurrent_compactors: 1
memtable_flush_writers: 1
file_cache_size: 64MiB
# Tests create and drop a keyspace each: no snapshot of every dropped table.
auto_snapshot: false
"""

_DATA_DIRS = ("data", "commitlog", "saved_caches", "hints", "cdc_raw")

_LOGBACK = """\
<!-- Written by services/cassandra.py: Cassandra's log, INFO and up, to one file. -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{log}</file>
    <append>true</append>
    <encoder>
      <pattern>%-5level [%thread] %date{{ISO8601}} %logger{{0}} - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
  </root>
</configuration>
"""


class CassandraError(ServiceError):
    """Cassandra could not be installed, started or stopped; the message says why, with the log's
    last lines when the node itself failed."""


def install(cache_dir: Path = CACHE_DIR, version: str = CASSANDRA_VERSION) -> Path:
    """Returns the folder of Cassandra's jars, complete: Maven copies them there (and caches the
    download in `cache_dir/m2`) the first time only. Several processes may call it at once: one
    installs, the others wait for it."""
    return maven_jars(
        cache_dir / "cassandra" / version,
        [f"org.apache.cassandra:cassandra-all:{version}"],
        [JAMM_JAR],
        what=f"Cassandra {version}",
        cache_dir=cache_dir,
        error=CassandraError,
    )


_PR_CAPBSET_DROP = 24
_CAP_IPC_LOCK = 14


def _child_setup(libc: ctypes.CDLL, exit_with_parent: bool, lock_memory: bool) -> None:
    """Runs in the forked child before exec (libc is loaded beforehand, in the parent)."""
    if exit_with_parent:
        die_with_parent(libc)
    if not lock_memory:
        # Cassandra mlockall()s its memory at start, which for root (CAP_IPC_LOCK) pins the whole
        # heap: without that capability and with a zero memlock limit it only logs a warning.
        libc.prctl(_PR_CAPBSET_DROP, _CAP_IPC_LOCK)  # fails harmlessly when not root
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))


@dataclass
class CassandraServer(ServiceProcess):
    """One Cassandra node on `host`:`port` (CQL) and `storage_port` (gossip, to itself only) whose
    files all live in `directory`. Its process outlives this object: `start` in one process and
    `stop` in another both work, through the pid file. `stop` sends SIGTERM (Cassandra drains and
    flushes); `kill` is a crash: no drain and no flush, so the next start replays the commit log."""

    directory: Path
    port: int = DEFAULT_PORT
    storage_port: int = DEFAULT_STORAGE_PORT
    host: str = HOST
    heap_mb: int = DEFAULT_HEAP_MB
    cluster_name: str = "pychat"
    exit_with_parent: bool = False
    # Cassandra locks its memory in RAM when it may (as root). A development or test node on a
    # machine without swap gains nothing from that and would hold its whole heap from the start.
    lock_memory: bool = False

    service = "Cassandra"
    error = CassandraError
    probe_name = "CQL"
    start_timeout = START_TIMEOUT
    stop_timeout = STOP_TIMEOUT

    @classmethod
    def on_free_ports(cls, directory: Path) -> CassandraServer:
        """A node of its own in `directory` (made if missing) on free ports, ending with its parent:
        for a test or a run that may kill it."""
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, port=free_port(), storage_port=free_port(), exit_with_parent=True)

    @classmethod
    def for_directory(
        cls, directory: Path, port: int | None = None, storage_port: int | None = None
    ) -> CassandraServer:
        """The node of `directory`, on the ports it last started with unless others are given."""
        saved = cls.saved_settings(directory)
        return cls(
            directory,
            port=port or saved.get("port", DEFAULT_PORT),
            storage_port=storage_port or saved.get("storage_port", DEFAULT_STORAGE_PORT),
        )

    @property
    def log_file(self) -> Path:
        """Cassandra's own log (logback)."""
        return self.directory / "logs" / "system.log"

    @property
    def output_file(self) -> Path:
        """The JVM's stdout and stderr: what fails before logging starts lands here."""
        return self.directory / "logs" / "output.log"

    @property
    def config_file(self) -> Path:
        return self.directory / "conf" / "cassandra.yaml"

    def release_version(self, timeout: float = 5.0) -> str | None:
        """Cassandra's version as the node reports it over CQL, or None while CQL does not answer."""
        if not port_is_open(self.host, self.port):
            return None
        from cassandra import DriverException
        from cassandra.cluster import Cluster, NoHostAvailable

        cluster = Cluster(
            [self.host],
            port=self.port,
            protocol_version=5,
            connect_timeout=timeout,
            control_connection_timeout=timeout,
        )
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local", timeout=timeout).one()
            return str(row.release_version)
        except (NoHostAvailable, DriverException, OSError):
            return None
        finally:
            cluster.shutdown()

    # -- ServiceProcess -----------------------------------------------------------------------

    def _install(self) -> Path:
        return install()

    def _ports(self) -> dict[str, int]:
        return {"port": self.port, "storage_port": self.storage_port}

    def _probe(self, timeout: float) -> str | None:
        return self.release_version(timeout)

    def _is_this_server(self, cmdline: bytes) -> bool:
        return f"-Dcassandra.config={self.config_file.as_uri()}".encode() in cmdline.split(b"\0")

    def _preexec(self) -> Callable[[], None]:
        return partial(
            _child_setup, ctypes.CDLL(None, use_errno=True), self.exit_with_parent, self.lock_memory
        )

    def _command(self, lib: Path) -> list[str]:
        return [
            java(CassandraError, "Cassandra"),
            f"-Xms{self.heap_mb}m",
            f"-Xmx{self.heap_mb}m",
            *JVM_SERVER_OPTIONS,
            *JVM17_SERVER_OPTIONS,
            f"-javaagent:{lib / JAMM_JAR}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config={self.config_file.as_uri()}",
            f"-Dcassandra.logdir={self.log_file.parent}",
            f"-Dcassandra.storagedir={self.directory}",
            f"-Dlogback.configurationFile={self.directory / 'conf' / 'logback.xml'}",
            f"-Dcassandra.triggers_dir={self.directory / 'triggers'}",
            # One node that is its own only seed: nobody to wait for.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-cp",
            f"{lib}/*",
            MAIN_CLASS,
        ]

    def _configure(self, installed: Path) -> None:
        d = self.directory
        for sub in ("conf", "logs", "triggers", *_DATA_DIRS):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            _YAML.format(
                cluster_name=json.dumps(self.cluster_name),
                host=self.host,
                port=self.port,
                storage_port=self.storage_port,
                # JSON strings are YAML strings: any path is quoted right.
                **{sub: json.dumps(str(d / sub)) for sub in _DATA_DIRS},
            )
        )
        (d / "conf" / "logback.xml").write_text(_LOGBACK.format(log=self.log_file))


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser(
        "cassandra",
        f"Install, start, wait for and stop a local Apache Cassandra {CASSANDRA_VERSION} node.",
        DEV_DIR,
        port_help=f"CQL port (default: the last one used, else {DEFAULT_PORT})",
        int_options=[
            ("--storage-port", f"gossip port (default: the last one used, else {DEFAULT_STORAGE_PORT})")
        ],
        timeout=START_TIMEOUT,
        waits_for="CQL",
    )
    # The driver logs every refused probe while the node starts; errors come back as exceptions.
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    return run_cli(
        parser,
        argv,
        lambda args: CassandraServer.for_directory(args.dir, args.port, args.storage_port),
        install,
    )


if __name__ == "__main__":
    sys.exit(main())
