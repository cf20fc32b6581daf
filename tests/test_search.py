"""Search over a real server: scope by membership, ranking, highlights, any language, phrases,
senders, pages, and an index that catches up after a restart."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pychat.client import ChatClient
from pychat.search import SearchIndex
from pychat.store import Chat, SendRequest, User
from tests.conftest import Clients, ServerProcess
from tests.storekit import TupleSqliteStore

pytestmark = pytest.mark.timeout(120)


async def search(client: ChatClient, q: str, **params: Any) -> dict[str, Any]:
    return await client.request("GET", "/api/search", params={"q": q, **params})  # type: ignore[no-any-return]


async def found(client: ChatClient, q: str, expected: int, **params: Any) -> list[dict[str, Any]]:
    """The results once the index has caught up to `expected` of them (indexing is off the
    message path: a message is searchable shortly after its ack)."""
    deadline = time.monotonic() + 15
    while True:
        results: list[dict[str, Any]] = (await search(client, q, **params))["results"]
        if len(results) >= expected or time.monotonic() > deadline:
            return results
        await asyncio.sleep(0.1)


async def test_only_chats_the_caller_belongs_to(clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    carol = await clients.user("carol")
    group = await alice.create_group("plans", [bob.user_id, carol.user_id])
    direct = await alice.create_direct(bob.user_id)
    await alice.post_message(group["chat_id"], "the zanzibar offsite is booked")
    await bob.post_message(direct["chat_id"], "zanzibar between us")
    assert len(await found(bob, "zanzibar", 2)) == 2
    mine = await found(carol, "zanzibar", 1)
    assert [r["chat_id"] for r in mine] == [group["chat_id"]]
    r = await carol.http.get("/api/search", params={"q": "zanzibar", "chat_id": direct["chat_id"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    # A member removed stops seeing the chat's messages at once.
    await alice.request("DELETE", f"/api/chats/{group['chat_id']}/members/{carol.user_id}")
    assert (await search(carol, "zanzibar"))["results"] == []
    outsider = await clients.user("outsider")
    assert (await search(outsider, "zanzibar"))["results"] == []


async def test_results_are_message_objects_with_a_highlight(clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    ack = await alice.post_message(chat["chat_id"], "<script>alert('x')</script> & the quokka said hi")
    (hit,) = await found(bob, "quokka", 1)
    assert hit["message_id"] == ack["message_id"] and hit["seq"] == ack["seq"]
    assert hit["sender_id"] == alice.user_id and hit["attachments"] == []
    assert hit["content"] == "<script>alert('x')</script> & the quokka said hi"
    assert (
        hit["highlight"]
        == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; the <mark>quokka</mark> said hi"
    )


async def test_ranking_puts_the_better_match_first(clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    weak = await alice.post_message(
        chat["chat_id"],
        "long notes about many things, the weather, lunch, and somewhere a walrus, then more text",
    )
    strong = await alice.post_message(chat["chat_id"], "walrus walrus walrus")
    results = await found(bob, "walrus", 2)
    assert [r["message_id"] for r in results] == [strong["message_id"], weak["message_id"]]


@pytest.mark.parametrize(
    ("content", "queries"),
    [
        ("Crème brûlée at the Café Zürich", ["creme brulee", "cafe", "ZURICH", "café"]),
        ("naïve façade of the Ångström lab", ["naive", "facade", "angstrom"]),
        ("東京都の天気は晴れです", ["天気", "京都", "晴れ", "東京都の天気", "す"]),
        ("我们明天去北京开会", ["北京", "明天", "开会"]),
        ("서울에서 내일 만나요", ["서울", "내일", "만나"]),
        ("Встреча в Москве завтра", ["москве", "встреча"]),
        ("meeting at the conference centre", ["conf", "centre", "MEETING"]),
        ("東京2020オリンピックの会議室Aで", ["東京2020", "会議室A", "オリンピック", "ピック", "2020オリ"]),
        ("2024年度の第3章", ["2024年", "第3章", "年度"]),
        ("spotkanie w Łodzi, potem Øresund", ["lodzi", "oresund"]),
        ("قال مُحَمَّد كَتَبَ", ["محمد", "كتب"]),
        ("हिन्दी भाषा सीखना", ["हिन्दी", "भाषा"]),
        ("ภาษาไทยง่ายมาก", ["ไทย", "ภาษา"]),
    ],
)
async def test_any_language(clients: Clients, content: str, queries: list[str]) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    await alice.post_message(chat["chat_id"], "something else entirely")
    ack = await alice.post_message(chat["chat_id"], content)
    for q in queries:
        results = await found(bob, q, 1, chat_id=chat["chat_id"])
        assert [r["message_id"] for r in results] == [ack["message_id"]], q
        assert "<mark>" in results[0]["highlight"], (q, results[0]["highlight"])
    assert (await search(bob, "北海道", chat_id=chat["chat_id"]))["results"] == []
    # The index's own tokens (chats, senders) are not text.
    assert (await search(bob, "k", chat_id=chat["chat_id"]))["results"] == []
    assert (await search(bob, "ハ", chat_id=chat["chat_id"]))["results"] == []


async def test_phrases_senders_and_before(clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    first = await alice.post_message(chat["chat_id"], "a red apple on the table")
    second = await bob.post_message(chat["chat_id"], "the apple is red")
    assert len(await found(alice, "apple", 2, chat_id=chat["chat_id"])) == 2
    phrase = await search(alice, '"red apple"', chat_id=chat["chat_id"])
    assert [r["message_id"] for r in phrase["results"]] == [first["message_id"]]
    by_bob = await search(alice, "apple", sender_id=bob.user_id)
    assert [r["message_id"] for r in by_bob["results"]] == [second["message_id"]]
    older = await search(alice, "apple", chat_id=chat["chat_id"], before=second["seq"])
    assert [r["message_id"] for r in older["results"]] == [first["message_id"]]


async def test_pages_cover_every_match_once(clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    for i in range(25):
        await alice.post_message(chat["chat_id"], f"pangolin number {i}")
    assert len(await found(bob, "pangolin", 25, limit=50)) == 25
    seen: list[int] = []
    cursor = None
    pages = 0
    newer = 0
    while True:
        params: dict[str, Any] = {"limit": 10}
        if cursor:
            params["cursor"] = cursor
        page = await search(bob, "pangolin", **params)
        seen += [r["seq"] for r in page["results"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # New matches between pages, indexed before the next page is asked for: they rank first
        # (as good a match, and newer), so pages read from the index as it is now would shift.
        for _ in range(3):
            await alice.post_message(chat["chat_id"], f"pangolin newer {newer}")
            newer += 1
        assert len(await found(bob, "pangolin", 25 + newer, limit=50)) == 25 + newer
    fresh = await search(bob, "pangolin", limit=10)
    assert {r["seq"] for r in fresh["results"]} >= set(range(26, 26 + newer)), "the new ones rank first"
    # The pages of the first search hold each of its 25 matches once, and none of the later ones.
    assert pages == 3 and newer == 6 and sorted(seen) == list(range(1, 26)), seen


async def test_bad_searches_get_clear_errors(clients: Clients, server: ServerProcess) -> None:
    alice = await clients.user("alice")
    for params in ({}, {"q": "  "}, {"q": "x" * 300}, {"q": "a", "limit": "0"}, {"q": "a", "before": "3"}):
        r = await alice.http.get("/api/search", params=params)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", params
    r = await alice.http.get("/api/search", params={"q": "a", "cursor": "not-a-cursor"})
    assert r.status_code == 400
    # Well-formed cursors whose numbers SQLite cannot hold (they were a 500: OverflowError, once
    # the caller has a chat to search).
    bob = await clients.user("bob")
    await alice.post_message((await alice.create_direct(bob.user_id))["chat_id"], "a b c")
    for numbers in ([0, 2**63, 0], [0, 1, 2**64], [10, 2**70, 2**70]):
        crafted = base64.urlsafe_b64encode(json.dumps(numbers).encode()).decode().rstrip("=")
        r = await alice.http.get("/api/search", params={"q": "a", "cursor": crafted})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request"), numbers
    r = await alice.http.get("/api/search", params={"q": "a", "chat_id": "c-unknown"})
    assert r.status_code == 404
    # Punctuation only, quotes and FTS5 syntax are text, not errors.
    for q in ('"""', "*", "NEAR(a b)", "a OR", "-", "chat:x"):
        r = await alice.http.get("/api/search", params={"q": q})
        assert r.status_code == 200, (q, r.text)
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        assert (await anonymous.get("/api/search", params={"q": "a"})).status_code == 401


async def test_the_index_catches_up_after_a_kill_and_is_rebuilt_when_lost(server_factory: Any) -> None:
    srv = server_factory()
    made = Clients(srv)
    alice = await made.user("alice")
    bob = await made.user("bob")
    chat = await alice.create_direct(bob.user_id)
    for i in range(30):
        await alice.post_message(chat["chat_id"], f"armadillo {i}")
    await made.close()
    srv.kill()  # some of them may not be indexed yet
    (srv.data_dir / "search.db").unlink()
    for extra in ("search.db-wal", "search.db-shm"):
        (srv.data_dir / extra).unlink(missing_ok=True)
    srv.start()
    made = Clients(srv)
    try:
        bob = ChatClient(srv.url, bob.token, bob.user_id)  # its token outlives the restart
        made.made.append(bob)
        results = await found(bob, "armadillo", 30, limit=50)
        assert sorted(r["seq"] for r in results) == list(range(1, 31))
    finally:
        await made.close()


def _indexer_pid(srv: ServerProcess) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pychat.search.worker" in cmdline and str(srv.data_dir).encode() in cmdline:
            return int(entry.name)
    raise AssertionError("no indexer process for this server")


async def test_a_killed_indexer_is_started_again_and_catches_up(server_factory: Any) -> None:
    srv = server_factory()
    made = Clients(srv)
    try:
        alice = await made.user("alice")
        bob = await made.user("bob")
        chat = await alice.create_direct(bob.user_id)
        await alice.post_message(chat["chat_id"], "okapi one")
        assert len(await found(bob, "okapi", 1)) == 1
        os.kill(_indexer_pid(srv), signal.SIGKILL)
        for i in range(5):
            await alice.post_message(chat["chat_id"], f"okapi {i}")
        results = await found(bob, "okapi", 6)
        assert sorted(r["seq"] for r in results) == list(range(1, 7))
    finally:
        await made.close()


def test_an_index_with_a_rescan_finds_messages_no_one_announced(tmp_path: Path) -> None:
    """A cluster node's index: the word of which chats moved may be lost (Redis pub/sub), so it
    also looks at the store's chat heads every `rescan_s` (here messages are stored behind its
    back and never announced)."""
    store = TupleSqliteStore(tmp_path / "store.db")
    index = SearchIndex(tmp_path / "search.db", store, rescan_s=0.5)
    try:
        for u in ("ua", "ub"):
            store.create_user(User(u, u, None, "scrypt$x", 1))
        store.create_chat(Chat("c1", "group", None, "ua", 1, 0, ["ua", "ub"]), None)
        index.start()
        store.append_batch([SendRequest("ua", "c1", "k1", "an unannounced persimmon", [])], [])
        deadline = time.monotonic() + 20
        results: list[dict[str, Any]] = []
        while not results and time.monotonic() < deadline:
            results, _ = index.search("persimmon", ["c1"])
            time.sleep(0.1)
        assert [r["seq"] for r in results] == [1]
        assert index.search("persimmon", ["c2"])[0] == []
    finally:
        index.stop()
        store.close()
