"""Redis 7.0 for development and tests: Debian's `redis-server` package, installed with apt by the
project itself, one server per instance directory, on 127.0.0.1 only.

    python -m services.redis start|stop|status|wait|install [--dir DIR] [--port N]

Each instance directory holds everything of its server: `redis.conf` (written anew on every start),
`data/` (the append-only file), `redis.log`, `output.log` and `redis.pid`, so instances on different
ports share nothing and a restart on the same directory loads its append-only file back.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from services import apt
from services.process import (
    CACHE_DIR,
    HOST,
    ServiceError,
    ServiceProcess,
    cli_parser,
    port_is_open,
    run_cli,
)

__all__ = [
    "REDIS_PACKAGE_VERSION",
    "REDIS_VERSION",
    "RedisError",
    "RedisServer",
    "install",
]

# Debian 12's redis-server, pinned to the exact package (a security update changes it here, on purpose).
REDIS_PACKAGE_VERSION = "5:7.0.15-1~deb12u10"
REDIS_VERSION = "7.0.15"
REDIS_SERVER = Path("/usr/bin/redis-server")

DEV_DIR = CACHE_DIR / "redis-dev"
DEFAULT_PORT = 6379
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

_CONF = """\
# Written by services/redis.py on every start of this instance: edits here are lost.
bind {host}
port {port}
protected-mode yes
daemonize no
supervised no
# The config file's path in the process title tells this server apart from others (`stop` in another
# process checks it before it signals a pid).
proc-title-template "{{title}} {{listen-addr}} {{server-mode}} {{config-file}}"
logfile {logfile}
loglevel notice
dir {data}

# Durability: every write goes to the append-only file, which is fsynced once a second; a SIGKILL
# loses nothing that reached the kernel, a power cut at most a second. No RDB snapshots.
save ""
appendonly yes
appendfsync everysec
appenddirname "appendonlydir"
"""


class RedisError(ServiceError):
    """Redis could not be installed, started or stopped; the message says why, with the log's last
    lines when the server itself failed."""


def install(version: str = REDIS_PACKAGE_VERSION) -> Path:
    """Returns the path of `redis-server`, installing Debian's package at exactly `version` (with apt,
    as root) only when it is missing or another version."""
    # redis-tools is pinned too: redis-server depends on exactly its own version of it.
    apt.install({"redis-server": version, "redis-tools": version}, CACHE_DIR / "redis", RedisError)
    if not REDIS_SERVER.is_file():
        raise RedisError(f"apt-get installed redis-server {version} but there is no {REDIS_SERVER}")
    return REDIS_SERVER


def _conf_string(value: str) -> str:
    """A redis.conf string: double quotes, backslash escapes (any path is read back as it is)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class RedisServer(ServiceProcess):
    """One Redis server on `host`:`port` whose files all live in `directory`. Its process outlives
    this object: `start` in one process and `stop` in another both work, through the pid file.
    `stop` sends SIGTERM (Redis fsyncs its append-only file and exits); `kill` is a crash: the next
    start replays the append-only file as far as it was written."""

    directory: Path
    port: int = DEFAULT_PORT
    host: str = HOST
    exit_with_parent: bool = False

    service = "Redis"
    error = RedisError
    probe_name = "PING"
    start_timeout = START_TIMEOUT
    stop_timeout = STOP_TIMEOUT
    probe_timeout = 2.0
    # Redis is up within milliseconds: no reason to wait a quarter second between probes.
    poll_interval = 0.05

    @classmethod
    def for_directory(cls, directory: Path, port: int | None = None) -> RedisServer:
        """The server of `directory`, on the port it last started with unless another is given."""
        return cls(directory, port=port or cls.saved_settings(directory).get("port", DEFAULT_PORT))

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def config_file(self) -> Path:
        return self.directory / "redis.conf"

    @property
    def data_dir(self) -> Path:
        """Redis's working directory: the append-only files (`appendonlydir/`)."""
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        """Redis's own log."""
        return self.directory / "redis.log"

    @property
    def output_file(self) -> Path:
        """The process's stdout and stderr: a config error lands here, before the log is opened."""
        return self.directory / "output.log"

    # -- protocol -----------------------------------------------------------------------------

    def _request(self, *args: str, timeout: float) -> bytes | None:
        """Sends one command on a connection of its own and returns its reply (a status or a bulk
        string), or None if the server does not answer or answers with an error (such as LOADING
        while it reads its append-only file back)."""
        command = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as conn:
                conn.sendall(command.encode())
                reply = conn.makefile("rb")
                head = reply.readline()
                if head.startswith(b"+"):
                    return head[1:].rstrip(b"\r\n")
                if head.startswith(b"$") and int(head[1:]) >= 0:
                    return reply.read(int(head[1:]))
                return None
        except (OSError, ValueError):
            return None

    def ping(self, timeout: float = 2.0) -> bool:
        """Whether the server answers PING (not while it still loads its data)."""
        return port_is_open(self.host, self.port) and self._request("PING", timeout=timeout) == b"PONG"

    def server_version(self, timeout: float = 2.0) -> str | None:
        """Redis's version as the server reports it (INFO server), or None while it does not answer."""
        info = self._request("INFO", "server", timeout=timeout)
        if info is None:
            return None
        for line in info.decode(errors="replace").splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
        return None

    # -- ServiceProcess -----------------------------------------------------------------------

    def _install(self) -> Path:
        return install()

    def _ports(self) -> dict[str, int]:
        return {"port": self.port}

    def _probe(self, timeout: float) -> str | None:
        return self.server_version(timeout) if self.ping(timeout) else None

    def _is_this_server(self, cmdline: bytes) -> bool:
        # Redis rewrites its command line into its process title, which names the config file.
        return str(self.config_file).encode() in cmdline

    @property
    def working_dir(self) -> Path:
        return self.data_dir

    def _command(self, installed: Path) -> list[str]:
        return [str(installed), str(self.config_file)]

    def _configure(self, installed: Path) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            _CONF.format(
                host=self.host,
                port=self.port,
                logfile=_conf_string(str(self.log_file)),
                data=_conf_string(str(self.data_dir)),
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser(
        "redis",
        f"Install, start, wait for and stop a local Redis {REDIS_VERSION} server (Debian's package).",
        DEV_DIR,
        port_help=f"port (default: the last one used, else {DEFAULT_PORT})",
        timeout=START_TIMEOUT,
        waits_for="PING",
    )
    return run_cli(parser, argv, lambda args: RedisServer.for_directory(args.dir, args.port), install)


if __name__ == "__main__":
    sys.exit(main())
