"""`pychat user list`, `pychat user passwd` and `pychat doctor`, as subprocesses on real data dirs,
against real servers, a real terminal (a pty) and real Kafka, Redis and Cassandra nodes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import socket
import sqlite3
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.cassandra import CassandraServer
from services.kafka import KafkaServer
from services.process import free_port
from services.redis import RedisServer
from tests.conftest import ServerProcess, keyspace_dropper, started

pytestmark = pytest.mark.timeout(300)


def _cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pychat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _login(url: str, name: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}/api/auth/token", json={"username": name, "password": password}, timeout=10)


# user list


@pytest.fixture
def own_store(store_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The environment that puts a command on a store of the test's own (SQLite in its data dir,
    or a Cassandra keyspace dropped afterwards)."""
    env = dict(store_env)
    if "PYCHAT_STORE" in env:
        env["PYCHAT_STORE"] = env["PYCHAT_STORE"].rsplit("/", 1)[0] + f"/cli_{uuid.uuid4().hex[:12]}"
    drop = keyspace_dropper(request, store_env)
    yield env
    drop(env)


def test_user_list_shows_ids_names_and_creation_times_and_no_secrets(
    tmp_path: Path, own_store: dict[str, str]
) -> None:
    data = tmp_path / "data"
    added = [
        _cli("user", "add", n, "--password", "password123", "--data-dir", str(data), env=own_store)
        for n in ("zoe", "Adam", "mia")
    ]
    made = [json.loads(a.stdout) for a in added]
    listed = _cli("user", "list", "--data-dir", str(data), env=own_store)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["user_id", "username", "created", "(UTC)"]
    rows = [line.split() for line in lines[1:]]
    assert [r[1] for r in rows] == ["Adam", "mia", "zoe"], "by username, any case"
    by_name = {u["username"]: u for u in made}
    for user_id, name, day, clock in rows:
        assert user_id == by_name[name]["user_id"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", day) and re.fullmatch(r"\d\d:\d\d:\d\d", clock)
    as_json = json.loads(_cli("user", "list", "--json", "--data-dir", str(data), env=own_store).stdout)
    assert [set(u) for u in as_json] == [{"user_id", "username", "display_name", "created_at"}] * 3
    assert "scrypt" not in listed.stdout + json.dumps(as_json), "no password hashes"
    assert all(u["token"] not in listed.stdout for u in made), "no tokens"
    if own_store:
        return  # the rest is SQLite's: a data dir with no database is said so, and none is made
    empty = _cli("user", "list", "--data-dir", str(tmp_path / "typo"))
    assert empty.returncode == 2 and "no store" in empty.stderr, empty.stderr
    assert not (tmp_path / "typo").exists()


# user passwd


def test_user_passwd_from_stdin_changes_the_login_and_keeps_issued_tokens(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory()

    def passwd(name: str, line: str) -> subprocess.CompletedProcess[str]:
        args = ["user", "passwd", name, "--password-stdin", "--data-dir", str(srv.data_dir)]
        return _cli(*args, stdin=line + "\n", env=srv.env)

    httpx.post(f"{srv.url}/api/users", json={"username": "pat", "password": "old password"}, timeout=10)
    old_token = _login(srv.url, "pat", "old password").json()["token"]
    # Refused as registration refuses it: nothing changes.
    short = passwd("pat", "short")
    assert short.returncode == 2 and "at least 8" in short.stderr, short.stderr
    huge = passwd("pat", "x" * 1025)
    assert huge.returncode == 2 and "at most 1024" in huge.stderr, huge.stderr
    nobody = passwd("nobody", "long enough")
    assert nobody.returncode == 2 and "no such user" in nobody.stderr
    assert _login(srv.url, "pat", "old password").status_code == 200
    done = passwd("pat", "a new pass phrase")
    assert done.returncode == 0, done.stderr
    assert "stay valid" in done.stderr
    assert _login(srv.url, "pat", "old password").status_code == 401
    assert _login(srv.url, "pat", "a new pass phrase").status_code == 200, "the running server reads it"
    # As the docs say: a token issued before the change works until it expires.
    mine = httpx.get(f"{srv.url}/api/chats", headers={"Authorization": f"Bearer {old_token}"}, timeout=10)
    assert mine.status_code == 200


def _at_a_terminal(args: list[str], answers: list[str]) -> tuple[int, str]:
    """Runs `pychat ARGS` on a pty of its own (its controlling terminal, where getpass asks),
    answering each prompt in turn; its exit status and everything it showed."""
    main, tty = os.openpty()

    def take_the_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "pychat", *args],
        stdin=tty,
        stdout=tty,
        stderr=tty,
        start_new_session=True,
        preexec_fn=take_the_terminal,  # after setsid, before exec
    )
    os.close(tty)
    shown, fresh, pending = b"", b"", list(answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([main], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the command exited, its end of the pty is closed
            break
        shown, fresh = shown + chunk, fresh + chunk
        if pending and fresh.endswith(b": "):  # a prompt, waiting for its answer
            os.write(main, pending.pop(0).encode() + b"\n")
            fresh = b""
    os.close(main)
    return proc.wait(30), shown.decode(errors="replace")


def test_user_passwd_asks_twice_at_the_terminal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert _cli("user", "add", "kim", "--password", "first password", "--data-dir", str(data)).returncode == 0
    status, shown = _at_a_terminal(
        ["user", "passwd", "kim", "--data-dir", str(data)], ["second pass", "other pass"]
    )
    assert status == 2 and "differ" in shown, shown
    assert "second pass" not in shown, "not echoed"
    status, shown = _at_a_terminal(
        ["user", "passwd", "kim", "--data-dir", str(data)], ["second pass", "second pass"]
    )
    assert status == 0, shown
    assert "new password for kim:" in shown and "again:" in shown
    srv = ServerProcess(data)
    srv.start()
    try:
        assert _login(srv.url, "kim", "first password").status_code == 401
        assert _login(srv.url, "kim", "second pass").status_code == 200
    finally:
        srv.stop()


# doctor


def _doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    done = _cli("doctor", *args, env=env)
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith(("ok    ", "FAIL  ")) for line in lines), done.stdout + done.stderr
    return done.returncode, lines


def _failed(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL")]


def test_doctor_passes_a_ready_data_dir_and_a_running_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    status, lines = _doctor("--data-dir", str(tmp_path / "new"), *ports)
    assert status == 0 and not _failed(lines), lines
    assert any("store: sqlite" in line and "not made yet" in line for line in lines)
    assert not (tmp_path / "new").exists(), "doctor makes nothing"
    data.mkdir()
    srv = ServerProcess(data)
    srv.start()
    try:
        status, lines = _doctor(
            "--data-dir", str(data), "--port", str(srv.port), "--ws-port", str(srv.ws_port)
        )
        assert status == 0, lines
        assert any(
            line.startswith("ok    store:") and "schema" in line and "(current)" in line for line in lines
        )
        rest, gateway = (
            next(line for line in lines if what in line) for what in ("REST port", "WebSocket port")
        )
        assert "in use by a pychat server" in rest and "answers /healthz" in rest, rest
        assert "in use by a pychat WebSocket gateway" in gateway, gateway
    finally:
        srv.stop()


def test_doctor_reports_bad_values_and_a_configuration_that_does_not_load(tmp_path: Path) -> None:
    toml = tmp_path / "pychat.toml"
    toml.write_text(
        "port = 9000\nws_port = 9000\nbatch_max = -1\nlog_level = 'loud'\nsecret_key = 'short'\n"
        "[limits]\nmax_content_bytes = 0\n"
    )
    status, lines = _doctor("--config", str(toml), "--data-dir", str(tmp_path / "data"))
    assert status == 1
    failed = "\n".join(_failed(lines))
    for setting in ("ws_port", "batch_max", "log_level", "secret_key", "limits.max_content_bytes"):
        assert f"config: {setting}:" in failed, (setting, failed)
    assert all("fix: " in line for line in _failed(lines)), "each says how to fix it"
    assert "PYCHAT_BATCH_MAX" in failed
    # One that does not load: that line alone.
    toml.write_text("port = 'eighty'\n")
    status, lines = _doctor("--config", str(toml))
    assert status == 1 and len(lines) == 1 and lines[0].startswith("FAIL  config:") and "port" in lines[0]
    toml.write_text("port = [\n")
    status, lines = _doctor("--config", str(toml))
    assert status == 1 and len(lines) == 1 and lines[0].startswith("FAIL  config:")
    status, lines = _doctor(env={"PYCHAT_NOT_A_SETTING": "1", "PYCHAT_HEARTBEAT_S": "soon"})
    assert status == 1 and "heartbeat_s" in lines[0]


def test_doctor_reports_closed_ports_and_a_port_held_by_something_else(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    media = tmp_path / "media"
    media.mkdir()
    toml = tmp_path / "node.toml"
    toml.write_text(
        f"kafka = '127.0.0.1:{closed}'\nredis = 'redis://127.0.0.1:{closed}/0'\n"
        f"store = 'cassandra://127.0.0.1:{closed}/pychat'\nmedia_store = 'file://{media}'\n"
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        status, lines = _doctor(
            "--config",
            str(toml),
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(taken),
            "--ws-port",
            str(free_port()),
        )
    assert status == 1
    failed = _failed(lines)
    assert len(failed) == 4, lines
    store, rest, kafka, redis = failed
    assert store.startswith(f"FAIL  store: cassandra 127.0.0.1:{closed}") and "nothing answers" in store
    assert "make cassandra" in store
    assert rest.startswith(f"FAIL  REST port 127.0.0.1:{taken}: in use by another program"), rest
    assert kafka.startswith(f"FAIL  kafka 127.0.0.1:{closed}: nothing answers"), kafka
    assert redis.startswith(f"FAIL  redis redis://127.0.0.1:{closed}/0: no answer"), redis


def test_doctor_reports_an_old_schema_until_migrate_upgrades_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "pychat.db") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '6')")
    db.close()
    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    status, lines = _doctor("--data-dir", str(data), *ports)
    assert status == 1
    (store,) = _failed(lines)
    assert "schema 6, older" in store and "pychat migrate" in store, store
    assert _cli("migrate", "--data-dir", str(data)).returncode == 0
    status, lines = _doctor("--data-dir", str(data), *ports)
    assert status == 0, lines
    (data / "pychat.db").write_bytes(b"not a database at all" * 100)
    status, lines = _doctor("--data-dir", str(data), *ports)
    (store,) = _failed(lines)
    assert status == 1 and "does not open as a pychat database" in store, store


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[RedisServer]:
    node = started(RedisServer(tmp_path / "redis", port=free_port(), exit_with_parent=True))
    yield node
    node.stop()


@pytest.mark.timeout(900)
def test_doctor_passes_a_cluster_node_whose_services_answer(
    tmp_path: Path, cassandra: CassandraServer, kafka: KafkaServer, redis_node: RedisServer
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    keyspace = f"doctor_{os.getpid()}"
    toml = tmp_path / "node.toml"
    toml.write_text(
        f"kafka = '{kafka.bootstrap_servers}'\nredis = 'redis://127.0.0.1:{redis_node.port}/0'\n"
        f"store = 'cassandra://{cassandra.host}:{cassandra.port}/{keyspace}'\nmedia_store = 'file://{media}'\n"
    )
    ports = ["--port", str(free_port()), "--ws-port", str(free_port())]
    status, lines = _doctor("--config", str(toml), "--data-dir", str(tmp_path / "d"), *ports)
    assert status == 0, lines
    assert any(line.startswith("ok    store: cassandra") and "not made yet" in line for line in lines), lines
    assert any(line.startswith("ok    kafka") and "Kafka answers" in line for line in lines), lines
    assert any(line.startswith("ok    redis") and "Redis" in line for line in lines), lines
    url = f"cassandra://{cassandra.host}:{cassandra.port}/{keyspace}"
    assert _cli("migrate", "--data-dir", str(tmp_path / "d"), "--store", url).returncode == 0
    status, lines = _doctor("--config", str(toml), "--data-dir", str(tmp_path / "d"), *ports)
    assert status == 0 and any("store: cassandra" in line and "(current)" in line for line in lines), lines
