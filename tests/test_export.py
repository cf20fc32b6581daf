"""A chat's history exported over HTTP in each format, read back with pyarrow (or as JSON lines)
and compared with the history API message by message."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pychat.client import ChatClient
from pychat.export import SCHEMA, by_day, record_batch
from pychat.verify import verify_export
from tests.conftest import Clients, ServerProcess, keyspace_dropper
from tests.storekit import assert_chained

pytestmark = pytest.mark.timeout(120)


async def export(client: ChatClient, chat_id: str, fmt: str, **params: Any) -> httpx.Response:
    return await client.http.get(f"/api/chats/{chat_id}/export", params={"format": fmt, **params}, timeout=60)


def rows_of(fmt: str, body: bytes) -> list[dict[str, Any]]:
    """Exported rows as history's message objects."""
    if fmt == "jsonl":
        return [json.loads(line) for line in body.decode().splitlines() if line]
    table = pq.read_table(io.BytesIO(body)) if fmt == "parquet" else pa.ipc.open_stream(body).read_all()
    assert table.schema.equals(SCHEMA), table.schema
    out = []
    for row in table.to_pylist():
        row["created_at"] = int(row["created_at"].timestamp() * 1000)
        row["attachments"] = [{k: v for k, v in a.items() if v is not None} for a in row["attachments"]]
        row["chain"] = row["chain"].hex()
        out.append(row)
    return out


async def chat_with_history(clients: Clients, count: int) -> tuple[ChatClient, ChatClient, dict[str, Any]]:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    photo = await alice.upload(b"%PDF-1.4\n" + os.urandom(64), filename="spec.pdf")
    for i in range(count):
        sender = alice if i % 2 == 0 else bob
        attachments = [photo["media_id"]] if i == 4 else None
        await sender.post_message(
            chat["chat_id"], f'message {i} — ünïcødé 東京 "quoted"\n', attachments=attachments
        )
    return alice, bob, chat


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "jsonl"])
async def test_each_format_reads_back_as_the_history(clients: Clients, fmt: str, tmp_path: Path) -> None:
    alice, bob, chat = await chat_with_history(clients, 45)
    history = await bob.history_all(chat["chat_id"])
    r = await export(bob, chat["chat_id"], fmt)
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].startswith("attachment;")
    exported = rows_of(fmt, r.content)
    assert exported == history
    assert_chained(history)  # every message carries its chain value (pychat/chain.py)
    assert exported[4]["attachments"][0]["filename"] == "spec.pdf"
    # The file verifies on its own (`pychat verify`); a changed line does not.
    path = tmp_path / f"export.{fmt}"
    path.write_bytes(r.content)
    assert verify_export(path).as_json() == {
        "ok": True,
        "chats": 1,
        "messages": 45,
        "breaks": [],
        "notes": [],
    }
    if fmt == "jsonl":
        lines = r.content.decode().splitlines()
        lines[7] = lines[7].replace("message 7", "message seven")
        path.write_text("\n".join(lines) + "\n")
        assert [(b.seq, "edited" in b.problem) for b in verify_export(path).breaks] == [(8, True)]
    # Incremental: only what came after a seq.
    r = await export(alice, chat["chat_id"], fmt, after=40)
    assert [m["seq"] for m in rows_of(fmt, r.content)] == [41, 42, 43, 44, 45]
    path.write_bytes(r.content)
    report = verify_export(path)
    assert report.ok and report.messages == 5 and "starts at seq 41" in report.notes[0]
    r = await export(alice, chat["chat_id"], fmt, after=45)
    assert rows_of(fmt, r.content) == []


async def test_created_at_is_a_utc_timestamp_in_arrow(clients: Clients) -> None:
    _, bob, chat = await chat_with_history(clients, 1)
    r = await export(bob, chat["chat_id"], "parquet")
    table = pq.read_table(io.BytesIO(r.content))
    when = table.column("created_at")[0].as_py()
    assert when.tzinfo is not None and abs(when - datetime.datetime.now(datetime.UTC)).total_seconds() < 600


async def test_only_members_export(clients: Clients, server: ServerProcess) -> None:
    alice, _, chat = await chat_with_history(clients, 2)
    stranger = await clients.user("stranger")
    r = await export(stranger, chat["chat_id"], "jsonl")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await export(alice, "c-unknown", "jsonl")
    assert r.status_code == 404
    for params in ({"format": "csv"}, {"format": "jsonl", "after": "-1"}, {"format": "jsonl", "after": "x"}):
        r = await alice.http.get(f"/api/chats/{chat['chat_id']}/export", params=params)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", params
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        r = await anonymous.get(f"/api/chats/{chat['chat_id']}/export")
        assert r.status_code == 401


def _rss_kib(pid: int) -> int:
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
async def test_exporting_a_million_messages_keeps_the_server_small(tmp_path: Any, fmt: str) -> None:
    """1,000,000 messages stored in a SQLite file first, then served: streamed exports of all of
    them raise the server's RSS by less than 64 MiB."""
    from pathlib import Path

    from pychat.store import Chat, SendRequest, User, open_store

    data = Path(str(tmp_path))
    store = open_store("", data, "NORMAL")
    for u in ("ua", "ub"):
        store.create_user(User(u, u, None, "scrypt$x", 1))
    store.create_chat(Chat("c1", "direct", None, "ua", 1, 0, ["ua", "ub"]), "ua|ub")
    total = 1_000_000
    for start in range(0, total, 5_000):
        store.append_batch(
            [
                SendRequest("ua", "c1", f"k{i:08d}", f"message {i} of a long history", [])
                for i in range(start, start + 5_000)
            ],
            [],
        )
    store.close()
    srv = ServerProcess(data)
    srv.start()
    try:
        from pychat.auth import TokenIssuer

        token, _ = TokenIssuer(srv.secret, 3600).issue("ub")
        assert srv.proc is not None
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}) as http:
            # Warm up the path (imports, threads, the driver) on a small slice.
            r = await http.get("/api/chats/c1/export", params={"format": fmt, "after": total - 10})
            assert r.status_code == 200
            before = _rss_kib(srv.proc.pid)
            size = 0
            peak = before
            # Every row, counted: JSON lines as they come; Parquet (its index is at its end) on disk.
            seqs: list[int] = []
            tail = b""
            saved = data / f"export.{fmt}"
            with saved.open("wb") as sink:
                async with http.stream(
                    "GET", "/api/chats/c1/export", params={"format": fmt}, timeout=300
                ) as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_bytes():
                        size += len(chunk)
                        peak = max(peak, _rss_kib(srv.proc.pid))
                        if fmt == "jsonl":
                            *lines, tail = (tail + chunk).split(b"\n")
                            seqs += [json.loads(line)["seq"] for line in lines]
                        else:
                            sink.write(chunk)
            if fmt == "parquet":
                seqs = pq.read_table(saved, columns=["seq"]).column("seq").to_pylist()
            growth = (peak - before) / 1024
            print(
                f"{fmt}: {size / 1e6:.1f} MB exported, {len(seqs)} rows,"
                f" server RSS {before / 1024:.1f} MiB, peak +{growth:.1f} MiB"
            )
            assert tail == b"" and len(seqs) == total, (len(seqs), tail[:100])
            assert seqs == list(range(1, total + 1)), "each message once, in order"
            assert growth < 64, growth
    finally:
        srv.stop()


def test_files_split_by_day_hold_runs_of_consecutive_messages() -> None:
    """A clock that steps back over midnight gives a day twice, never interleaved seqs."""
    day = 86_400_000
    at = [5 * day - 2, 5 * day + 1, 5 * day - 1, 5 * day - 1, 5 * day + 3]
    batch = record_batch(
        [("c", i + 1, f"m{i}", "u", "x", "[]", t, None, bytes(32)) for i, t in enumerate(at)]
    )
    runs = [(name, part.column("seq").to_pylist()) for name, part in by_day(batch)]
    assert runs == [("1970-01-05", [1]), ("1970-01-06", [2]), ("1970-01-05", [3, 4]), ("1970-01-06", [5])]


def _start_export(srv: ServerProcess, token: str, fmt: str = "arrow") -> tuple[socket.socket, bytes]:
    """An export whose client reads its answer's head and then nothing more."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    s.connect(("127.0.0.1", srv.port))
    s.sendall(
        f"GET /api/chats/big/export?format={fmt} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    return s, head


@pytest.mark.timeout(600)
def test_concurrent_and_stalled_exports_keep_the_server_small(
    tmp_path: Path, store_env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    """15 exports at once of a 48 MB chat by its 5 members, whose clients read nothing: 8 run (at
    most 2 per user), the others are refused with `rate_limited` or `unavailable` and Retry-After,
    and the server grows by less than 400 MiB (before: all 15 ran, each holding its whole chat,
    2+ GB). A client that takes nothing for `rest_send_timeout_ms` is abandoned: its export's
    memory is let go and its slot is free again."""
    from pychat.auth import TokenIssuer
    from pychat.store import Chat, SendRequest, User, open_store

    members = [f"u{i}" for i in range(5)]
    data = tmp_path / "data"
    data.mkdir()
    store = open_store(store_env.get("PYCHAT_STORE", ""), data, "NORMAL")
    for u in members:
        store.create_user(User(u, u, None, "scrypt$x", 1))
    store.create_chat(Chat("big", "group", "big", "u0", 1, 0, members), None)
    for start in range(0, 3_000, 100):
        store.append_batch(
            [
                SendRequest("u0", "big", f"k{i:06d}", f"{i:06d}" + "x" * 16_000, [])
                for i in range(start, start + 100)
            ],
            [],
        )
    store.close()
    drop = keyspace_dropper(request, store_env)
    srv = ServerProcess(data, env={**store_env, "PYCHAT_REST_SEND_TIMEOUT_MS": "3000"})
    srv.start()
    held: list[socket.socket] = []
    try:
        assert srv.proc is not None
        tokens = {u: TokenIssuer(srv.secret, 3600).issue(u)[0] for u in members}
        before = _rss_kib(srv.proc.pid)
        with ThreadPoolExecutor(15) as pool:
            started = list(pool.map(lambda u: (u, *_start_export(srv, tokens[u])), members * 3))
        held = [s for _, s, _ in started]
        peak = before
        for _ in range(20):  # while they are held (they are abandoned after 3 s)
            peak = max(peak, _rss_kib(srv.proc.pid))
            time.sleep(0.1)
        growth = (peak - before) / 1024
        print(f"stalled exports: server RSS {before / 1024:.0f} MiB, peak +{growth:.0f} MiB")
        assert growth < 400, growth
        status = [(u, int(head.split(b" ", 2)[1])) for u, _, head in started]
        running = [u for u, code in status if code == 200]
        assert len(running) == 8 and max(running.count(u) for u in members) <= 2, status
        for _, _, head in started:
            code = int(head.split(b" ", 2)[1])
            assert code in (200, 429, 503) and (code == 200 or b"retry-after: 5" in head.lower()), head
        # Abandoned after 3 s (or cut by the kernel before): all 8 slots are free again.
        deadline = time.monotonic() + 30
        while True:
            with ThreadPoolExecutor(8) as pool:
                again = list(pool.map(lambda u: _start_export(srv, tokens[u]), members[:4] * 2))
            for s, _ in again:
                s.close()
            if all(h.startswith(b"HTTP/1.1 200") for _, h in again) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(h.startswith(b"HTTP/1.1 200") for _, h in again), [h[:12] for _, h in again]
        # And an export read to its end is whole (once the ones just closed have let go).
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {tokens['u4']}"}) as http:
            r = http.get("/api/chats/big/export", params={"format": "arrow"}, timeout=120)
            while r.status_code == 503 and time.monotonic() < deadline + 30:
                time.sleep(0.5)
                r = http.get("/api/chats/big/export", params={"format": "arrow"}, timeout=120)
        assert r.status_code == 200 and len(rows_of("arrow", r.content)) == 3_000
    finally:
        for s in held:
            s.close()
        srv.stop()
        drop(srv.env)


def _doc_block(path: Path, containing: str) -> str:
    """The fenced code block of a doc that contains `containing`, as written there."""
    blocks = path.read_text().split("```")[1::2]
    (block,) = [b for b in blocks if containing in b]
    return block.split("\n", 1)[1]  # past the language tag


OPERATOR_EXPORT_EXAMPLE = _doc_block(
    Path(__file__).resolve().parent.parent / "docs" / "operator.md", "format=parquet"
)


def _run_shell(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.stores("sqlite")  # the example reads an export's files: the store is beside the point
async def test_the_operator_guides_pyarrow_example_prints_the_last_messages(
    clients: Clients, server: ServerProcess, tmp_path: Path
) -> None:
    """docs/operator.md's export example, run as written against a real export (of fewer and of
    more than the 3 messages it prints)."""
    # Its `.venv/bin/python`, from the directory it is run in: this test's Python.
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    alice = await clients.user("alice")
    chat = await alice.create_group("g", [])
    env = {**os.environ, "API": f"{server.url}/api", "TOKEN": alice.token, "CHAT": chat["chat_id"]}
    sent = 0
    for count in (2, 5):
        for i in range(sent, count):
            await alice.post_message(chat["chat_id"], f"message {i}")
        sent = count
        done = await asyncio.to_thread(_run_shell, OPERATOR_EXPORT_EXAMPLE, tmp_path, env)
        assert done.returncode == 0, done.stderr
        shown = re.findall(r"'content': '([^']*)'", done.stdout)  # the rows as Python prints them
        assert shown == [f"message {i}" for i in range(max(count - 3, 0), count)], done.stdout
