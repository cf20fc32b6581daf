"""The web chat page (pychat/web/) in a real browser: Playwright for Python driving Debian's
Chromium (services/chromium.py) against a real server. Two or three people in browser contexts
of their own register, chat, watch typing and ticks, scroll back through history, send with the
keyboard only, attach an image, search, and live through a server restart. Screenshots of each
step go to test-results/web/<test>/; every page is checked for console errors."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from PIL import Image
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from pychat.client import ChatClient
from tests.conftest import PASSWORD, ROOT, Clients, ServerProcess, unique_name

pytestmark = pytest.mark.timeout(300)

RESULTS = ROOT / "test-results" / "web"
WAIT_MS = 15_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from services.chromium import ARGS, install

    chromium = install()  # the pinned Debian package (`make test` installs it first)
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(chromium), args=ARGS)
        yield launched
        await launched.close()


@dataclass
class Person:
    """One user's browser context and page, with what its console said."""

    name: str
    page: Page
    shots: Path
    errors: list[str] = field(default_factory=list)
    user_id: str = ""

    async def shot(self, step: str) -> None:
        self.shots.mkdir(parents=True, exist_ok=True)
        n = len(list(self.shots.glob("*.png"))) + 1
        await self.page.screenshot(path=str(self.shots / f"{n:02d}-{step}-{self.name}.png"))

    async def log_in(self, server: ServerProcess, username: str, register: bool = False) -> None:
        await self.page.goto(server.url)
        if register:
            await self.page.click("#auth-switch")
        await self.page.fill("#auth-username", username)
        await self.page.fill("#auth-password", PASSWORD)
        await self.page.click("#auth-submit")
        await self.page.wait_for_selector("#main:not([hidden])", timeout=WAIT_MS)
        await self.page.wait_for_function("() => document.getElementById('conn').textContent === 'Connected'")
        self.user_id = await self.page.evaluate(
            "() => JSON.parse(localStorage.getItem('pychat.session')).user_id"
        )

    async def open_chat(self, title: str) -> None:
        await self.page.click(f".chat-item:has(.title:text-is('{title}'))", timeout=WAIT_MS)
        await self.page.wait_for_selector("#composer:not([hidden])")

    async def say(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")

    async def sees(self, text: str) -> None:
        await self.page.wait_for_function(
            """text => [...document.querySelectorAll('#messages li.msg p.content')]
                 .some(p => p.textContent === text)""",
            arg=text,
            timeout=WAIT_MS,
        )

    async def contents(self) -> list[str]:
        return await self.page.eval_on_selector_all(
            "#messages li.msg p.content", "ps => ps.map(p => p.textContent)"
        )

    async def scroll_until(self, text: str, to: Literal["top", "bottom"]) -> None:
        """Scrolls the message list to its top or bottom (`to`) until `text` is among its messages
        (each scroll may load a page); the caller asserts what came."""
        scroll = "box.scrollHeight" if to == "bottom" else "0"
        for _ in range(20):
            if text in await self.contents():
                return
            await self.page.eval_on_selector("#messages", f"box => box.scrollTop = {scroll}")
            await asyncio.sleep(0.3)

    async def tick_of(self, text: str) -> str:
        return await self.page.eval_on_selector(
            f"#messages li.mine:has(p.content:text-is('{text}')) .tick", "t => t.dataset.status"
        )

    async def tick_becomes(self, text: str, status: str) -> None:
        await self.page.wait_for_function(
            """([text, status]) => [...document.querySelectorAll('#messages li.mine')]
                 .some(li => li.querySelector('p.content')?.textContent === text
                             && li.querySelector('.tick')?.dataset.status === status)""",
            arg=[text, status],
            timeout=WAIT_MS,
        )


# Chromium reports refused and cut connections in the console; expected only while a server restarts.
RECONNECTING = re.compile(
    r"WebSocket connection to .* failed|Failed to load resource: net::ERR_(CONNECTION_REFUSED|CONNECTION_RESET|EMPTY_RESPONSE)"
)


@pytest.fixture
def people(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Any]:
    shots = RESULTS / request.node.name
    shutil.rmtree(shots, ignore_errors=True)

    async def person(name: str, width: int = 1100) -> Person:
        context = await browser.new_context(viewport={"width": width, "height": 760})
        page = await context.new_page()
        p = Person(name, page, shots)

        def console(m: ConsoleMessage) -> None:
            if m.type == "error":
                p.errors.append(m.text)

        page.on("console", console)
        page.on("pageerror", lambda e: p.errors.append(f"uncaught: {e}"))
        return p

    yield person


async def username(client: ChatClient) -> str:
    """The client's username, as any client finds it (`GET /api/users?ids=`)."""
    found = await client.request("GET", f"/api/users?ids={client.user_id}")
    return str(found["users"][0]["username"])


def no_console_errors(*people: Person, allow: re.Pattern[str] | None = None) -> None:
    for p in people:
        errors = [e for e in p.errors if not (allow and allow.search(e))]
        assert not errors, f"{p.name}'s console: {errors}"


async def test_two_people_register_chat_and_see_typing_and_ticks_go_sent_delivered_read(
    server: ServerProcess, people: Any
) -> None:
    alice, bob = await people("alice"), await people("bob")
    alice_name, bob_name = unique_name("alice"), unique_name("bob")
    await alice.log_in(server, alice_name, register=True)
    await alice.shot("registered")
    await bob.log_in(server, bob_name, register=True)
    # Bob's page is closed (his session stays in the browser): alice's message is sent, not delivered.
    await bob.page.goto("about:blank")
    await alice.page.click("#new-chat")
    await alice.page.fill("#user-search", bob_name)
    await alice.page.check(f"#pick-{bob.user_id}", timeout=WAIT_MS)
    await alice.shot("new-chat")
    await alice.page.click("#new-chat-create")
    await alice.page.wait_for_selector("#composer:not([hidden])")
    await alice.say("hello bob")
    await alice.tick_becomes("hello bob", "sent")
    await alice.page.wait_for_function(
        "() => document.getElementById('chat-status').textContent.startsWith('last seen today at')"
    )
    assert await alice.page.locator(".chat-item .dot.online").count() == 0
    await alice.shot("sent")

    # Bob comes back: the page logs him in from his saved session and syncs.
    await bob.page.goto(server.url)
    await bob.page.wait_for_selector("#main:not([hidden])", timeout=WAIT_MS)
    await alice.tick_becomes("hello bob", "delivered")
    await alice.page.wait_for_selector(".chat-item .dot.online", timeout=WAIT_MS)
    await alice.shot("delivered")
    unread = await bob.page.text_content(".chat-item .badge")
    assert unread == "1"
    await bob.shot("unread")
    await bob.open_chat(alice_name)
    await bob.sees("hello bob")
    await alice.tick_becomes("hello bob", "read")
    await alice.page.wait_for_function(
        "() => document.getElementById('chat-status').textContent === 'online'"
    )
    await alice.shot("read")

    await bob.page.type("#text", "typing slowly", delay=40)
    await alice.page.wait_for_function(
        "() => document.getElementById('typing').textContent.includes('is typing')", timeout=WAIT_MS
    )
    await alice.shot("typing")
    await bob.page.press("#text", "Enter")
    await alice.sees("typing slowly")
    await alice.page.wait_for_function("() => document.getElementById('typing').textContent === ''")
    await bob.tick_becomes("typing slowly", "read")
    await alice.shot("answer")
    await bob.shot("answer")
    assert await alice.contents() == ["hello bob", "typing slowly"]
    assert await bob.contents() == ["hello bob", "typing slowly"]
    no_console_errors(alice, bob)


async def test_scrolling_back_through_200_messages_shows_each_once_in_order(
    server: ServerProcess, people: Any, clients: Clients
) -> None:
    alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
    chat = await alice_sdk.create_direct(bob_sdk.user_id)
    await bob_sdk.connect()
    for i in range(1, 201):
        await bob_sdk.send(chat["chat_id"], f"message {i}")
    alice = await people("alice")
    name, bob_title = await username(alice_sdk), await username(bob_sdk)
    await alice.log_in(server, name)
    assert await alice.page.text_content(".chat-item .badge") == "200"
    await alice.open_chat(bob_title)
    await alice.sees("message 200")
    await alice.shot("newest")
    await alice.scroll_until("message 1", to="top")
    await alice.shot("oldest")
    assert await alice.contents() == [f"message {i}" for i in range(1, 201)]
    separators = await alice.page.eval_on_selector_all("#messages li.day", "d => d.length")
    assert separators == 1, "one day, one date separator"
    no_console_errors(alice)


async def test_a_group_of_three(server: ServerProcess, people: Any, clients: Clients) -> None:
    sdk = [await clients.user(n) for n in ("alice", "bob", "carol")]
    names = [await username(c) for c in sdk]
    alice, bob, carol = [await people(n) for n in ("alice", "bob", "carol")]
    for p, name in zip((alice, bob, carol), names, strict=True):
        await p.log_in(server, name)
    await alice.page.click("#new-chat")
    for other in sdk[1:]:
        await alice.page.fill("#user-search", names[sdk.index(other)])
        await alice.page.check(f"#pick-{other.user_id}", timeout=WAIT_MS)
    await alice.page.fill("#group-title", "Three of us")
    await alice.shot("group")
    await alice.page.click("#new-chat-create")
    await alice.page.wait_for_selector("#composer:not([hidden])")
    await alice.say("hi both")
    for p in (bob, carol):
        await p.open_chat("Three of us")
        await p.sees("hi both")
    await bob.say("hi from bob")
    await carol.say("hi from carol")
    for p in (alice, bob, carol):
        await p.sees("hi from bob")
        await p.sees("hi from carol")
        assert await p.contents() == ["hi both", "hi from bob", "hi from carol"]
        await p.shot("group")
    senders = await alice.page.eval_on_selector_all(
        "#messages li.msg .sender", "s => s.map(x => x.textContent)"
    )
    assert senders == names[1:]
    await alice.tick_becomes("hi both", "read")
    no_console_errors(alice, bob, carol)


async def test_keyboard_only_sending_at_phone_width(
    server: ServerProcess, people: Any, clients: Clients
) -> None:
    alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
    await alice_sdk.create_direct(bob_sdk.user_id)
    alice_name = await username(alice_sdk)
    alice = await people("alice", width=390)
    await alice.page.goto(server.url)
    # Log in with the keyboard alone: the form starts focused.
    await alice.page.keyboard.type(alice_name)
    await alice.page.keyboard.press("Tab")
    await alice.page.keyboard.type(PASSWORD)
    await alice.page.keyboard.press("Enter")
    await alice.page.wait_for_selector("#main:not([hidden])", timeout=WAIT_MS)
    await alice.shot("list")
    for _ in range(15):  # Tab to the chat in the list
        await alice.page.keyboard.press("Tab")
        if await alice.page.evaluate("() => !!document.activeElement.dataset.chat"):
            break
    else:
        raise AssertionError("the chat list cannot be reached with Tab")
    await alice.page.keyboard.press("Enter")
    await alice.page.wait_for_function("() => document.activeElement.id === 'text'")
    await alice.page.keyboard.type("sent with the keyboard")
    await alice.page.keyboard.press("Shift+Enter")
    await alice.page.keyboard.type("second line")
    await alice.page.keyboard.press("Enter")
    await alice.sees("sent with the keyboard\nsecond line")
    await alice.shot("sent")
    await bob_sdk.connect()
    history = await bob_sdk.history_all((await bob_sdk.list_chats())[0]["chat_id"])
    assert [m["content"] for m in history] == ["sent with the keyboard\nsecond line"]
    # Readable at phone width: nothing wider than the screen.
    assert await alice.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    no_console_errors(alice)


async def test_a_server_restart_mid_conversation_loses_and_doubles_nothing(
    server_factory: Any, people: Any
) -> None:
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.url) as http:
        names = [unique_name(n) for n in ("alice", "bob")]
        for n in names:
            (await http.post("/api/users", json={"username": n, "password": PASSWORD})).raise_for_status()
    alice, bob = await people("alice"), await people("bob")
    await alice.log_in(server, names[0])
    await bob.log_in(server, names[1])
    await alice.page.click("#new-chat")
    await alice.page.fill("#user-search", names[1])
    await alice.page.check(f"#pick-{bob.user_id}", timeout=WAIT_MS)
    await alice.page.click("#new-chat-create")
    await alice.page.wait_for_selector("#composer:not([hidden])")
    await bob.open_chat(names[0])
    for i in range(5):
        await (alice if i % 2 == 0 else bob).say(f"before {i}")
    await alice.sees("before 4")
    await bob.sees("before 4")
    server.kill()
    # Written while the server is down: shown at once, sent when it is back.
    await alice.page.wait_for_function(
        "() => document.getElementById('conn').textContent.startsWith('Offline')"
    )
    await alice.say("while down")
    await alice.tick_becomes("while down", "sending")
    await alice.shot("offline")
    server.start()
    await alice.page.wait_for_function(
        "() => document.getElementById('conn').textContent === 'Connected'", timeout=30_000
    )
    await bob.page.wait_for_function(
        "() => document.getElementById('conn').textContent === 'Connected'", timeout=30_000
    )
    await bob.sees("while down")
    for i in range(5):
        await (bob if i % 2 == 0 else alice).say(f"after {i}")
    expected = [f"before {i}" for i in range(5)] + ["while down"] + [f"after {i}" for i in range(5)]
    for p in (alice, bob):
        await p.sees("after 4")
        assert await p.contents() == expected, p.name
        await p.shot("after-restart")
    # And the store has each once, in that order.
    async with httpx.AsyncClient(base_url=server.url) as http:
        token = (
            await http.post("/api/auth/token", json={"username": names[0], "password": PASSWORD})
        ).json()["token"]
        auth = {"authorization": f"Bearer {token}"}
        chat_id = (await http.get("/api/chats", headers=auth)).json()["chats"][0]["chat_id"]
        page = (await http.get(f"/api/chats/{chat_id}/messages?limit=50", headers=auth)).json()
    assert [m["content"] for m in page["messages"]] == expected
    assert [m["seq"] for m in page["messages"]] == list(range(1, 12))
    no_console_errors(alice, bob, allow=RECONNECTING)


async def test_an_image_attachment_and_search_jumping_to_the_message(
    server: ServerProcess, people: Any, clients: Clients, tmp_path: Path
) -> None:
    alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
    chat = await alice_sdk.create_direct(bob_sdk.user_id)
    await alice_sdk.connect()
    word = unique_name("zebra")
    for i in range(1, 121):
        await alice_sdk.send(chat["chat_id"], f"{word} early" if i == 3 else f"filler {i}")
    names = [await username(alice_sdk), await username(bob_sdk)]
    bob = await people("bob")
    await bob.log_in(server, names[1])
    await bob.open_chat(names[0])
    picture = tmp_path / "dot.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    picture.write_bytes(buf.getvalue())
    await bob.page.set_input_files("#attach", str(picture))
    await bob.page.wait_for_selector("#uploads .upload:has-text('ready')", timeout=WAIT_MS)
    # ... and a second image pasted into the message box (a canvas drawn in the page).
    await bob.page.focus("#text")
    await bob.page.evaluate(
        """async () => {
            const canvas = document.createElement('canvas');
            canvas.width = 40; canvas.height = 30;
            canvas.getContext('2d').fillRect(0, 0, 40, 30);
            const blob = await new Promise(done => canvas.toBlob(done, 'image/png'));
            const data = new DataTransfer();
            data.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
            document.getElementById('text').dispatchEvent(
                new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
        }"""
    )
    await bob.page.wait_for_function(
        "() => document.querySelectorAll('#uploads .upload').length === 2"
        " && [...document.querySelectorAll('#uploads .upload')].every(u => u.textContent.includes('ready'))",
        timeout=WAIT_MS,
    )
    await bob.say("a red picture")
    await bob.sees("a red picture")
    await bob.page.wait_for_function(
        "() => [...document.querySelectorAll('#messages img.thumb')].filter(i => i.src.startsWith('blob:') && i.naturalWidth > 0).length === 2",
        timeout=WAIT_MS,
    )
    stored = (await alice_sdk.history_all(chat["chat_id"]))[-1]
    assert [a["filename"] for a in stored["attachments"]] == ["dot.png", "pasted.png"]
    assert all(a["content_type"] == "image/png" and a["thumbnail_url"] for a in stored["attachments"])
    await bob.shot("attachment")
    # Search finds the early message (far above the first page) and jumps to it.
    await bob.page.fill("#search", word)
    await bob.page.press("#search", "Enter")
    result = bob.page.locator("#search-results button.result").first
    await result.wait_for(timeout=WAIT_MS)
    assert await result.locator("mark").first.text_content() == word
    await result.click()
    await bob.page.wait_for_selector("#messages li.found", timeout=WAIT_MS)
    assert await bob.page.text_content("#messages li.found p.content") == f"{word} early"
    await bob.shot("search")
    # Scrolling down from there loads the newer messages, each once, up to the newest.
    await bob.scroll_until("a red picture", to="bottom")
    expected = [f"{word} early" if i == 3 else f"filler {i}" for i in range(1, 121)] + ["a red picture"]
    assert await bob.contents() == expected
    no_console_errors(bob)


async def test_the_docs_page_and_the_first_load_stay_small(server: ServerProcess, people: Any) -> None:
    reader = await people("reader")
    loaded: list[tuple[str, int]] = []

    async def on_response(response: Any) -> None:
        kind = response.request.resource_type
        if kind in ("script", "stylesheet"):
            loaded.append((response.url, len(await response.body())))

    reader.page.on("response", on_response)
    await reader.page.goto(server.url)
    await reader.page.wait_for_selector("#auth:not([hidden])")
    await asyncio.sleep(0.5)
    total = sum(n for _, n in loaded)
    assert loaded and total < 100 * 1024, f"scripts and styles of the first load: {total} bytes {loaded}"
    await reader.shot("login")
    await reader.page.goto(f"{server.url}/docs")
    await reader.page.wait_for_selector("details#findUsers", timeout=WAIT_MS)
    await reader.page.click("details#findUsers summary")
    await reader.shot("docs")
    assert "username" in (await reader.page.text_content("details#findUsers")).lower()
    async with httpx.AsyncClient() as http:
        served = (await http.get(f"{server.url}/api/openapi.json")).content
        again = await http.get(f"{server.url}/", headers={"if-none-match": "x"})
        etag = again.headers["etag"]
        unchanged = await http.get(f"{server.url}/", headers={"if-none-match": etag})
    assert served == (ROOT / "api" / "openapi.json").read_bytes()
    assert unchanged.status_code == 304
    assert "script-src 'self'" in again.headers["content-security-policy"]
    no_console_errors(reader)


async def test_ticks_of_older_messages_come_from_every_members_pointers(
    server: ServerProcess, people: Any, clients: Clients
) -> None:
    alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
    chat = await alice_sdk.create_direct(bob_sdk.user_id)
    first = await alice_sdk.post_message(chat["chat_id"], "read one")
    await alice_sdk.post_message(chat["chat_id"], "not yet")
    await bob_sdk.request("POST", f"/api/messages/{first['message_id']}/read")
    # More than a page from Bob after them: the newest page has none of Alice's messages, and
    # hers get their ticks when scrolled to.
    for i in range(60):
        await bob_sdk.post_message(chat["chat_id"], f"bob {i}")
    alice = await people("alice")
    await alice.log_in(server, await username(alice_sdk))
    await alice.open_chat(await username(bob_sdk))
    await alice.scroll_until("read one", to="top")
    await alice.tick_becomes("read one", "read")
    assert await alice.tick_of("not yet") == "sent"
    await alice.shot("ticks")
    no_console_errors(alice)


async def test_a_refused_send_keeps_its_reason_and_retry_when_its_chat_is_opened_again(
    server: ServerProcess, people: Any, clients: Clients
) -> None:
    alice_sdk, bob_sdk, carol_sdk = [await clients.user(n) for n in ("alice", "bob", "carol")]
    with_bob = await alice_sdk.create_direct(bob_sdk.user_id)
    await alice_sdk.create_direct(carol_sdk.user_id)
    alice = await people("alice")
    await alice.log_in(server, await username(alice_sdk))
    bob, carol = await username(bob_sdk), await username(carol_sdk)
    await alice.open_chat(bob)
    too_long = "x" * (64 * 1024 + 1)  # over the content limit (PROTOCOL.md): `too_large`
    await alice.say(too_long)
    failed = alice.page.locator("#messages li.failed")
    await failed.locator("button", has_text="Retry").wait_for(timeout=WAIT_MS)
    await alice.open_chat(carol)
    await alice.open_chat(bob)
    await failed.locator("button", has_text="Retry").wait_for(timeout=WAIT_MS)
    assert "Not sent" in (await failed.locator(".why").text_content() or "")
    assert await failed.locator(".tick").get_attribute("data-status") == "sending", "never acked"
    await alice.shot("refused")
    assert await alice_sdk.history_all(with_bob["chat_id"]) == [], "nothing stored"
    no_console_errors(alice)
