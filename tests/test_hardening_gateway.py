"""The gateway at its edges (issue 11): a returning user's big backlog, live traffic during a
sync, ping floods, silent sockets, and retries by senders who left. Real servers, real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from pychat.auth import hash_password
from pychat.config import Config, Limits
from pychat.errors import STATUS
from pychat.gateway import ERROR_CODES, FRAME_LIMIT_DEFAULTS, GATEWAY_DEFAULTS
from pychat.ids import new_id, now_ms
from pychat.store import Chat, SendRequest, User
from pychat.store.sqlite import SqliteStore
from tests.conftest import PASSWORD, Clients, ServerProcess
from tests.test_messaging import open_raw, send_frame
from tests.test_reliability import rss_mb
from tests.wsraw import RawWs, client_frame, raw_upgrade, split_server_frames

OP_TEXT, OP_PING = 0x1, 0x9


def test_settings_limits_and_error_codes_have_one_source() -> None:
    """Every gateway setting and frame limit is a configuration field whose default is the
    gateway's own; the REST error table covers exactly the gateway's codes."""
    config = Config()
    assert config.for_gateway() == GATEWAY_DEFAULTS
    assert Limits().for_gateway() == FRAME_LIMIT_DEFAULTS
    assert sorted(STATUS) == sorted(ERROR_CODES)
    assert STATUS["rate_limited"] == 429 and STATUS["unavailable"] == 503


async def metric(srv: ServerProcess, name: str) -> int:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{srv.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"pychat_gateway_{name}_total "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no metric {name}")


async def login(srv: ServerProcess, username: str) -> tuple[str, str]:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{srv.url}/api/auth/token", json={"username": username, "password": PASSWORD})
    r.raise_for_status()
    return r.json()["token"], r.json()["user_id"]


def seed_history(data_dir: Path, messages: int, size: int) -> tuple[str, str, str]:
    """Writes a store before the server starts: two users, one group with `messages` messages
    of `size` bytes from the first (`backlog_sender`, to `backlog_reader`). Returns (sender
    name, reader name, chat id)."""
    store = SqliteStore(data_dir / "pychat.db")
    password_hash = hash_password(PASSWORD)
    names = ("backlog_sender", "backlog_reader")
    users = [User(new_id("u"), name, None, password_hash, now_ms()) for name in names]
    for user in users:
        store.create_user(user)
    chat = Chat(new_id("c"), "group", "history", users[0].user_id, now_ms(), 0, [u.user_id for u in users])
    store.create_chat(chat, None)
    body = "x" * size
    for start in range(0, messages, 2000):
        sends = [
            SendRequest(users[0].user_id, chat.chat_id, f"seed{i:08d}", f"{i}:{body}", [])
            for i in range(start, min(start + 2000, messages))
        ]
        store.append_batch(sends, [])
    store.close()
    return names[0], names[1], chat.chat_id


def _text_frames_in(buf: bytes) -> int:
    """The complete text frames in `buf` (a heartbeat ping may follow any frame: not counted)."""
    frames, _ = split_server_frames(buf)
    return sum(opcode == OP_TEXT for opcode, _ in frames)


async def read_frames(
    reader: asyncio.StreamReader, until_type: str, timeout: float = 120, pace_s: float = 0.0
) -> list[dict[str, Any]]:
    """Server text frames off a raw stream until one of `until_type`; with `pace_s`, a slow
    client: 16 KiB at a time with a pause after each."""
    frames: list[dict[str, Any]] = []
    buf = b""
    async with asyncio.timeout(timeout):
        while True:
            complete, buf = split_server_frames(buf)
            for k, (opcode, payload) in enumerate(complete):
                if opcode != OP_TEXT:
                    continue
                frames.append(json.loads(payload))
                if frames[-1]["type"] == until_type:
                    later = sum(op == OP_TEXT for op, _ in complete[k + 1 :]) + _text_frames_in(buf)
                    assert not later, "nothing follows the frame waited for"
                    return frames
            chunk = await reader.read(16384)
            if not chunk:
                raise AssertionError(f"connection closed before {until_type}: {frames[-3:]}")
            buf += chunk
            if pace_s:
                await asyncio.sleep(pace_s)


def seeded_server(
    tmp_path: Path, messages: int, size: int, env: dict[str, str] | None = None
) -> tuple[ServerProcess, str]:
    """A started server whose store already holds a chat's history (`seed_history`)."""
    srv = ServerProcess(tmp_path / "data", env=env or {})
    srv.data_dir.mkdir()
    _, _, chat_id = seed_history(srv.data_dir, messages, size)
    srv.start()
    return srv, chat_id


async def syncing_reader(
    srv: ServerProcess, ref: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The seeded reader on a raw socket with a small receive buffer, its `sync` sent."""
    token, _ = await login(srv, "backlog_reader")
    reader, writer = await raw_upgrade(srv.ws_port, token, rcvbuf=4096)
    await read_frames(reader, "hello")
    writer.write(client_frame(OP_TEXT, json.dumps({"type": "sync", "since": {}, "ref": ref}).encode()))
    await writer.drain()
    return reader, writer


async def test_a_big_backlog_is_streamed_within_the_queue_and_never_delays_other_acks(tmp_path: Path) -> None:
    # 40,000 messages of 1 KB (~45 MB of frames) wait for a user who syncs and does not read.
    srv, chat_id = seeded_server(tmp_path, 40_000, 1000)
    try:
        sender_token, _ = await login(srv, "backlog_sender")
        before = rss_mb(srv)
        stuck_reader, stuck_writer = await syncing_reader(srv)
        # Meanwhile another user's sends are acked (the engine never waits for that backlog).
        sender = await RawWs.open(srv.ws_url, sender_token)
        for i in range(20):
            await sender.send(send_frame(chat_id, f"live {i}"))
            await sender.until("ack", timeout=30)
        await asyncio.sleep(1.0)
        growth = rss_mb(srv) - before
        # The whole backlog read at once costs >100 MB; a queue's worth is a few MB.
        assert growth < 30, f"server memory grew by {growth:.0f} MB while the backlog waited"
        # Once the reader reads, it gets every message once, in order, then `synced`.
        frames = await read_frames(stuck_reader, "synced")
        seqs = [f["seq"] for f in frames if f["type"] == "msg"]
        assert seqs == list(range(1, 40_021)), (seqs[:5], seqs[-5:], len(seqs))
        assert frames[-1]["chats"] == {chat_id: 40_020}
        assert await metric(srv, "sync_rows") >= 40_000
        stuck_writer.close()
        await sender.close()
    finally:
        srv.stop()


async def test_live_traffic_during_a_slow_sync_is_capped_and_the_sync_runs_again_without_a_gap(
    tmp_path: Path,
) -> None:
    env = {"PYCHAT_SYNC_HOLD_CAPACITY": "32", "PYCHAT_SEND_PER_S": "100000", "PYCHAT_SEND_BURST": "100000"}
    srv, chat_id = seeded_server(tmp_path, 5_000, 400, env)
    try:
        sender_token, _ = await login(srv, "backlog_sender")
        slow_reader, slow_writer = await syncing_reader(srv, ref="s")
        # The reader takes its 2 MB backlog slowly while 300 live messages arrive: far over the
        # 32 the server may hold back for it meanwhile.
        reading = asyncio.create_task(read_frames(slow_reader, "synced", pace_s=0.02))
        sender = await RawWs.open(srv.ws_url, sender_token)
        for i in range(300):
            await sender.send(send_frame(chat_id, f"live {i}"))
        for _ in range(300):
            await sender.until("ack", timeout=30)
        frames = await reading
        seqs = [f["seq"] for f in frames if f["type"] == "msg"]
        assert seqs == list(range(1, 5_301)), (len(seqs), seqs[:3], seqs[-3:])
        assert frames[-1]["ref"] == "s"
        assert await metric(srv, "sync_restarts") >= 1, "the held messages overflowed and the sync ran again"
        # Live messages after the sync follow on with no gap.
        await sender.send(send_frame(chat_id, "after"))
        after = await read_frames(slow_reader, "msg")
        assert after[-1]["seq"] == 5_301
        slow_writer.close()
        await sender.close()
    finally:
        srv.stop()


async def test_a_ping_flood_that_never_reads_does_not_grow_the_server(server_factory: Any) -> None:
    srv = server_factory()
    clients = Clients(srv)
    flooder = await clients.user("pinger")
    await clients.close()
    before = rss_mb(srv)
    reader, writer = await raw_upgrade(srv.ws_port, flooder.token, rcvbuf=4096)
    ping = client_frame(OP_PING, b"p" * 125)
    # 300,000 pings of 125 bytes: 38 MB of pongs if every one were kept until written.
    for _ in range(300):
        writer.write(ping * 1000)
        await writer.drain()
    await asyncio.sleep(1.0)
    growth = rss_mb(srv) - before
    print(f"server memory growth under the ping flood: {growth:.1f} MB")
    assert growth < 8, f"server memory grew by {growth:.1f} MB"
    assert await metric(srv, "pongs_coalesced") > 0
    # The connection still works: a pong, then the server keeps serving it.
    writer.write(client_frame(OP_TEXT, b'{"type":"sync","since":{}}'))
    frames = await read_frames(reader, "synced")
    assert frames[-1]["type"] == "synced"
    writer.close()


def _silent_socket(port: int, source: str) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


async def test_silent_sockets_neither_block_upgrades_nor_stay(server_factory: Any) -> None:
    srv = server_factory({"PYCHAT_HANDSHAKE_TIMEOUT_MS": "4000", "PYCHAT_UPGRADES_PER_S": "100000"})
    clients = Clients(srv)
    user = await clients.user("upgrader")
    await clients.close()
    loop = asyncio.get_running_loop()
    # 1,100 sockets from one address that never send a request: more than the old 1,024 permits.
    silent = [_silent_socket(srv.ws_port, "127.0.0.1") for _ in range(1_100)]
    closed_at: dict[int, float] = {}
    answered: dict[int, bytes] = {}

    async def watch(i: int, s: socket.socket) -> None:
        data = b""
        try:
            while chunk := await loop.sock_recv(s, 4096):
                data += chunk
        except OSError:
            pass
        closed_at[i] = time.monotonic()
        answered[i] = data

    watchers = [asyncio.create_task(watch(i, s)) for i, s in enumerate(silent)]
    await asyncio.sleep(0.5)
    # A client from another address upgrades at once, before any silent socket timed out.
    upgraded = await connect(f"{srv.ws_url}?token={user.token}", local_addr=("127.0.0.2", 0))
    assert json.loads(await upgraded.recv())["type"] == "hello"
    upgraded_at = time.monotonic()
    await upgraded.close()
    async with asyncio.timeout(60):
        await asyncio.gather(*watchers)
    timed_out = [i for i, data in answered.items() if not data]
    told_to_wait = [i for i, data in answered.items() if data.startswith(b"HTTP/1.1 429")]
    assert timed_out and told_to_wait, (len(timed_out), len(told_to_wait))
    assert len(timed_out) <= GATEWAY_DEFAULTS["handshakes_per_address"]
    assert upgraded_at < min(closed_at[i] for i in timed_out), "the upgrade did not wait for silent sockets"
    assert await metric(srv, "handshake_timeouts") == len(timed_out)
    assert await metric(srv, "handshakes_refused_per_address") == len(told_to_wait)
    for s in silent:
        s.close()


async def test_a_sender_who_left_gets_the_original_ack_on_retry(server_factory: Any) -> None:
    # A window of 2 keys: older retries are answered by the store, not from memory.
    for window in ("1000", "2"):
        srv = server_factory({"PYCHAT_IDEMPOTENCY_WINDOW": window})
        clients = Clients(srv)
        alice, bob = await clients.user("leaver"), await clients.user("stayer")
        chat_id = (await alice.create_group("g", [bob.user_id]))["chat_id"]
        ws = await open_raw(srv, alice)
        first = send_frame(chat_id, "before leaving", cmid="k-first")
        await ws.send(first)
        ack = await ws.until("ack")
        for i in range(3):  # push the first key out of a 2-key window
            await ws.send(send_frame(chat_id, f"more {i}"))
            await ws.until("ack")
        async with httpx.AsyncClient(
            base_url=srv.url, headers={"authorization": f"Bearer {alice.token}"}
        ) as http:
            assert (await http.delete(f"/api/chats/{chat_id}/members/{alice.user_id}")).status_code == 204
            await ws.send(first)
            again = await ws.until("ack", client_msg_id="k-first")
            assert (again["message_id"], again["seq"]) == (ack["message_id"], ack["seq"])
            rest = await http.post(
                "/api/messages", json={"chat_id": chat_id, "content": "x", "client_msg_id": "k-first"}
            )
            assert rest.status_code == 201 and rest.json()["seq"] == ack["seq"]
            # Anything new from the former member is refused and stored nowhere.
            await ws.send(send_frame(chat_id, "after leaving", cmid="k-new"))
            error = await ws.until("error", ref="k-new")
            assert error["code"] == "forbidden"
        bob_http = httpx.AsyncClient(base_url=srv.url, headers={"authorization": f"Bearer {bob.token}"})
        async with bob_http:
            history = (await bob_http.get(f"/api/chats/{chat_id}/messages")).json()["messages"]
        assert [m["seq"] for m in history] == [1, 2, 3, 4], "nothing was stored twice"
        await ws.close()
        await clients.close()
