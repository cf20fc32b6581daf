"""The Autobahn test suite's fuzzing client (`wstest -m fuzzingclient`, autobahntestsuite, Apache-2.0)
against pychat's WebSocket gateway: installed from PyPI by the project itself into a Python 2.7
virtualenv (its runner is Python 2 only), then run against a pychat server of its own.

    python -m services.autobahn install
    python -m services.autobahn run [--cases 1.*,2.*,...] [--out test-results/autobahn]

Python 2.7 is pyenv's (~/.pyenv/versions/2.7.*) or Debian's (/usr/bin/python2.7); the install takes
virtualenv from PyPI into `~/.cache/pychat/autobahn/vtool` (`$PYCHAT_CACHE` moves `~/.cache/pychat`),
makes `autobahn/venv` with it and installs the pinned requirements below there, once: a second
install finds them and does nothing.

`run` starts `pychat serve` on free ports in a temporary data dir with the heartbeat at its maximum
(see `HEARTBEAT_S`), registers a user, and runs the cases on
`ws://127.0.0.1:PORT/ws?token=...`. The reports go to the output folder: `index.json`, one JSON per
case, and Autobahn's HTML. `tests/autobahn_check.py` reads them: pychat is not an echo server, and
it sends a `hello` frame first on every connection, which Autobahn's own verdicts do not know.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from services.cluster import ClusterError, Node
from services.process import CACHE_DIR, HOST, ServiceError, command_output_tail, free_port, install_lock

__all__ = ["CASES", "REQUIREMENTS", "AutobahnError", "install", "python27", "run"]

HOME = CACHE_DIR / "autobahn"
VTOOL = HOME / "vtool"
VENV = HOME / "venv"
WSTEST = VENV / "bin" / "wstest"
VIRTUALENV = "virtualenv==20.15.1"  # the last virtualenv that makes Python 2.7 environments
# Every package of the runner, pinned: the newest releases that still install on Python 2.7.
REQUIREMENTS = (
    "autobahntestsuite==25.10.1",
    "autobahn==0.10.9",
    "Twisted==19.10.0",
    "zope.interface==4.6.0",
    "klein==17.10.0",
    "jinja2==2.11.3",
    "Werkzeug==1.0.1",
    "cryptography==3.3.2",
    "service-identity==18.1.0",
    "pyOpenSSL==19.1.0",
    "markupsafe==1.1.1",
    "unittest2==1.1.0",
    "txaio==2.1.0",
    "six==1.16.0",
    "incremental==16.10.1",
    "setuptools==44.0.0",
    "Automat==22.10.0",
    "PyHamcrest==1.10.1",
    "attrs==21.4.0",
    "cffi==1.15.1",
    "constantly==15.1.0",
    "enum34==1.1.10",
    "hyperlink==21.0.0",
    "idna==2.10",
    "ipaddress==1.0.23",
    "pyasn1==0.5.1",
    "pyasn1-modules==0.3.0",
    "pycparser==2.21",
    "traceback2==1.4.0",
    "linecache2==1.0.0",
    "typing==3.10.0.0",
    "ujson==2.0.3",
    "wsaccel==0.6.6",
    "argparse==1.4.0",
)
PYTHON27_CANDIDATES = (
    # pyenv's newest 2.7 first (2.7.18 before 2.7.9).
    *sorted(
        Path.home().glob(".pyenv/versions/2.7.*/bin/python"),
        key=lambda p: [int(n) if n.isdigit() else -1 for n in p.parent.parent.name.split(".")],
        reverse=True,
    ),
    Path("/usr/bin/python2.7"),
)
# RFC 6455's cases: framing (1, 2), reserved bits and opcodes (3, 4), fragmentation (5), UTF-8 (6),
# closing (7), limits and performance (9), misc (10). Not 12 and 13: pychat has no permessage-deflate.
CASES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*")
OUT_DIR = Path("test-results") / "autobahn"
AGENT = "pychat"
# An hour, the most the gateway takes (it clamps heartbeat_s to 1..3600), so nobody is dropped for
# silence. The sweep still pings each connection once per heartbeat, in slices (connection id
# modulo 3600 against a counter of seconds), so the first few cases, whose ids are near the count,
# can get one ping: the client answers it, and Autobahn keeps pings out of a case's events.
HEARTBEAT_S = 3600
PASSWORD = "autobahn fuzzing client"
# The whole run takes about 2.5 minutes: a client stuck for this long is stopped.
RUN_TIMEOUT = 900.0


# Python 2, run by the runner's own interpreter: wstest with one change. pychat sends a `hello` text
# frame first on every connection, before it reads anything. The fuzzing client would take it for
# part of its case's answer: no case would match what it expects, and the client would close on its
# timers instead (with 1001, late). So the client sets a connection's first message aside when it is
# that hello, and says in the case's report whether it was ("pychatHello"); any other first message
# stays in "received", where it fails the case.
_WSTEST = r"""
import sys
from autobahntestsuite import fuzzing, wstest

HELLO = '{"type":"hello"'
Protocol = fuzzing.FuzzingClientProtocol
Factory = fuzzing.FuzzingClientFactory
on_message, connection_lost, log_case = Protocol.onMessage, Protocol.connectionLost, Factory.logCase

def onMessage(self, msg, binary):
    if self.runCase is not None and not hasattr(self, "pychat_hello"):
        self.pychat_hello = not binary and msg.startswith(HELLO)
        if self.pychat_hello:
            return
    on_message(self, msg, binary)

def connectionLost(self, reason):
    self.factory.pychat_hello = getattr(self, "pychat_hello", False)
    connection_lost(self, reason)

def logCase(self, result):
    result["pychatHello"] = self.pychat_hello
    log_case(self, result)

Protocol.onMessage, Protocol.connectionLost, Factory.logCase = onMessage, connectionLost, logCase
sys.argv[0] = "wstest"
sys.exit(wstest.run())
"""


class AutobahnError(ServiceError):
    """The fuzzing client could not be installed or run; the message says why."""


def python27() -> Path:
    """pyenv's or Debian's Python 2.7, the only Python Autobahn's runner runs on."""
    for candidate in PYTHON27_CANDIDATES:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise AutobahnError(
        "Autobahn's wstest needs Python 2.7: install it with `pyenv install 2.7.18` "
        "(Debian 12 has no python2.7 package)"
    )


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise AutobahnError(f"{what} failed (exit {done.returncode}):\n{command_output_tail(done)}")


def install() -> Path:
    """Returns the path of `wstest`, installing the runner (as above) only the first time, or when
    the pins changed. Several processes may call it at once: one installs, the others wait."""
    marker = HOME / "installed"
    wanted = "\n".join(REQUIREMENTS) + "\n"

    def complete() -> bool:
        return WSTEST.is_file() and marker.is_file() and marker.read_text() == wanted

    if complete():
        return WSTEST
    with install_lock(HOME):
        if complete():  # installed while this one waited
            return WSTEST
        marker.unlink(missing_ok=True)
        python = str(python27())
        quiet = ["-q", "--disable-pip-version-check"]
        if not (VTOOL / "virtualenv").is_dir():
            shutil.rmtree(VTOOL, ignore_errors=True)
            _run(
                [python, "-m", "pip", "install", *quiet, "--target", str(VTOOL), VIRTUALENV],
                f"pip install {VIRTUALENV} (with {python})",
            )
        shutil.rmtree(VENV, ignore_errors=True)
        _run(
            [python, "-m", "virtualenv", "-q", str(VENV)],
            f"virtualenv {VENV} (with {python})",
            env={"PYTHONPATH": str(VTOOL)},
        )
        requirements = HOME / "requirements.txt"
        requirements.write_text(wanted)
        _run(
            [str(VENV / "bin" / "pip"), "install", *quiet, "-r", str(requirements)],
            f"pip install -r {requirements}",
        )
        if not WSTEST.is_file():
            raise AutobahnError(f"autobahntestsuite installed, but there is no {WSTEST}")
        marker.write_text(wanted)
    return WSTEST


def _token(url: str) -> str:
    """Registers a user on the server at `url` and returns a WebSocket token of theirs."""
    account = {"username": f"autobahn{secrets.token_hex(4)}", "password": PASSWORD}
    with httpx.Client(base_url=url, timeout=30) as http:
        http.post("/api/users", json=account).raise_for_status()
        got = http.post("/api/auth/token", json=account)
        got.raise_for_status()
        return str(got.json()["token"])


def _fuzz(wstest: Path, spec_file: Path, log_file: Path) -> None:
    """Runs the fuzzing client on `spec_file`, its output (a line per case) into `log_file`."""
    command = [str(wstest.parent / "python"), "-c", _WSTEST, "-m", "fuzzingclient", "-s", str(spec_file)]
    with open(log_file, "wb") as log:
        try:
            done = subprocess.run(
                command,
                cwd=spec_file.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=RUN_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            raise AutobahnError(f"wstest did not finish in {RUN_TIMEOUT:.0f} s; see {log_file}") from e
    if done.returncode != 0:
        raise AutobahnError(f"wstest exited with {done.returncode}; see {log_file}")


def run(cases: list[str], out_dir: Path, exclude: list[str] | None = None) -> float:
    """Runs the fuzzing client's `cases` against a pychat server of its own, writes the reports in
    `out_dir` (anew) and returns how long the cases took, in seconds."""
    wstest = install()
    out_dir = out_dir.resolve()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="pychat-autobahn-") as tmp:
        port, ws_port = free_port(), free_port()
        node = Node(
            "autobahn",
            Path(tmp),
            port,
            ws_port,
            {
                "PYCHAT_PORT": str(port),
                "PYCHAT_WS_PORT": str(ws_port),
                "PYCHAT_HEARTBEAT_S": str(HEARTBEAT_S),
                "PYCHAT_LOG_LEVEL": "warning",
            },
        )
        try:
            node.start()
            spec = {
                "outdir": str(out_dir),
                "servers": [{"agent": AGENT, "url": f"ws://{HOST}:{ws_port}/ws?token={_token(node.url)}"}],
                "cases": cases,
                "exclude-cases": exclude or [],
                "exclude-agent-cases": {},
            }
            spec_file = Path(tmp) / "fuzzingclient.json"
            spec_file.write_text(json.dumps(spec, indent=2))
            started = time.monotonic()
            _fuzz(wstest, spec_file, out_dir / "wstest.log")
            took = time.monotonic() - started
        finally:
            node.stop()
            if node.log_file.is_file():
                shutil.copy(node.log_file, out_dir / "pychat.log")
    if not (out_dir / "index.json").is_file():
        raise AutobahnError(f"wstest wrote no report; see {out_dir / 'wstest.log'}")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.autobahn", description="Autobahn's fuzzing client against pychat."
    )
    parser.add_argument("command", choices=["install", "run"])
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated case patterns (default {','.join(CASES)})"
    )
    parser.add_argument("--exclude", default="", help="comma-separated case patterns to leave out")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"report folder (default {OUT_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(install())
            return 0
        cases = [c for c in args.cases.split(",") if c]
        took = run(cases, args.out, [c for c in args.exclude.split(",") if c])
    except (ServiceError, ClusterError, httpx.HTTPError) as e:
        print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
        return 1
    print(f"autobahn: {', '.join(cases)} in {took:.0f} s; reports in {args.out}/ (index.json, index.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
