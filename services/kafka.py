"""Apache Kafka 4.1 in KRaft mode for development and tests: installed from Maven Central by the
project itself, one combined broker and controller per instance directory, on 127.0.0.1 only.

    python -m services.kafka start|stop|status|wait|install [--dir DIR] [--port N] [--controller-port N]

The jars (`kafka_2.13`, its dependencies and an SLF4J binding) are copied by Maven once into
`~/.cache/pychat/kafka/<version>/lib/` (`$PYCHAT_CACHE` moves `~/.cache/pychat`). Each instance
directory holds everything else of its node: `server.properties` (written anew on every start),
`data/` (the log directory, formatted once), `logs/` and `kafka.pid`, so instances on different ports
share nothing and a restart on the same directory recovers its logs.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.process import (
    CACHE_DIR,
    HOST,
    ServiceError,
    ServiceProcess,
    cli_parser,
    java,
    maven_jars,
    port_is_open,
    run_cli,
)

__all__ = [
    "KAFKA_VERSION",
    "KafkaError",
    "KafkaServer",
    "install",
]

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
# Kafka's jars bring the SLF4J API (1.7.36 in 4.1.1) but no binding: without one the node would log
# nothing at all. The binding must be of the same SLF4J line as that API (a 2.x binding goes unseen).
SLF4J_VERSION = "1.7.36"
SLF4J_BINDING_JAR = f"slf4j-simple-{SLF4J_VERSION}.jar"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
NODE_ID = 1

DEV_DIR = CACHE_DIR / "kafka-dev"
DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
DEFAULT_HEAP_MB = 512
DEFAULT_PARTITIONS = 12
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0

JVM_OPTIONS = (
    # Kafka's own defaults (bin/kafka-run-class.sh): G1 with short pauses.
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
    # Two cores, shared with the chat server and its tests: few GC and JIT threads.
    "-XX:ParallelGCThreads=2",
    "-XX:ConcGCThreads=1",
    "-XX:CICompilerCount=2",
    "-XX:+PerfDisableSharedMem",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.net.preferIPv4Stack=true",
)

_PROPERTIES = """\
# Written by services/kafka.py on every start of this instance: edits here are lost.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={node_id}@{host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={log_dir}

num.partitions={partitions}
# One node: every replication factor is 1, and acks=all means this node's own log.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# No other member to wait for: a consumer group's first rebalance completes at once.
group.initial.rebalance.delay.ms=0
"""


class KafkaError(ServiceError):
    """Kafka could not be installed, started or stopped; the message says why, with the log's last
    lines when the node itself failed."""


def install(cache_dir: Path = CACHE_DIR, version: str = KAFKA_VERSION) -> Path:
    """Returns the folder of Kafka's jars, complete: Maven copies them there (and caches the download
    in `cache_dir/m2`) the first time only. Several processes may call it at once: one installs, the
    others wait for it."""
    return maven_jars(
        cache_dir / "kafka" / version,
        [f"org.apache.kafka:kafka_{SCALA_VERSION}:{version}", f"org.slf4j:slf4j-simple:{SLF4J_VERSION}"],
        [f"kafka_{SCALA_VERSION}-{version}.jar", SLF4J_BINDING_JAR],
        what=f"Kafka {version}",
        cache_dir=cache_dir,
        error=KafkaError,
    )


def random_cluster_id() -> str:
    """A cluster id as Kafka makes them (`Uuid.randomUuid`): 16 random bytes in URL-safe base64
    without padding, never starting with '-' (it would read as an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _property_value(value: str) -> str:
    """A value for a Java properties file: backslashes are escapes there."""
    return value.replace("\\", "\\\\")


@dataclass
class KafkaServer(ServiceProcess):
    """One Kafka node in KRaft mode, broker and controller in one JVM, on `host`:`port` (clients) and
    `controller_port` (the Raft quorum, of itself only), whose files all live in `directory`. Its
    process outlives this object: `start` in one process and `stop` in another both work, through
    the pid file. `stop` sends SIGTERM (a controlled shutdown that flushes and closes every log);
    `kill` is a crash: no flush, so the next start recovers the logs' unflushed segments."""

    directory: Path
    port: int = DEFAULT_PORT
    controller_port: int = DEFAULT_CONTROLLER_PORT
    host: str = HOST
    heap_mb: int = DEFAULT_HEAP_MB
    # Partitions of a topic created without a count (auto-created, or by a client that leaves it out).
    partitions: int = DEFAULT_PARTITIONS
    exit_with_parent: bool = False

    service = "Kafka"
    error = KafkaError
    probe_name = "metadata requests"
    start_timeout = START_TIMEOUT
    stop_timeout = STOP_TIMEOUT

    @classmethod
    def for_directory(
        cls,
        directory: Path,
        port: int | None = None,
        controller_port: int | None = None,
        partitions: int | None = None,
    ) -> KafkaServer:
        """The node of `directory`, on the ports (and with the default partition count) it last
        started with unless others are given."""
        saved = cls.saved_settings(directory)
        return cls(
            directory,
            port=port or saved.get("port", DEFAULT_PORT),
            controller_port=controller_port or saved.get("controller_port", DEFAULT_CONTROLLER_PORT),
            partitions=partitions or saved.get("partitions", DEFAULT_PARTITIONS),
        )

    @property
    def bootstrap_servers(self) -> str:
        return self.address

    @property
    def config_file(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log_dir(self) -> Path:
        """Kafka's log directory: the partitions' segments and the KRaft metadata log."""
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        """Kafka's own log (slf4j-simple)."""
        return self.directory / "logs" / "server.log"

    @property
    def output_file(self) -> Path:
        """The JVM's stdout and stderr: what fails before logging starts lands here."""
        return self.directory / "logs" / "output.log"

    def cluster_id(self, timeout: float = 5.0) -> str | None:
        """The cluster id as the broker reports it in a metadata response, or None while it does not
        answer (the broker serves clients only once the controller has unfenced it)."""
        if not port_is_open(self.host, self.port):
            return None
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "socket.connection.setup.timeout.ms": int(timeout * 1000),
                # A probe: its failures come back as the exception below, not as log lines.
                "log_level": 0,
            }
        )
        try:
            metadata = admin.list_topics(timeout=timeout)
        except KafkaException:
            return None
        return str(metadata.cluster_id) if NODE_ID in metadata.brokers else None

    def _jvm_command(self, lib: Path, main: str, *args: str, heap_mb: int) -> list[str]:
        return [
            java(KafkaError, "Kafka"),
            f"-Xms{heap_mb}m",
            f"-Xmx{heap_mb}m",
            *JVM_OPTIONS,
            f"-Dorg.slf4j.simpleLogger.logFile={self.log_file}",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS",
            # As Kafka's own log4j2.yaml: one line per request only at WARN and up.
            "-Dorg.slf4j.simpleLogger.log.kafka.request.logger=warn",
            "-cp",
            f"{lib}/*",
            main,
            *args,
        ]

    def _format_storage(self, lib: Path) -> None:
        """Formats the log directory for a new cluster of this one node, once: a formatted directory
        (it has meta.properties) keeps its cluster id and data."""
        if (self.log_dir / "meta.properties").is_file():
            return
        done = subprocess.run(
            self._jvm_command(
                lib,
                STORAGE_TOOL,
                "format",
                "--cluster-id",
                random_cluster_id(),
                "--config",
                str(self.config_file),
                heap_mb=256,
            ),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        with open(self.output_file, "a") as output:
            output.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} format\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise KafkaError(
                f"Kafka could not format {self.log_dir} (exit {done.returncode})\n{self.log_tail()}"
            )

    # -- ServiceProcess -----------------------------------------------------------------------

    def _install(self) -> Path:
        return install()

    def _ports(self) -> dict[str, int]:
        return {"port": self.port, "controller_port": self.controller_port}

    def _settings(self) -> dict[str, int]:
        return {**self._ports(), "partitions": self.partitions}

    def _probe(self, timeout: float) -> str | None:
        return self.cluster_id(timeout)

    def _is_this_server(self, cmdline: bytes) -> bool:
        return str(self.config_file).encode() in cmdline.split(b"\0")

    def _command(self, installed: Path) -> list[str]:
        return self._jvm_command(installed, MAIN_CLASS, str(self.config_file), heap_mb=self.heap_mb)

    def _configure(self, installed: Path) -> None:
        for sub in (self.log_dir, self.log_file.parent):
            sub.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            _PROPERTIES.format(
                node_id=NODE_ID,
                host=self.host,
                port=self.port,
                controller_port=self.controller_port,
                log_dir=_property_value(str(self.log_dir)),
                partitions=self.partitions,
            )
        )
        self._format_storage(installed)


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser(
        "kafka",
        f"Install, start, wait for and stop a local Apache Kafka {KAFKA_VERSION} node (KRaft).",
        DEV_DIR,
        port_help=f"broker (client) port (default: the last one used, else {DEFAULT_PORT})",
        int_options=[
            (
                "--controller-port",
                f"controller (Raft) port (default: the last one used, else {DEFAULT_CONTROLLER_PORT})",
            ),
            (
                "--partitions",
                f"partitions of a topic created without a count (default: as last time, else {DEFAULT_PARTITIONS})",
            ),
        ],
        timeout=START_TIMEOUT,
        waits_for="the broker",
    )
    return run_cli(
        parser,
        argv,
        lambda args: KafkaServer.for_directory(args.dir, args.port, args.controller_port, args.partitions),
        install,
    )


if __name__ == "__main__":
    sys.exit(main())
