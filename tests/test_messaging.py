"""The message path over real sockets: send -> ack -> msg, ordering, idempotency,
history, sync, receipts (PROTOCOL.md's guarantees)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pychat.chain import genesis, link
from pychat.client import ChatClient, ChatError
from tests.conftest import Clients, ServerProcess
from tests.wsraw import RawWs, client_frame, raw_upgrade

pytestmark = [pytest.mark.stores("sqlite", "cassandra"), pytest.mark.timeout(600)]


def send_frame(chat_id: str, content: str, cmid: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "send",
        "chat_id": chat_id,
        "client_msg_id": cmid or uuid.uuid4().hex,
        "content": content,
        **extra,
    }


async def open_raw(server: ServerProcess, client: ChatClient, sync: bool = True) -> RawWs:
    ws = await RawWs.open(server.ws_url, client.token)
    if sync:
        await ws.send({"type": "sync", "since": {}})
        await ws.until("synced")
    return ws


async def test_direct_chat_send_ack_msg_and_senders_other_device(
    server: ServerProcess, clients: Clients
) -> None:
    alice, bob = await clients.user("alice"), await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    assert chat["kind"] == "direct" and sorted(chat["members"]) == sorted([alice.user_id, bob.user_id])
    a1, a2, b = [await open_raw(server, c) for c in (alice, alice, bob)]
    frame = send_frame(chat["chat_id"], "hi bob")
    await a1.send(frame)
    ack = await a1.until("ack")
    assert ack["client_msg_id"] == frame["client_msg_id"] and ack["chat_id"] == chat["chat_id"]
    assert ack["seq"] == 1 and isinstance(ack["message_id"], str) and ack["created_at"] > 0
    expected = {
        "type": "msg",
        "chat_id": chat["chat_id"],
        "seq": 1,
        "message_id": ack["message_id"],
        "sender_id": alice.user_id,
        "content": "hi bob",
        "attachments": [],
        "created_at": ack["created_at"],
        "client_msg_id": frame["client_msg_id"],
    }
    assert await b.until("msg") == expected
    assert await a2.until("msg") == expected
    # Barrier: bob answers; the sending connection's first msg must be bob's (seq 2), never its own seq 1.
    await b.send(send_frame(chat["chat_id"], "hi alice"))
    await b.until("ack")
    first_msg_on_a1 = await a1.until("msg")
    assert (first_msg_on_a1["seq"], first_msg_on_a1["sender_id"]) == (2, bob.user_id)
    for ws in (a1, a2, b):
        await ws.close()


async def test_group_of_four_everyone_but_the_sending_connection_gets_it(
    server: ServerProcess, clients: Clients
) -> None:
    users = [await clients.user(f"g{i}") for i in range(4)]
    group = await users[0].create_group("four", [u.user_id for u in users[1:]])
    assert group["kind"] == "group" and group["title"] == "four" and len(group["members"]) == 4
    sockets = [await open_raw(server, u) for u in users]
    await sockets[2].send(send_frame(group["chat_id"], "from two"))
    ack = await sockets[2].until("ack")
    for i in (0, 1, 3):
        msg = await sockets[i].until("msg")
        assert (msg["seq"], msg["message_id"], msg["sender_id"]) == (1, ack["message_id"], users[2].user_id)
    await sockets[0].send(send_frame(group["chat_id"], "barrier"))
    await sockets[0].until("ack")
    assert (await sockets[2].until("msg"))["seq"] == 2
    for ws in sockets:
        await ws.close()


async def test_200_concurrent_sends_from_3_senders_give_every_receiver_seq_1_to_200(
    server: ServerProcess, clients: Clients
) -> None:
    senders = [await clients.user(f"s{i}") for i in range(3)]
    reader = await clients.user("reader")
    group = await senders[0].create_group("burst", [u.user_id for u in senders[1:]] + [reader.user_id])
    chat_id = group["chat_id"]
    sender_ws = [await open_raw(server, s) for s in senders]
    reader_ws = await open_raw(server, reader)
    counts = [67, 67, 66]

    async def burst(ws: RawWs, n: int, who: int) -> list[dict[str, Any]]:
        for k in range(n):
            await ws.send(send_frame(chat_id, f"{who}:{k}"))
        return await ws.collect("ack", n, timeout=60)

    acks = await asyncio.gather(
        *(burst(ws, n, i) for i, (ws, n) in enumerate(zip(sender_ws, counts, strict=True)))
    )
    ack_seqs = sorted(a["seq"] for per in acks for a in per)
    assert ack_seqs == list(range(1, 201))
    received = await reader_ws.collect("msg", 200, timeout=60)
    assert [m["seq"] for m in received] == list(range(1, 201)), "in order, no gap, no repeat"
    # Each sender receives everyone else's messages, in order; with its own acks that is 1..200.
    for i, ws in enumerate(sender_ws):
        others = await ws.collect("msg", 200 - counts[i], timeout=60)
        seqs = [m["seq"] for m in others]
        assert seqs == sorted(seqs)
        assert sorted(seqs + [a["seq"] for a in acks[i]]) == list(range(1, 201))
    # Per sender, the acks follow the order of its sends.
    for per in acks:
        contents = [m for m in received if m["message_id"] in {a["message_id"] for a in per}]
        order = [int(m["content"].split(":")[1]) for m in contents]
        assert order == sorted(order)
    for ws in [*sender_ws, reader_ws]:
        await ws.close()


async def test_retry_on_same_connection_new_connection_and_rest_is_one_message(
    server: ServerProcess, clients: Clients
) -> None:
    alice, bob = await clients.user("ia"), await clients.user("ib")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    bob_ws = await open_raw(server, bob)
    frame = send_frame(chat_id, "once", cmid="retry-me")
    ws1 = await open_raw(server, alice)
    await ws1.send(frame)
    await ws1.send(frame)  # while the first may still be in flight
    first, second = await ws1.collect("ack", 2)
    await ws1.send(frame)  # after the ack
    third = await ws1.until("ack")
    ws2 = await open_raw(server, alice)
    await ws2.send(frame)
    fourth = await ws2.until("ack")
    assert first == second == third == fourth
    rest = await alice.post_message(chat_id, "once", client_msg_id="retry-me")
    assert rest == {k: first[k] for k in ("message_id", "chat_id", "seq", "created_at")}
    page = await bob.history(chat_id)
    assert [m["message_id"] for m in page["messages"]] == [first["message_id"]]
    # Bob got exactly one msg: the next one he sees after a new message is seq 2.
    await ws1.send(send_frame(chat_id, "next"))
    got = await bob_ws.collect("msg", 2)
    assert [m["seq"] for m in got] == [1, 2]
    # The same client_msg_id from another sender is a different message.
    other = await bob.post_message(chat_id, "mine", client_msg_id="retry-me")
    assert other["seq"] == 3
    for ws in (ws1, ws2, bob_ws):
        await ws.close()


async def test_a_retry_older_than_the_gateways_window_is_answered_by_the_store(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # A window of 2 acked keys: the first send's key is long gone from memory when it is retried.
    srv = server_factory({"PYCHAT_IDEMPOTENCY_WINDOW": "2"})
    clients = Clients(srv)
    alice, bob = await clients.user("wa"), await clients.user("wb")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    bob_ws = await open_raw(srv, bob)
    ws = await open_raw(srv, alice)
    for k in range(5):
        await ws.send(send_frame(chat_id, f"m{k}", cmid=f"old-{k}"))
    acks = await ws.collect("ack", 5)
    await ws.send(send_frame(chat_id, "m0 again", cmid="old-0"))
    assert await ws.until("ack") == acks[0]
    rest = await alice.post_message(chat_id, "m1 again", client_msg_id="old-1")
    assert rest == {k: acks[1][k] for k in ("message_id", "chat_id", "seq", "created_at")}
    await ws.send(send_frame(chat_id, "new", cmid="fresh"))
    fresh = await ws.until("ack")
    assert fresh["seq"] == 6, "the retries were not stored again"
    assert [m["seq"] for m in await bob_ws.collect("msg", 6)] == [1, 2, 3, 4, 5, 6]
    page = await bob.history(chat_id)
    assert [m["content"] for m in page["messages"]] == ["m0", "m1", "m2", "m3", "m4", "new"]
    await ws.send(send_frame(chat_id, "new again", cmid="fresh"))  # the window's newest key
    assert await ws.until("ack") == fresh
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{srv.url}/metrics")).text
    counts = {
        ln.split()[0]: float(ln.split()[1])
        for ln in metrics.splitlines()
        if ln.startswith("pychat_gateway_retries")
    }
    assert counts["pychat_gateway_retries_answered_by_store_total"] == 2
    assert counts["pychat_gateway_retries_answered_from_window_total"] == 1
    await ws.close()
    await bob_ws.close()
    await clients.close()


async def test_a_full_engine_queue_pauses_reading_and_loses_nothing(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # Room for 2 events: bursts from several connections keep finding the queue full, so each
    # stops reading until the engine takes a batch, then carries on where it stopped.
    srv = server_factory({"PYCHAT_ENGINE_QUEUE_CAPACITY": "2", "PYCHAT_SEND_BURST": "1000"})
    clients = Clients(srv)
    reader = await clients.user("bq")
    senders = [await clients.user(f"bq{i}") for i in range(4)]
    chat_id = (await senders[0].create_group("q", [reader.user_id, *(s.user_id for s in senders[1:])]))[
        "chat_id"
    ]
    reader_ws = await open_raw(srv, reader)
    sockets = [await open_raw(srv, s) for s in senders]

    async def burst(ws: RawWs, who: int) -> list[dict[str, Any]]:
        for k in range(150):
            await ws.send(send_frame(chat_id, f"{who}:{k}"))
        return await ws.collect("ack", 150, timeout=60)

    acks = await asyncio.gather(*(burst(ws, i) for i, ws in enumerate(sockets)))
    assert sorted(a["seq"] for per in acks for a in per) == list(range(1, 601))
    for per in acks:  # each sender's messages were stored in the order it sent them
        assert [a["seq"] for a in per] == sorted(a["seq"] for a in per)
    got = await reader_ws.collect("msg", 600, timeout=60)
    assert [m["seq"] for m in got] == list(range(1, 601))
    for ws, own in zip(sockets, acks, strict=True):  # and every sender gets the others' messages
        seqs = [m["seq"] for m in await ws.collect("msg", 450, timeout=60)]
        assert seqs == sorted(seqs) and sorted(seqs + [a["seq"] for a in own]) == list(range(1, 601))
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{srv.url}/metrics")).text
    waits = next(
        ln for ln in metrics.splitlines() if ln.startswith("pychat_gateway_engine_queue_full_waits_total ")
    )
    assert int(float(waits.split()[1])) > 0, "the bursts did meet a full queue"
    for ws in [reader_ws, *sockets]:
        await ws.close()
    await clients.close()


async def test_rest_send_is_delivered_live_over_websocket(server: ServerProcess, clients: Clients) -> None:
    alice, bob = await clients.user("ra"), await clients.user("rb")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    bob_ws = await open_raw(server, bob)
    alice_ws = await open_raw(server, alice)
    ack = await alice.post_message(chat_id, "via rest")
    assert set(ack) == {"message_id", "chat_id", "seq", "created_at"} and ack["seq"] == 1
    for ws in (bob_ws, alice_ws):  # the REST sender's devices get it too
        msg = await ws.until("msg")
        assert (msg["message_id"], msg["content"], msg["sender_id"]) == (
            ack["message_id"],
            "via rest",
            alice.user_id,
        )
        assert msg["client_msg_id"].startswith("rest-")
    await bob_ws.close()
    await alice_ws.close()


async def test_history_pagination_and_bounds(server: ServerProcess, clients: Clients) -> None:
    alice, bob = await clients.user("ha"), await clients.user("hb")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    for i in range(1, 26):
        await alice.post_message(chat_id, f"m{i}")

    async def seqs(**kw: Any) -> tuple[list[int], bool]:
        page = await bob.history(chat_id, **kw)
        return [m["seq"] for m in page["messages"]], page["has_more"]

    assert await seqs() == (list(range(1, 26)), False)
    assert await seqs(limit=10) == (list(range(16, 26)), True)
    assert await seqs(before=16, limit=10) == (list(range(6, 16)), True)
    assert await seqs(before=6, limit=10) == (list(range(1, 6)), False)
    assert await seqs(after=20) == (list(range(21, 26)), False)
    assert await seqs(after=5, limit=3) == ([6, 7, 8], True)
    assert await seqs(after=5, before=9) == ([6, 7, 8], False)
    assert await seqs(after=25) == ([], False)
    assert await seqs(limit=200) == (list(range(1, 26)), False)
    page = await bob.history(chat_id, after=0, limit=1)
    assert page["messages"][0] == {
        "message_id": page["messages"][0]["message_id"],
        "chat_id": chat_id,
        "seq": 1,
        "sender_id": alice.user_id,
        "content": "m1",
        "attachments": [],
        "created_at": page["messages"][0]["created_at"],
        "client_msg_id": page["messages"][0]["client_msg_id"],
        "chain": link(genesis(chat_id), 1, alice.user_id, "m1", page["messages"][0]["created_at"], []).hex(),
    }
    for bad in ({"limit": 0}, {"limit": 201}, {"limit": "x"}, {"before": -1}, {"after": "1.5"}):
        with pytest.raises(ChatError) as e:
            await bob.request("GET", f"/api/chats/{chat_id}/messages", params=bad)
        assert (e.value.status, e.value.code) == (400, "bad_request"), bad


async def test_offline_user_syncs_with_no_gap_while_live_messages_keep_coming(
    server: ServerProcess, clients: Clients
) -> None:
    alice, bob = await clients.user("oa"), await clients.user("ob")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    other_chat = (await alice.create_group("side", [bob.user_id]))["chat_id"]
    alice_ws = await open_raw(server, alice)
    for i in range(60):
        await alice_ws.send(send_frame(chat_id, f"offline {i}"))
    await alice_ws.collect("ack", 60)
    await alice.post_message(other_chat, "side 1")

    async def keep_sending() -> None:
        for i in range(50):
            await alice_ws.send(send_frame(chat_id, f"live {i}"))
            await asyncio.sleep(0.002)

    sender = asyncio.create_task(keep_sending())
    bob_ws = await RawWs.open(server.ws_url, bob.token)
    await bob_ws.send({"type": "sync", "since": {}})
    synced = await bob_ws.until("synced", timeout=30)
    await sender
    for i in range(10):  # certainly after `synced`
        await alice_ws.send(send_frame(chat_id, f"late {i}"))
    await alice_ws.collect("ack", 60, timeout=30)
    main = [m for m in await bob_ws.collect("msg", 121, timeout=30) if m["chat_id"] == chat_id]
    # (a presence frame about alice may come too: they share a direct chat)
    assert [f for f in await bob_ws.quiet() if f["type"] == "msg"] == [], "nothing more, no repeats"
    cut = bob_ws.frames.index(synced)
    before = [f["seq"] for f in bob_ws.frames[:cut] if f["type"] == "msg" and f["chat_id"] == chat_id]
    after = [f["seq"] for f in bob_ws.frames[cut:] if f["type"] == "msg" and f["chat_id"] == chat_id]
    assert sorted(before + after) == list(range(1, 121)), "every message exactly once"
    assert after == list(range(max(before) + 1, 121)), "after synced: increasing, no gap"
    assert len(main) == 120
    assert synced["chats"][chat_id] >= 60 and synced["chats"][other_chat] == 1
    assert [f["content"] for f in bob_ws.frames if f["type"] == "msg" and f["chat_id"] == other_chat] == [
        "side 1"
    ]
    await alice_ws.close()
    await bob_ws.close()


async def test_sync_since_cursor_returns_only_newer_messages(server: ServerProcess, clients: Clients) -> None:
    alice, bob = await clients.user("ca"), await clients.user("cb")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    for i in range(5):
        await alice.post_message(chat_id, f"m{i}")
    bob_ws = await RawWs.open(server.ws_url, bob.token)
    await bob_ws.send({"type": "sync", "since": {chat_id: 3}})
    synced = await bob_ws.until("synced")
    assert [f["seq"] for f in bob_ws.frames if f["type"] == "msg"] == [4, 5]
    assert synced == {"type": "synced", "chats": {chat_id: 5}}
    # Without a cursor, the read pointer decides: after reading 4, only 5 comes.
    await bob_ws.send({"type": "read", "chat_id": chat_id, "seq": 4})
    bob2 = await RawWs.open(server.ws_url, bob.token)
    async with asyncio.timeout(10):
        while True:  # the read pointer is stored in a batch; wait until it shows
            receipts = await bob.request("GET", f"/api/chats/{chat_id}/receipts", params={"seq": 4})
            if bob.user_id in receipts["read"]:
                break
            await asyncio.sleep(0.02)
    await bob2.send({"type": "sync"})
    await bob2.until("synced")
    assert [f["seq"] for f in bob2.frames if f["type"] == "msg"] == [5]
    await bob_ws.close()
    await bob2.close()


async def test_delivered_and_read_receipts_reach_the_sender(server: ServerProcess, clients: Clients) -> None:
    alice, bob, carol = await clients.user("rca"), await clients.user("rcb"), await clients.user("rcc")
    chat_id = (await alice.create_group("receipts", [bob.user_id, carol.user_id]))["chat_id"]
    alice_ws, bob_ws = await open_raw(server, alice), await open_raw(server, bob)
    await alice_ws.send(send_frame(chat_id, "read me"))
    await alice_ws.until("ack")
    await bob_ws.until("msg")
    await bob_ws.send({"type": "delivered", "chat_id": chat_id, "seq": 1})
    assert await alice_ws.until("receipt") == {
        "type": "receipt",
        "chat_id": chat_id,
        "user_id": bob.user_id,
        "status": "delivered",
        "seq": 1,
    }
    await bob_ws.send({"type": "read", "chat_id": chat_id, "seq": 1})
    receipt = await alice_ws.until("receipt")
    assert (receipt["status"], receipt["seq"], receipt["user_id"]) == ("read", 1, bob.user_id)
    got = await alice.request("GET", f"/api/chats/{chat_id}/receipts", params={"seq": 1})
    assert (got["delivered"], got["read"]) == ([bob.user_id], [bob.user_id])
    assert got["pointers"][bob.user_id] == {"delivered": 1, "read": 1}
    assert got["pointers"][carol.user_id] == {"delivered": 0, "read": 0}
    # The reader's own connection gets no receipt about itself.
    await alice_ws.send(send_frame(chat_id, "barrier"))
    await alice_ws.until("ack")
    await bob_ws.until("msg", seq=2)
    assert [f for f in bob_ws.frames if f["type"] == "receipt"] == []
    await alice_ws.close()
    await bob_ws.close()


async def test_read_pointer_never_moves_back(server: ServerProcess, clients: Clients) -> None:
    alice, bob = await clients.user("pa"), await clients.user("pb")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    acks = [await alice.post_message(chat_id, f"m{i}") for i in range(5)]
    alice_ws = await open_raw(server, alice)
    read = await bob.request("POST", f"/api/messages/{acks[4]['message_id']}/read")
    assert read == {"chat_id": chat_id, "seq": 5}
    r1 = await alice_ws.until("receipt", status="read")
    assert r1["seq"] == 5
    # Older message: answered with the unchanged pointer, no receipt sent.
    read = await bob.request("POST", f"/api/messages/{acks[2]['message_id']}/read")
    assert read == {"chat_id": chat_id, "seq": 5}
    bob_ws = await open_raw(server, bob)
    await bob_ws.send({"type": "read", "chat_id": chat_id, "seq": 2})
    await bob_ws.send({"type": "delivered", "chat_id": chat_id, "seq": 1})
    await bob_ws.send(send_frame(chat_id, "barrier"))
    await bob_ws.until("ack")
    await alice_ws.until("msg", content="barrier")
    assert [f["seq"] for f in alice_ws.frames if f["type"] == "receipt"] == [5, 5]  # delivered 5, read 5
    got = await alice.request("GET", f"/api/chats/{chat_id}/receipts", params={"seq": 5})
    assert got["read"] == [bob.user_id]
    await alice_ws.close()
    await bob_ws.close()


async def test_non_member_is_refused_everywhere(server: ServerProcess, clients: Clients) -> None:
    alice, bob, eve = await clients.user("na"), await clients.user("nb"), await clients.user("ne")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    ack = await alice.post_message(chat_id, "private")
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/api/chats/{chat_id}", {}),
        ("GET", f"/api/chats/{chat_id}/messages", {}),
        ("POST", "/api/messages", {"json": {"chat_id": chat_id, "content": "let me in"}}),
        ("POST", f"/api/messages/{ack['message_id']}/read", {}),
        ("GET", f"/api/chats/{chat_id}/receipts", {"params": {"seq": 1}}),
        ("POST", f"/api/chats/{chat_id}/members", {"json": {"user_id": eve.user_id}}),
    ]
    for method, path, kw in calls:
        with pytest.raises(ChatError) as e:
            await eve.request(method, path, **kw)
        assert (e.value.status, e.value.code) == (403, "forbidden"), path
    eve_ws = await open_raw(server, eve)
    await eve_ws.send(send_frame(chat_id, "ws", cmid="eve-1"))
    err = await eve_ws.until("error")
    assert (err["code"], err["ref"]) == ("forbidden", "eve-1")
    for frame in (
        {"type": "read", "chat_id": chat_id, "seq": 1},
        {"type": "delivered", "chat_id": chat_id, "seq": 1},
        {"type": "typing", "chat_id": chat_id, "state": "start"},
    ):
        await eve_ws.send(frame)
        assert (await eve_ws.until("error"))["code"] == "forbidden"
    # Eve's sync does not leak the chat.
    await eve_ws.send({"type": "sync", "since": {chat_id: 0}})
    synced = await eve_ws.until("synced")
    assert chat_id not in synced["chats"]
    assert [f for f in eve_ws.frames if f["type"] == "msg"] == []
    assert (await bob.history(chat_id))["messages"][0]["content"] == "private"
    assert len((await bob.history(chat_id))["messages"]) == 1
    with pytest.raises(ChatError) as e:
        await eve.request("GET", "/api/chats/cdoesnotexist")
    assert e.value.status == 404
    await eve_ws.close()


BAD_FRAMES: list[tuple[str, str, str | None]] = [
    ("not json", "bad_request", None),
    ("[1, 2]", "bad_request", None),
    ('{"chat_id": "x"}', "bad_request", None),
    ('{"type": "fly"}', "bad_request", None),
    ('{"type": 5}', "bad_request", None),
    ('{"type": "send", "chat_id": "CHAT", "client_msg_id": "r1"}', "bad_request", "r1"),
    ('{"type": "send", "chat_id": "CHAT", "client_msg_id": "r2", "content": 5}', "bad_request", "r2"),
    ('{"type": "send", "chat_id": "CHAT", "content": "x"}', "bad_request", None),
    ('{"type": "send", "chat_id": "CHAT", "client_msg_id": "r3", "content": "BIG"}', "too_large", "r3"),
    (
        '{"type": "send", "chat_id": "CHAT", "client_msg_id": "r4", "content": "x", "attachments": "no"}',
        "bad_request",
        "r4",
    ),
    (
        '{"type": "send", "chat_id": "CHAT", "client_msg_id": "r5", "content": "x", "attachments": ELEVEN}',
        "too_large",
        "r5",
    ),
    (
        '{"type": "send", "chat_id": "CHAT", "client_msg_id": "r6", "content": "x", "attachments": ["nomedia"]}',
        "not_found",
        "r6",
    ),
    ('{"type": "send", "chat_id": "nochat", "client_msg_id": "r7", "content": "x"}', "not_found", "r7"),
    ('{"type": "send", "chat_id": "CHAT", "client_msg_id": "r8", "content": ""}', "bad_request", "r8"),
    ('{"type": "read", "chat_id": "CHAT", "seq": -1}', "bad_request", None),
    ('{"type": "read", "chat_id": "CHAT", "seq": "1"}', "bad_request", None),
    ('{"type": "read", "chat_id": "CHAT", "seq": 999}', "bad_request", None),
    ('{"type": "delivered", "chat_id": "CHAT"}', "bad_request", None),
    ('{"type": "sync", "since": [1]}', "bad_request", None),
    ('{"type": "sync", "since": {"CHAT": -4}}', "bad_request", None),
    ('{"type": "typing", "chat_id": "CHAT", "state": "maybe"}', "bad_request", None),
    ('{"type": "presence.subscribe", "user_ids": "x"}', "bad_request", None),
]


async def test_every_bad_frame_gets_its_error_and_the_connection_keeps_working(
    server: ServerProcess, clients: Clients
) -> None:
    alice, bob = await clients.user("bfa"), await clients.user("bfb")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    ws = await open_raw(server, alice)
    eleven = json.dumps([f"m{i}" for i in range(11)])
    for text, code, ref in BAD_FRAMES:
        text = text.replace("CHAT", chat_id).replace("BIG", "x" * (64 * 1024 + 1)).replace("ELEVEN", eleven)
        await ws.send(text)
        err = await ws.until("error")
        assert (err["code"], err["ref"]) == (code, ref), text[:100]
        assert isinstance(err["message"], str) and err["message"]
        await ws.send(send_frame(chat_id, "still here"))
        assert (await ws.until("ack"))["chat_id"] == chat_id
    await ws.ws.send(b"\x00binary")
    assert (await ws.until("error"))["code"] == "bad_request"
    await ws.send(send_frame(chat_id, "after binary"))
    await ws.until("ack")
    # Nothing half-stored: only the good messages are in history.
    page = await alice.history(chat_id, limit=200)
    assert {m["content"] for m in page["messages"]} == {"still here", "after binary"}
    assert [m["seq"] for m in page["messages"]] == list(range(1, len(BAD_FRAMES) + 2))
    await ws.close()


async def test_a_client_that_keeps_misbehaving_is_disconnected(
    server: ServerProcess, clients: Clients
) -> None:
    alice = await clients.user("spam")
    ws = await open_raw(server, alice)
    for _ in range(25):
        try:
            await ws.send("garbage")
        except Exception:
            break
    codes = []
    with pytest.raises(Exception):  # noqa: B017 - the close surfaces as ConnectionClosed
        while True:
            codes.append((await ws.recv())["code"])
    assert codes[:20] == ["bad_request"] * 20
    assert ws.ws.close_reason == "too many bad frames"


async def _close_code_after(server: ServerProcess, token: str, frame: bytes) -> tuple[int, bytes]:
    """Sends one raw frame after the upgrade; returns the close code and reason the server sent."""
    reader, writer = await raw_upgrade(server.ws_port, token)
    writer.write(frame)
    await writer.drain()
    try:
        async with asyncio.timeout(10):
            while True:
                head = await reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(await reader.readexactly(8), "big")
                payload = await reader.readexactly(length)
                if head[0] & 0x0F == 0x8:
                    return int.from_bytes(payload[:2], "big"), payload[2:]
    finally:
        writer.close()


async def test_websocket_protocol_violations_close_with_their_rfc_codes(
    server: ServerProcess, clients: Clients
) -> None:
    alice = await clients.user("rfc")
    # Not UTF-8: 1007. Unmasked client frame: 1002. Unknown opcode: 1002.
    assert await _close_code_after(server, alice.token, client_frame(0x1, b"\xff\xfe")) == (
        1007,
        b"text frame is not UTF-8",
    )
    assert (await _close_code_after(server, alice.token, client_frame(0x1, b"{}", masked=False)))[0] == 1002
    assert (await _close_code_after(server, alice.token, client_frame(0x3, b"")))[0] == 1002
    # The server keeps serving.
    ws = await open_raw(server, alice)
    await ws.close()


async def test_frame_over_the_size_limit_is_refused(server: ServerProcess, clients: Clients) -> None:
    alice = await clients.user("huge")
    ws = await open_raw(server, alice)
    await ws.send("x" * (256 * 1024 + 10))
    err = await ws.until("error")
    assert err["code"] == "too_large"
    await ws.close()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"content": "x"}, 400, "bad_request"),
        ({"chat_id": "CHAT", "content": 5}, 400, "bad_request"),
        ({"chat_id": "CHAT", "content": "x" * (64 * 1024 + 1)}, 413, "too_large"),
        ({"chat_id": "CHAT", "content": "x", "attachments": ["a"] * 11}, 413, "too_large"),
        ({"chat_id": "CHAT", "content": "x", "attachments": ["nomedia"]}, 404, "not_found"),
        ({"chat_id": "CHAT", "content": ""}, 400, "bad_request"),
        ({"chat_id": "CHAT", "content": "x", "client_msg_id": ""}, 400, "bad_request"),
        ({"chat_id": "nochat", "content": "x"}, 404, "not_found"),
    ],
)
async def test_bad_rest_sends(
    server: ServerProcess, clients: Clients, body: dict[str, Any], status: int, code: str
) -> None:
    alice, bob = await clients.user("brs"), await clients.user("brt")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    body = {k: (chat_id if v == "CHAT" else v) for k, v in body.items()}
    with pytest.raises(ChatError) as e:
        await alice.request("POST", "/api/messages", json=body)
    assert (e.value.status, e.value.code) == (status, code)
    assert (await alice.history(chat_id))["messages"] == []


async def test_lone_surrogates_in_rest_bodies_are_bad_requests(clients: Clients) -> None:
    alice, bob = await clients.user("sur"), await clients.user("sus")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    raw = b'{"chat_id": "CHAT", "content": "bad \\ud800 text"}'.replace(b"CHAT", chat_id.encode())
    r = await alice.http.post("/api/messages", content=raw, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request")
    r = await alice.http.post("/api/chats", content=b'{"kind": "group", "members": [], "title": "\\udfff"}')
    assert r.status_code == 400
