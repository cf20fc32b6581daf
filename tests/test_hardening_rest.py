"""REST over a real server where things go wrong: the write lock held by someone else, a
damaged chat, members leaving and coming back, overload answers and registration floods."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import PASSWORD, Clients, ServerProcess, unique_name
from tests.test_contract import OPENAPI, check_rest
from tests.test_messaging import open_raw

Factory = Callable[..., ServerProcess]


@pytest.mark.stores("sqlite")  # reads or locks the SQLite file itself
async def test_rest_reads_and_healthz_answer_while_a_rest_write_waits_for_the_write_lock(
    server_factory: Factory,
) -> None:
    srv = server_factory()
    clients = Clients(srv)
    alice, bob = await clients.user("lock"), await clients.user("lockb")
    before = await alice.create_group("before", [bob.user_id])
    # Another process holds SQLite's write lock: the server's writes wait (busy timeout 10 s).
    lock = sqlite3.connect(srv.data_dir / "pychat.db", isolation_level=None, timeout=10)
    lock.execute("BEGIN IMMEDIATE")
    try:
        body = {"kind": "group", "title": "during", "members": [bob.user_id]}
        write = asyncio.create_task(alice.http.post("/api/chats", json=body, timeout=60))
        # Give the write time to reach the lock; nothing below depends on how long it took.
        await asyncio.sleep(0.5)
        assert not write.done()
        health = await alice.http.get("/healthz", timeout=60)
        listed = await alice.http.get("/api/chats", timeout=60)
        assert not write.done(), "the reads were answered while the write still waited for the lock"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert listed.status_code == 200
    assert [c["chat_id"] for c in listed.json()["chats"]] == [before["chat_id"]]
    created = await write
    assert created.status_code == 201, created.text
    assert {c["chat_id"] for c in await alice.list_chats()} == {before["chat_id"], created.json()["chat_id"]}
    await clients.close()


@pytest.mark.stores("sqlite")  # reads or locks the SQLite file itself
async def test_a_chat_whose_last_seq_fell_behind_keeps_taking_messages_without_reusing_a_seq(
    server_factory: Factory,
) -> None:
    srv = server_factory()
    clients = Clients(srv)
    alice, bob = await clients.user("dmg"), await clients.user("dmgb")
    damaged = (await alice.create_group("damaged", [bob.user_id]))["chat_id"]
    fine = (await alice.create_group("fine", [bob.user_id]))["chat_id"]
    for i in range(3):
        await alice.post_message(damaged, f"m{i}")
    # As after restoring an old copy of the chats table: last_seq behind the stored messages.
    db = sqlite3.connect(srv.data_dir / "pychat.db", isolation_level=None, timeout=10)
    db.execute("UPDATE chats SET last_seq = 1 WHERE chat_id = ?", (damaged,))
    db.close()
    acks = [await bob.post_message(damaged, "after the damage"), await bob.post_message(fine, "elsewhere")]
    acks.append(await alice.post_message(damaged, "and on"))
    assert [a["seq"] for a in acks] == [4, 1, 5]
    history = await bob.history_all(damaged)
    assert [m["seq"] for m in history] == [1, 2, 3, 4, 5]
    assert [m["content"] for m in history] == ["m0", "m1", "m2", "after the damage", "and on"]
    assert {c["chat_id"]: c["last_seq"] for c in await bob.list_chats()} == {damaged: 5, fine: 1}
    await clients.close()


async def test_read_pointers_are_kept_when_a_member_is_removed_and_added_again(
    server: ServerProcess, clients: Clients
) -> None:
    alice, bob = await clients.user("ptr"), await clients.user("ptrb")
    chat_id = (await alice.create_group("pointers", [bob.user_id]))["chat_id"]
    acks = [await alice.post_message(chat_id, f"m{i}") for i in range(1, 4)]
    read = await bob.request("POST", f"/api/messages/{acks[1]['message_id']}/read")
    assert read == {"chat_id": chat_id, "seq": 2}
    assert await alice.request("DELETE", f"/api/chats/{chat_id}/members/{bob.user_id}") is None
    await alice.post_message(chat_id, "while bob is away")
    await alice.request("POST", f"/api/chats/{chat_id}/members", json={"user_id": bob.user_id})

    unread = {c["chat_id"]: c["unread"] for c in await bob.list_chats()}
    assert unread[chat_id] == 2, "messages 3 and 4, not the whole history"
    at_2 = await bob.request("GET", f"/api/chats/{chat_id}/receipts", params={"seq": 2})
    assert bob.user_id in at_2["read"] and bob.user_id in at_2["delivered"]
    at_3 = await bob.request("GET", f"/api/chats/{chat_id}/receipts", params={"seq": 3})
    assert bob.user_id not in at_3["read"]
    # A sync that does not name the chat starts at the read pointer: only what is new to bob.
    ws = await open_raw(server, bob)
    backlog = [f["seq"] for f in ws.frames if f["type"] == "msg" and f["chat_id"] == chat_id]
    assert backlog == [3, 4]
    await ws.ws.close()


async def test_unavailable_answers_carry_retry_after_ms_and_a_retry_after_header(server_factory: Any) -> None:
    made = Clients(server_factory({"PYCHAT_SEARCH": "false"}))
    alice = await made.user("busy")
    r = await alice.http.get("/api/search", params={"q": "x"})  # search turned off: 503
    await made.close()
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "unavailable"
    assert isinstance(error["retry_after_ms"], int) and error["retry_after_ms"] >= 1
    assert r.headers["retry-after"] == str(max(1, math.ceil(error["retry_after_ms"] / 1000)))
    check_rest("Error", r.json())


async def _register(http: httpx.AsyncClient, name: str) -> httpx.Response:
    return await http.post("/api/users", json={"username": name, "password": PASSWORD})


async def test_registration_is_rate_limited_per_client_address(server_factory: Factory) -> None:
    srv = server_factory({"PYCHAT_REGISTER_PER_MIN": "3"})
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        # Malformed requests cost nothing (no hash is computed for them).
        assert (await http.post("/api/users", json={"username": "x"})).status_code == 400
        names = [unique_name("reg") for _ in range(4)]
        for name in names[:3]:
            assert (await _register(http, name)).status_code == 201
        r = await _register(http, names[3])
        assert r.status_code == 429
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and error["retry_after_ms"] >= 1
        assert r.headers["retry-after"] == str(max(1, math.ceil(error["retry_after_ms"] / 1000)))
        check_rest("Error", r.json())
        assert "429" in OPENAPI["paths"]["/api/users"]["post"]["responses"]
        refused = await http.post("/api/auth/token", json={"username": names[3], "password": PASSWORD})
        assert refused.status_code == 401, "the refused registration stored nothing"
        # Logging in is not registering.
        login = await http.post("/api/auth/token", json={"username": names[0], "password": PASSWORD})
        assert login.status_code == 200
    # Another address has its own allowance.
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=srv.url, timeout=30, transport=other) as http:
        assert (await _register(http, names[3])).status_code == 201


async def test_a_retry_by_a_removed_sender_after_a_restart_gets_the_original_ack(
    server_factory: Factory,
) -> None:
    # After the restart the gateway remembers no ack: the retry is answered by the store.
    srv = server_factory()
    clients = Clients(srv)
    alice, bob = await clients.user("left"), await clients.user("leftb")
    chat_id = (await alice.create_group("left", [bob.user_id]))["chat_id"]
    first = await bob.post_message(chat_id, "before leaving", client_msg_id="k-left-1")
    assert await alice.request("DELETE", f"/api/chats/{chat_id}/members/{bob.user_id}") is None
    srv.stop()
    srv.start()
    assert await bob.post_message(chat_id, "before leaving", client_msg_id="k-left-1") == first
    r = await bob.http.post(
        "/api/messages", json={"chat_id": chat_id, "content": "after", "client_msg_id": "k-left-2"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    assert [m["client_msg_id"] for m in await alice.history_all(chat_id)] == ["k-left-1"]
    await clients.close()


def _open_silent(port: int, count: int) -> list[socket.socket]:
    """Sockets that connect and send nothing (connected without waiting: on a port that stopped
    accepting, a blocking connect would wait for the kernel's SYN retries instead)."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        held.append(s)
    return held


def test_silent_and_idle_sockets_do_not_take_the_rest_port_down(server_factory: Factory) -> None:
    """300 sockets that never send, and 20 that sent one request and went quiet, leave room for
    everyone else: /healthz on a new connection answers at once (granian's defaults served 128
    connections at once, and kept a silent one for good)."""
    srv = server_factory()
    held: list[socket.socket] = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            held.append(s)
        held += _open_silent(srv.port, 300)
        time.sleep(0.5)  # all of them reach the server
        started = time.monotonic()
        try:
            r = httpx.get(f"{srv.url}/healthz", timeout=5)
        except httpx.TimeoutException:
            pytest.fail("/healthz did not answer within 5 s behind 320 quiet sockets")
        elapsed = time.monotonic() - started
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        assert elapsed < 1, f"/healthz took {elapsed:.2f} s"
    finally:
        for s in held:
            s.close()


def _closed_after(s: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes `s` (or `limit`), and what it sent before."""
    started = time.monotonic()
    received = b""
    s.settimeout(0.1)
    while time.monotonic() - started < limit:
        try:
            data = s.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        received += data
    return time.monotonic() - started, received


def test_the_rest_port_closes_silent_slow_idle_and_stalled_clients(server_factory: Factory) -> None:
    """The head timeout closes a socket that sends nothing, a head sent too slowly, and a
    keep-alive connection left idle after a request; a body that stops coming is answered 408
    and closed. (Before: the silent socket stayed for good, the others for 30 s.)"""
    srv = server_factory({"PYCHAT_REST_HEADER_TIMEOUT_MS": "1000"})
    silent = _open_silent(srv.port, 1)[0]
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # the rest of the head never comes
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert idle.recv(4096).startswith(b"HTTP/1.1 200")
    stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    stalled.sendall(
        b"POST /api/users HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"username"'
    )
    time.sleep(0.1)  # the silent socket is connected by now
    sockets = {"silent": silent, "slow": slow, "idle": idle, "stalled": stalled}
    try:
        with ThreadPoolExecutor(len(sockets)) as pool:
            closed = dict(
                zip(sockets, pool.map(lambda s: _closed_after(s, 10), sockets.values()), strict=True)
            )
    finally:
        for s in sockets.values():
            s.close()
    waits = {name: round(seconds, 2) for name, (seconds, _) in closed.items()}
    assert all(0.5 < w < 5 for w in waits.values()), waits
    assert closed["stalled"][1].startswith(b"HTTP/1.1 408"), closed["stalled"][1][:200]
    assert json.loads(closed["stalled"][1].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_request"
