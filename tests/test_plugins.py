"""Plugins in real servers (pychat.plugins): before_send rejecting and rewriting, hooks that raise
or overrun under each policy, after_store feeding a webhook receiver at least once across a
SIGKILL, the shipped word filter, the echo bot, and `pychat plugins` / a plugin that fails to load."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from pychat.client import ChatClient, ChatError
from pychat.metrics import Metrics
from pychat.plugins import Reject, Rewrite, Send
from pychat.plugins.host import PluginHost, PluginSpec
from pychat.plugins.wordfilter import WordFilter
from pychat.store import SendRequest
from tests.conftest import PASSWORD, Clients, ServerProcess, unique_name

pytestmark = pytest.mark.timeout(300)


def configured(tmp_path: Path, plugins: str) -> dict[str, str]:
    """The environment of a server whose configuration file lists these `[[plugins]]`."""
    path = tmp_path / f"pychat-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(plugins)
    return {"PYCHAT_CONFIG": str(path)}


async def metrics_text(server: ServerProcess) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{server.url}/metrics", timeout=5)).text


async def metric(server: ServerProcess, name: str, plugin: str) -> float:
    text = await metrics_text(server)
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'plugin="{plugin}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def msg_with_seq(client: ChatClient, seq: int) -> dict[str, Any]:
    """The `msg` frame of this seq (earlier ones skipped)."""
    while True:
        msg = await client.next_event("msg")
        if msg["seq"] == seq:
            return msg


async def pair(clients: Clients) -> tuple[ChatClient, ChatClient, str]:
    alice, bob = await clients.user("alice"), await clients.user("bob")
    chat = await alice.create_direct(bob.user_id)
    await asyncio.gather(alice.connect(), bob.connect())
    return alice, bob, chat["chat_id"]


async def test_before_send_rejects_and_rewrites_and_the_rest_of_the_batch_goes_on(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory(configured(tmp_path, '[[plugins]]\nuse = "tests.plugin_examples:Gatekeeper"\n'))
    clients = Clients(server)
    try:
        alice, bob, chat_id = await pair(clients)
        # Many sends at once from both users (they share engine batches), three of them refused.
        texts = [f"fine {i}" if i % 7 else f"forbidden {i}" for i in range(1, 22)]
        sends = [(alice if i % 2 else bob).send(chat_id, t) for i, t in enumerate(texts)]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        refused = [t for t, o in zip(texts, outcomes, strict=True) if isinstance(o, ChatError)]
        assert refused == [t for t in texts if t.startswith("forbidden")]
        assert all(
            o.code == "forbidden" and "gatekeeper" in str(o) for o in outcomes if isinstance(o, ChatError)
        )
        history = await alice.history_all(chat_id)
        assert sorted(m["content"] for m in history) == sorted(t for t in texts if t.startswith("fine"))
        assert [m["seq"] for m in history] == list(range(1, len(history) + 1)), "no seq for a refused send"
        # A retry of a refused send is asked again (still refused), not answered from memory.
        with pytest.raises(ChatError) as again:
            await alice.send(chat_id, "forbidden again", client_msg_id="retry-1")
        with pytest.raises(ChatError) as second:
            await alice.send(chat_id, "forbidden again", client_msg_id="retry-1")
        assert again.value.code == second.value.code == "forbidden"
        calls = await metric(server, "pychat_plugin_calls_total", "Gatekeeper")
        assert calls >= 3

        # Rewritten: what is stored is what everyone gets, live, in history, sync and export, and
        # the sender sees it in its ack (an ack of a send stored as sent carries no content).
        plain = await alice.send(chat_id, "fine as it is")
        assert "content" not in plain and "attachments" not in plain
        ack = await alice.send(chat_id, "shout: hello there", client_msg_id="shout-1")
        assert (ack["content"], ack["attachments"]) == ("HELLO THERE", [])
        again = await alice.send(chat_id, "shout: hello there", client_msg_id="shout-1")
        assert again == ack, "a retry answered from the window shows the rewrite too"
        posted = await alice.http.post(
            "/api/messages", json={"chat_id": chat_id, "content": "shout: over rest"}
        )
        assert posted.status_code == 201 and posted.json()["content"] == "OVER REST"
        plain_rest = await alice.http.post("/api/messages", json={"chat_id": chat_id, "content": "calm"})
        assert "content" not in plain_rest.json()
        live = await msg_with_seq(bob, ack["seq"])
        assert live["content"] == "HELLO THERE" and live["seq"] == ack["seq"]
        (stored,) = [m for m in await bob.history_all(chat_id) if m["seq"] == ack["seq"]]
        assert stored["content"] == "HELLO THERE"
        late = await clients.device(bob)
        await late.connect()
        await late.sync({chat_id: ack["seq"] - 1})
        synced = await msg_with_seq(late, ack["seq"])
        assert synced["content"] == "HELLO THERE"
        exported = await bob.http.get(
            f"/api/chats/{chat_id}/export", params={"format": "jsonl", "after": ack["seq"] - 1}
        )
        assert json.loads(exported.text.splitlines()[0])["content"] == "HELLO THERE"
    finally:
        await clients.close()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_hook_that_raises_or_overruns_follows_its_policy_and_the_server_keeps_serving(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, policy: str
) -> None:
    plugins = (
        f'[[plugins]]\nuse = "tests.plugin_examples:Raiser"\npolicy = "{policy}"\n'
        f'[[plugins]]\nuse = "tests.plugin_examples:Sleeper"\npolicy = "open"\nbudget_ms = 50\n'
        "[plugins.settings]\nsleep_s = 0.5\n"
        f'[[plugins]]\nuse = "tests.plugin_examples:AsyncTagger"\n'
    )
    server = server_factory(configured(tmp_path, plugins))
    clients = Clients(server)
    try:
        alice, bob, chat_id = await pair(clients)
        for i in range(4):
            if policy == "open":
                ack = await alice.send(chat_id, f"hello {i}")
                msg = await bob.next_event("msg")
                # The raiser and the sleeper changed nothing; the async tagger after them did.
                assert msg["seq"] == ack["seq"] and msg["content"] == f"hello {i} #tagged"
            else:
                with pytest.raises(ChatError) as refused:
                    await alice.send(chat_id, f"hello {i}")
                assert refused.value.code == "unavailable" and refused.value.retry_after_ms
        assert (
            await metric(server, "pychat_plugin_errors_total", "Raiser")
            + await metric(server, "pychat_plugin_skipped_total", "Raiser")
            == 4
        )
        if policy == "open":
            # Overran (or was still busy, or skipped after 3 in a row): never a stall of its 0.5 s each.
            assert await metric(server, "pychat_plugin_timeouts_total", "Sleeper") >= 1
        assert (await alice.list_chats())[0]["chat_id"] == chat_id
        text = await metrics_text(server)
        tagged = 'pychat_plugin_seconds_count{hook="before_send",plugin="AsyncTagger"}'
        # The async tagger ran for each send under `open` (after the others failed); never under `closed`.
        assert (f"{tagged} 4" in text) == (policy == "open"), text
    finally:
        await clients.close()


class Receiver:
    """A webhook receiver on 127.0.0.1 that checks signatures and records what arrived, when."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.arrivals: list[tuple[float, str]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                timestamp = self.headers["X-Pychat-Timestamp"]
                mac = hmac.new(outer.secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
                with outer.lock:
                    if self.headers["X-Pychat-Signature"] != "sha256=" + mac.hexdigest():
                        outer.bad_signatures += 1
                    now = time.monotonic()
                    for m in json.loads(body)["messages"]:
                        outer.arrivals.append((now, m["message_id"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def wait_for(self, wanted: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not wanted <= self.received() and time.monotonic() < deadline:
            time.sleep(0.2)

    def received(self) -> set[str]:
        with self.lock:
            return {m for _, m in self.arrivals}

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver("s3cret")
    yield r
    r.close()


async def test_after_store_reaches_the_webhook_at_least_once_across_a_sigkill(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, receiver: Receiver
) -> None:
    env = configured(
        tmp_path,
        f'[[plugins]]\nuse = "webhook"\n[plugins.settings]\nurl = "{receiver.url}"\nsecret = "s3cret"\n',
    )
    server = server_factory(env)
    name_a, name_b = unique_name("alice"), unique_name("bob")
    for name in (name_a, name_b):
        await ChatClient.register(server.url, name, PASSWORD)
    alice = await ChatClient.login(server.url, name_a, PASSWORD)
    bob = await ChatClient.login(server.url, name_b, PASSWORD)
    chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
    acked: set[str] = set()
    try:
        for i in range(150):
            acked.add((await alice.post_message(chat_id, f"before {i}"))["message_id"])
        server.kill()  # SIGKILL: whatever the feed had in hand is handed over again
        killed_at = time.monotonic()
        server.start()
        for i in range(150):
            acked.add((await alice.post_message(chat_id, f"after {i}"))["message_id"])
        await asyncio.to_thread(receiver.wait_for, acked, 60)
        assert acked <= receiver.received(), (
            f"{len(acked - receiver.received())} stored messages never arrived"
        )
        assert receiver.received() <= acked, "only stored messages arrive"
        assert receiver.bad_signatures == 0
        seen: dict[str, float] = {}
        for at, message_id in receiver.arrivals:
            if message_id in seen:
                assert seen[message_id] < killed_at < at, "a message arrived twice, not across the kill"
            else:
                seen[message_id] = at
        assert len(receiver.arrivals) - len(seen) <= 500, "duplicates are at most the batch in hand"
    finally:
        await alice.close()
        await bob.close()


async def test_the_word_filter_masks_and_rejects_per_chat(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    env = configured(
        tmp_path,
        '[[plugins]]\nuse = "wordfilter"\n[plugins.settings]\nwords = ["darn", "heck"]\naction = "mask"\n',
    )
    server = server_factory(env)
    clients = Clients(server)
    try:
        alice, bob, chat_id = await pair(clients)
        await alice.send(chat_id, "Darn it, what the HÉCK — darnit is fine")
        msg = await bob.next_event("msg")
        assert msg["content"] == "**** it, what the **** — darnit is fine"
    finally:
        await clients.close()


async def test_the_echo_bot_answers_in_a_group(server: ServerProcess, clients: Clients) -> None:
    bot_name = unique_name("echo")
    await ChatClient.register(server.url, bot_name, PASSWORD)
    bot_user = await ChatClient.login(server.url, bot_name, PASSWORD)
    bot_id = bot_user.user_id
    await bot_user.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pychat.plugins.echo_bot",
        "--url",
        server.url,
        "--username",
        bot_name,
        "--password",
        PASSWORD,
    )
    try:
        alice, bob = await clients.user("alice"), await clients.user("bob")
        group = await alice.create_group("with a bot", [bob.user_id, bot_id])
        await bob.connect()
        # The bot hears only what is sent while it is connected: ask until it answers.
        answer = None
        for _ in range(30):
            await alice.post_message(group["chat_id"], "/echo hello from alice")
            with contextlib.suppress(TimeoutError):
                while answer is None:
                    msg = await bob.next_event("msg", timeout=2)
                    if msg["sender_id"] == bot_id:
                        answer = msg
            if answer is not None:
                break
        assert answer is not None, "the bot never answered"
        assert answer["content"] == "hello from alice" and answer["chat_id"] == group["chat_id"]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def test_pychat_plugins_lists_hooks_and_a_plugin_that_fails_to_load_stops_serve(tmp_path: Path) -> None:
    good = configured(
        tmp_path,
        '[[plugins]]\nuse = "wordfilter"\n[plugins.settings]\nwords = ["x"]\n'
        '[[plugins]]\nname = "hook"\nuse = "webhook"\n[plugins.settings]\nurl = "http://127.0.0.1:9/"\nsecret = "k"\n',
    )
    done = subprocess.run(
        [sys.executable, "-m", "pychat", "plugins", "--data-dir", str(tmp_path / "d")],
        env={**_env(), **good},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(p["name"], p["hooks"]) for p in listed["loaded"]] == [
        ("wordfilter", ["before_send"]),
        ("hook", ["after_store"]),
    ]
    assert any(a.startswith("webhook ") for a in listed["available"])
    for bad, says in (
        ('[[plugins]]\nuse = "no_such_module_here:Thing"\n', "no module 'no_such_module_here'"),
        ('[[plugins]]\nuse = "nonexistent"\n', "no plugin named 'nonexistent'"),
        ('[[plugins]]\nuse = "wordfilter"\n', "settings.words"),
    ):
        started = subprocess.run(
            [sys.executable, "-m", "pychat", "serve", "--data-dir", str(tmp_path / "d2"), "--port", "0"],
            env={**_env(), **configured(tmp_path, bad)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert started.returncode == 2 and "plugin error" in started.stderr and says in started.stderr, (
            started.stderr
        )


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_the_word_filter_settings_per_chat() -> None:
    f = WordFilter({"words": ["darn"], "action": "mask", "chats": {"kids": "reject", "adults": "off"}})
    verdicts = f.before_send(
        [
            Send("u", "general", "k1", "oh darn", []),
            Send("u", "kids", "k2", "Darn!", []),
            Send("u", "adults", "k3", "darn", []),
            Send("u", "general", "k4", "darning socks", []),
        ]
    )
    assert verdicts[0] == Rewrite("oh ****")
    (accented,) = f.before_send([Send("u", "general", "k5", "D\u0301arn, HÉCK", [])])
    assert accented == Rewrite("****, HÉCK"), "combining accents are folded too"
    assert isinstance(verdicts[1], Reject) and verdicts[1].code == "forbidden"
    assert verdicts[2:] == [None, None]
    for bad in (
        {"words": []},
        {"words": ["x"], "action": "delete"},
        {"words": ["x"], "chats": {"c": "drop"}},
    ):
        with pytest.raises(ValueError):
            WordFilter(bad)


async def test_on_connect_refuses_a_banned_user_at_login_and_upgrade_and_asks_once_per_user(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    banned = tmp_path / "banned.txt"
    server = server_factory(
        configured(
            tmp_path,
            f'[[plugins]]\nuse = "tests.plugin_examples:Bouncer"\n[plugins.settings]\nbanned = "{banned}"\n',
        )
    )
    names = [unique_name("guest"), unique_name("troll")]
    for name in names:
        await ChatClient.register(server.url, name, PASSWORD)
    guest = await ChatClient.login(server.url, names[0], PASSWORD)
    troll = await ChatClient.login(server.url, names[1], PASSWORD)  # before the ban: a valid token
    storm: list[ChatClient] = []
    try:
        banned.write_text(troll.user_id)
        with pytest.raises(ChatError) as login:
            await ChatClient.login(server.url, names[1], PASSWORD)
        assert login.value.code == "forbidden" and login.value.status == 403
        with pytest.raises(ChatError) as upgrade:
            await troll.connect()
        assert upgrade.value.code == "forbidden" and "banned" in str(upgrade.value)
        # A reconnect storm of one user: 20 upgrades at once, the plugin asked once.
        before = await metric(server, "pychat_plugin_calls_total", "Bouncer")
        storm = [ChatClient(server.url, guest.token, guest.user_id) for _ in range(20)]
        hellos = await asyncio.gather(*(c.connect() for c in storm))
        assert all(h["type"] == "hello" for h in hellos)
        asked = await metric(server, "pychat_plugin_calls_total", "Bouncer") - before
        assert asked == 1, f"asked {asked} times for 20 upgrades of one user"
        # The refusal is kept too: the banned user's retries do not reach Python.
        for _ in range(5):
            with pytest.raises(ChatError):
                await troll.connect()
        assert await metric(server, "pychat_plugin_calls_total", "Bouncer") - before == 1
    finally:
        for c in (guest, troll, *storm):
            await c.close()


async def test_receipts_and_chat_events_reach_their_hooks_in_order_across_a_sigkill(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    log_path = tmp_path / "events.jsonl"
    env = configured(
        tmp_path,
        f'[[plugins]]\nuse = "tests.plugin_examples:EventLog"\n[plugins.settings]\npath = "{log_path}"\n',
    )
    server = server_factory(env)
    clients = Clients(server)

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []

    async def until(check: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        for _ in range(200):
            if check(events := logged()):
                return events
            await asyncio.sleep(0.05)
        raise AssertionError(f"not logged: {logged()}")

    try:
        alice, bob, carol = (
            await clients.user("alice"),
            await clients.user("bob"),
            await clients.user("carol"),
        )
        group = await alice.create_group("events", [bob.user_id])
        chat_id = group["chat_id"]
        await alice.request("POST", f"/api/chats/{chat_id}/members", json={"user_id": carol.user_id})
        await alice.request("DELETE", f"/api/chats/{chat_id}/members/{carol.user_id}")
        ack = await alice.post_message(chat_id, "read me")
        await bob.request("POST", f"/api/messages/{ack['message_id']}/read")
        # The two hooks are fed independently: wait for both.
        events = await until(
            lambda e: (
                any(x["type"] == "receipt" and x["user_id"] == bob.user_id for x in e)
                and sum(x["type"] != "receipt" for x in e) >= 3
            )
        )
        # Each hook in order (the two hooks are fed independently of each other).
        chat_events = [(e["type"], e.get("user_id")) for e in events if e["type"] != "receipt"]
        assert chat_events[:3] == [
            ("chat.created", None),
            ("member.added", carol.user_id),
            ("member.removed", carol.user_id),
        ]
        (receipt,) = [e for e in events if e["type"] == "receipt" and e["user_id"] == bob.user_id]
        assert receipt["read"] == receipt["delivered"] == ack["seq"] and receipt["chat_id"] == chat_id
        # Killed and started again: what came after is handed over too, nothing before is lost
        # (events above the durable cursor may come again: at least once).
        server.kill()
        server.start()
        await alice.request("POST", f"/api/chats/{chat_id}/members", json={"user_id": carol.user_id})
        events = await until(lambda e: len({x["at"] for x in e if x["type"] == "member.added"}) == 2)
        once = list(dict.fromkeys(json.dumps(e, sort_keys=True) for e in events if e["type"] != "receipt"))
        assert [json.loads(e)["type"] for e in once] == [
            "chat.created",
            "member.added",
            "member.removed",
            "member.added",
        ], "each chat event once, in order, when repeats are set aside"
    finally:
        await clients.close()


def test_a_rewrite_the_store_cannot_take_is_a_plugin_error_not_a_failed_batch() -> None:
    metrics = Metrics()
    host = PluginHost([PluginSpec.parse({"use": "tests.plugin_examples:Mangler"}, "t")], metrics, 1024, 10)
    try:
        sends = [SendRequest("u", "c", f"k{i}", "hello", []) for i in range(4)]
        out, refused = host.before_send(sends)
        assert out == sends and refused == {}, "fail open: the sends go on as they were"
        assert 'pychat_plugin_errors_total{hook="before_send",plugin="Mangler"} 1' in metrics.render([], 0)
    finally:
        host.close()


def test_each_hook_has_its_own_thread_a_slow_after_store_never_delays_before_send() -> None:
    metrics = Metrics()
    host = PluginHost([PluginSpec.parse({"use": "tests.plugin_examples:SlowStore"}, "t")], metrics, 1024, 10)
    try:
        (plugin,) = host.plugins
        slow = threading.Thread(target=host.call, args=(plugin, "after_store", [{"seq": 1}], 5.0))
        slow.start()
        time.sleep(0.1)
        started = time.monotonic()
        sends = [SendRequest("u", "c", "k", "hello", [])]
        assert host.before_send(sends) == (sends, {})
        assert time.monotonic() - started < 0.5
        slow.join()
        assert "pychat_plugin_timeouts_total{" not in metrics.render([], 0)
    finally:
        host.close()


async def test_a_new_after_store_plugin_starts_from_now_unless_it_replays(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, receiver: Receiver
) -> None:
    server = server_factory()
    name_a, name_b = unique_name("alice"), unique_name("bob")
    for name in (name_a, name_b):
        await ChatClient.register(server.url, name, PASSWORD)
    alice = await ChatClient.login(server.url, name_a, PASSWORD)
    bob = await ChatClient.login(server.url, name_b, PASSWORD)
    try:
        chat_id = (await alice.create_direct(bob.user_id))["chat_id"]
        old = {(await alice.post_message(chat_id, f"old {i}"))["message_id"] for i in range(5)}
        hook = f'[plugins.settings]\nurl = "{receiver.url}"\nsecret = "s3cret"\n'
        for replay, expected in ((False, set()), (True, old)):
            server.stop()
            server.env.update(
                configured(
                    tmp_path,
                    f'[[plugins]]\nuse = "webhook"\nname = "hook{replay}"\nreplay = {str(replay).lower()}\n{hook}',
                )
            )
            server.start()
            new = (await alice.post_message(chat_id, f"new {replay}"))["message_id"]
            await asyncio.to_thread(receiver.wait_for, {new, *expected}, 30)
            got = receiver.received()
            assert new in got and expected <= got
            if not replay:
                assert not old & got, "history before the plugin's first start is not handed over"
    finally:
        await alice.close()
        await bob.close()
