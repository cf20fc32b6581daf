"""Bounded reliability runs: a reconnect storm against upgrade rate limits, and a
slow consumer that must not hurt anyone else. (Crash chaos: test_chaos.py.)"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from benchmarks.reconnect_storm import storm
from tests.conftest import Clients, ServerProcess
from tests.test_messaging import open_raw, send_frame
from tests.wsraw import raw_upgrade

Factory = Callable[..., ServerProcess]


def rss_mb(srv: ServerProcess) -> float:
    assert srv.proc is not None
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_reconnect_storm_is_told_when_to_come_back_and_fully_recovers(server_factory: Factory) -> None:
    srv = server_factory(
        {
            "PYCHAT_UPGRADES_PER_S": "400",
            "PYCHAT_UPGRADE_BURST": "200",
            "PYCHAT_MAX_CONNECTIONS_PER_USER": "150",
        }
    )
    clients = Clients(srv)
    users = [await clients.user("storm") for _ in range(10)]
    await clients.close()
    tokens = [users[i % len(users)].token for i in range(1500)]
    result = await storm(srv.ws_url, tokens)
    print(result)
    assert result["connections"] == 1500
    assert result["told_to_wait_storm"] > 0, "the storm met the upgrade limit"
    # Connection attempts that time out on a loaded machine are retried like the rest.
    assert result["refused"] <= result["connections"] // 10
    assert srv.proc is not None and srv.proc.poll() is None, "the server stayed up"
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{srv.url}/healthz")).json() == {"status": "ok"}


async def _stuck_socket(srv: ServerProcess, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that upgrades, then never reads again (small receive buffer)."""
    return await raw_upgrade(srv.ws_port, token, rcvbuf=4096)


async def test_a_slow_consumer_is_cut_off_and_nobody_else_notices(server_factory: Factory) -> None:
    srv = server_factory(
        {"PYCHAT_QUEUE_CAPACITY": "64", "PYCHAT_SEND_PER_S": "100000", "PYCHAT_SEND_BURST": "100000"}
    )
    clients = Clients(srv)
    alice, bob, slow = await clients.user("sender"), await clients.user("reader"), await clients.user("slow")
    chat_id = (await alice.create_group("flood", [bob.user_id, slow.user_id]))["chat_id"]
    sender, reader = await open_raw(srv, alice), await open_raw(srv, bob)
    stuck_reader, stuck_writer = await _stuck_socket(srv, slow.token)
    before = rss_mb(srv)
    body = "x" * 60_000
    n = 1500  # 90 MB of msg frames for the stuck client, against a queue of 64
    receiving = asyncio.create_task(reader.collect("msg", n, timeout=120))
    window = 8  # the sender paces itself by its acks, as the SDK does
    for i in range(n):
        if i >= window:
            await sender.until("ack")
        await sender.send(send_frame(chat_id, f"{i}:{body}"))
    got = await receiving
    assert [m["seq"] for m in got] == list(range(1, n + 1)), "the reader got everything, in order"
    growth = rss_mb(srv) - before
    assert growth < 60, f"server memory grew by {growth:.0f} MB"
    # The stuck connection was closed by the server: reading what is buffered ends in EOF.
    async with asyncio.timeout(30):
        while await stuck_reader.read(1 << 20):
            pass
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{srv.url}/metrics")).text
    assert "pychat_gateway_queue_overflows_total 1" in metrics
    stuck_writer.close()
    await sender.close()
    await reader.close()
    await clients.close()


@pytest.mark.stores("sqlite")  # reads or locks the SQLite file itself
async def test_a_send_parked_when_its_connection_is_dropped_can_be_retried(server_factory: Factory) -> None:
    # The engine stalls (another process holds SQLite's write lock), its queue (1 event) fills,
    # the connection stops reading with a send parked and is dropped by the heartbeat. The
    # parked send must be given up, not left "in flight": a retry from another connection gets
    # an ack once the engine runs again, and every key is stored once.
    srv = server_factory({"PYCHAT_ENGINE_QUEUE_CAPACITY": "1", "PYCHAT_HEARTBEAT_S": "1"})
    clients = Clients(srv)
    alice, bob = await clients.user("park"), await clients.user("parkb")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    first = await open_raw(srv, alice)
    lock = sqlite3.connect(srv.data_dir / "pychat.db", isolation_level=None, timeout=10)
    lock.execute("BEGIN IMMEDIATE")
    try:
        for k in range(4):
            await first.send(send_frame(chat_id, f"m{k}", cmid=f"park-{k}"))
        # Silent for twice the heartbeat (it reads nothing while a send is parked): dropped,
        # well before the engine's 10 s busy timeout would fail its transaction.
        for _ in range(80):
            if first.ws.state.name == "CLOSED":
                break
            await asyncio.sleep(0.1)
        assert first.ws.state.name == "CLOSED"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    second = await open_raw(srv, alice)
    for k in range(4):
        await second.send(send_frame(chat_id, f"m{k} again", cmid=f"park-{k}"))
    acks = await second.collect("ack", 4, timeout=20)
    assert sorted(a["client_msg_id"] for a in acks) == [f"park-{k}" for k in range(4)]
    page = await bob.history(chat_id)
    assert sorted(m["client_msg_id"] for m in page["messages"]) == [f"park-{k}" for k in range(4)]
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{srv.url}/metrics")).text
    parked = next(
        ln for ln in metrics.splitlines() if ln.startswith("pychat_gateway_engine_queue_full_waits_total ")
    )
    assert float(parked.split()[1]) >= 1, "a send was parked"
    await second.close()
    await clients.close()
