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

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

__all__ = [
    "CASSANDRA_VERSION",
    "CassandraError",
    "CassandraServer",
    "install",
]

CASSANDRA_VERSION = "5.0.6"
# The agent Cassandra needs to measure object sizes; it comes with cassandra-all's dependencies.
JAMM_JAR = "jamm-0.4.0.jar"
# Pinned so that a newer Maven default never changes how the jars are copied.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"

CACHE_DIR = Path(os.environ.get("PYCHAT_CACHE") or Path.home() / ".cache" / "pychat")
DEV_DIR = CACHE_DIR / "cassandra-dev"
HOST = "127.0.0.1"
DEFAULT_PORT = 9042
DEFAULT_STORAGE_PORT = 7000
DEFAULT_HEAP_MB = 768
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
LOG_TAIL_LINES = 60

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

_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by services/cassandra.py: the one dependency whose jars make a Cassandra node. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pychat.services</groupId>
  <artifactId>cassandra-jars</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{plugin_version}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""

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


class CassandraError(RuntimeError):
    """Cassandra could not be installed, started or stopped; the message says why, with the log's
    last lines when the node itself failed."""


def install(cache_dir: Path = CACHE_DIR, version: str = CASSANDRA_VERSION) -> Path:
    """Returns the folder of Cassandra's jars, complete: Maven copies them there (and caches the
    download in `cache_dir/m2`) the first time only. Several processes may call it at once: one
    installs, the others wait for it."""
    home = cache_dir / "cassandra" / version
    lib = home / "lib"
    marker = home / "installed"
    if marker.is_file() and (lib / JAMM_JAR).is_file():
        return lib
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and (lib / JAMM_JAR).is_file():  # installed while this one waited
            return lib
        marker.unlink(missing_ok=True)
        mvn = shutil.which("mvn")
        if mvn is None:
            raise CassandraError("Maven (mvn) is needed to install Cassandra; it is not on PATH")
        partial = home / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(lib, ignore_errors=True)
        pom = home / "pom.xml"
        pom.write_text(_POM.format(version=version, plugin_version=DEPENDENCY_PLUGIN_VERSION))
        done = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                f"-Dmaven.repo.local={cache_dir / 'm2'}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).splitlines()[-LOG_TAIL_LINES:]
            raise CassandraError(
                f"mvn could not fetch Cassandra {version} (exit {done.returncode}):\n" + "\n".join(output)
            )
        if not (partial / JAMM_JAR).is_file():
            raise CassandraError(f"Cassandra {version}'s dependencies lack {JAMM_JAR}; see {partial}")
        partial.rename(lib)
        jars = len(list(lib.glob("*.jar")))
        marker.write_text(f"cassandra-all {version}: {jars} jars\n")
    return lib


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _port_is_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_CAP_IPC_LOCK = 14


def _child_setup(libc: ctypes.CDLL, exit_with_parent: bool, lock_memory: bool) -> None:
    """Runs in the forked child before exec (libc is loaded beforehand, in the parent)."""
    if exit_with_parent:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if not lock_memory:
        # Cassandra mlockall()s its memory at start, which for root (CAP_IPC_LOCK) pins the whole
        # heap: without that capability and with a zero memlock limit it only logs a warning.
        libc.prctl(_PR_CAPBSET_DROP, _CAP_IPC_LOCK)  # fails harmlessly when not root
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return list(deque(f, maxlen=lines))
    except FileNotFoundError:
        return []


@dataclass
class CassandraServer:
    """One Cassandra node on `host`:`port` (CQL) and `storage_port` (gossip, to itself only) whose
    files all live in `directory`. Its process outlives this object: `start` in one process and
    `stop` in another both work, through the pid file."""

    directory: Path
    port: int = DEFAULT_PORT
    storage_port: int = DEFAULT_STORAGE_PORT
    host: str = HOST
    heap_mb: int = DEFAULT_HEAP_MB
    cluster_name: str = "pychat"
    # For tests: the kernel SIGKILLs the node when the thread that started it exits, so a killed
    # test run leaves no Cassandra behind. The CLI's nodes outlive it, of course.
    exit_with_parent: bool = False
    # Cassandra locks its memory in RAM when it may (as root). A development or test node on a
    # machine without swap gains nothing from that and would hold its whole heap from the start.
    lock_memory: bool = False
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _output: IO[bytes] | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_directory(
        cls, directory: Path, port: int | None = None, storage_port: int | None = None
    ) -> CassandraServer:
        """The node of `directory`, on the ports it last started with unless others are given."""
        saved: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            saved = json.loads((directory / "instance.json").read_text())
        return cls(
            directory,
            port=port or saved.get("port", DEFAULT_PORT),
            storage_port=storage_port or saved.get("storage_port", DEFAULT_STORAGE_PORT),
        )

    @property
    def pid_file(self) -> Path:
        return self.directory / "cassandra.pid"

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

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the JVM's own output, then of the node's log."""
        parts = []
        for path in (self.output_file, self.log_file):
            tail = _tail(path, lines)
            if tail:
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "".join(tail))
        return "\n".join(parts) or f"(no log in {self.directory / 'logs'})"

    # -- process ------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of this directory's running node, or None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._alive(pid) else None

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        # Not our child: check that the pid is still this node's JVM, not a reused pid or a zombie.
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        return state != "Z" and f"-Dcassandra.config={self.config_file.as_uri()}".encode() in cmdline

    def status(self) -> str:
        """'running' (CQL answers), 'starting' (process up, no CQL yet) or 'stopped'."""
        if self.pid() is None:
            return "stopped"
        return "running" if self.release_version() is not None else "starting"

    def release_version(self, timeout: float = 5.0) -> str | None:
        """Cassandra's version as the node reports it over CQL, or None while CQL does not answer."""
        if not _port_is_open(self.host, self.port):
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

    def _jvm_command(self, lib: Path) -> list[str]:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        if java is None:
            raise CassandraError("Java (17) is needed to run Cassandra; `java` is not on PATH")
        return [
            java,
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

    def _write_config(self) -> None:
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
        (d / "instance.json").write_text(json.dumps({"port": self.port, "storage_port": self.storage_port}))

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Installs Cassandra if needed, starts this node in the background and returns its version
        once CQL answers. On a node already running on these ports it only waits for CQL. Raises
        CassandraError (with the log's tail) if the node exits or does not answer within `timeout`
        seconds; it then leaves no process behind."""
        if self.pid() is not None:
            saved = json.loads((self.directory / "instance.json").read_text())
            if (saved["port"], saved["storage_port"]) != (self.port, self.storage_port):
                raise CassandraError(
                    f"Cassandra in {self.directory} already runs on ports {saved['port']} and "
                    f"{saved['storage_port']}, not {self.port} and {self.storage_port}"
                )
            return self.wait(timeout)
        lib = install()
        for port in (self.port, self.storage_port):
            if not _port_is_free(self.host, port):
                raise CassandraError(
                    f"port {self.host}:{port} is taken: another Cassandra, or another server?"
                )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._close_output()
        self._output = open(self.output_file, "ab")  # noqa: SIM115 - closed by stop() and kill()
        self._output.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
        self._output.flush()
        self._proc = subprocess.Popen(
            self._jvm_command(lib),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a Ctrl-C in the shell that ran make stays there
            preexec_fn=partial(
                _child_setup, ctypes.CDLL(None, use_errno=True), self.exit_with_parent, self.lock_memory
            ),
        )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            return self.wait(timeout)
        except CassandraError:
            self.kill()
            raise

    def wait(self, timeout: float = START_TIMEOUT) -> str:
        """Returns Cassandra's version once this node answers CQL; raises CassandraError with the
        log's tail if it is not running, exits, or does not answer within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pid() is None:
                code = self._proc.poll() if self._proc is not None else None
                exited = f" (exit code {code})" if code is not None else ""
                raise CassandraError(
                    f"Cassandra in {self.directory} is not running{exited}\n{self.log_tail()}"
                )
            version = self.release_version()
            if version is not None:
                return version
            if time.monotonic() > deadline:
                raise CassandraError(
                    f"Cassandra in {self.directory} did not answer CQL on {self.host}:{self.port} "
                    f"within {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self._alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stops the node cleanly (SIGTERM: Cassandra drains and flushes), or with SIGKILL if it has
        not exited after `timeout` seconds. Nothing happens if it is not running."""
        pid = self.pid()
        if pid is not None:
            self._signal(pid, signal.SIGTERM)
            if not self._wait_exit(pid, timeout):
                self._signal(pid, signal.SIGKILL)
                self._wait_exit(pid, 10)
        self.pid_file.unlink(missing_ok=True)
        self._close_output()

    def kill(self) -> None:
        """SIGKILL, as a crash: no drain and no flush, so the next start replays the commit log."""
        pid = self.pid()
        if pid is not None:
            self._signal(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10):
                raise CassandraError(f"Cassandra (pid {pid}) survived SIGKILL for 10 s")
        self.pid_file.unlink(missing_ok=True)
        self._close_output()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.cassandra",
        description=f"Install, start, wait for and stop a local Apache Cassandra {CASSANDRA_VERSION} node.",
    )
    parser.add_argument("command", choices=["start", "stop", "status", "wait", "install"])
    parser.add_argument("--dir", type=Path, default=DEV_DIR, help=f"instance directory (default {DEV_DIR})")
    parser.add_argument(
        "--port", type=int, help=f"CQL port (default: the last one used, else {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--storage-port",
        type=int,
        help=f"gossip port (default: the last one used, else {DEFAULT_STORAGE_PORT})",
    )
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT, help="seconds to wait for CQL")
    args = parser.parse_args(argv)
    # The driver logs every refused probe while the node starts; errors come back as exceptions.
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    server = CassandraServer.for_directory(args.dir.resolve(), args.port, args.storage_port)
    try:
        if args.command == "install":
            print(install())
        elif args.command == "start":
            server.start(args.timeout)
            print(f"{server.host}:{server.port}")
        elif args.command == "wait":
            server.wait(args.timeout)
            print(f"{server.host}:{server.port}")
        elif args.command == "stop":
            server.stop()
        else:
            state = server.status()
            print(f"{state} {server.host}:{server.port} pid {server.pid()} dir {server.directory}")
            return 0 if state == "running" else 3
    except CassandraError as e:
        print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
