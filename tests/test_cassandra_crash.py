"""Cassandra itself is SIGKILLed while sends are in flight, then restarted, under one pychat
server that is never restarted: every acked message is there exactly once with its acked seq,
unacked sends get `unavailable` with `retry_after_ms`, and succeed when retried."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cassandra import CassandraServer
from tests.conftest import Clients, ServerProcess, started
from tests.wsraw import RawWs

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def own_cassandra(tmp_path: Path) -> Iterator[CassandraServer]:
    """A node of this test's own: it gets killed."""
    node = started(CassandraServer.on_free_ports(tmp_path / "cassandra"))
    yield node
    node.stop()


async def test_cassandra_killed_mid_sends_loses_no_ack_and_the_server_recovers_by_itself(
    own_cassandra: CassandraServer, tmp_path: Path
) -> None:
    srv = ServerProcess(
        tmp_path / "data",
        env={
            "PYCHAT_STORE": f"cassandra://{own_cassandra.host}:{own_cassandra.port}/crash",
            "PYCHAT_SEND_PER_S": "100000",
            "PYCHAT_SEND_BURST": "100000",
        },
    )
    srv.data_dir.mkdir()
    srv.start()
    try:
        assert srv.proc is not None
        pid = srv.proc.pid
        clients = Clients(srv)
        alice, bob = await clients.user("writer"), await clients.user("reader")
        chat_id = (await alice.create_group("crash", [bob.user_id]))["chat_id"]
        ws = await RawWs.open(srv.ws_url, alice.token)
        keys = [f"k{i:04}-{uuid.uuid4().hex[:6]}" for i in range(600)]
        acks: dict[str, dict[str, object]] = {}
        errors: list[dict[str, object]] = []

        async def send(key: str) -> None:
            await ws.send({"type": "send", "chat_id": chat_id, "client_msg_id": key, "content": key})

        async def answers(until: int, timeout: float) -> None:
            """Reads acks and errors until `until` keys are acked or nothing comes for `timeout`."""
            while len(acks) < until:
                try:
                    frame = await ws.recv(timeout=timeout)
                except TimeoutError:
                    return
                if frame["type"] == "ack":
                    acks[str(frame["client_msg_id"])] = frame
                elif frame["type"] == "error":
                    errors.append(frame)

        for key in keys[:200]:
            await send(key)
        await answers(200, timeout=30)
        assert len(acks) == 200
        # Kill Cassandra with 400 sends on their way.
        for key in keys[200:]:
            await send(key)
        own_cassandra.kill()
        await answers(600, timeout=15)
        assert errors, "sends while Cassandra was gone were refused, not left hanging"
        for e in errors:
            assert e["code"] == "unavailable" and int(str(e["retry_after_ms"])) > 0, e
        acked_before_restart = dict(acks)
        own_cassandra.start()
        # The server reconnects by itself; unacked keys are retried until each is acked.
        for _ in range(60):
            missing = [k for k in keys if k not in acks]
            if not missing:
                break
            for key in missing:
                await send(key)
            await answers(600, timeout=2)
            await asyncio.sleep(0.5)
        assert set(acks) == set(keys), f"{len(keys) - len(acks)} sends never acked"
        assert srv.proc.poll() is None and srv.proc.pid == pid, "the server was never restarted"
        async with httpx.AsyncClient(
            base_url=srv.url, headers={"authorization": f"Bearer {bob.token}"}
        ) as http:
            history: list[dict[str, object]] = []
            after = 0
            while True:
                page = (
                    await http.get(f"/api/chats/{chat_id}/messages", params={"after": after, "limit": 200})
                ).json()
                history += page["messages"]
                if not page["has_more"]:
                    break
                after = int(str(history[-1]["seq"]))
        assert [m["seq"] for m in history] == list(range(1, len(keys) + 1)), "gap-free, each key once"
        by_key = {str(m["client_msg_id"]): m for m in history}
        assert len(by_key) == len(keys)
        for key, ack in acks.items():
            m = by_key[key]
            assert (m["message_id"], m["seq"]) == (ack["message_id"], ack["seq"]), key
        # What was acked before the kill is what is stored now.
        for key, ack in acked_before_restart.items():
            assert by_key[key]["seq"] == ack["seq"]
        await ws.close()
        await clients.close()
    finally:
        srv.stop()
