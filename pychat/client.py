"""The async Python client SDK (what the tests, bots and plugins use).

    client = await ChatClient.login("http://127.0.0.1:8080", "alice", "secret123")
    await client.connect()
    ack = await client.send(chat_id, "hello")
    async for event in client.events():
        ...

Guarantees it adds on top of PROTOCOL.md:
- every `send` gets a `client_msg_id`; unacked sends are re-sent after a
  reconnect with the same id, so the server stores each at most once;
- `msg` events are de-duplicated by (chat_id, seq), also across reconnects (each one
  dropped is counted in `duplicates_dropped`), and local cursors (highest gap-free seq per
  chat) drive `sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from pychat.ids import new_id

# PROTOCOL.md's default limit; larger frames are refused by the server.
MAX_FRAME_BYTES = 256 * 1024


class ChatError(Exception):
    """An error answer from the server: `code` is one of PROTOCOL.md's codes;
    `retry_after_ms` is set when the server said when to try again."""

    def __init__(
        self, code: str, message: str, status: int | None = None, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after_ms = retry_after_ms


def retry_delay(attempt: int, retry_after_ms: int | None = None) -> float:
    """Seconds to wait before reconnect `attempt` (0-based): the server's `retry_after_ms` when it
    gave one, else exponential backoff from 50 ms to 5 s; both spread by jitter so that clients
    dropped together do not come back together."""
    if retry_after_ms is not None:
        return retry_after_ms / 1000 * (1 + random.random())
    backoff: float = min(0.05 * 2.0**attempt, 5.0)
    return backoff * (0.5 + random.random())


async def open_websocket(
    ws_url: str, token: str, ssl_context: SSLContext | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    """Opens a WebSocket and reads `hello`. An upgrade refused with 429/503 raises ChatError
    carrying the server's `retry_after_ms`. `ssl_context` is for a `wss://` URL (e.g. one that
    trusts a private CA); None: the system's trusted certificates."""
    tls: dict[str, Any] = (
        {"ssl": ssl_context} if ssl_context is not None and ws_url.startswith("wss:") else {}
    )
    try:
        ws = await connect(f"{ws_url}?token={token}", max_size=2**20, ping_interval=None, **tls)
    except InvalidStatus as e:
        try:
            err = json.loads(e.response.body or b"{}").get("error", {})
        except ValueError:
            err = {}
        raise ChatError(
            err.get("code", "unavailable"),
            err.get("message", f"upgrade refused with {e.response.status_code}"),
            e.response.status_code,
            err.get("retry_after_ms"),
        ) from None
    hello = json.loads(await ws.recv())
    if hello.get("type") != "hello":
        await ws.close()
        raise ChatError("internal", f"expected hello, got {hello!r}")
    return ws, hello


@dataclass
class _ChatCursor:
    """Highest seq with no gap below it, plus seqs seen above it."""

    contiguous: int = 0
    above: set[int] = field(default_factory=set)

    def reach(self, seq: int) -> None:
        """Everything up to `seq` is accounted for."""
        if seq > self.contiguous:
            self.contiguous = seq
            self.above = {s for s in self.above if s > seq}
        while self.contiguous + 1 in self.above:
            self.contiguous += 1
            self.above.discard(self.contiguous)

    def see(self, seq: int) -> bool:
        """Records seq; False if it was seen before."""
        if seq <= self.contiguous or seq in self.above:
            return False
        self.above.add(seq)
        while self.contiguous + 1 in self.above:
            self.contiguous += 1
            self.above.discard(self.contiguous)
        return True


class ChatClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        user_id: str,
        *,
        auto_reconnect: bool = True,
        ssl_context: SSLContext | None = None,
    ) -> None:
        """`ssl_context`: what verifies the server over https:// and wss:// (e.g. a context that
        trusts a private CA: `ssl.create_default_context(cafile=...)`); None: the usual CAs."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.user_id = user_id
        self.auto_reconnect = auto_reconnect
        self.ssl_context = ssl_context
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
            verify=ssl_context if ssl_context is not None else True,
        )
        self.cursors: dict[str, _ChatCursor] = {}
        # `msg` frames dropped as already seen (same chat and seq): a server that delivers once
        # keeps this at 0 on a connection that never dropped.
        self.duplicates_dropped: int = 0
        self.session_id: str | None = None
        self._ws: ClientConnection | None = None
        self._ws_url: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._unacked: dict[str, tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = {}
        self._sync_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._connected = asyncio.Event()
        self._closing = False
        # Frames to write, in order; one writer task drains it.
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    # accounts

    @staticmethod
    async def register(
        base_url: str,
        username: str,
        password: str,
        display_name: str | None = None,
        *,
        ssl_context: SSLContext | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"username": username, "password": password}
        if display_name is not None:
            body["display_name"] = display_name
        verify = ssl_context if ssl_context is not None else True
        async with httpx.AsyncClient(base_url=base_url, verify=verify) as http:
            user: dict[str, Any] = _answer(await http.post("/api/users", json=body))
        return user

    @classmethod
    async def login(
        cls,
        base_url: str,
        username: str,
        password: str,
        *,
        ssl_context: SSLContext | None = None,
        **kwargs: Any,
    ) -> ChatClient:
        verify = ssl_context if ssl_context is not None else True
        async with httpx.AsyncClient(base_url=base_url, verify=verify) as http:
            got = _answer(
                await http.post("/api/auth/token", json={"username": username, "password": password})
            )
        return cls(base_url, got["token"], got["user_id"], ssl_context=ssl_context, **kwargs)

    # REST

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return _answer(await self.http.request(method, path, **kwargs))

    async def create_direct(self, other_user_id: str) -> dict[str, Any]:
        return await self.request("POST", "/api/chats", json={"kind": "direct", "members": [other_user_id]})  # type: ignore[no-any-return]

    async def create_group(self, title: str, members: list[str]) -> dict[str, Any]:
        body = {"kind": "group", "title": title, "members": members}
        return await self.request("POST", "/api/chats", json=body)  # type: ignore[no-any-return]

    async def list_chats(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/api/chats"))["chats"]  # type: ignore[no-any-return]

    async def history(
        self, chat_id: str, *, before: int | None = None, after: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        params = {
            k: v for k, v in {"before": before, "after": after, "limit": limit}.items() if v is not None
        }
        return await self.request("GET", f"/api/chats/{chat_id}/messages", params=params)  # type: ignore[no-any-return]

    async def history_all(self, chat_id: str) -> list[dict[str, Any]]:
        """Every message of the chat, oldest first, paging through `history`."""
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await self.history(chat_id, after=after, limit=200)
            out.extend(page["messages"])
            if not page["has_more"]:
                return out
            after = page["messages"][-1]["seq"]

    async def post_message(
        self,
        chat_id: str,
        content: str,
        client_msg_id: str | None = None,
        attachments: list[str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"chat_id": chat_id, "content": content}
        if client_msg_id is not None:
            body["client_msg_id"] = client_msg_id
        if attachments is not None:
            body["attachments"] = attachments
        return await self.request("POST", "/api/messages", json=body)  # type: ignore[no-any-return]

    # media

    async def upload(
        self,
        data: bytes | os.PathLike[str] | str,
        *,
        filename: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> dict[str, Any]:
        """Uploads bytes, or a file by its path (streamed from disk, never read whole into memory).
        The answer's `media_id` goes in `send(..., attachments=[...])`. The server types the file
        from its bytes; `content_type` is only a hint."""
        params = {"filename": filename} if filename else None
        headers = {"Content-Type": content_type}
        body: bytes | AsyncIterator[bytes]
        if isinstance(data, bytes):
            body = data
        else:
            path = Path(data)
            headers["Content-Length"] = str((await asyncio.to_thread(path.stat)).st_size)
            params = {"filename": filename or path.name}
            body = _file_chunks(path)
        media: dict[str, Any] = await self.request(
            "POST", "/api/media", content=body, params=params, headers=headers
        )
        return media

    async def download(self, url_or_id: str, *, to: os.PathLike[str] | str | None = None) -> bytes | None:
        """An attachment's bytes (by its `url`, `thumbnail_url` or `media_id`); with `to`, written
        to that file as they arrive and None returned."""
        path = url_or_id if url_or_id.startswith("/") else f"/api/media/{url_or_id}"
        async with self.http.stream("GET", path) as response:
            if response.status_code >= 400:
                await response.aread()
                _answer(response)
            if to is None:
                return await response.aread()
            f = await asyncio.to_thread(open, to, "wb")
            try:
                async for chunk in response.aiter_bytes():
                    await asyncio.to_thread(f.write, chunk)
            finally:
                await asyncio.to_thread(f.close)
        return None

    # WebSocket

    async def connect(self) -> dict[str, Any]:
        """Opens the WebSocket; returns the `hello` frame."""
        self._closing = False
        if self._ws_url is None:
            config = await self.request("GET", "/api/config")
            self._ws_url = config["ws_url"]
        attempt = 0
        while True:  # a server under a reconnect storm says when to come back
            try:
                hello = await self._open()
                break
            except ChatError as e:
                if e.retry_after_ms is None or attempt >= 20:
                    raise
                await asyncio.sleep(retry_delay(attempt, e.retry_after_ms))
                attempt += 1
        self._reader = asyncio.create_task(self._read_loop())
        self._writer = asyncio.create_task(self._write_loop())
        return hello

    async def _write_loop(self) -> None:
        while True:
            frame = await self._outbox.get()
            await self._connected.wait()
            if self._ws is not None:
                with contextlib.suppress(ConnectionClosed):  # unacked sends go again after reconnect
                    await self._ws.send(json.dumps(frame))

    async def _open(self) -> dict[str, Any]:
        assert self._ws_url is not None
        ws, hello = await open_websocket(self._ws_url, self.token, self.ssl_context)
        self._ws = ws
        self.session_id = hello["session_id"]
        self._connected.set()
        # Tells event consumers that what follows comes over a new connection (until its `synced`).
        self._events.put_nowait({"type": "connected", "session_id": self.session_id})
        # Anything sent but not acked goes again, with the same client_msg_id.
        for frame, _ in list(self._unacked.values()):
            await ws.send(json.dumps(frame))
        return dict(hello)

    async def _read_loop(self) -> None:
        try:
            await self._read_until_closed()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken reader must not leave futures waiting forever
            self._fail_pending(ChatError("internal", f"client reader failed: {e!r}"))
            raise

    async def _read_until_closed(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for raw in ws:
                    self._dispatch(json.loads(raw))
            except ConnectionClosed:
                pass
            self._connected.clear()
            if self._closing or not self.auto_reconnect:
                self._fail_pending(ChatError("unavailable", "connection closed"))
                return
            attempt, retry_after = 0, None
            while not self._closing:
                await asyncio.sleep(retry_delay(attempt, retry_after))
                attempt += 1
                try:
                    await self._open()
                    self._outbox.put_nowait({"type": "sync", "since": self.since()})
                    break
                except ChatError as e:
                    retry_after = e.retry_after_ms
                except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                    retry_after = None
            if self._closing:
                return

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ack":
            # Our own message is part of the chat too: the cursor moves over it.
            self.cursors.setdefault(frame["chat_id"], _ChatCursor()).see(frame["seq"])
            entry = self._unacked.pop(frame["client_msg_id"], None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(frame)
            return
        if kind == "msg":
            cursor = self.cursors.setdefault(frame["chat_id"], _ChatCursor())
            if not cursor.see(frame["seq"]):
                self.duplicates_dropped += 1
                return  # a duplicate across reconnects
        elif kind == "synced":
            # Everything up to each chat's last seq is now here (or was read before).
            for chat_id, last in frame["chats"].items():
                self.cursors.setdefault(chat_id, _ChatCursor()).reach(last)
            waiter = self._sync_waiters.pop(frame.get("ref", ""), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)
        elif kind == "error" and frame.get("ref") in self._sync_waiters:
            waiter = self._sync_waiters.pop(frame["ref"])
            if not waiter.done():
                waiter.set_exception(
                    ChatError(frame["code"], frame["message"], None, frame.get("retry_after_ms"))
                )
            return
        elif kind == "error" and frame["code"] == "rate_limited" and frame.get("ref") in self._unacked:
            # Too fast: the same send goes again when the server said it may.
            again, _ = self._unacked[frame["ref"]]
            delay = retry_delay(0, frame.get("retry_after_ms", 100))
            asyncio.get_running_loop().call_later(delay, self._outbox.put_nowait, again)
            return
        elif kind == "error" and frame.get("ref") in self._unacked:
            _, fut = self._unacked.pop(frame["ref"])
            if not fut.done():
                fut.set_exception(
                    ChatError(frame["code"], frame["message"], None, frame.get("retry_after_ms"))
                )
            return
        self._events.put_nowait(frame)

    def _fail_pending(self, error: ChatError) -> None:
        for _, fut in self._unacked.values():
            if not fut.done():
                fut.set_exception(error)
        self._unacked.clear()
        for fut in self._sync_waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._sync_waiters.clear()

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        if self._ws is None:
            raise ChatError("unavailable", "not connected")
        self._outbox.put_nowait(frame)

    async def send(
        self,
        chat_id: str,
        content: str,
        *,
        attachments: list[str] | None = None,
        client_msg_id: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Sends and waits for the `ack` (the message is durable then). Raises ChatError if refused."""
        fut = self.send_nowait(chat_id, content, attachments=attachments, client_msg_id=client_msg_id)
        try:
            return await asyncio.wait_for(fut, timeout)
        except BaseException:
            # Told it failed, the caller may retry under another id: this one must not go again.
            self.forget(fut)
            raise

    def forget(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        """Stops re-sending the send behind `fut` (e.g. after giving up on it)."""
        for cmid, (_, pending) in list(self._unacked.items()):
            if pending is fut:
                del self._unacked[cmid]

    def send_nowait(
        self,
        chat_id: str,
        content: str,
        *,
        attachments: list[str] | None = None,
        client_msg_id: str | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        """Queues a send; the future resolves with the `ack`."""
        # Time-ordered, so the store appends its idempotency key instead of dirtying a random page.
        cmid = client_msg_id or new_id("")
        frame: dict[str, Any] = {
            "type": "send",
            "chat_id": chat_id,
            "client_msg_id": cmid,
            "content": content,
        }
        if attachments:
            frame["attachments"] = attachments
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if len(json.dumps(frame).encode()) > MAX_FRAME_BYTES:
            fut.set_exception(
                ChatError("too_large", f"the send frame is larger than {MAX_FRAME_BYTES} bytes")
            )
            return fut
        self._unacked[cmid] = (frame, fut)
        if self._ws is not None and self._connected.is_set():
            self._outbox.put_nowait(frame)
        return fut

    def since(self) -> dict[str, int]:
        return {chat_id: c.contiguous for chat_id, c in self.cursors.items()}

    async def sync(self, since: dict[str, int] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Asks for everything missed (default: from the local cursors); returns the `synced` frame
        after every backlog `msg` has been delivered to `events()`. Waits and asks again while the
        server is still answering another sync of this connection (`rate_limited`)."""
        async with asyncio.timeout(timeout):
            attempt = 0
            while True:
                ref = uuid.uuid4().hex
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._sync_waiters[ref] = fut
                frame = {"type": "sync", "since": self.since() if since is None else since, "ref": ref}
                await self._send_frame(frame)
                try:
                    return await fut
                except ChatError as e:
                    if e.code != "rate_limited":
                        raise
                    await asyncio.sleep(retry_delay(attempt, e.retry_after_ms))
                    attempt += 1
                finally:
                    self._sync_waiters.pop(ref, None)

    async def mark_delivered(self, chat_id: str, seq: int) -> None:
        await self._send_frame({"type": "delivered", "chat_id": chat_id, "seq": seq})

    async def mark_read(self, chat_id: str, seq: int) -> None:
        await self._send_frame({"type": "read", "chat_id": chat_id, "seq": seq})

    async def typing(self, chat_id: str, state: str = "start") -> None:
        await self._send_frame({"type": "typing", "chat_id": chat_id, "state": state})

    async def subscribe_presence(self, user_ids: list[str]) -> None:
        """Follows these users' presence; a `presence` event for each comes at once, then on changes."""
        await self._send_frame({"type": "presence.subscribe", "user_ids": user_ids})

    async def presence(self, user_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/api/users/{user_id}/presence")  # type: ignore[no-any-return]

    async def send_raw(self, text: str) -> None:
        """Sends a text frame as is (for tools and tests of bad input)."""
        assert self._ws is not None
        await self._ws.send(text)

    async def next_event(self, kind: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The next event (of `kind`, skipping others)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._events.get()
                if kind is None or event.get("type") == kind:
                    return event

    def pending_events(self) -> list[dict[str, Any]]:
        """Events received and not yet consumed, without waiting."""
        out = []
        while not self._events.empty():
            out.append(self._events.get_nowait())
        return out

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event (msg, synced, receipt, typing, presence, chat, error, and `connected`
        after each (re)connection) in arrival order."""
        while True:
            yield await self._events.get()

    @property
    def unacked(self) -> list[str]:
        return list(self._unacked)

    async def drop_connection(self) -> None:
        """Closes the socket as a network failure would; with auto_reconnect the client comes back."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def close(self) -> None:
        self._closing = True
        self._fail_pending(ChatError("unavailable", "client closed"))
        # The reader first: one reconnecting could otherwise open a socket after the close below.
        for task in (self._reader, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._ws is not None:
            await self._ws.close()
        await self.http.aclose()


async def _file_chunks(path: Path, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


def _answer(response: httpx.Response) -> Any:
    if response.status_code == 204:
        return None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        raise ChatError(
            err.get("code", "internal"),
            err.get("message", response.text),
            response.status_code,
            err.get("retry_after_ms"),
        )
    return body
