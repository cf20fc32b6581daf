"""The web chat page (pychat/web/) in a real browser: Playwright for Python driving Debian's
Chromium (services/chromium.py) against a real server. Two or three people in browser contexts
of their own register, chat, watch typing and ticks, scroll back through history, send with the
keyboard only, attach an image, search, open a chat at its unread divider, and live through an
outage and a server restart, at desktop and phone width; axe-core audits the pages (its npm
tarball pinned by sha256) and the pages go gzip-compressed. Screenshots of each step go to
test-results/web/<test>/; every page is checked for console errors."""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import io
import re
import shutil
import tarfile
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
# The widths the layout changes between: side by side above 700 px, one column below.
SIZES = {"desktop": (1100, 760), "phone": (390, 844)}


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

    async def person(name: str, width: int = 1100, height: int = 760, audit: bool = False) -> Person:
        # An audited page gets axe-core injected: the page's CSP would refuse an inline script.
        context = await browser.new_context(viewport={"width": width, "height": height}, bypass_csp=audit)
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


# axe-core (the accessibility rules engine) pinned: the npm tarball, checked by its sha256.
AXE_VERSION = "4.10.3"
AXE_SHA256 = "0f2b4d7dcdf7d1219df8d1959ad68e565f51d14c3f0d88bb71cd59abeb956292"


@functools.cache
def axe_source() -> str:
    """axe-core's browser script, from its npm tarball: downloaded from registry.npmjs.org once
    into ~/.cache/pychat/axe-core/ (PYCHAT_CACHE), refused unless its sha256 is the pinned one."""
    from services.process import CACHE_DIR

    tarball = CACHE_DIR / "axe-core" / f"axe-core-{AXE_VERSION}.tgz"
    if tarball.is_file():
        data = tarball.read_bytes()
    else:
        url = f"https://registry.npmjs.org/axe-core/-/axe-core-{AXE_VERSION}.tgz"
        data = httpx.get(url, timeout=120, follow_redirects=True).raise_for_status().content
    digest = hashlib.sha256(data).hexdigest()
    assert digest == AXE_SHA256, f"axe-core {AXE_VERSION}: sha256 {digest}, pinned {AXE_SHA256}"
    if not tarball.is_file():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        part = tarball.with_suffix(".part")
        part.write_bytes(data)
        part.replace(tarball)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        script = tar.extractfile("package/axe.min.js")
        assert script is not None
        return script.read().decode()


async def serious_axe_findings(person: Person) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now (the person's context
    made with `audit=True`)."""
    if not await person.page.evaluate("() => !!window.axe"):
        await person.page.add_script_tag(content=axe_source())
    found: list[str] = await person.page.evaluate(
        """async () => (await axe.run(document, {
                resultTypes: ['violations'],
                // Experimental in axe 4.10: a control's name holds its visible text (WCAG 2.5.3).
                rules: {'label-content-name-mismatch': {enabled: true}},
            })).violations
            .filter(v => v.impact === 'serious' || v.impact === 'critical')
            .map(v => `${v.id} (${v.impact}): ${v.help}; at ${v.nodes.map(n => n.target.join(' ')).join(', ')}`)"""
    )
    return found


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


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_a_chat_with_200_unread_opens_at_the_unread_divider_and_scrolls_both_ways(
    server: ServerProcess, people: Any, clients: Clients, size: tuple[int, int]
) -> None:
    alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
    chat = await alice_sdk.create_direct(bob_sdk.user_id)
    await bob_sdk.connect()
    for i in range(1, 211):
        ack = await bob_sdk.send(chat["chat_id"], f"message {i}")
        if i == 10:  # Alice read the first ten elsewhere: her read pointer is at 10
            await alice_sdk.request("POST", f"/api/messages/{ack['message_id']}/read")
    alice = await people("alice", *size)
    name, bob_title = await username(alice_sdk), await username(bob_sdk)
    await alice.log_in(server, name)
    assert await alice.page.text_content(".chat-item .badge") == "200"
    await alice.open_chat(bob_title)
    # The divider sits right above the first unread message, and the chat opens scrolled to it.
    divider = alice.page.locator("#messages li.unread")
    await divider.wait_for(timeout=WAIT_MS)
    assert await divider.text_content() == "200 unread messages"
    first = await divider.evaluate("d => d.nextElementSibling.querySelector('p.content').textContent")
    assert first == "message 11"
    await alice.page.wait_for_function(
        """() => {
            const box = document.getElementById('messages').getBoundingClientRect();
            const d = document.querySelector('#messages li.unread').getBoundingClientRect();
            return d.top >= box.top && d.bottom <= box.top + box.height / 2;
        }""",
        timeout=WAIT_MS,
    )
    await alice.shot("unread-divider")
    await alice.scroll_until("message 210", to="bottom")
    await alice.shot("newest")
    await alice.scroll_until("message 1", to="top")
    await alice.shot("oldest")
    assert await alice.contents() == [f"message {i}" for i in range(1, 211)]
    assert await alice.page.locator("#messages li.unread").count() == 1
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
    responses: list[Any] = []

    def on_response(response: Any) -> None:  # bodies are read below, once all are here
        if response.request.resource_type in ("script", "stylesheet"):
            responses.append(response)

    reader.page.on("response", on_response)
    await reader.page.goto(server.url)  # returns at `load`: the scripts and styles are fetched
    await reader.page.wait_for_selector("#auth:not([hidden])")
    # Every script and stylesheet the page names has its response here (events come on their own).
    named = set(
        await reader.page.evaluate(
            "() => [...document.querySelectorAll('script[src], link[rel=stylesheet]')].map(e => e.src || e.href)"
        )
    )
    deadline = asyncio.get_running_loop().time() + WAIT_MS / 1000
    while not named <= {r.url for r in responses}:
        assert asyncio.get_running_loop().time() < deadline, (named, [r.url for r in responses])
        await asyncio.sleep(0.02)
    loaded = [(r.url, len(await r.body())) for r in responses]
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


async def test_the_sender_sees_what_a_plugin_stored_not_what_it_typed(
    server_factory: Any, people: Any, tmp_path: Path
) -> None:
    config = tmp_path / "pychat.toml"
    config.write_text('[[plugins]]\nuse = "tests.plugin_examples:Gatekeeper"\n')
    server = server_factory({"PYCHAT_CONFIG": str(config)})
    clients = Clients(server)
    try:
        alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
        await alice_sdk.create_direct(bob_sdk.user_id)
        alice = await people("alice")
        await alice.log_in(server, await username(alice_sdk))
        await alice.open_chat(await username(bob_sdk))
        await alice.say("shout: hello there")
        await alice.sees("HELLO THERE")
        await alice.tick_becomes("HELLO THERE", "sent")
        assert "shout: hello there" not in await alice.contents()
        await alice.shot("rewritten")
        no_console_errors(alice)
    finally:
        await clients.close()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_logged_out_nothing_of_the_chat_shows_or_answers(
    server: ServerProcess, people: Any, size: tuple[int, int]
) -> None:
    reader = await people("reader", *size)
    await reader.page.goto(server.url)
    await reader.page.wait_for_selector("#auth:not([hidden])", timeout=WAIT_MS)
    await reader.shot("logged-out")
    for part in ("#main", "#sidebar", "#chat", "#new-chat", "#search", "#logout", "#composer", "#text"):
        assert not await reader.page.is_visible(part), f"{part} shows before login"
    # The keyboard reaches only the login card.
    reached = []
    for _ in range(8):
        await reader.page.keyboard.press("Tab")
        reached.append(await reader.page.evaluate("() => document.activeElement.closest('#main')?.id || ''"))
    assert not any(reached), "Tab reaches the chat layout before login"
    # And its buttons do nothing, even when a script clicks them: no dialog, no request.
    await reader.page.evaluate("() => document.getElementById('new-chat').click()")
    assert not await reader.page.is_visible("#new-chat-dialog")
    no_console_errors(reader)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_with_no_chat_open_the_composer_is_off(
    server: ServerProcess, people: Any, clients: Clients, size: tuple[int, int]
) -> None:
    alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
    chat = await alice_sdk.create_direct(bob_sdk.user_id)
    alice = await people("alice", *size)
    await alice.log_in(server, await username(alice_sdk))
    if size == SIZES["phone"]:  # a chat opened, then left with Back
        await alice.open_chat(await username(bob_sdk))
        await alice.page.click("#back")
        await alice.page.wait_for_selector("#chat-list .chat-item")
    assert not await alice.page.is_visible("#composer")
    assert await alice.page.is_disabled("#text")
    # Enter (or a submit) in it anyway: nothing is sent, nothing shows, no error.
    await alice.page.evaluate(
        """() => {
            const text = document.getElementById('text');
            text.disabled = false;
            text.value = 'to nobody';
            text.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true}));
            document.getElementById('composer').requestSubmit();
        }"""
    )
    await asyncio.sleep(1)
    assert await alice.page.locator("#messages li").count() == 0
    assert "Not sent" not in (await alice.page.text_content("body") or "")
    assert await alice_sdk.history_all(chat["chat_id"]) == []
    await alice.shot("no-chat-open")
    no_console_errors(alice)


async def test_search_highlights_keep_the_spaces_around_the_match(
    server: ServerProcess, people: Any, clients: Clients
) -> None:
    alice_sdk, bob_sdk = await clients.user("alice"), await clients.user("bob")
    chat = await alice_sdk.create_direct(bob_sdk.user_id)
    word = unique_name("pastel")
    await alice_sdk.post_message(chat["chat_id"], f"{word} de nata")
    await alice_sdk.post_message(chat["chat_id"], f"um {word} <de> nata & café")
    bob = await people("bob")
    await bob.log_in(server, await username(bob_sdk))
    await bob.page.fill("#search", word)
    await bob.page.press("#search", "Enter")
    previews = bob.page.locator("#search-results button.result .preview")
    await previews.nth(1).wait_for(timeout=WAIT_MS)
    texts = sorted(await previews.all_text_contents())
    assert texts == [f"{word} de nata", f"um {word} <de> nata & café"]
    assert await bob.page.locator("#search-results mark").all_text_contents() == [word, word]
    await bob.shot("search")
    no_console_errors(bob)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_an_outage_shows_offline_at_every_width_and_online_again_after(
    server_factory: Any, people: Any, size: tuple[int, int]
) -> None:
    server = server_factory()
    names = [unique_name(n) for n in ("alice", "bob")]
    for n in names:
        await ChatClient.register(server.url, n, PASSWORD)
    bob_sdk = await ChatClient.login(server.url, names[1], PASSWORD)
    try:
        await bob_sdk.connect()  # Bob stays online (the SDK reconnects after the outage)
        alice = await people("alice", *size)
        await alice.log_in(server, names[0])
        await alice.page.click("#new-chat")
        await alice.page.fill("#user-search", names[1])
        await alice.page.check(f"#pick-{bob_sdk.user_id}", timeout=WAIT_MS)
        await alice.page.click("#new-chat-create")
        await alice.page.wait_for_function(
            "() => document.getElementById('chat-status').textContent === 'online'", timeout=WAIT_MS
        )
        assert not await alice.page.is_visible("#conn")
        server.kill()
        offline = alice.page.locator("#conn")
        await offline.wait_for(state="visible", timeout=WAIT_MS)
        assert "offline" in (await offline.text_content() or "").lower()
        box = await offline.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= size[0] and 0 <= box["y"] < size[1]
        # Nobody's presence is known while offline: the header says so, not "online".
        status = await alice.page.text_content("#chat-status")
        assert status != "online" and "offline" in (status or "").lower()
        assert await alice.page.locator(".chat-item .dot.online").count() == 0
        await alice.shot("offline")
        server.start()
        await offline.wait_for(state="hidden", timeout=30_000)
        await alice.page.wait_for_function(
            "() => document.getElementById('chat-status').textContent === 'online'", timeout=30_000
        )
        await alice.shot("online-again")
        no_console_errors(alice, allow=RECONNECTING)
    finally:
        await bob_sdk.close()


async def test_the_group_dialog_keeps_who_was_picked_across_searches(
    server: ServerProcess, people: Any, clients: Clients
) -> None:
    sdk = [await clients.user(n) for n in ("alice", "bob", "carol")]
    names = [await username(c) for c in sdk]
    alice = await people("alice")
    await alice.log_in(server, names[0])
    await alice.page.click("#new-chat")
    await alice.page.fill("#user-search", names[1])
    await alice.page.check(f"#pick-{sdk[1].user_id}", timeout=WAIT_MS)
    await alice.page.fill("#user-search", names[2])
    await alice.page.check(f"#pick-{sdk[2].user_id}", timeout=WAIT_MS)
    # Bob, found by the first search, is still there and still picked.
    assert await alice.page.is_checked(f"#pick-{sdk[1].user_id}")
    await alice.page.fill("#user-search", "")
    await asyncio.sleep(0.5)  # the search answers after a pause in typing
    assert await alice.page.is_checked(f"#pick-{sdk[1].user_id}")
    assert await alice.page.is_checked(f"#pick-{sdk[2].user_id}")
    assert await alice.page.text_content("#new-chat-create") == "Create group of 3"
    await alice.shot("picked")
    # Unpicked, Bob goes at the next search; Carol stays.
    await alice.page.uncheck(f"#pick-{sdk[1].user_id}")
    await alice.page.fill("#user-search", names[0])
    await asyncio.sleep(0.5)
    assert await alice.page.locator(f"#pick-{sdk[1].user_id}").count() == 0
    assert await alice.page.is_checked(f"#pick-{sdk[2].user_id}")
    assert await alice.page.text_content("#new-chat-create") == "Start chat"
    await alice.page.click("#new-chat-create")
    await alice.page.wait_for_selector("#composer:not([hidden])")
    chats = await sdk[0].list_chats()
    assert [(c["kind"], sorted(c["members"])) for c in chats] == [
        ("direct", sorted([sdk[0].user_id, sdk[2].user_id]))
    ]
    no_console_errors(alice)


# A colour's contrast with what is behind it (WCAG 2: relative luminance), over a page's elements.
CONTRAST = """els => {
    const rgb = c => c.match(/[\\d.]+/g).map(Number);
    const lum = ([r, g, b]) => {
        const f = v => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const behind = e => {
        for (; e; e = e.parentElement) {
            const c = rgb(getComputedStyle(e).backgroundColor);
            if (c.length < 4 || c[3] > 0) return c;
        }
        return [255, 255, 255];
    };
    return els.map(e => {
        const [a, b] = [lum(rgb(getComputedStyle(e).color)), lum(behind(e))];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    });
}"""


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_the_docs_page_title_links_code_spans_and_fit(
    server: ServerProcess, people: Any, size: tuple[int, int]
) -> None:
    reader = await people("reader", *size)
    await reader.page.goto(f"{server.url}/docs")
    await reader.page.wait_for_selector("details#findUsers", timeout=WAIT_MS)
    assert await reader.page.title() == "pychat API v1"
    assert await reader.page.text_content("h1") == "pychat API v1"
    await reader.page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    await reader.shot("docs")
    # Descriptions show `code` as code, not as backticks.
    assert "`" not in await reader.page.inner_text("#docs")
    assert await reader.page.locator("#docs-body details p code").count() > 0
    # Every link answers: pages and the contract with 200, in-page links with their target.
    links = await reader.page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
    assert f"{server.url}/api/ws-frames.schema.json" in links
    async with httpx.AsyncClient() as http:
        for link in dict.fromkeys(links):
            url, _, anchor = link.partition("#")
            if url == f"{server.url}/docs" and anchor:
                assert await reader.page.locator(f"[id='{anchor}']").count() == 1, link
            else:
                assert (await http.get(url)).status_code == 200, link
    # Nothing runs off the side: long lines wrap or scroll inside their block.
    wider = await reader.page.evaluate(
        """() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
            .map(e => e.tagName + (e.id ? '#' + e.id : '') + ' ' + (e.textContent || '').slice(0, 40))"""
    )
    assert wider == []
    assert await reader.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    # The method labels are readable (WCAG AA: 4.5:1).
    ratios = await reader.page.eval_on_selector_all(".method", CONTRAST)
    assert ratios and min(ratios) >= 4.5, min(ratios)
    no_console_errors(reader)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_axe_finds_nothing_serious_logged_out_in_a_chat_and_on_the_docs(
    server: ServerProcess, people: Any, clients: Clients, size: tuple[int, int]
) -> None:
    alice_sdk, bob_sdk, carol_sdk = [await clients.user(n) for n in ("alice", "bob", "carol")]
    chat = await alice_sdk.create_group("Three of us", [bob_sdk.user_id, carol_sdk.user_id])
    mine = await alice_sdk.post_message(chat["chat_id"], "one of mine, read")
    for reader in (bob_sdk, carol_sdk):
        await reader.request("POST", f"/api/messages/{mine['message_id']}/read")
    await alice_sdk.post_message(chat["chat_id"], "another of mine")
    for i in range(3):
        await bob_sdk.post_message(chat["chat_id"], f"from bob {i}")
    alice = await people("alice", *size, audit=True)
    await alice.page.goto(server.url)
    await alice.page.wait_for_selector("#auth:not([hidden])", timeout=WAIT_MS)
    assert await serious_axe_findings(alice) == []
    await alice.log_in(server, await username(alice_sdk))
    await alice.open_chat("Three of us")
    await alice.page.wait_for_selector("#messages li.unread", timeout=WAIT_MS)
    await alice.tick_becomes("one of mine, read", "read")
    assert await serious_axe_findings(alice) == []
    await alice.page.goto(f"{server.url}/docs")
    await alice.page.wait_for_selector("details#findUsers", timeout=WAIT_MS)
    await alice.page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    assert await serious_axe_findings(alice) == []
    no_console_errors(alice)


async def test_the_pages_go_gzip_compressed_to_clients_that_take_it(server: ServerProcess) -> None:
    web = ROOT / "pychat" / "web"
    files = {
        "/": web / "index.html",
        "/app.js": web / "app.js",
        "/app.css": web / "app.css",
        "/docs": web / "docs.html",
        "/docs.js": web / "docs.js",
        "/api/openapi.json": ROOT / "api" / "openapi.json",
    }
    async with httpx.AsyncClient(base_url=server.url) as http:
        del http.headers["accept-encoding"]  # httpx asks for gzip by default
        for url, path in files.items():
            plain = path.read_bytes()
            async with http.stream("GET", url, headers={"accept-encoding": "gzip, deflate, br"}) as r:
                raw = b"".join([part async for part in r.aiter_raw()])  # the bytes as they came
            assert r.status_code == 200
            assert r.headers.get("content-encoding") == "gzip", url
            assert "accept-encoding" in r.headers.get("vary", "").lower(), url
            assert raw[:2] == b"\x1f\x8b" and gzip.decompress(raw) == plain, url
            assert len(raw) < len(plain), url
            if url == "/app.js":
                assert len(raw) < 14 * 1024, f"app.js: {len(raw)} bytes gzip-compressed"
            # A client that asks for no encoding, or refuses gzip, gets the file as it is.
            for asks in ({}, {"accept-encoding": "gzip;q=0, identity"}):
                got = await http.get(url, headers=asks)
                assert "content-encoding" not in got.headers, (url, asks)
                assert got.content == plain, (url, asks)
                assert "accept-encoding" in got.headers.get("vary", "").lower(), url
            # Each encoding has its own ETag; both answer 304 while unchanged.
            again = await http.get(
                url, headers={"accept-encoding": "gzip", "if-none-match": r.headers["etag"]}
            )
            assert again.status_code == 304 and again.headers["etag"] == r.headers["etag"]
            assert r.headers["etag"] != got.headers["etag"]
