"""The REST API (PROTOCOL.md), as a plain ASGI app served by granian.

Every route but the public ones requires `Authorization: Bearer TOKEN`; every
chat, message and receipt read checks membership first.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl

from pychat import __version__
from pychat.auth import DUMMY_HASH, USERNAME, TokenIssuer, hash_password, verify_password
from pychat.blobs import BlobStore
from pychat.config import Config
from pychat.engine import Engine
from pychat.errors import ApiError, RateLimited
from pychat.extras import missing
from pychat.gateway import Gateway
from pychat.ids import new_id, now_ms
from pychat.media import (
    IMAGE_TYPES,
    THUMBNAIL_TYPE,
    BlobStream,
    ByteRange,
    MediaService,
    disposition,
    parse_range,
)
from pychat.metrics import Metrics
from pychat.plugins import Connect
from pychat.presence import Presence
from pychat.ratelimit import RateLimiter
from pychat.search import SearchIndex
from pychat.store import Chat, Media, Store, User, receipts_at
from pychat.web import CSP, load_pages

try:
    from pychat import export as chat_export
except ModuleNotFoundError as _e:  # the `export` extra is not installed: the rest still serves
    chat_export = None  # type: ignore[assignment]
    EXPORT_MISSING = str(missing("export", _e))

if TYPE_CHECKING:
    from pychat.cluster.node import ClusterNode

log = logging.getLogger("pychat.rest")

T = TypeVar("T")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)
    user_id: str = ""
    client: str = ""
    # For a streamed route (uploads): the body is read by the handler, not before it.
    receive: Receive | None = None

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError("bad_request", "the body must be JSON") from None
        if not isinstance(value, dict):
            raise ApiError("bad_request", "the body must be a JSON object")
        try:  # JSON may spell lone surrogates, which are not text
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError("bad_request", "the body must be valid UTF-8 text") from None
        return value

    def int_query(self, name: str, lo: int, hi: int, default: int | None = None) -> int | None:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        if not re.fullmatch(r"-?[0-9]{1,19}", raw):
            raise ApiError("bad_request", f"`{name}` must be an integer")
        value = int(raw)
        if not lo <= value <= hi:
            raise ApiError("bad_request", f"`{name}` must be between {lo} and {hi}")
        return value


class BodyStream(Protocol):
    """A response body produced as it is sent; `aclose` is always called after."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    # A body sent as it is produced (media downloads, exports) instead of `body`: `length` bytes
    # in all, or None when not known before the end (then sent chunked).
    stream: BodyStream | None = None
    length: int | None = None


def _body_stalled(seconds: float) -> ApiError:
    error = ApiError("bad_request", f"the request body stalled for {seconds:g} s", status=408)
    error.extra_headers.append(("connection", "close"))
    return error


def ok(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


def _string(body: dict[str, Any], key: str, *, required: bool = True, max_len: int = 256) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError("bad_request", f"`{key}` is required")
        return None
    if not isinstance(value, str):
        raise ApiError("bad_request", f"`{key}` must be a string")
    if len(value) > max_len:
        raise ApiError("bad_request", f"`{key}` is longer than {max_len} characters")
    return value


def _id_list(body: dict[str, Any], key: str, max_items: int) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= 128 for v in value):
        raise ApiError("bad_request", f"`{key}` must be a list of ids")
    if len(value) > max_items:
        raise ApiError("too_large", f"`{key}` has more than {max_items} items")
    return list(dict.fromkeys(value))


Handler = Callable[[Request], Awaitable[Response]]

# Search: the longest query, and the most results on a page.
MAX_QUERY_CHARS = 256
SEARCH_MAX = 200

# The largest seq a client can name (JSON numbers stay exact up to 2**53 - 1).
MAX_SEQ = 2**53 - 1

# `GET /api/users`: ids per lookup, and users per prefix search.
USERS_MAX = 200
USERS_PAGE_MAX = 50

# Threads that encode exports (each export runs on one at a time).
EXPORT_THREADS = 2

# A streamed response (media, exports) is handed to the server in pieces of at most this much, so
# that what waits in its buffers for a slow client stays small.
SEND_PIECE = 256 * 1024

# Users known to exist (a signed token is checked against the store once per user, not per
# request); users are never deleted, so an entry never goes stale. Past this many it starts over.
KNOWN_USERS_MAX = 100_000

# Threads for REST's store writes. SQLite takes one writer at a time, so more would only wait for
# its lock; they are apart from the read threads so that reads never queue behind such waits.
WRITE_THREADS = 2


class RestApi:
    """The ASGI application. Handlers run on the event loop but never call the store there:
    every store call goes through `_store_call` to a thread (SQLite blocks, up to its busy timeout
    while the engine or another process holds the write lock)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        engine: Engine,
        gateway: Gateway,
        presence: Presence,
        issuer: TokenIssuer,
        metrics: Metrics,
        blobs: BlobStore,
        cluster: ClusterNode | None = None,
        search: SearchIndex | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.store = store
        self.engine = engine
        self.gateway = gateway
        self.presence = presence
        self.login_limit = RateLimiter(
            config.login_per_min / 60, config.login_per_min
        )  # failures per username+address
        self.login_failures = RateLimiter(config.login_failures_per_min / 60, config.login_failures_per_min)
        self.send_limit = RateLimiter(config.send_per_s, config.send_burst)
        self.register_limit = RateLimiter(config.register_per_min / 60, config.register_per_min)
        self._reads = ThreadPoolExecutor(max(1, config.rest_threads), thread_name_prefix="pychat-rest")
        self._writes = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="pychat-rest-write")
        # Exports encode pages on threads of their own: few, so that the memory each thread's
        # allocator keeps after a page stays small, and exports never hold up the REST reads.
        self._exports = ThreadPoolExecutor(EXPORT_THREADS, thread_name_prefix="pychat-export")
        self.export_slots = (
            chat_export.ExportSlots(config.exports_at_once, config.exports_per_user) if chat_export else None
        )
        self._known_users: set[str] = set()
        self.media = MediaService(config, store, blobs, self._store_call)
        self.search_index = search
        # One member change at a time, from its checks to telling the gateway: with the store
        # calls on threads, two changes could otherwise publish their member lists out of order
        # (a removed member kept in the gateway's cache) or both pass the group-size check.
        self._member_changes = asyncio.Lock()
        self.issuer = issuer
        self.metrics = metrics
        # (method, pattern, handler, needs_auth, route label)
        self.routes: list[tuple[str, re.Pattern[str], Handler, bool, str]] = []
        r = self._route
        r("POST", "/api/users", self.create_user, auth=False)
        r("POST", "/api/auth/token", self.login, auth=False)
        r("GET", "/api/config", self.get_config, auth=False)
        r("GET", "/healthz", self.healthz, auth=False)
        r("GET", "/metrics", self.get_metrics, auth=False)
        r("POST", "/api/chats", self.create_chat)
        r("GET", "/api/chats", self.list_chats)
        r("GET", "/api/chats/{chat_id}", self.get_chat)
        r("POST", "/api/chats/{chat_id}/members", self.add_member)
        r("DELETE", "/api/chats/{chat_id}/members/{user_id}", self.remove_member)
        r("POST", "/api/messages", self.post_message)
        r("GET", "/api/chats/{chat_id}/messages", self.history)
        r("POST", "/api/messages/{message_id}/read", self.mark_read)
        r("GET", "/api/chats/{chat_id}/receipts", self.receipts)
        r("GET", "/api/users", self.find_users)
        r("GET", "/api/users/{user_id}/presence", self.get_presence)
        r("POST", "/api/media", self.upload_media)
        r("GET", "/api/media/{media_id}", self.download_media)
        r("GET", "/api/media/{media_id}/thumbnail", self.download_thumbnail)
        # Routes whose handler reads the body itself, as it arrives.
        self.streamed = {"/api/media"}
        r("GET", "/api/search", self.search)
        r("GET", "/api/chats/{chat_id}/export", self.export)
        # The web chat page, the API docs page and the OpenAPI document (pychat/web/).
        self.pages = load_pages()
        for url in self.pages:
            r("GET", url, self.page, auth=False)

    def _route(self, method: str, path: str, handler: Handler, auth: bool = True) -> None:
        pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
        self.routes.append((method, pattern, handler, auth, path))

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        route_label = "unmatched"
        try:
            response, route_label = await self._dispatch(scope, self._receive_within(receive))
        except ApiError as e:
            response = Response(e.status, json.dumps(e.body()).encode(), headers=e.headers())
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            self.metrics.errors.inc(kind="http_internal")
            response = Response(500, json.dumps(ApiError("internal", "internal error").body()).encode())
        headers = [(b"content-type", response.content_type.encode())]
        length = response.length if response.stream is not None else len(response.body)
        if response.status != 304 and length is not None:  # a 304's length would be the 200's
            headers.append((b"content-length", str(length).encode()))
        headers.extend((k.encode(), v.encode()) for k, v in response.headers)
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            if response.stream is None:
                await send({"type": "http.response.body", "body": response.body})
            else:
                await self._send_stream(response.stream, send, receive)
        finally:
            if response.stream is not None:
                await response.stream.aclose()
        self.metrics.http_requests.inc(route=route_label, status=str(response.status))
        self.metrics.http_seconds.observe(time.perf_counter() - started, route=route_label)

    def _receive_within(self, receive: Receive) -> Receive:
        """`receive`, refused with 408 when the client sends nothing of its body for as long as
        it may take over a request head (it would keep its connection's slot for good)."""
        seconds = self.config.rest_header_timeout_ms / 1000

        async def within() -> dict[str, Any]:
            try:
                return await asyncio.wait_for(receive(), seconds)
            except TimeoutError:
                pass
            # Raised here, with no exception in flight and none in a local: a reference cycle
            # through the traceback would keep the request, and so its connection, until the
            # garbage collector's next full run.
            raise _body_stalled(seconds)

        return within

    async def _send_stream(self, stream: BodyStream, send: Send, receive: Receive) -> None:
        """Sends the stream in pieces until its end or the client's leaving (a send to a closed
        connection does not fail: `receive` tells). A client that takes no piece for
        `rest_send_timeout_ms` is abandoned; the kernel cuts its connection (rest_port)."""
        timeout = self.config.rest_send_timeout_ms / 1000 or None
        # With the body read, `receive` answers only when the client disconnects.
        gone = asyncio.ensure_future(receive())
        try:
            async for chunk in stream:
                for start in range(0, len(chunk), SEND_PIECE):
                    if gone.done():
                        log.info("a client left during a streamed response")
                        return
                    piece = chunk[start : start + SEND_PIECE]
                    message = {"type": "http.response.body", "body": piece, "more_body": True}
                    await asyncio.wait_for(send(message), timeout)
            await send({"type": "http.response.body", "body": b""})
        except TimeoutError:
            log.info("a client read nothing of a streamed response for %s s: abandoned", timeout)
            self.metrics.errors.inc(kind="http_stalled_reader")
        except Exception as e:  # the blob store failed midway
            log.info("a streamed response stopped early: %s", e)
        finally:
            gone.cancel()

    async def _dispatch(self, scope: Scope, receive: Receive) -> tuple[Response, str]:
        path: str = scope["path"]
        method: str = scope["method"]
        allowed: list[str] = []
        for route_method, pattern, handler, auth, label in self.routes:
            m = pattern.match(path)
            if m is None:
                continue
            allowed.append(route_method)
            if route_method != method:
                continue
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            req = Request(
                method=method,
                path=path,
                query=dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))),
                headers=headers,
                body=b"",
                params=m.groupdict(),
                client=(scope.get("client") or ("", 0))[0],
            )
            origins = self.config.origins
            if origins and "origin" in headers and headers["origin"] not in origins:
                raise ApiError("forbidden", "origin not allowed")
            if auth:
                req.user_id = await self._authenticate(headers)
            if label in self.streamed:
                req.receive = receive
            else:
                req.body = await self._read_body(receive)
            return await handler(req), label
        if allowed:
            error = ApiError("bad_request", f"method {method} is not allowed here", status=405)
            error.extra_headers = [("allow", ", ".join(allowed))]
            raise error
        raise ApiError("not_found", "no such endpoint")

    async def _authenticate(self, headers: dict[str, str]) -> str:
        """The user of a valid token for a user the store has (a token signed for a user who is
        not there, as after a store was replaced under the same key, is refused)."""
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError("unauthorized", "missing bearer token")
        user_id = self.issuer.user_of(token.strip())
        if user_id not in self._known_users:
            # Only found users are kept: one created on another node is found at its first call.
            if not await self._store_call(self.store.existing_users, [user_id]):
                raise ApiError("unauthorized", "invalid token: no such user")
            if len(self._known_users) >= KNOWN_USERS_MAX:
                self._known_users.clear()
            self._known_users.add(user_id)
        return user_id

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self.config.limits.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError("bad_request", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError("too_large", f"request body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def close(self) -> None:
        """Stops the store threads: queued calls are dropped, running ones finish (the store is
        closed after this)."""
        for pool in (self._reads, self._writes, self._exports):
            await asyncio.to_thread(functools.partial(pool.shutdown, wait=True, cancel_futures=True))
        await asyncio.to_thread(self.media.close)

    # helpers

    async def _store_call(self, call: Callable[..., T], *args: Any, write: bool = False) -> T:
        """`call(*args)` (a store call, or one that reads the store) on a REST store thread."""
        pool = self._writes if write else self._reads
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(call, *args))
        except self.store.unavailable_errors as e:
            log.warning("the store did not answer %s: %s", getattr(call, "__name__", call), e)
            raise ApiError("unavailable", "the store is unavailable; retry") from None

    async def _member_chat(self, chat_id: str, user_id: str) -> Chat:
        chat = await self._store_call(self.store.get_chat, chat_id)
        if chat is None:
            raise ApiError("not_found", "no such chat")
        if user_id not in chat.members:
            raise ApiError("forbidden", "not a member of this chat")
        return chat

    async def _publish_chat(self, chat: Chat, also: list[str] | None = None) -> None:
        """Updates the gateway's membership cache (every node's, in a cluster), then tells the members."""
        frame = json.dumps({"type": "chat", "chat": chat.to_json()}, separators=(",", ":"))
        users = [*chat.members, *(also or [])]
        self.presence.membership_changed()
        if self.cluster is not None:
            await asyncio.to_thread(
                self.cluster.publish_chat, chat.chat_id, chat.kind, chat.members, users, frame
            )
            return
        self.gateway.set_chat_members(chat.chat_id, chat.members, chat.kind == "direct")
        self.gateway.push_to_users(users, frame)

    # handlers

    async def create_user(self, req: Request) -> Response:
        body = req.json()
        username = _string(body, "username", max_len=64)
        password = _string(body, "password", max_len=1024)
        display_name = _string(body, "display_name", required=False, max_len=128)
        assert username is not None and password is not None
        lim = self.config.limits
        if not (lim.username_min <= len(username) <= lim.username_max and USERNAME.fullmatch(username)):
            raise ApiError(
                "bad_request",
                f"username must be {lim.username_min} to {lim.username_max} characters of [A-Za-z0-9_.-]",
            )
        if len(password) < 8:
            raise ApiError("bad_request", "password must be at least 8 characters")
        # Every well-formed attempt costs the address a token: each one may cost a slow hash.
        retry_after = self.register_limit.check(req.client)
        if retry_after is not None:
            raise RateLimited(retry_after)
        if await self._store_call(self.store.user_by_name, username) is not None:
            raise ApiError("conflict", "username is taken")
        password_hash = await asyncio.to_thread(hash_password, password)
        user = User(new_id("u"), username, display_name, password_hash, now_ms())
        await self._store_call(self.store.create_user, user, write=True)
        return ok(user.public(), 201)

    async def login(self, req: Request) -> Response:
        body = req.json()
        username = _string(body, "username", max_len=64)
        password = _string(body, "password", max_len=1024)
        assert username is not None and password is not None
        # Failures are what is limited, per (username, address) and per address, so a stranger
        # cannot lock a user out by failing logins in its name from elsewhere.
        key = f"{username.lower()}|{req.client}"
        blocked = self.login_limit.blocked(key) or self.login_failures.blocked(req.client)
        if blocked:
            raise RateLimited(blocked)
        user = await self._store_call(self.store.user_by_name, username)
        stored_hash = user.password_hash if user else DUMMY_HASH
        valid = await asyncio.to_thread(verify_password, password, stored_hash)
        if user is None or not valid:
            self.login_limit.check(key)
            self.login_failures.check(req.client)
            raise ApiError("unauthorized", "wrong username or password")
        plugins = self.engine.plugins
        if plugins is not None and plugins.connectors:
            attempt = Connect(user.user_id, req.client, "login", req.headers.get("origin"))
            (refused,), _ = await asyncio.to_thread(plugins.on_connect, [attempt])
            if refused is not None:
                raise ApiError(refused.code, refused.message, retry_after_ms=refused.retry_after_ms)
        token, expires_at = self.issuer.issue(user.user_id)
        return ok({"token": token, "user_id": user.user_id, "expires_at": expires_at})

    async def get_config(self, req: Request) -> Response:
        ws_url = self.config.public_ws_url
        if not ws_url:
            host = self.config.host
            if host in ("0.0.0.0", "::", ""):
                host = req.headers.get("host", "127.0.0.1").rsplit(":", 1)[0] or "127.0.0.1"
            ws_url = f"ws://{host}:{self.gateway.port}/ws"
        lim = self.config.limits
        return ok(
            {
                "ws_url": ws_url,
                "version": __version__,
                "limits": {
                    "max_content_bytes": lim.max_content_bytes,
                    "max_attachments": lim.max_attachments,
                    "max_frame_bytes": lim.max_frame_bytes,
                    "max_upload_bytes": lim.max_upload_bytes,
                    "max_group_members": lim.max_group_members,
                    "history_max": lim.history_max,
                    "username_min": lim.username_min,
                    "username_max": lim.username_max,
                },
            }
        )

    async def healthz(self, req: Request) -> Response:
        try:
            store_ok = await self._store_call(self.store.ping)
        except Exception:
            store_ok = False
        if not store_ok:
            raise ApiError("unavailable", "the store is not answering")
        if not self.engine.alive:
            raise ApiError("unavailable", "the engine thread has stopped")
        return ok({"status": "ok"})

    async def get_metrics(self, req: Request) -> Response:
        text = self.metrics.render(self.gateway.counters(), self.gateway.connection_count())
        if self.cluster is not None:
            # The node's part in the cluster: sends produced again, gaps read from the store, ...
            text += "".join(
                f"# TYPE pychat_cluster_{name} gauge\npychat_cluster_{name} {value}\n"
                for name, value in sorted(self.cluster.metrics().items())
            )
        return Response(200, text.encode(), "text/plain; version=0.0.4")

    async def create_chat(self, req: Request) -> Response:
        body = req.json()
        kind = body.get("kind")
        lim = self.config.limits
        members = _id_list(body, "members", lim.max_group_members)
        if kind == "direct":
            others = [m for m in members if m != req.user_id]
            if len(others) != 1 or len(members) != 1:
                raise ApiError("bad_request", "a direct chat has exactly one other member")
            members = [req.user_id, others[0]]
            title = None
        elif kind == "group":
            title = _string(body, "title", required=False, max_len=256)
            members = [req.user_id, *[m for m in members if m != req.user_id]]
            if len(members) > lim.max_group_members:
                raise ApiError("too_large", f"a group has at most {lim.max_group_members} members")
        else:
            raise ApiError("bad_request", '`kind` must be "direct" or "group"')
        missing = set(members) - await self._store_call(self.store.existing_users, members)
        if missing:
            raise ApiError("not_found", f"no such user: {sorted(missing)[0]}")
        direct_key = "|".join(sorted(members)) if kind == "direct" else None
        chat = Chat(new_id("c"), kind, title, req.user_id, now_ms(), 0, members)
        chat, created = await self._store_call(self.store.create_chat, chat, direct_key, write=True)
        if created:
            await self._publish_chat(chat)
        return ok(chat.to_json(), 201 if created else 200)

    async def list_chats(self, req: Request) -> Response:
        return ok({"chats": await self._store_call(self.store.list_chats, req.user_id)})

    async def get_chat(self, req: Request) -> Response:
        return ok((await self._member_chat(req.params["chat_id"], req.user_id)).to_json())

    async def add_member(self, req: Request) -> Response:
        async with self._member_changes:
            chat = await self._member_chat(req.params["chat_id"], req.user_id)
            body = req.json()
            user_id = _string(body, "user_id", max_len=128)
            assert user_id is not None
            if chat.kind != "group":
                raise ApiError("bad_request", "members can be added to group chats only")
            if user_id in chat.members:
                return ok(chat.to_json())
            if len(chat.members) >= self.config.limits.max_group_members:
                raise ApiError("too_large", "the group is full")
            if not await self._store_call(self.store.existing_users, [user_id]):
                raise ApiError("not_found", "no such user")
            await self._store_call(self.store.add_member, chat.chat_id, user_id, write=True)
            updated = await self._store_call(self.store.get_chat, chat.chat_id)
            assert updated is not None
            await self._publish_chat(updated)
            return ok(updated.to_json())

    async def remove_member(self, req: Request) -> Response:
        async with self._member_changes:
            chat = await self._member_chat(req.params["chat_id"], req.user_id)
            target = req.params["user_id"]
            if target != req.user_id and req.user_id != chat.created_by:
                raise ApiError("forbidden", "only the group's creator may remove others")
            if chat.kind != "group":
                raise ApiError("bad_request", "the members of a direct chat are fixed")
            if target not in chat.members:
                raise ApiError("not_found", "not a member of this chat")
            await self._store_call(self.store.remove_member, chat.chat_id, target, write=True)
            updated = await self._store_call(self.store.get_chat, chat.chat_id)
            assert updated is not None
            await self._publish_chat(updated, also=[target])
            return Response(204)

    async def post_message(self, req: Request) -> Response:
        body = req.json()
        lim = self.config.limits
        chat_id = _string(body, "chat_id", max_len=128)
        content = body.get("content", "")
        if not isinstance(content, str):
            raise ApiError("bad_request", "`content` must be a string")
        if len(content.encode()) > lim.max_content_bytes:
            raise ApiError("too_large", f"`content` is larger than {lim.max_content_bytes} bytes")
        client_msg_id = _string(body, "client_msg_id", required=False, max_len=128)
        if client_msg_id == "":
            raise ApiError("bad_request", "`client_msg_id` must not be empty")
        attachments = _id_list(body, "attachments", lim.max_attachments)
        if not content and not attachments:
            raise ApiError("bad_request", "a message needs `content` or `attachments`")
        assert chat_id is not None
        retry_after = self.send_limit.check(req.user_id)
        if retry_after is not None:
            raise RateLimited(retry_after)
        ack = await self.engine.send(
            req.user_id, chat_id, client_msg_id or new_id("rest-"), content, attachments
        )
        return ok(ack, 201)

    async def history(self, req: Request) -> Response:
        chat_id = req.params["chat_id"]
        big = MAX_SEQ
        before = req.int_query("before", 0, big)
        after = req.int_query("after", 0, big)
        limit = req.int_query("limit", 1, self.config.limits.history_max, default=50)
        assert limit is not None
        # The membership check and the page's read run at once (one store round trip of latency
        # instead of two); the page is returned only to a member.
        member, page = await asyncio.gather(
            self._member_chat(chat_id, req.user_id),
            self._store_call(self.store.history, chat_id, before, after, limit),
            return_exceptions=True,
        )
        if isinstance(member, BaseException):
            raise member
        if isinstance(page, BaseException):
            raise page
        messages, has_more = page
        return ok({"messages": messages, "has_more": has_more})

    async def mark_read(self, req: Request) -> Response:
        message = await self._store_call(self.store.message_by_id, req.params["message_id"])
        if message is None:
            raise ApiError("not_found", "no such message")
        await self._member_chat(message["chat_id"], req.user_id)
        _, read = await self.engine.move_pointer(req.user_id, message["chat_id"], "read", message["seq"])
        return ok({"chat_id": message["chat_id"], "seq": read})

    async def receipts(self, req: Request) -> Response:
        chat = await self._member_chat(req.params["chat_id"], req.user_id)
        seq = req.int_query("seq", 1, MAX_SEQ)
        if seq is None:
            raise ApiError("bad_request", "`seq` is required")
        pointers = await self._store_call(self.store.pointers, chat.chat_id)
        delivered, read = receipts_at(pointers, seq)
        # Every member's pointers too: a client sets all its messages' ticks from one call.
        members = {u: {"delivered": d, "read": r} for u, (d, r) in pointers.items()}
        return ok({"delivered": delivered, "read": read, "pointers": members})

    async def page(self, req: Request) -> Response:
        page = self.pages[req.path]
        body, etag, encoding = page.encoded(req.headers.get("accept-encoding", ""))
        headers = [
            ("etag", etag),
            *encoding,
            ("cache-control", "no-cache"),  # asked again each load; a 304 while unchanged
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
        ]
        if page.content_type.startswith("text/html"):
            headers += [("content-security-policy", CSP), ("x-frame-options", "DENY")]
        if etag in req.headers.get("if-none-match", ""):
            return Response(304, b"", page.content_type, headers)
        return Response(200, body, page.content_type, headers)

    async def find_users(self, req: Request) -> Response:
        """`?q=PREFIX` (usernames starting with it, any case) or `?ids=A,B,...` (profiles by id):
        how a client names the members of its chats and finds someone to start a chat with."""
        ids = req.query.get("ids")
        q = req.query.get("q")
        if (ids is None) == (q is None):
            raise ApiError(
                "bad_request", "give either `q` (a username prefix) or `ids` (user ids, comma-separated)"
            )
        if ids is not None:
            wanted = list(dict.fromkeys(x for x in ids.split(",") if x))
            if len(wanted) > USERS_MAX:
                raise ApiError("bad_request", f"at most {USERS_MAX} ids")
            users = await self._store_call(self.store.users_by_ids, wanted)
            order = {u: i for i, u in enumerate(wanted)}
            users.sort(key=lambda u: order[u.user_id])
        else:
            assert q is not None
            lim = self.config.limits
            if not (1 <= len(q) <= lim.username_max and USERNAME.fullmatch(q)):
                raise ApiError(
                    "bad_request", f"`q` is 1 to {lim.username_max} characters of a username ([A-Za-z0-9_.-])"
                )
            limit = req.int_query("limit", 1, USERS_PAGE_MAX, default=20)
            assert limit is not None
            users = await self._store_call(self.store.users_named, q, limit)
        return ok({"users": [u.public() for u in users]})

    async def get_presence(self, req: Request) -> Response:
        user_id = req.params["user_id"]
        if not await self._store_call(self.presence.may_follow, req.user_id, user_id):
            if await self._store_call(self.store.user_by_id, user_id) is None:
                raise ApiError("not_found", "no such user")
            raise ApiError("forbidden", "you share no chat with this user")
        return ok(await self._store_call(self.presence.status, user_id))

    async def search(self, req: Request) -> Response:
        q = (req.query.get("q") or "").strip()
        if not q:
            raise ApiError("bad_request", "`q` is required")
        if len(q) > MAX_QUERY_CHARS:
            raise ApiError("bad_request", f"`q` is longer than {MAX_QUERY_CHARS} characters")
        limit = req.int_query("limit", 1, SEARCH_MAX, default=50)
        before = req.int_query("before", 1, MAX_SEQ)
        assert limit is not None
        chat_id = req.query.get("chat_id") or None
        sender = req.query.get("sender_id") or None
        if self.search_index is None:
            raise ApiError("unavailable", "search is turned off on this server (search = false)")
        if chat_id is not None:
            chats = [(await self._member_chat(chat_id, req.user_id)).chat_id]
        else:
            if before is not None:
                raise ApiError("bad_request", "`before` (a seq) needs `chat_id`")
            chats = [c for c, _, _ in await self._store_call(self.store.sync_chats, req.user_id, {})]
        try:
            results, cursor = await self._store_call(
                functools.partial(
                    self.search_index.search,
                    q,
                    chats,
                    sender=sender,
                    before=before,
                    limit=limit,
                    cursor=req.query.get("cursor"),
                )
            )
        except ValueError as e:
            raise ApiError("bad_request", str(e)) from None
        return ok({"results": results, "next_cursor": cursor})

    async def export(self, req: Request) -> Response:
        if chat_export is None or self.export_slots is None:
            raise ApiError("unavailable", EXPORT_MISSING)
        FORMATS = chat_export.FORMATS
        slots = self.export_slots
        fmt = req.query.get("format") or "jsonl"
        if fmt not in FORMATS:
            raise ApiError("bad_request", f"`format` must be one of {', '.join(FORMATS)}")
        after = req.int_query("after", 0, MAX_SEQ, default=0)
        assert after is not None
        chat = await self._member_chat(req.params["chat_id"], req.user_id)
        content_type, extension = FORMATS[fmt]
        slots.claim(req.user_id)
        user_id = req.user_id
        stream = chat_export.ChatExport(
            self.store, chat.chat_id, fmt, after, self._exports, lambda: slots.release(user_id)
        )
        try:
            await stream.prefetch()
        except BaseException as e:
            await stream.aclose()
            if isinstance(e, self.store.unavailable_errors):
                raise ApiError("unavailable", "the store is unavailable; retry") from None
            raise
        name = f"chat-{chat.chat_id}-after-{after}.{extension}"
        headers = [
            ("content-disposition", f'attachment; filename="{re.sub(r"[^A-Za-z0-9._-]", "_", name)}"'),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
        ]
        return Response(200, content_type=content_type, headers=headers, stream=stream)

    async def upload_media(self, req: Request) -> Response:
        assert req.receive is not None
        media = await self.media.upload(req.user_id, req.headers, req.query, req.receive)
        answer = {**media.attachment(), "sha256": media.sha256}
        return ok(answer, 201)

    async def download_media(self, req: Request) -> Response:
        media = await self.media.readable(req.user_id, req.params["media_id"])
        inline = media.content_type in IMAGE_TYPES
        return await self._blob_response(req, media, media.sha256, media.size, media.content_type, inline)

    async def download_thumbnail(self, req: Request) -> Response:
        media = await self.media.readable(req.user_id, req.params["media_id"])
        if not media.thumb_sha256 or media.thumb_size is None:
            raise ApiError("not_found", "this media has no thumbnail")
        return await self._blob_response(
            req, media, media.thumb_sha256, media.thumb_size, THUMBNAIL_TYPE, True
        )

    async def _blob_response(
        self, req: Request, media: Media, key: str, size: int, content_type: str, inline: bool
    ) -> Response:
        """A blob with the caching and safety headers of every media answer; a range of it (206) or
        416 when `Range` asks; 304 when the client has it (`If-None-Match`)."""
        etag = f'"{key}"'
        headers = [
            ("etag", etag),
            ("accept-ranges", "bytes"),
            # Private: access depends on who asks. Immutable: the same URL never has other bytes.
            ("cache-control", "private, max-age=31536000, immutable"),
            ("x-content-type-options", "nosniff"),
            ("content-security-policy", "default-src 'none'; sandbox"),
            ("content-disposition", disposition(media, inline)),
        ]
        if_none_match = req.headers.get("if-none-match")
        # Weak comparison (RFC 9110 13.1.2): W/"x" matches "x".
        held = [t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")]
        if if_none_match and (if_none_match.strip() == "*" or etag in held):
            return Response(304, b"", content_type, headers)
        wanted = parse_range(req.headers.get("range"), size)
        if_range = req.headers.get("if-range")
        if if_range is not None and if_range.strip() != etag:
            wanted = None  # the client's copy is another one: the whole body
        if wanted == "unsatisfiable":
            return Response(
                416,
                json.dumps(ApiError("bad_request", "the range is outside the file").body()).encode(),
                headers=[*headers, ("content-range", f"bytes */{size}")],
            )
        if isinstance(wanted, ByteRange):
            end = wanted.start + wanted.length - 1
            headers.append(("content-range", f"bytes {wanted.start}-{end}/{size}"))
            stream = await self._open_blob(key, wanted.start, wanted.length)
            return Response(
                206, content_type=content_type, headers=headers, stream=stream, length=wanted.length
            )
        stream = await self._open_blob(key, 0, size)
        return Response(200, content_type=content_type, headers=headers, stream=stream, length=size)

    async def _open_blob(self, key: str, start: int, length: int) -> BlobStream:
        try:
            return await self.media.open_stream(key, start, length)
        except FileNotFoundError:
            log.error("the blob %s of a media row is missing from the media store", key)
            raise ApiError("internal", "the file is missing from the media store") from None
        except Exception:
            log.exception("the media store did not open blob %s", key)
            raise ApiError("unavailable", "the media store is unavailable; retry") from None

    async def not_yet(self, req: Request) -> Response:
        raise ApiError("unavailable", f"{req.path} is not available in this version yet")
