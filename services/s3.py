"""An S3-compatible server for development and tests: versitygw (Apache-2.0), built by the project
itself with `go install` from the Go module proxy at a pinned version, serving the S3 API on a local
folder (its posix backend: each bucket a directory, each object a file).

    python -m services.s3 start|stop|status|wait|install [--dir DIR] [--port N]

Each instance directory holds everything of its server: `data/` (the buckets), `meta/` (object
metadata, kept beside the files instead of in extended attributes), `output.log` and the pid
file. The root credentials are `ACCESS_KEY` / `SECRET_KEY` below: for loopback only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.process import (
    CACHE_DIR,
    HOST,
    ServiceError,
    ServiceProcess,
    cli_parser,
    command_output_tail,
    install_lock,
    port_is_open,
    run_cli,
)

__all__ = ["ACCESS_KEY", "SECRET_KEY", "VERSITYGW_VERSION", "S3Error", "S3Server", "install"]

VERSITYGW_MODULE = "github.com/versity/versitygw/cmd/versitygw"
VERSITYGW_VERSION = "v1.8.0"
ACCESS_KEY = "pychat-dev"
SECRET_KEY = "pychat-dev-secret"

HOME = CACHE_DIR / "versitygw" / VERSITYGW_VERSION
BINARY = HOME / "bin" / "versitygw"
DEV_DIR = CACHE_DIR / "s3-dev"
DEFAULT_PORT = 7070
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class S3Error(ServiceError):
    """The S3 server could not be installed, started or stopped; the message says why."""


def install(version: str = VERSITYGW_VERSION) -> Path:
    """Returns the versitygw binary, building it once per version with the machine's Go (modules
    from the Go module proxy, cached under the project's cache). Several processes may call it at
    once: one builds, the others wait."""
    binary = CACHE_DIR / "versitygw" / version / "bin" / "versitygw"
    if binary.is_file():
        return binary
    home = binary.parent.parent
    with install_lock(home):
        if binary.is_file():
            return binary
        go = shutil.which("go") or (
            "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None
        )
        if go is None:
            raise S3Error(f"Go is needed to build versitygw {version}; `go` is not on PATH")
        env = {
            **os.environ,
            "GOBIN": str(binary.parent),
            "GOPATH": str(CACHE_DIR / "go"),
            "GOFLAGS": "-modcacherw",
            "CGO_ENABLED": "0",
        }
        done = subprocess.run(
            [go, "install", f"{VERSITYGW_MODULE}@{version}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        if done.returncode != 0 or not binary.is_file():
            raise S3Error(f"go install {VERSITYGW_MODULE}@{version} failed:\n" + command_output_tail(done))
    return binary


@dataclass
class S3Server(ServiceProcess):
    """One versitygw on `host`:`port` whose buckets and metadata live in `directory`."""

    directory: Path
    port: int = DEFAULT_PORT
    host: str = HOST
    exit_with_parent: bool = False

    service = "S3"
    error = S3Error
    probe_name = "HTTP"
    start_timeout = START_TIMEOUT
    stop_timeout = STOP_TIMEOUT
    probe_timeout = 2.0
    poll_interval = 0.05

    @classmethod
    def for_directory(cls, directory: Path, port: int | None = None) -> S3Server:
        return cls(directory, port=port or cls.saved_settings(directory).get("port", DEFAULT_PORT))

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def media_store(self, bucket: str) -> str:
        """The `media_store` setting that puts pychat's media in `bucket` here (created if missing)."""
        return f"s3://{bucket}?endpoint={self.endpoint}&create=1"

    @property
    def client_env(self) -> dict[str, str]:
        """The environment an S3 client (pychat) needs for this server's root user."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    @property
    def config_file(self) -> Path:
        # versitygw takes its settings on the command line; this file records them for people.
        return self.directory / "versitygw.args"

    @property
    def log_file(self) -> Path:
        return self.directory / "output.log"

    @property
    def output_file(self) -> Path:
        return self.directory / "output.log"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def _install(self) -> Path:
        return install()

    def _ports(self) -> dict[str, int]:
        return {"port": self.port}

    def _probe(self, timeout: float) -> str | None:
        if not port_is_open(self.host, self.port):
            return None
        # An anonymous request: any S3 answer (403 AccessDenied) means the gateway serves.
        try:
            with urllib.request.urlopen(f"{self.endpoint}/", timeout=timeout) as answer:
                return f"HTTP {answer.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}" if b"<Error>" in e.read() else None
        except OSError:
            return None

    def _is_this_server(self, cmdline: bytes) -> bool:
        return str(self.data_dir).encode() in cmdline

    def _command(self, installed: Path) -> list[str]:
        return [
            str(installed),
            "--port",
            f"{self.host}:{self.port}",
            "--access",
            ACCESS_KEY,
            "--secret",
            SECRET_KEY,
            "--quiet",
            "posix",
            "--sidecar",
            str(self.directory / "meta"),
            str(self.data_dir),
        ]

    def _configure(self, installed: Path) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.directory / "meta").mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(" ".join(self._command(installed)) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser(
        "s3",
        f"Build, start, wait for and stop a local S3 server (versitygw {VERSITYGW_VERSION}).",
        DEV_DIR,
        port_help=f"port (default: the last one used, else {DEFAULT_PORT})",
        timeout=START_TIMEOUT,
        waits_for="an S3 answer",
    )
    return run_cli(parser, argv, lambda args: S3Server.for_directory(args.dir, args.port), install)


if __name__ == "__main__":
    sys.exit(main())
