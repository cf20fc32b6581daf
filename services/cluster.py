"""A pychat cluster on this machine: N `pychat serve` nodes sharing a Cassandra keyspace, a Kafka
broker and a Redis (issue 13). `make cluster N=3` and `make cluster-stop` run this module; the
cluster tests and benchmarks use `PychatCluster` with servers of their own.

    python -m services.cluster start|stop [--nodes N] [--dir DIR] [--base-port P]

`start` starts the development Cassandra, Kafka and Redis (the instances `make cassandra`,
`make kafka` and `make redis` run), then the nodes, each on its own REST and WebSocket ports, with
one token secret (a client's token is good on every node); it prints each node's URLs. Each node
keeps its data dir, `pychat.log` and `pychat.pid` under DIR/<node id>. `stop` stops the nodes, then
the three servers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.cassandra import DEV_DIR as CASSANDRA_DIR
from services.cassandra import CassandraServer
from services.kafka import DEV_DIR as KAFKA_DIR
from services.kafka import KafkaServer
from services.process import CACHE_DIR, HOST, free_port, port_is_free, tail
from services.redis import DEV_DIR as REDIS_DIR
from services.redis import RedisServer

DEV_DIR = CACHE_DIR / "cluster-dev"
DEFAULT_BASE_PORT = 8100
KEYSPACE = "pychat_cluster"
START_TIMEOUT = 60.0


class ClusterError(RuntimeError):
    """A node did not start; the message ends with its log's tail."""


@dataclass
class Node:
    """One `pychat serve` process of a cluster."""

    node_id: str
    directory: Path
    port: int
    ws_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.ws_port}/ws"

    @property
    def log_file(self) -> Path:
        return self.directory / "pychat.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "pychat.pid"

    def launch(self, detach: bool = False) -> None:
        """Starts the process without waiting for it (see `wait`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pychat", "serve", "--data-dir", str(self.directory / "data")],
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=detach,
            )
        self.pid_file.write_text(str(self.proc.pid))

    def wait(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"node {self.node_id} exited:\n" + "\n".join(tail(self.log_file, 40)))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.kill()
        raise ClusterError(
            f"node {self.node_id} did not answer in {timeout:.0f} s:\n" + "\n".join(tail(self.log_file, 40))
        )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.launch()
        self.wait(timeout)

    def _pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid if self.proc.poll() is None else None
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def kill(self) -> None:
        """SIGKILL: nothing of the node's shutdown runs."""
        self._signal(signal.SIGKILL, 10)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 20)

    def _signal(self, sig: int, wait_s: float) -> None:
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    break
            elif self._pid() is None:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait(10)


class PychatCluster:
    """N nodes on one store, Kafka and Redis; node k listens on base_port + 2k (REST) and + 2k + 1
    (WebSocket), or on free ports when no base port is given."""

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int,
        store: str,
        kafka: str,
        redis: str,
        base_port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        secret_file = directory / "secret.key"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(48))
            secret_file.chmod(0o600)
        self.secret = secret_file.read_text().strip()
        self.directory = directory
        ports = (
            [(base_port + 2 * k, base_port + 2 * k + 1) for k in range(nodes)]
            if base_port is not None
            else [(free_port(), free_port()) for _ in range(nodes)]
        )
        self.nodes = [
            Node(
                f"node{k + 1}",
                directory / f"node{k + 1}",
                ports[k][0],
                ports[k][1],
                {
                    "PYCHAT_STORE": store,
                    "PYCHAT_KAFKA": kafka,
                    "PYCHAT_REDIS": redis,
                    "PYCHAT_NODE_ID": f"node{k + 1}",
                    "PYCHAT_PORT": str(ports[k][0]),
                    "PYCHAT_WS_PORT": str(ports[k][1]),
                    "PYCHAT_SECRET_KEY": self.secret,
                    # Media every node sees: a folder they share on this machine (or env's S3 bucket).
                    "PYCHAT_MEDIA_STORE": f"file://{directory.resolve() / 'media'}",
                    **(env or {}),
                },
            )
            for k in range(nodes)
        ]

    def start(self, detach: bool = False) -> None:
        """Starts every node at once and waits for all (the first creates the keyspace)."""
        for node in self.nodes:
            for port in (node.port, node.ws_port):
                if not port_is_free(HOST, port):
                    raise ClusterError(f"port {HOST}:{port} is taken (a cluster already running?)")
        first, *rest = self.nodes
        first.launch(detach)
        first.wait()
        for node in rest:
            node.launch(detach)
        for node in rest:
            node.wait()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _dev_services() -> tuple[CassandraServer, KafkaServer, RedisServer]:
    return (
        CassandraServer.for_directory(CASSANDRA_DIR),
        KafkaServer.for_directory(KAFKA_DIR),
        RedisServer.for_directory(REDIS_DIR),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cluster", description=__doc__)
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=DEV_DIR)
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    args = parser.parse_args(argv)
    cassandra, kafka, redis = _dev_services()
    if args.command == "stop":
        for node_dir in sorted(args.dir.glob("node*")):
            Node(node_dir.name, node_dir, 0, 0, {}).stop()
        for server in (redis, kafka, cassandra):
            server.stop()
        print("pychat cluster stopped")
        return 0
    for server in (cassandra, kafka, redis):
        print(f"{server.service}: {server.start()}", flush=True)
    cluster = PychatCluster(
        args.dir.resolve(),
        nodes=args.nodes,
        store=f"cassandra://{cassandra.address}/{KEYSPACE}",
        kafka=kafka.bootstrap_servers,
        redis=redis.url,
        base_port=args.base_port,
    )
    try:
        cluster.start(detach=True)
    except ClusterError as e:
        cluster.stop()
        print(f"pychat cluster: {e}", file=sys.stderr)
        return 1
    for node in cluster.nodes:
        print(f"{node.node_id}  REST {node.url}/api  WebSocket {node.ws_url}  (log {node.log_file})")
    print(f"stop it with: make cluster-stop   (data and logs: {args.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
