"""Chats and members over REST, and the gateway's membership cache following them."""

from __future__ import annotations

import pytest

from pychat.client import ChatError
from tests.conftest import Clients, ServerProcess
from tests.test_messaging import open_raw, send_frame


async def test_direct_chat_is_unique_per_pair(clients: Clients) -> None:
    alice, bob = await clients.user("da"), await clients.user("db")
    first = await alice.request("POST", "/api/chats", json={"kind": "direct", "members": [bob.user_id]})
    r = await bob.http.post("/api/chats", json={"kind": "direct", "members": [alice.user_id]})
    assert r.status_code == 200
    assert r.json() == first
    assert set(first) >= {"chat_id", "kind", "title", "members", "created_at", "last_seq"}
    assert (first["kind"], first["title"], first["last_seq"]) == ("direct", None, 0)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"kind": "direct", "members": []}, 400, "bad_request"),
        ({"kind": "direct", "members": ["SELF"]}, 400, "bad_request"),
        ({"kind": "direct", "members": ["OTHER", "OTHER2"]}, 400, "bad_request"),
        ({"kind": "direct", "members": ["unone"]}, 404, "not_found"),
        ({"kind": "group", "members": ["unone"]}, 404, "not_found"),
        ({"kind": "group", "members": "x"}, 400, "bad_request"),
        ({"kind": "group", "members": [], "title": 5}, 400, "bad_request"),
        ({"kind": "channel", "members": []}, 400, "bad_request"),
        ({"members": []}, 400, "bad_request"),
    ],
)
async def test_bad_chat_requests(clients: Clients, body: dict[str, object], status: int, code: str) -> None:
    alice, bob, carol = await clients.user("ba"), await clients.user("bb"), await clients.user("bc")
    subst = {"SELF": alice.user_id, "OTHER": bob.user_id, "OTHER2": carol.user_id}
    if isinstance(body.get("members"), list):
        body = {**body, "members": [subst.get(m, m) for m in body["members"]]}  # type: ignore[union-attr]
    with pytest.raises(ChatError) as e:
        await alice.request("POST", "/api/chats", json=body)
    assert (e.value.status, e.value.code) == (status, code)
    assert await alice.list_chats() == []


async def test_chat_list_newest_activity_first_with_last_message_and_unread(clients: Clients) -> None:
    alice, bob, carol = await clients.user("la"), await clients.user("lb"), await clients.user("lc")
    d1 = await alice.create_direct(bob.user_id)
    g = await alice.create_group("team", [bob.user_id, carol.user_id])
    d2 = await alice.create_direct(carol.user_id)
    await bob.post_message(g["chat_id"], "one")
    await bob.post_message(g["chat_id"], "two")
    await alice.post_message(g["chat_id"], "mine")
    await bob.post_message(d1["chat_id"], "latest")
    chats = await alice.list_chats()
    assert [c["chat_id"] for c in chats] == [d1["chat_id"], g["chat_id"], d2["chat_id"]]
    by_id = {c["chat_id"]: c for c in chats}
    assert by_id[g["chat_id"]]["unread"] == 2, "own messages are not unread"
    assert by_id[g["chat_id"]]["last_message"]["content"] == "mine"
    assert by_id[g["chat_id"]]["last_seq"] == 3
    assert by_id[d2["chat_id"]]["last_message"] is None and by_id[d2["chat_id"]]["unread"] == 0
    await alice.request("POST", f"/api/messages/{by_id[g['chat_id']]['last_message']['message_id']}/read")
    chats = await alice.list_chats()
    assert {c["chat_id"]: c["unread"] for c in chats}[g["chat_id"]] == 0


async def test_added_member_is_told_and_can_send_removed_member_cannot(
    server: ServerProcess, clients: Clients
) -> None:
    alice, bob, carol = await clients.user("ma"), await clients.user("mb"), await clients.user("mc")
    g = await alice.create_group("grow", [bob.user_id])
    chat_id = g["chat_id"]
    carol_ws = await open_raw(server, carol)
    await carol_ws.send(send_frame(chat_id, "early", cmid="c0"))
    assert (await carol_ws.until("error"))["code"] == "forbidden"
    updated = await bob.request("POST", f"/api/chats/{chat_id}/members", json={"user_id": carol.user_id})
    assert set(updated["members"]) == {alice.user_id, bob.user_id, carol.user_id}
    frame = await carol_ws.until("chat")
    assert frame["chat"]["chat_id"] == chat_id and carol.user_id in frame["chat"]["members"]
    await carol_ws.send(send_frame(chat_id, "hello all"))
    assert (await carol_ws.until("ack"))["seq"] == 1
    # Adding again changes nothing.
    again = await alice.request("POST", f"/api/chats/{chat_id}/members", json={"user_id": carol.user_id})
    assert again["members"] == updated["members"]
    # Only the creator removes others; anyone removes itself.
    with pytest.raises(ChatError) as e:
        await bob.request("DELETE", f"/api/chats/{chat_id}/members/{carol.user_id}")
    assert e.value.status == 403
    assert await alice.request("DELETE", f"/api/chats/{chat_id}/members/{carol.user_id}") is None
    removed = await carol_ws.until("chat")
    assert carol.user_id not in removed["chat"]["members"]
    await carol_ws.send(send_frame(chat_id, "still?", cmid="c2"))
    assert (await carol_ws.until("error", ref="c2"))["code"] == "forbidden"
    with pytest.raises(ChatError) as e:
        await carol.history(chat_id)
    assert e.value.status == 403
    assert await bob.request("DELETE", f"/api/chats/{chat_id}/members/{bob.user_id}") is None
    assert (await alice.request("GET", f"/api/chats/{chat_id}"))["members"] == [alice.user_id]
    with pytest.raises(ChatError) as e:
        await alice.request("DELETE", f"/api/chats/{chat_id}/members/{bob.user_id}")
    assert e.value.status == 404
    await carol_ws.close()


async def test_members_of_a_direct_chat_are_fixed(clients: Clients) -> None:
    alice, bob, carol = await clients.user("fa"), await clients.user("fb"), await clients.user("fc")
    d = await alice.create_direct(bob.user_id)
    with pytest.raises(ChatError) as e:
        await alice.request("POST", f"/api/chats/{d['chat_id']}/members", json={"user_id": carol.user_id})
    assert (e.value.status, e.value.code) == (400, "bad_request")
    with pytest.raises(ChatError) as e:
        await alice.request("POST", f"/api/chats/{d['chat_id']}/members", json={})
    assert e.value.status == 400
    # Nobody leaves a direct chat: asking for it again must always find both members.
    with pytest.raises(ChatError) as e:
        await alice.request("DELETE", f"/api/chats/{d['chat_id']}/members/{alice.user_id}")
    assert (e.value.status, e.value.code) == (400, "bad_request")
    assert (await alice.create_direct(bob.user_id))["members"] == d["members"]


async def test_people_are_found_by_username_prefix_and_named_by_id(
    server: ServerProcess, clients: Clients
) -> None:
    import httpx

    alice, bob, carol = (
        await clients.user("findme"),
        await clients.user("findme"),
        await clients.user("other"),
    )
    found = await alice.request("GET", "/api/users?q=FINDME&limit=50")
    names = [u["username"] for u in found["users"]]
    assert names == sorted(names, key=str.lower) and all(n.lower().startswith("findme") for n in names)
    assert {alice.user_id, bob.user_id} <= {u["user_id"] for u in found["users"]}
    assert carol.user_id not in {u["user_id"] for u in found["users"]}
    assert set(found["users"][0]) == {"user_id", "username", "display_name"}, "no password hash, nothing else"
    named = await alice.request("GET", f"/api/users?ids={carol.user_id},u_nobody,{bob.user_id}")
    assert [u["user_id"] for u in named["users"]] == [carol.user_id, bob.user_id]
    for query in (
        "",
        "?q=",
        "?q=a%20b",
        "?q=x&ids=y",
        "?ids=" + ",".join(f"u{i}" for i in range(201)),
        "?q=x&limit=51",
    ):
        with pytest.raises(ChatError) as bad:
            await alice.request("GET", f"/api/users{query}")
        assert bad.value.code == "bad_request", query
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{server.url}/api/users?q=findme")).status_code == 401
