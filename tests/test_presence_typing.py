"""Typing indicators and presence over real sockets, with short timings
(typing: forward a start at most every 1 s, expire after 1.5 s; presence grace 1 s)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from pychat.client import ChatError
from tests.conftest import Clients, ServerProcess
from tests.test_messaging import open_raw, send_frame
from tests.wsraw import RawWs

TIMINGS = {
    "PYCHAT_TYPING_TTL_MS": "1500",
    "PYCHAT_TYPING_MIN_INTERVAL_MS": "1000",
    "PYCHAT_PRESENCE_GRACE_MS": "1000",
    "PYCHAT_SIDE_TICK_MS": "50",
}


@pytest.fixture(scope="module")
def side_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("side"), env=TIMINGS)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def side_clients(side_server: ServerProcess) -> AsyncIterator[Clients]:
    made = Clients(side_server)
    yield made
    await made.close()


def typing_frames(ws: RawWs) -> list[tuple[str, str]]:
    return [(f["user_id"], f["state"]) for f in ws.frames if f["type"] == "typing"]


async def test_typing_goes_to_the_other_members_only(
    side_server: ServerProcess, side_clients: Clients
) -> None:
    a, b, c = [await side_clients.user(p) for p in ("ta", "tb", "tc")]
    chat_id = (await a.create_group("typing", [b.user_id, c.user_id]))["chat_id"]
    a1, a2, b_ws, c_ws = [await open_raw(side_server, u) for u in (a, a, b, c)]
    await a1.send({"type": "typing", "chat_id": chat_id, "state": "start"})
    for ws in (b_ws, c_ws):
        assert await ws.until("typing") == {
            "type": "typing",
            "chat_id": chat_id,
            "user_id": a.user_id,
            "state": "start",
        }
    await a1.send({"type": "typing", "chat_id": chat_id, "state": "stop"})
    assert (await b_ws.until("typing"))["state"] == "stop"
    # Barrier: a message sent after the typing frames reaches a's other device after them.
    await a1.send(send_frame(chat_id, "done typing"))
    await a2.until("msg")
    assert typing_frames(a2) == [] and typing_frames(a1) == []
    for ws in (a1, a2, b_ws, c_ws):
        await ws.close()


async def test_start_is_rate_limited_and_stop_needs_an_open_state(
    side_server: ServerProcess, side_clients: Clients
) -> None:
    a, b = await side_clients.user("ra"), await side_clients.user("rb")
    chat_id = (await a.create_direct(b.user_id))["chat_id"]
    a_ws, b_ws = await open_raw(side_server, a), await open_raw(side_server, b)
    await a_ws.send({"type": "typing", "chat_id": chat_id, "state": "stop"})  # nothing open: dropped
    for _ in range(3):
        await a_ws.send({"type": "typing", "chat_id": chat_id, "state": "start"})
    await a_ws.send({"type": "typing", "chat_id": chat_id, "state": "stop"})
    await a_ws.send({"type": "typing", "chat_id": chat_id, "state": "stop"})
    await a_ws.send(send_frame(chat_id, "barrier"))
    await b_ws.until("msg")
    assert typing_frames(b_ws) == [(a.user_id, "start"), (a.user_id, "stop")]
    await a_ws.close()
    await b_ws.close()


async def test_unrefreshed_start_expires_and_closing_the_last_connection_stops_typing(
    side_server: ServerProcess, side_clients: Clients
) -> None:
    a, b = await side_clients.user("ea"), await side_clients.user("eb")
    chat_id = (await a.create_direct(b.user_id))["chat_id"]
    a_ws, b_ws = await open_raw(side_server, a), await open_raw(side_server, b)
    await a_ws.send({"type": "typing", "chat_id": chat_id, "state": "start"})
    assert (await b_ws.until("typing"))["state"] == "start"
    started = time.monotonic()
    stop = await b_ws.until("typing", timeout=10)
    assert stop["state"] == "stop" and stop["user_id"] == a.user_id
    assert time.monotonic() - started >= 1.0, "not before the expiry"
    # Typing again, then the typer's only connection closes: a stop follows at once.
    await a_ws.send({"type": "typing", "chat_id": chat_id, "state": "start"})
    assert (await b_ws.until("typing"))["state"] == "start"
    await a_ws.close()
    assert (await b_ws.until("typing", timeout=1.0))["state"] == "stop"
    await b_ws.close()


def presence_frames(ws: RawWs, user_id: str) -> list[str]:
    return [f["status"] for f in ws.frames if f["type"] == "presence" and f["user_id"] == user_id]


async def test_presence_of_a_two_device_user_reaches_its_direct_partner(
    side_server: ServerProcess, side_clients: Clients
) -> None:
    a, b = await side_clients.user("pa"), await side_clients.user("pb")
    await a.create_direct(b.user_id)
    b_ws = await open_raw(side_server, b)
    before = int(time.time() * 1000)
    a1 = await open_raw(side_server, a)
    online = await b_ws.until("presence")
    assert (online["user_id"], online["status"]) == (a.user_id, "online")
    assert online["last_seen"] >= before - 5
    assert (await b.presence(a.user_id))["status"] == "online"
    a2 = await open_raw(side_server, a)
    await a1.close()
    await asyncio.sleep(1.5)  # past the grace period: a still has a device, so still online
    assert (await b.presence(a.user_id))["status"] == "online"
    closed_at = int(time.time() * 1000)
    await a2.close()
    offline = await b_ws.until("presence", timeout=10)
    assert (offline["user_id"], offline["status"]) == (a.user_id, "offline")
    assert closed_at - 5 <= offline["last_seen"] <= closed_at + 1000
    assert presence_frames(b_ws, a.user_id) == ["online", "offline"]
    rest = await b.presence(a.user_id)
    assert rest == {"user_id": a.user_id, "status": "offline", "last_seen": offline["last_seen"]}
    await b_ws.close()


async def test_a_quick_reconnect_within_the_grace_period_does_not_flap(
    side_server: ServerProcess, side_clients: Clients
) -> None:
    a, b = await side_clients.user("ga"), await side_clients.user("gb")
    await a.create_direct(b.user_id)
    b_ws = await open_raw(side_server, b)
    a_ws = await open_raw(side_server, a)
    assert (await b_ws.until("presence"))["status"] == "online"
    await a_ws.close()
    reconnected_at = int(time.time() * 1000)
    a_ws = await open_raw(side_server, a)
    await asyncio.sleep(0.3)
    await a_ws.close()
    offline = await b_ws.until("presence", timeout=10)
    # The only offline is the final one: the drop and quick return were never published.
    assert offline["status"] == "offline" and offline["last_seen"] >= reconnected_at
    assert presence_frames(b_ws, a.user_id) == ["online", "offline"]
    await b_ws.close()


async def test_subscribe_answers_at_once_then_pushes_changes(
    side_server: ServerProcess, side_clients: Clients
) -> None:
    a, b, c = [await side_clients.user(p) for p in ("sa", "sb", "sc")]
    await a.create_group("sub", [b.user_id, c.user_id])  # a group: no automatic following
    b_ws = await open_raw(side_server, b)
    c_ws = await open_raw(side_server, c)
    await b_ws.send({"type": "presence.subscribe", "user_ids": [a.user_id, c.user_id]})
    first = {f["user_id"]: f for f in [await b_ws.until("presence"), await b_ws.until("presence")]}
    assert first[a.user_id]["status"] == "offline" and first[a.user_id]["last_seen"] is None
    assert first[c.user_id]["status"] == "online"
    a_ws = await open_raw(side_server, a)
    assert (await b_ws.until("presence", user_id=a.user_id))["status"] == "online"
    await a_ws.close()
    assert (await b_ws.until("presence", user_id=a.user_id, timeout=10))["status"] == "offline"
    # c did not subscribe: it hears nothing about a.
    await b_ws.send(send_frame((await a.list_chats())[0]["chat_id"], "barrier"))
    await c_ws.until("msg")
    assert presence_frames(c_ws, a.user_id) == []
    await b_ws.close()
    await c_ws.close()


async def test_subscribe_limits_and_strangers(side_server: ServerProcess, side_clients: Clients) -> None:
    a, stranger = await side_clients.user("la"), await side_clients.user("ls")
    a_ws = await open_raw(side_server, a)
    await a_ws.send({"type": "presence.subscribe", "user_ids": [f"u{i}" for i in range(1001)]})
    err = await a_ws.until("error")
    assert err["code"] == "bad_request" and "1000" in err["message"]
    await a_ws.send({"type": "presence.subscribe", "user_ids": [stranger.user_id, a.user_id]})
    me = await a_ws.until("presence")
    assert (me["user_id"], me["status"]) == (a.user_id, "online")
    refused = await a_ws.until("error")
    assert refused["code"] == "forbidden" and stranger.user_id in refused["message"]
    with pytest.raises(ChatError) as e:
        await a.presence(stranger.user_id)
    assert e.value.status == 403
    with pytest.raises(ChatError) as e:
        await a.presence("unobody")
    assert e.value.status == 404
    # The limit counts what the connection already follows (itself, now): 1 + 1000 is over.
    await a_ws.send({"type": "presence.subscribe", "user_ids": [f"x{i}" for i in range(1000)]})
    assert (await a_ws.until("error"))["code"] == "bad_request"
    await a_ws.send({"type": "presence.subscribe", "user_ids": [f"x{i}" for i in range(999)]})
    assert (await a_ws.until("error"))["code"] == "forbidden"
    await a_ws.send({"type": "presence.subscribe", "user_ids": [a.user_id] * 3})
    assert (await a_ws.until("presence"))["user_id"] == a.user_id
    await a_ws.close()


async def test_presence_of_oneself_and_unknown_over_rest(side_clients: Clients) -> None:
    a = await side_clients.user("self")
    me = await a.presence(a.user_id)
    assert me == {"user_id": a.user_id, "status": "offline", "last_seen": None}


async def test_last_seen_is_stored_and_survives_a_restart(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory(TIMINGS)
    clients = Clients(srv)
    a, b = await clients.user("rsa"), await clients.user("rsb")
    await a.create_direct(b.user_id)
    b_ws = await open_raw(srv, b)
    a_ws = await open_raw(srv, a)
    await b_ws.until("presence", status="online")
    await a_ws.close()
    offline = await b_ws.until("presence", status="offline", timeout=10)
    await b_ws.close()
    srv.stop()
    srv.start()
    assert await b.presence(a.user_id) == {
        "user_id": a.user_id,
        "status": "offline",
        "last_seen": offline["last_seen"],
    }
    await clients.close()
