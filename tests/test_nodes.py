"""Three pychat nodes as one service (issue 13): real `pychat serve` processes on one Cassandra
keyspace, one Kafka broker and one Redis; users spread over the nodes. `make test-cluster`."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pychat.client import ChatClient, ChatError
from services.cassandra import CassandraServer
from services.s3 import S3Server
from tests.nodekit import Nodes, Sender, check_chat, running_cluster, users_on

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, cassandra: CassandraServer, s3: S3Server
) -> Iterator[Nodes]:
    # Media in a bucket on a real S3 server, as a deployment would have it.
    media = {"PYCHAT_MEDIA_STORE": s3.media_store(f"nodes-{uuid.uuid4().hex[:12]}"), **s3.client_env}
    with running_cluster(tmp_path_factory.mktemp("nodes"), cassandra, env=media) as running:
        yield running


@pytest.fixture
async def six(nodes: Nodes) -> AsyncIterator[list[ChatClient]]:
    """Six users, two on each node, connected."""
    clients = await users_on(nodes.urls, 6)
    yield clients
    for c in clients:
        await c.close()


# Messages of other chats met while waiting for one chat's, per client, for a later wait.
_elsewhere: dict[int, list[dict[str, Any]]] = {}


async def _msgs(client: ChatClient, chat_id: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    kept = _elsewhere.setdefault(id(client), [])
    got = [m for m in kept if m["chat_id"] == chat_id][:count]
    for m in got:
        kept.remove(m)
    while len(got) < count:
        frame = await client.next_event("msg", timeout=timeout)
        (got if frame["chat_id"] == chat_id else kept).append(frame)
    return got


async def test_a_group_and_direct_chats_across_nodes_are_gap_free_in_order_and_delivered_once(
    six: list[ChatClient],
) -> None:
    group = await six[0].create_group("across", [c.user_id for c in six[1:]])
    direct = await six[1].create_direct(six[2].user_id)  # node 2 and node 3
    per_sender = 15
    senders = [Sender(c, group["chat_id"]) for c in six]
    pair = [Sender(six[1], direct["chat_id"]), Sender(six[2], direct["chat_id"])]
    await asyncio.gather(
        *[s.send(f"g-{i}-{k}", f"group {i}.{k}") for i, s in enumerate(senders) for k in range(per_sender)],
        *[s.send(f"d-{i}-{k}", f"direct {i}.{k}") for i, s in enumerate(pair) for k in range(10)],
    )
    total = per_sender * len(six)
    for client in six:
        # Every other member's messages, once, in seq order (its own come as acks).
        got = await _msgs(client, group["chat_id"], total - per_sender)
        seqs = [m["seq"] for m in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert {m["sender_id"] for m in got} == {c.user_id for c in six} - {client.user_id}
        assert all(m["client_msg_id"].startswith("g-") for m in got)
    acks = {k: v for s in senders for k, v in s.acks.items()}
    # History from every node: the same gap-free chat holding every ack.
    pages = [await c.history_all(group["chat_id"]) for c in six[:3]]
    assert pages[0] == pages[1] == pages[2]
    check_chat(pages[0], acks)
    check_chat(await six[2].history_all(direct["chat_id"]), {k: v for s in pair for k, v in s.acks.items()})
    assert len(await _msgs(six[1], direct["chat_id"], 10)) == 10
    # Once on the wire too: the SDK drops a repeated (chat, seq) before the checks above see it,
    # so count what it dropped (none of these connections dropped: nothing may come twice).
    assert [c.duplicates_dropped for c in six] == [0] * len(six), "a msg frame came twice"


async def test_a_retry_on_another_node_gets_the_original_ack(nodes: Nodes, six: list[ChatClient]) -> None:
    group = await six[0].create_group("retry", [six[1].user_id])
    first = await six[0].send(group["chat_id"], "once", client_msg_id="same-key")
    # The client reconnects elsewhere (node 2 instead of node 1) and retries.
    sender = Sender(six[0], group["chat_id"])
    await sender.move(nodes.urls[1])
    six[0] = sender.client
    again = await sender.client.send(group["chat_id"], "once", client_msg_id="same-key")
    assert (again["seq"], again["message_id"]) == (first["seq"], first["message_id"])
    # Over REST on the third node too.
    over_rest = ChatClient(nodes.urls[2], sender.client.token, sender.client.user_id)
    rest = await over_rest.post_message(group["chat_id"], "once", client_msg_id="same-key")
    await over_rest.close()
    assert (rest["seq"], rest["message_id"]) == (first["seq"], first["message_id"])
    history = await six[1].history_all(group["chat_id"])
    assert [m["seq"] for m in history] == [1]
    metrics = (await sender.client.http.get("/metrics")).text
    assert "pychat_cluster_pending_sends 0" in metrics and "pychat_cluster_gaps_filled" in metrics
    assert "pychat_gateway_cluster_frames_dropped_total 0" in metrics


async def test_receipts_typing_and_presence_cross_nodes(six: list[ChatClient]) -> None:
    a, b = six[0], six[1]  # node 1, node 2
    direct = await a.create_direct(b.user_id)
    ack = await a.send(direct["chat_id"], "read me")
    await _msgs(b, direct["chat_id"], 1)
    await b.mark_read(direct["chat_id"], ack["seq"])
    receipt = await a.next_event("receipt", timeout=10)
    assert (receipt["user_id"], receipt["seq"]) == (b.user_id, ack["seq"])
    await b.typing(direct["chat_id"], "start")
    typing = await a.next_event("typing", timeout=10)
    assert (typing["user_id"], typing["state"]) == (b.user_id, "start")
    # Presence: a direct partner on another node is followed without asking.
    assert (await a.presence(b.user_id))["status"] == "online"
    await b.close()
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        frame = await a.next_event("presence", timeout=30)
        if frame["user_id"] == b.user_id and frame["status"] == "offline":
            break
        assert asyncio.get_running_loop().time() < deadline
    assert (await a.presence(b.user_id))["status"] == "offline"


async def test_sync_on_another_node_returns_what_was_missed_without_a_gap(
    nodes: Nodes, six: list[ChatClient]
) -> None:
    group = await six[0].create_group("missed", [six[1].user_id])
    await six[0].send(group["chat_id"], "seen")
    await _msgs(six[1], group["chat_id"], 1)
    since = six[1].since()
    away = Sender(six[1], group["chat_id"])
    six[1].auto_reconnect = False
    await six[1].drop_connection()
    for k in range(40):
        await six[0].send(group["chat_id"], f"missed {k}")
    await away.move(nodes.urls[2])  # it comes back on node 3
    six[1] = away.client
    synced = await away.client.sync(since)
    assert synced["chats"][group["chat_id"]] == 41
    got = await _msgs(away.client, group["chat_id"], 40)
    assert [m["seq"] for m in got] == list(range(2, 42))
    # And live again afterwards.
    await six[0].send(group["chat_id"], "live")
    assert [m["seq"] for m in await _msgs(away.client, group["chat_id"], 1)] == [42]


async def test_a_membership_change_reaches_every_node_before_the_next_send(six: list[ChatClient]) -> None:
    owner, joiner = six[0], six[2]  # node 1 changes it; the joiner sends on node 3
    group = await owner.create_group("members", [six[1].user_id])
    for _ in range(5):
        await owner.request(
            "POST", f"/api/chats/{group['chat_id']}/members", json={"user_id": joiner.user_id}
        )
        ack = await joiner.send(group["chat_id"], "I am in")
        assert ack["seq"] >= 1
        await owner.request("DELETE", f"/api/chats/{group['chat_id']}/members/{joiner.user_id}")
        with pytest.raises(ChatError) as refused:
            await joiner.send(group["chat_id"], "and out")
        assert refused.value.code == "forbidden"


async def test_media_uploaded_on_one_node_is_posted_and_read_on_the_others(six: list[ChatClient]) -> None:
    # six[0] on node 1, six[1] on node 2, six[2] on node 3; six[5] (node 3) is not in the group.
    uploader, on_two, on_three, outsider = six[0], six[1], six[2], six[5]
    group = await uploader.create_group("media", [on_two.user_id, on_three.user_id])
    data = os.urandom(3 * 1024 * 1024 + 5)
    media = await uploader.upload(data, filename="across.bin")
    for c in (on_two, on_three, outsider):
        with pytest.raises(ChatError) as refused:
            await c.download(media["url"])
        assert refused.value.code == "forbidden"
    await asyncio.gather(on_two.sync(), on_three.sync())
    ack = await uploader.send(group["chat_id"], "a file", attachments=[media["media_id"]])
    for c in (on_two, on_three):
        (msg,) = await _msgs(c, group["chat_id"], 1)
        assert msg["seq"] == ack["seq"] and msg["attachments"][0]["media_id"] == media["media_id"]
        assert await c.download(msg["attachments"][0]["url"]) == data
    with pytest.raises(ChatError) as refused:
        await outsider.download(media["url"])
    assert refused.value.code == "forbidden"


async def _found(client: ChatClient, q: str, expected: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Search results once `expected` are there (indexing follows the acks), or what there is."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        page = await client.request("GET", "/api/search", params={"q": q})
        results: list[dict[str, Any]] = page["results"]
        if len(results) >= expected or asyncio.get_running_loop().time() > deadline:
            return results
        await asyncio.sleep(0.2)


async def test_search_on_any_node_finds_every_chat_of_the_caller_and_no_other(six: list[ChatClient]) -> None:
    # six[0] on node 1, six[1] on node 2, six[2] on node 3; six[4] (node 2) is in neither chat.
    word = f"kumquat{uuid.uuid4().hex[:6]}"
    group = await six[0].create_group("fruit", [six[1].user_id, six[2].user_id])
    direct = await six[1].create_direct(six[2].user_id)
    await six[0].send(group["chat_id"], f"the {word} crate arrived")
    await six[1].send(direct["chat_id"], f"{word} between us")
    # Each node answers for both chats, whichever node sequenced and stored them.
    for reader in (six[0], six[1], six[2]):
        expected = 2 if reader is not six[0] else 1
        results = await _found(reader, word, expected)
        assert sorted(r["chat_id"] for r in results) == sorted(
            [group["chat_id"], direct["chat_id"]][:expected]
        ), (reader.user_id, results)
        assert f"<mark>{word}</mark>" in results[0]["highlight"]
    assert (await six[4].request("GET", "/api/search", params={"q": word}))["results"] == []
    # A member removed on one node stops seeing the chat's messages on every node.
    await six[0].request("DELETE", f"/api/chats/{group['chat_id']}/members/{six[2].user_id}")
    results = await _found(six[2], word, 1)
    assert [r["chat_id"] for r in results] == [direct["chat_id"]]
