"""What the service modules (cassandra.py, kafka.py, redis.py) share: a server process that outlives
the Python process that started it and is found again through its instance directory's pid file,
the install lock, the Maven download of a JVM server's jars, and the `python -m services.NAME`
command line. Each module keeps what is its server's own: install, config, command line, probe."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import IO, ClassVar

CACHE_DIR = Path(os.environ.get("PYCHAT_CACHE") or Path.home() / ".cache" / "pychat")
HOST = "127.0.0.1"
LOG_TAIL_LINES = 60
# Pinned so that a newer Maven default never changes how the jars are copied.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"


class ServiceError(RuntimeError):
    """A server could not be installed, started or stopped; each module raises its own subclass, with
    the log's last lines when the server itself failed."""


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), for a server of a test or a run."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on `host`:`port` now. With SO_REUSEADDR, as the servers bind
    themselves: the connections that a killed server leaves in TIME_WAIT do not hold its port (without
    it, a port freed by kill() looked taken)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True


def port_is_open(host: str, port: int) -> bool:
    """Whether something accepts connections on `host`:`port`: a cheap check before a client probe."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return list(deque(f, maxlen=lines))
    except FileNotFoundError:
        return []


_PR_SET_PDEATHSIG = 1


def die_with_parent(libc: ctypes.CDLL) -> None:
    """Runs in the forked child before exec (libc is loaded beforehand, in the parent): the kernel
    SIGKILLs the child when the thread that started it exits."""
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def java(error: type[ServiceError], service: str) -> str:
    """The `java` to run a JVM server with: `$JAVA_HOME`'s, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    found = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if found is None:
        raise error(f"Java (17) is needed to run {service}; `java` is not on PATH")
    return found


@contextlib.contextmanager
def install_lock(home: Path) -> Iterator[None]:
    """Held while one process installs into `home`: the others wait for it (and then find the install
    done, which they check again under the lock)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def command_output_tail(done: subprocess.CompletedProcess[str]) -> str:
    """The last lines of what a failed install command printed, for its error message."""
    return "\n".join((done.stdout + done.stderr).splitlines()[-LOG_TAIL_LINES:])


_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by services/process.py: the dependencies whose jars make {what}. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pychat.services</groupId>
  <artifactId>{artifact}</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
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

_POM_DEPENDENCY = """\
    <dependency>
      <groupId>{group}</groupId>
      <artifactId>{artifact}</artifactId>
      <version>{version}</version>
    </dependency>"""


def maven_jars(
    home: Path,
    dependencies: Sequence[str],
    required: Sequence[str],
    *,
    what: str,
    cache_dir: Path,
    error: type[ServiceError],
) -> Path:
    """Returns `home`/lib with the jars of `dependencies` ("group:artifact:version") and of theirs,
    complete: Maven copies them there (and caches the download in `cache_dir/m2`) the first time only.
    `required` names jars that must be among them; `what` ("Kafka 4.1.1") is for messages. Several
    processes may call it at once: one installs, the others wait for it."""
    lib = home / "lib"
    marker = home / "installed"

    def complete() -> bool:
        return marker.is_file() and all((lib / jar).is_file() for jar in required)

    if complete():
        return lib
    with install_lock(home):
        if complete():  # installed while this one waited
            return lib
        marker.unlink(missing_ok=True)
        mvn = shutil.which("mvn")
        if mvn is None:
            raise error(f"Maven (mvn) is needed to install {what}; it is not on PATH")
        # Copied beside lib/ and renamed at the end: a half-done copy is never taken for an install.
        partial_lib = home / "lib.partial"
        shutil.rmtree(partial_lib, ignore_errors=True)
        shutil.rmtree(lib, ignore_errors=True)
        pom = home / "pom.xml"
        pom.write_text(
            _POM.format(
                what=what,
                artifact=f"{home.parent.name}-jars",
                version=home.name,
                dependencies="\n".join(
                    _POM_DEPENDENCY.format(group=g, artifact=a, version=v)
                    for g, a, v in (d.split(":") for d in dependencies)
                ),
                plugin_version=DEPENDENCY_PLUGIN_VERSION,
            )
        )
        done = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                f"-Dmaven.repo.local={cache_dir / 'm2'}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial_lib}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise error(f"mvn could not fetch {what} (exit {done.returncode}):\n{command_output_tail(done)}")
        for jar in required:
            if not (partial_lib / jar).is_file():
                raise error(f"{what}'s jars lack {jar}; see {partial_lib}")
        partial_lib.rename(lib)
        jars = len(list(lib.glob("*.jar")))
        marker.write_text(f"{', '.join(dependencies)}: {jars} jars\n")
    return lib


def _ports_text(ports: Sequence[object]) -> str:
    return f"port {ports[0]}" if len(ports) == 1 else "ports " + " and ".join(map(str, ports))


class ServiceProcess(ABC):
    """One server whose files all live in `directory`. Its process outlives this object: `start` in
    one process and `stop` in another both work, through the pid file. A subclass is a dataclass
    with the attributes below as fields, and provides the abstract parts: its install, config,
    command line and readiness probe."""

    # The subclass's fields.
    directory: Path
    host: str
    port: int
    # For tests: the kernel SIGKILLs the server when the thread that started it exits, so a killed
    # test run leaves no server behind. The CLI's servers outlive it, of course.
    exit_with_parent: bool

    service: ClassVar[str]  # "Cassandra": in messages, and the pid file's name in lower case
    error: ClassVar[type[ServiceError]]
    probe_name: ClassVar[str]  # what start() and wait() wait for: "CQL", "PING"
    start_timeout: ClassVar[float] = 120.0
    stop_timeout: ClassVar[float] = 60.0
    probe_timeout: ClassVar[float] = 5.0
    poll_interval: ClassVar[float] = 0.25

    # The process this object started, if any, and the file its output goes to.
    _proc: subprocess.Popen[bytes] | None = None
    _output: IO[bytes] | None = None

    # -- what a subclass provides ------------------------------------------------------------------

    @property
    @abstractmethod
    def config_file(self) -> Path: ...

    @property
    @abstractmethod
    def log_file(self) -> Path:
        """The server's own log."""

    @property
    @abstractmethod
    def output_file(self) -> Path:
        """The process's stdout and stderr: what fails before its log is opened lands here."""

    @abstractmethod
    def _install(self) -> Path:
        """Installs the server if needed; returns what `_command` needs (its jars, its binary)."""

    @abstractmethod
    def _ports(self) -> dict[str, int]:
        """The ports it listens on, by their names in instance.json: all must be free to start."""

    @abstractmethod
    def _configure(self, installed: Path) -> None:
        """Writes the config files (anew on every start) and makes the directories they name."""

    @abstractmethod
    def _command(self, installed: Path) -> list[str]: ...

    @abstractmethod
    def _is_this_server(self, cmdline: bytes) -> bool:
        """Whether a process with this /proc/PID/cmdline is this directory's server."""

    @abstractmethod
    def _probe(self, timeout: float) -> str | None:
        """What the server answers once it serves clients (its version, its cluster id), or None."""

    def _settings(self) -> dict[str, int]:
        """What instance.json keeps for `for_directory`: the ports, and whatever else a subclass adds."""
        return self._ports()

    @property
    def working_dir(self) -> Path:
        return self.directory

    def _preexec(self) -> Callable[[], None] | None:
        """What the forked child runs before exec (libc is loaded here, in the parent)."""
        return partial(die_with_parent, ctypes.CDLL(None)) if self.exit_with_parent else None

    # -- files ------------------------------------------------------------------------------------

    @staticmethod
    def saved_settings(directory: Path) -> dict[str, int]:
        """What the instance in `directory` last started with (ports...), or {} if it never did."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            saved: dict[str, int] = json.loads((directory / "instance.json").read_text())
            return saved
        return {}

    @property
    def pid_file(self) -> Path:
        return self.directory / f"{self.service.lower()}.pid"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the process's own output, then of the server's log."""
        parts = []
        for path in (self.output_file, self.log_file):
            last = tail(path, lines)
            if last:
                parts.append(f"--- {path} (last {len(last)} lines)\n" + "".join(last))
        return "\n".join(parts) or f"(no log in {self.output_file.parent})"

    # -- process ----------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of this directory's running server, or None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._alive(pid) else None

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        # Not our child: check that the pid is still this server, not a reused pid or a zombie.
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        return state != "Z" and self._is_this_server(cmdline)

    def status(self) -> str:
        """'running' (it answers its probe), 'starting' (process up, no answer yet) or 'stopped'."""
        if self.pid() is None:
            return "stopped"
        return "running" if self._probe(self.probe_timeout) is not None else "starting"

    def start(self, timeout: float | None = None) -> str:
        """Installs the server if needed, starts it in the background and returns its probe's answer
        once it serves clients. On a server already running on these ports it only waits for it.
        Raises the module's error (with the log's tail) if the server exits or does not answer within
        `timeout` seconds (default: the service's own); it then leaves no process behind."""
        timeout = self.start_timeout if timeout is None else timeout
        ports = self._ports()
        if self.pid() is not None:
            saved = self.saved_settings(self.directory)
            if any(saved.get(name) != port for name, port in ports.items()):
                running_on = _ports_text([saved.get(name) for name in ports])
                raise self.error(
                    f"{self.service} in {self.directory} already runs on {running_on}, "
                    f"not {_ports_text(list(ports.values()))}"
                )
            return self.wait(timeout)
        installed = self._install()
        for port in ports.values():
            if not port_is_free(self.host, port):
                raise self.error(
                    f"port {self.host}:{port} is taken: another {self.service}, or another server?"
                )
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "instance.json").write_text(json.dumps(self._settings()))
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        self._configure(installed)
        self._close_output()
        self._output = open(self.output_file, "ab")  # noqa: SIM115 - closed by stop() and kill()
        self._output.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
        self._output.flush()
        self._proc = subprocess.Popen(
            self._command(installed),
            cwd=self.working_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a Ctrl-C in the shell that ran make stays there
            preexec_fn=self._preexec(),
        )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            return self.wait(timeout)
        except ServiceError:
            self.kill()
            raise

    def wait(self, timeout: float | None = None) -> str:
        """Returns the probe's answer once the server serves clients; raises the module's error with
        the log's tail if it is not running, exits, or does not answer within `timeout` seconds."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self.pid() is None:
                code = self._proc.poll() if self._proc is not None else None
                exited = f" (exit code {code})" if code is not None else ""
                raise self.error(
                    f"{self.service} in {self.directory} is not running{exited}\n{self.log_tail()}"
                )
            # A probe never outlasts the deadline by much, nor gives up too soon on a busy machine.
            answer = self._probe(min(self.probe_timeout, max(1.0, deadline - time.monotonic())))
            if answer is not None:
                return answer
            if time.monotonic() > deadline:
                raise self.error(
                    f"{self.service} in {self.directory} did not answer {self.probe_name} on "
                    f"{self.address} within {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(self.poll_interval)

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
            time.sleep(0.05)
        return True

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def stop(self, timeout: float | None = None) -> None:
        """Stops the server cleanly (SIGTERM), or with SIGKILL if it has not exited after `timeout`
        seconds (default: the service's own). Nothing happens if it is not running."""
        pid = self.pid()
        if pid is not None:
            self._signal(pid, signal.SIGTERM)
            if not self._wait_exit(pid, self.stop_timeout if timeout is None else timeout):
                self._signal(pid, signal.SIGKILL)
                self._wait_exit(pid, 10)
        self.pid_file.unlink(missing_ok=True)
        self._close_output()

    def kill(self) -> None:
        """SIGKILL, as a crash: the server gets no chance to flush anything."""
        pid = self.pid()
        if pid is not None:
            self._signal(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10):
                raise self.error(f"{self.service} (pid {pid}) survived SIGKILL for 10 s")
        self.pid_file.unlink(missing_ok=True)
        self._close_output()

    def restart(self, timeout: float | None = None) -> str:
        """A clean stop, then a start on the same directory and ports: the data stays."""
        self.stop()
        return self.start(timeout)


# -- python -m services.NAME ---------------------------------------------------------------------


def cli_parser(
    module: str,
    description: str,
    dev_dir: Path,
    *,
    port_help: str,
    int_options: Sequence[tuple[str, str]] = (),
    timeout: float,
    waits_for: str,
) -> argparse.ArgumentParser:
    """The command line that every service module has: a command, the instance directory, its
    port(s) and other numbers (`int_options`: flag and help), and how long to wait."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{module}", description=description)
    parser.add_argument("command", choices=["start", "stop", "status", "wait", "install"])
    parser.add_argument("--dir", type=Path, default=dev_dir, help=f"instance directory (default {dev_dir})")
    parser.add_argument("--port", type=int, help=port_help)
    for flag, help_text in int_options:
        parser.add_argument(flag, type=int, help=help_text)
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds to wait for {waits_for}")
    return parser


def run_cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    server_for: Callable[[argparse.Namespace], ServiceProcess],
    install: Callable[[], Path],
) -> int:
    """Parses `argv` and runs its command on the server that `server_for` makes of the arguments (with
    `--dir` made absolute). Exit status: 0, 1 on an error, 3 for `status` of a server not running."""
    args = parser.parse_args(argv)
    args.dir = args.dir.resolve()
    server = server_for(args)
    try:
        if args.command == "install":
            print(install())
        elif args.command == "start":
            server.start(args.timeout)
            print(server.address)
        elif args.command == "wait":
            server.wait(args.timeout)
            print(server.address)
        elif args.command == "stop":
            server.stop()
        else:
            state = server.status()
            print(f"{state} {server.address} pid {server.pid()} dir {server.directory}")
            return 0 if state == "running" else 3
    except ServiceError as e:
        print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
        return 1
    return 0
