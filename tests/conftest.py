"""Test fixtures: real pychat servers as subprocesses on 127.0.0.1, real SQLite
files in temporary directories, real sockets."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from pychat.client import ChatClient
from services.process import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerProcess:
    """A `pychat serve` subprocess on its own data dir."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    ws_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def secret(self) -> bytes:
        return (self.data_dir / "secret.key").read_text().strip().encode()

    def start(self) -> None:
        self.port = self.port or free_port()
        self.ws_port = self.ws_port or free_port()
        env = {**os.environ, **self.env}
        if self._log is None:
            self._log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pychat",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                "--ws-port",
                str(self.ws_port),
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.data_dir / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stores(*kinds): run the module's servers on each of these stores (default: sqlite)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # `@pytest.mark.stores("sqlite", "cassandra")` on a module runs its server tests on each store.
    if "store_kind" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("stores")
        # PYCHAT_TEST_STORES=sqlite,cassandra runs every other module's servers on those stores too.
        default = tuple(os.environ.get("PYCHAT_TEST_STORES", "sqlite").split(","))
        kinds = marker.args if marker else default
        metafunc.parametrize("store_kind", kinds, indirect=True, scope="module")


@pytest.fixture(scope="module")
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def store_env(store_kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that puts a server on `store_kind`: SQLite in its data dir, or a fresh
    keyspace on the session's Cassandra node."""
    if store_kind == "sqlite":
        return {}
    node = request.getfixturevalue("cassandra")
    return {"PYCHAT_STORE": f"cassandra://{node.host}:{node.port}/srv_{uuid.uuid4().hex[:12]}"}


def keyspace_dropper(
    request: pytest.FixtureRequest, store_env: dict[str, str]
) -> Callable[[dict[str, str]], None]:
    """What drops a server's keyspace once the server has stopped (a test run makes hundreds:
    kept, they filled the session node's heap). Resolved at setup, used at teardown."""
    if not store_env.get("PYCHAT_STORE", "").startswith("cassandra://"):
        return lambda env: None
    cluster = request.getfixturevalue("cassandra_cluster")

    def drop(env: dict[str, str]) -> None:
        keyspace = env["PYCHAT_STORE"].rsplit("/", 1)[1].split("?")[0]
        session = cluster.connect()
        try:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        finally:
            session.shutdown()

    return drop


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, store_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """One server per test module (per store); tests keep apart by using fresh users."""
    drop = keyspace_dropper(request, store_env)
    srv = ServerProcess(tmp_path_factory.mktemp("pychat"), env=dict(store_env))
    srv.start()
    yield srv
    srv.stop()
    drop(srv.env)


@pytest.fixture
def server_factory(
    tmp_path: Path, store_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServerProcess]]:
    """Starts servers of the test's own (on a fresh data dir and store, with extra environment);
    stops them after."""
    started: list[ServerProcess] = []

    def make(env: dict[str, str] | None = None) -> ServerProcess:
        data_dir = tmp_path / f"data{len(started)}"
        data_dir.mkdir()
        own = dict(store_env)
        if "PYCHAT_STORE" in own:  # a keyspace of its own
            own["PYCHAT_STORE"] = own["PYCHAT_STORE"].rsplit("/", 1)[0] + f"/srv_{uuid.uuid4().hex[:12]}"
        srv = ServerProcess(data_dir, env={**own, **(env or {})})
        started.append(srv)  # before it starts: stopped (its log closed) even if it fails to
        srv.start()
        return srv

    drop = keyspace_dropper(request, store_env)
    yield make
    for srv in started:
        srv.stop()
        drop(srv.env)


_names = itertools.count(1)


def unique_name(prefix: str = "user") -> str:
    return f"{prefix}{os.getpid() % 1000}_{next(_names)}"


PASSWORD = "correct horse battery"


class Clients:
    """Makes logged-in SDK clients and closes them after the test."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.made: list[ChatClient] = []

    async def user(self, prefix: str = "user", **kwargs: object) -> ChatClient:
        name = unique_name(prefix)
        await ChatClient.register(self.server.url, name, PASSWORD)
        client = await ChatClient.login(self.server.url, name, PASSWORD, **kwargs)  # type: ignore[arg-type]
        self.made.append(client)
        return client

    async def device(self, of: ChatClient, **kwargs: object) -> ChatClient:
        """Another device (connection) of the same user."""
        client = ChatClient(of.base_url, of.token, of.user_id, **kwargs)  # type: ignore[arg-type]
        self.made.append(client)
        return client

    async def close(self) -> None:
        for c in self.made:
            await c.close()


@pytest.fixture
async def clients(server: ServerProcess) -> AsyncIterator[Clients]:
    made = Clients(server)
    yield made
    await made.close()


# Hypothesis: a bounded run in `make test`, a long one under `make fuzz`.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Cassandra: one real node for the test session, installed by services/cassandra.py on first use
# (a download of about a minute), on free ports in a temporary directory.
from cassandra.cluster import Cluster, Session  # noqa: E402

from services.cassandra import CassandraServer  # noqa: E402
from services.process import ServiceError, ServiceProcess  # noqa: E402

Service = TypeVar("Service", bound=ServiceProcess)


def started(server: Service) -> Service:
    """Starts a real server for a test; one that cannot start fails the test with its log's tail,
    never a skip."""
    try:
        server.start()
    except ServiceError as e:
        pytest.fail(f"{server.service} did not start: {e}", pytrace=False)
    return server


SESSION_CASSANDRA_HEAP_MB = 1024


@pytest.fixture(scope="session")
def cassandra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraServer]:
    """A running Cassandra 5.0 node, shared by the session. A node that cannot start fails the test
    with the tail of its log: never a skip. The first run downloads Cassandra, so modules that use it
    raise their timeout (see tests/test_cassandra_service.py)."""
    node = CassandraServer.on_free_ports(tmp_path_factory.mktemp("cassandra"))
    # It hosts every test's keyspace (dropped after each server, but many live at once).
    node.heap_mb = SESSION_CASSANDRA_HEAP_MB
    node = started(node)
    yield node
    node.stop()


@pytest.fixture(scope="session")
def cassandra_cluster(cassandra: CassandraServer) -> Iterator[Cluster]:
    """The driver's cluster object for the session's node (protocol v5)."""
    cluster = Cluster([cassandra.host], port=cassandra.port, protocol_version=5)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def cassandra_session(cassandra_cluster: Cluster) -> Iterator[Session]:
    """A driver session on a keyspace of the test's own (SimpleStrategy, replication factor 1),
    dropped after the test."""
    keyspace = f"test_{uuid.uuid4().hex}"
    session = cassandra_cluster.connect()
    session.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    )
    session.set_keyspace(keyspace)
    yield session
    session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
    session.shutdown()


from services.kafka import KafkaServer  # noqa: E402


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    """A running Kafka 4.1 node (KRaft, broker and controller in one JVM), shared by the session. One
    that cannot start fails the test with its log's tail, never a skip."""
    node = started(
        KafkaServer(
            tmp_path_factory.mktemp("kafka"),
            port=free_port(),
            controller_port=free_port(),
            exit_with_parent=True,
        )
    )
    yield node
    node.stop()


from services.s3 import S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running S3-compatible server (versitygw, built from the Go module proxy on first use) on a
    folder of its own, shared by the session. One that cannot start fails the test with its log's
    tail, never a skip."""
    node = started(S3Server(tmp_path_factory.mktemp("s3"), port=free_port(), exit_with_parent=True))
    yield node
    node.stop()
