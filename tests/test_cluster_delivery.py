"""Messages another node stored reach this node's connections through the gateway's own fan-out
(`Gateway.deliver_stored` via pychat/cluster/delivery.py): in seq order, once each, and a message
the relay lost is read from the store before the ones after it are delivered, or, when none
follows it, when the node catches up after its relay came back. An in-process
server on real sockets; the messages are put in its store directly, as another node's sequencer
would have (so nothing here fans them out but the delivery under test)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pychat.client import ChatClient
from pychat.cluster.delivery import RemoteDelivery
from pychat.config import Config
from pychat.gateway import Stored
from pychat.server import Server
from pychat.store import SendRequest
from tests.conftest import PASSWORD, free_port, unique_name
from tests.wsraw import RawWs


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A server in this process (the test hands its gateway what another node would relay)."""
    running = Server(Config(data_dir=tmp_path, port=free_port(), ws_port=free_port()))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_another_nodes_messages_arrive_in_order_with_a_lost_one_read_from_the_store(
    server: Server,
) -> None:
    names = [unique_name("far"), unique_name("here")]
    for name in names:
        await ChatClient.register(server.http_url, name, PASSWORD)
    far, here = [await ChatClient.login(server.http_url, n, PASSWORD) for n in names]
    chat_id = (await far.create_group("across", [here.user_id]))["chat_id"]
    ws = await RawWs.open(server.ws_url, here.token)
    # Another node's sequencer stored four messages; its relay to this node lost the third.
    sends = [SendRequest(far.user_id, chat_id, f"k{i}", f"m{i}", []) for i in range(1, 5)]
    results, _ = await asyncio.to_thread(server.store.append_batch, sends, [])
    assert [r.seq for r in results if isinstance(r, Stored)] == [1, 2, 3, 4]
    rows = await asyncio.to_thread(server.store.messages_after, chat_id, 0, 10)
    delivery = RemoteDelivery(server.gateway, server.store)
    await asyncio.to_thread(delivery.deliver, [rows[0], rows[1], rows[3]])
    got = await ws.collect("msg", 4)
    assert [(m["seq"], m["content"]) for m in got] == [(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4")]
    assert delivery.filled == 1
    # A resend of what was delivered (a relay that repeats itself) is not delivered twice.
    await asyncio.to_thread(delivery.deliver, [rows[2], rows[3]])
    assert [f for f in await ws.quiet(0.5) if f.get("type") == "msg"] == []
    await ws.close()
    await far.close()
    await here.close()


async def test_messages_the_relay_lost_with_nothing_after_them_arrive_when_the_node_catches_up(
    server: Server,
) -> None:
    names = [unique_name("far"), unique_name("here"), unique_name("away")]
    for name in names:
        await ChatClient.register(server.http_url, name, PASSWORD)
    far, here, away = [await ChatClient.login(server.http_url, n, PASSWORD) for n in names]
    chat_id = (await far.create_group("across", [here.user_id]))["chat_id"]
    elsewhere = (await far.create_group("elsewhere", [away.user_id]))["chat_id"]
    ws = await RawWs.open(server.ws_url, here.token)
    sends = [SendRequest(far.user_id, chat_id, f"k{i}", f"m{i}", []) for i in range(1, 5)]
    sends += [SendRequest(far.user_id, elsewhere, f"e{i}", f"e{i}", []) for i in (1, 2)]
    await asyncio.to_thread(server.store.append_batch, sends, [])
    rows = await asyncio.to_thread(server.store.messages_after, chat_id, 0, 10)
    other = await asyncio.to_thread(server.store.messages_after, elsewhere, 0, 10)
    delivery = RemoteDelivery(server.gateway, server.store)
    # 1 and 2 came by relay; 3 and 4 were lost (Redis restarted), and nothing came after them.
    # In the chat where no member is connected here, e2 was lost too.
    await asyncio.to_thread(delivery.deliver, rows[:2] + other[:1])
    assert [m["seq"] for m in await ws.collect("msg", 2)] == [1, 2]
    assert delivery.filled == 0
    await asyncio.to_thread(delivery.catch_up)
    got = await ws.collect("msg", 2)
    assert [(m["seq"], m["content"]) for m in got] == [(3, "m3"), (4, "m4")]
    assert delivery.caught_up == 2, "elsewhere has no member connected here: its e2 is not read"
    await asyncio.to_thread(delivery.catch_up)
    assert [f for f in await ws.quiet(0.5) if f.get("type") == "msg"] == []
    assert delivery.caught_up == 2
    await ws.close()
    for c in (far, here, away):
        await c.close()


async def test_the_sequenced_stream_cuts_a_removed_member_off_at_the_removal(server: Server) -> None:
    names = [unique_name("owner"), unique_name("stays"), unique_name("leaves")]
    for name in names:
        await ChatClient.register(server.http_url, name, PASSWORD)
    owner, stays, leaves = [await ChatClient.login(server.http_url, n, PASSWORD) for n in names]
    chat_id = (await owner.create_group("cut", [stays.user_id, leaves.user_id]))["chat_id"]
    ws_stays = await RawWs.open(server.ws_url, stays.token)
    ws_leaves = await RawWs.open(server.ws_url, leaves.token)
    sends = [SendRequest(owner.user_id, chat_id, f"k{i}", f"m{i}", []) for i in range(1, 4)]
    await asyncio.to_thread(server.store.append_batch, sends, [])
    rows = await asyncio.to_thread(server.store.messages_after, chat_id, 0, 10)
    removal = b'{"type":"chat","chat_id":"%s","members_removed":true}' % chat_id.encode()
    members = ("members", (chat_id, [owner.user_id, stays.user_id], False, 100, [leaves.user_id], removal))
    # The stream says: message 1, the removal, messages 2 and 3; then a late, older membership
    # (a start's scan) that must not bring the removed member back.
    stale = ("members", (chat_id, [owner.user_id, stays.user_id, leaves.user_id], False, 99, [], None))
    gaps = await asyncio.to_thread(
        server.gateway.apply_sequenced,
        [("row", rows[0]), members, ("row", rows[1]), stale, ("row", rows[2])],
    )
    assert gaps == []
    assert [m["seq"] for m in await ws_stays.collect("msg", 3)] == [1, 2, 3]
    got = [f for f in await ws_leaves.quiet(1.0) if f.get("type") in ("msg", "chat")]
    assert [(f["type"], f.get("seq")) for f in got] == [("msg", 1), ("chat", None)]
    for c in (ws_stays, ws_leaves):
        await c.close()
    for c in (owner, stays, leaves):
        await c.close()
