"""An acked message survives SIGKILL, exactly once; idempotency survives a restart."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from tests.conftest import Clients, ServerProcess
from tests.wsraw import RawWs

pytestmark = [pytest.mark.stores("sqlite", "cassandra"), pytest.mark.timeout(600)]


async def test_every_acked_message_survives_sigkill_exactly_once(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory()
    clients = Clients(srv)
    alice, bob = await clients.user("killer"), await clients.user("victim")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    ws = await RawWs.open(srv.ws_url, alice.token)
    sent: list[str] = []
    # Keep many sends in flight; kill the moment the 300th ack is in.
    for i in range(400):
        cmid = f"k{i}-{uuid.uuid4().hex[:6]}"
        sent.append(cmid)
        await ws.send({"type": "send", "chat_id": chat_id, "client_msg_id": cmid, "content": f"m{i}"})
    acks = await ws.collect("ack", 300, timeout=60)
    srv.kill()
    await ws.close()
    acked = {a["client_msg_id"]: a for a in acks}
    srv.start()
    history = await bob.history_all(chat_id)
    seqs = [m["seq"] for m in history]
    assert seqs == list(range(1, len(history) + 1)), "gap-free after the crash"
    stored = {m["client_msg_id"]: m for m in history}
    assert len(stored) == len(history), "no client_msg_id stored twice"
    for cmid, ack in acked.items():
        m = stored[cmid]
        assert (m["message_id"], m["seq"], m["created_at"]) == (
            ack["message_id"],
            ack["seq"],
            ack["created_at"],
        )
    assert len(history) >= len(acked) == 300
    # Re-sending everything (acked or not) after the restart stores nothing twice;
    # acked ones get their original ack back from the store.
    ws2 = await RawWs.open(srv.ws_url, alice.token)
    for i, cmid in enumerate(sent):
        await ws2.send({"type": "send", "chat_id": chat_id, "client_msg_id": cmid, "content": f"m{i}"})
    again = {a["client_msg_id"]: a for a in await ws2.collect("ack", len(sent), timeout=60)}
    for cmid, ack in acked.items():
        assert {k: again[cmid][k] for k in ("message_id", "seq", "created_at")} == {
            k: ack[k] for k in ("message_id", "seq", "created_at")
        }
    final = await bob.history(chat_id, limit=1)
    assert final["messages"][0]["seq"] == len(sent)
    assert sorted(a["seq"] for a in again.values()) == list(range(1, len(sent) + 1))
    await ws2.close()
    await clients.close()


async def test_tokens_and_chats_survive_a_restart(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory()
    clients = Clients(srv)
    alice, bob = await clients.user("keeper"), await clients.user("kept")
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    srv.stop()
    srv.start()
    # Same token, and the gateway knows the membership again.
    ws = await RawWs.open(srv.ws_url, alice.token)
    await ws.send({"type": "send", "chat_id": chat_id, "client_msg_id": "after-restart", "content": "back"})
    assert (await ws.until("ack"))["seq"] == 1
    await ws.close()
    await clients.close()
