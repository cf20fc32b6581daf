"""Security: rate limits with retry_after_ms, connection caps, Origin checks,
password storage, secrets kept out of logs, and no access across chats."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pychat.client import ChatClient, ChatError, open_websocket
from tests.conftest import PASSWORD, Clients, ServerProcess, unique_name
from tests.test_messaging import open_raw, send_frame

Factory = Callable[..., ServerProcess]


async def test_failed_logins_are_limited_per_username_and_address(server_factory: Factory) -> None:
    srv = server_factory({"PYCHAT_LOGIN_PER_MIN": "3", "PYCHAT_LOGIN_FAILURES_PER_MIN": "4"})
    name = unique_name("brute")
    await ChatClient.register(srv.url, name, PASSWORD)

    async def login(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
        return await http.post("/api/auth/token", json={"username": username, "password": password})

    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await login(http, name, PASSWORD)).status_code == 200, "successes are not limited"
        assert [(await login(http, name, "wrong guess")).status_code for _ in range(3)] == [401] * 3
        r = await login(http, name, PASSWORD)
        assert r.status_code == 429, "after 3 failures from here, even the right password waits"
        err = r.json()["error"]
        assert err["code"] == "rate_limited" and 0 < err["retry_after_ms"] <= 60_000
        assert int(r.headers["retry-after"]) >= 1
        assert (await login(http, name.upper(), PASSWORD)).status_code == 429, "whatever the case"
        # Failures from one address are limited across usernames too (4 per minute: 3 spent).
        others = [(await login(http, unique_name("x"), "wrong guess")).status_code for _ in range(3)]
        assert others == [401, 429, 429]
    # Someone failing from 127.0.0.1 does not lock the user out elsewhere.
    elsewhere = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=srv.url, transport=elsewhere) as http:
        assert (await login(http, name, PASSWORD)).status_code == 200


async def test_sends_are_rate_limited_and_the_sdk_waits_as_told(server_factory: Factory) -> None:
    srv = server_factory({"PYCHAT_SEND_PER_S": "10", "PYCHAT_SEND_BURST": "5"})
    clients = Clients(srv)
    alice, bob = await clients.user("fast"), await clients.user("slow")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    ws = await open_raw(srv, alice)
    for i in range(10):
        await ws.send(send_frame(chat_id, f"m{i}", cmid=f"c{i}"))
    await asyncio.sleep(0.3)
    await ws.send(send_frame(chat_id, "later", cmid="later"))  # the connection is still fine
    later = await ws.until("ack", client_msg_id="later")  # every answer to the ten came before it
    acks = [f for f in ws.frames if f["type"] == "ack" and f["client_msg_id"] != "later"]
    limited = [f for f in ws.frames if f["type"] == "error"]
    assert len(acks) + len(limited) == 10 and len(acks) >= 5 and len(limited) >= 4
    assert all(e["code"] == "rate_limited" and e["retry_after_ms"] > 0 and e["ref"] for e in limited)
    assert later["seq"] == len(acks) + 1
    await ws.close()
    first_sdk_seq = later["seq"] + 1
    # The SDK re-sends what was refused as too fast, after retry_after_ms: all 40 arrive once.
    await alice.connect()
    acks = await asyncio.gather(*(alice.send(chat_id, f"sdk {i}") for i in range(40)))
    assert sorted(a["seq"] for a in acks) == list(range(first_sdk_seq, first_sdk_seq + 40))
    # Over REST the limit is per user.
    statuses = []
    for i in range(8):
        try:
            await bob.post_message(chat_id, f"rest {i}")
            statuses.append(201)
        except ChatError as e:
            statuses.append(e.status or 0)
            assert e.code == "rate_limited" and e.retry_after_ms
    assert statuses[:5] == [201] * 5 and 429 in statuses
    await clients.close()


async def test_upgrade_storms_are_told_when_to_come_back(server_factory: Factory) -> None:
    srv = server_factory({"PYCHAT_UPGRADES_PER_S": "20", "PYCHAT_UPGRADE_BURST": "5"})
    clients = Clients(srv)
    alice = await clients.user("storm")
    outcomes: list[object] = []
    opened = []
    for _ in range(10):
        try:
            ws, _ = await open_websocket(srv.ws_url, alice.token)
            opened.append(ws)
            outcomes.append("ok")
        except ChatError as e:
            outcomes.append((e.status, e.code, e.retry_after_ms is not None and e.retry_after_ms > 0))
    assert outcomes[:5] == ["ok"] * 5
    assert (429, "rate_limited", True) in outcomes[5:]
    for ws in opened:
        await ws.close()
    # The SDK honours retry_after_ms and gets in.
    hellos = await asyncio.gather(*(c.connect() for c in [await clients.device(alice) for _ in range(12)]))
    assert all(h["user_id"] == alice.user_id for h in hellos)
    await clients.close()


async def test_connection_cap_answers_503_with_retry_after(server_factory: Factory) -> None:
    srv = server_factory({"PYCHAT_MAX_CONNECTIONS": "2"})
    clients = Clients(srv)
    alice = await clients.user("cap")
    a = await open_raw(srv, alice, sync=False)
    b = await open_raw(srv, alice, sync=False)
    with pytest.raises(ChatError) as e:
        await open_websocket(srv.ws_url, alice.token)
    assert (e.value.status, e.value.code, e.value.retry_after_ms) == (503, "unavailable", 1000)
    await a.close()
    await b.close()
    await clients.close()


async def test_origin_allow_list_on_websocket_and_rest(server_factory: Factory) -> None:
    srv = server_factory({"PYCHAT_ALLOWED_ORIGINS": "https://chat.example, https://other.example"})
    clients = Clients(srv)
    alice = await clients.user("origin")
    with pytest.raises(InvalidStatus) as e:
        async with connect(f"{srv.ws_url}?token={alice.token}", origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert e.value.response.status_code == 403
    async with connect(f"{srv.ws_url}?token={alice.token}", origin="https://chat.example") as ws:  # type: ignore[arg-type]
        assert '"hello"' in str(await ws.recv())
    r = await alice.http.get("/api/chats", headers={"Origin": "https://evil.example"})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    assert (
        await alice.http.get("/api/chats", headers={"Origin": "https://other.example"})
    ).status_code == 200
    assert (await alice.http.get("/api/chats")).status_code == 200, "non-browser clients send no Origin"
    await clients.close()


@pytest.mark.stores("sqlite")  # reads or locks the SQLite file itself
async def test_passwords_are_stored_only_as_slow_salted_hashes(
    server: ServerProcess, clients: Clients
) -> None:
    a, b = await clients.user("hash"), await clients.user("hash")
    db = sqlite3.connect(server.data_dir / "pychat.db")
    rows = dict(
        db.execute("SELECT user_id, password_hash FROM users WHERE user_id IN (?, ?)", (a.user_id, b.user_id))
    )
    db.close()
    ha, hb = rows[a.user_id], rows[b.user_id]
    assert ha.startswith("scrypt$16384$8$1$") and hb.startswith("scrypt$16384$8$1$")
    assert ha != hb, "salted: the same password hashes differently"
    assert PASSWORD not in ha and PASSWORD.encode().hex() not in ha


async def test_secrets_never_appear_in_logs(server_factory: Factory) -> None:
    srv = server_factory({"PYCHAT_LOG_LEVEL": "debug"})
    clients = Clients(srv)
    alice, bob = await clients.user("quiet"), await clients.user("quiet")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    await alice.connect()
    await alice.send(chat_id, "a secret message body")
    async with httpx.AsyncClient(base_url=srv.url) as http:
        await http.post("/api/auth/token", json={"username": "nobody-at-all", "password": "bad secret pw"})
        await http.get("/api/chats", headers={"Authorization": "Bearer v1.forged.1.sig"})
    await clients.close()
    srv.stop()
    log = (srv.data_dir / "server.log").read_text()
    for secret in (PASSWORD, "bad secret pw", alice.token, bob.token, srv.secret.decode(), "v1.forged"):
        assert secret not in log


async def test_a_stranger_sees_nothing_of_a_chat(clients: Clients) -> None:
    alice, bob, eve = await clients.user("sa"), await clients.user("sb"), await clients.user("se")
    chat_id = (await alice.create_group("private", [bob.user_id]))["chat_id"]
    await alice.post_message(chat_id, "for members only")
    assert await eve.list_chats() == []
    for path in (
        f"/api/chats/{chat_id}",
        f"/api/chats/{chat_id}/messages",
        f"/api/chats/{chat_id}/receipts?seq=1",
    ):
        r = await eve.http.get(path)
        assert r.status_code == 403 and "for members only" not in r.text
    # Membership changes are for members only too.
    r = await eve.http.post(f"/api/chats/{chat_id}/members", json={"user_id": eve.user_id})
    assert r.status_code == 403
    r = await eve.http.delete(f"/api/chats/{chat_id}/members/{bob.user_id}")
    assert r.status_code == 403
    assert len((await alice.request("GET", f"/api/chats/{chat_id}"))["members"]) == 2


def _modes(data_dir: Path) -> dict[str, int]:
    """The permission bits of the data dir and of the SQLite files in it (with their -wal, -shm)."""
    files = {p.name: p.stat().st_mode & 0o777 for p in data_dir.glob("*.db*")}
    return {".": data_dir.stat().st_mode & 0o777, **files}


async def test_the_data_dir_and_its_databases_are_the_owners_only(server_factory: Factory) -> None:
    """The data dir is 0700 and pychat.db, search.db and their -wal and -shm 0600 (they hold
    messages and password hashes); an older install made readable by all is made private at start."""
    srv = server_factory()
    clients = Clients(srv)
    alice, bob = await clients.user("perm"), await clients.user("permb")
    await alice.post_message((await alice.create_direct(bob.user_id))["chat_id"], "private words")
    await clients.close()
    modes = _modes(srv.data_dir)
    assert "search.db" in modes and ("pychat.db" in modes) == ("PYCHAT_STORE" not in srv.env), modes
    assert modes == {".": 0o700, **{name: 0o600 for name in modes if name != "."}}, modes
    srv.stop()
    srv.data_dir.chmod(0o755)
    for path in srv.data_dir.glob("*.db*"):
        path.chmod(0o644)
    srv.start()
    modes = _modes(srv.data_dir)
    assert modes == {".": 0o700, **{name: 0o600 for name in modes if name != "."}}, modes
