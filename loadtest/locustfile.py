"""Locust users for load-testing a pychat deployment: a WebSocket chat user and
a REST user, with statistics per frame type in Locust's UI and CSV output.

    make loadtest                                            # local server, headless, 30 s, CSV stats
    locust -f loadtest/locustfile.py --host http://HOST:PORT  # against your own deployment, web UI

Each simulated person registers (random name), logs in, and makes a group with
a few people who registered before it, so sends fan out to real members. A server
limits registrations per client address (`register_per_min`, default 120): `make
loadtest` starts its server with a high limit; against your own deployment, users
past the limit wait as the server says (`retry_after_ms`) before they start.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any, ClassVar

import websocket  # websocket-client: blocking, cooperative under Locust's gevent
from locust import HttpUser, User, between, task

PASSWORD = "loadtest-password"
# Registration attempts per simulated person while the server says `rate_limited`.
REGISTER_ATTEMPTS = 100


def _account(post: Any, prefix: str) -> dict[str, Any]:
    """Registers a random name and logs in; `post(path, json=...)` is any HTTP client's post.
    A registration refused as `rate_limited` is retried after the wait the server names."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    for _ in range(REGISTER_ATTEMPTS):
        r = post("/api/users", json={"username": name, "password": PASSWORD})
        if r.status_code != 429:
            break
        time.sleep(r.json()["error"].get("retry_after_ms", 1000) / 1000)  # gevent-patched under Locust
    return dict(post("/api/auth/token", json={"username": name, "password": PASSWORD}).json())


class ChatUser(User):
    """A person on a phone: WebSocket connect, sync, send, read, typing."""

    wait_time = between(0.5, 2.0)
    known_users: ClassVar[list[str]] = []

    def on_start(self) -> None:
        import requests

        http = requests.Session()

        def post(path: str, **kw: Any) -> Any:
            return http.post(f"{self.host}{path}", timeout=30, **kw)

        me = _account(post, "ws")
        self.user_id, token = me["user_id"], me["token"]
        others = random.sample(self.known_users, min(4, len(self.known_users)))
        ChatUser.known_users.append(self.user_id)
        chat = post(
            "/api/chats",
            json={"kind": "group", "title": "load", "members": others},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        self.chat_id = chat["chat_id"]
        ws_url = http.get(f"{self.host}/api/config", timeout=30).json()["ws_url"]
        started = time.perf_counter()
        self.ws = websocket.create_connection(f"{ws_url}?token={token}", timeout=10)
        self._read_until("hello")
        self._fire("connect", started)
        self.last_seq = 0
        self.sync()

    def on_stop(self) -> None:
        self.ws.close()

    def _fire(self, name: str, started: float, exc: Exception | None = None, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )

    def _read_until(self, kind: str, **match: Any) -> dict[str, Any]:
        """Reads frames until one of `kind` (matching fields); counts what passes by."""
        while True:
            raw = self.ws.recv()
            frame = json.loads(raw)
            if frame["type"] == "msg":
                self.last_seq = (
                    max(self.last_seq, frame["seq"]) if frame["chat_id"] == self.chat_id else self.last_seq
                )
                self.environment.events.request.fire(
                    request_type="WS recv",
                    name="msg",
                    response_time=0,
                    response_length=len(raw),
                    exception=None,
                    context={},
                )
            elif frame["type"] in ("receipt", "typing", "presence", "chat"):
                self.environment.events.request.fire(
                    request_type="WS recv",
                    name=frame["type"],
                    response_time=0,
                    response_length=len(raw),
                    exception=None,
                    context={},
                )
            if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                return dict(frame)
            if frame["type"] == "error" and frame.get("ref") in match.values():
                raise RuntimeError(f"{frame['code']}: {frame['message']}")

    @task(10)
    def send(self) -> None:
        cmid = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            self.ws.send(
                json.dumps(
                    {"type": "send", "chat_id": self.chat_id, "client_msg_id": cmid, "content": "hello " * 8}
                )
            )
            ack = self._read_until("ack", client_msg_id=cmid)
            self.last_seq = max(self.last_seq, ack["seq"])
            self._fire("send -> ack", started)
        except Exception as e:
            self._fire("send -> ack", started, e)

    @task(3)
    def read(self) -> None:
        if self.last_seq:
            started = time.perf_counter()
            self.ws.send(json.dumps({"type": "read", "chat_id": self.chat_id, "seq": self.last_seq}))
            self._fire("read", started)

    @task(2)
    def typing(self) -> None:
        started = time.perf_counter()
        self.ws.send(json.dumps({"type": "typing", "chat_id": self.chat_id, "state": "start"}))
        self._fire("typing", started)

    @task(1)
    def sync(self) -> None:
        ref = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            self.ws.send(json.dumps({"type": "sync", "since": {self.chat_id: self.last_seq}, "ref": ref}))
            self._read_until("synced", ref=ref)
            self._fire("sync -> synced", started)
        except Exception as e:
            self._fire("sync -> synced", started, e)


class RestUser(HttpUser):
    """A web or bot client: REST only."""

    wait_time = between(1.0, 3.0)

    def on_start(self) -> None:
        me = _account(self.client.post, "rest")
        self.client.headers["Authorization"] = f"Bearer {me['token']}"
        self.chat_id = self.client.post(
            "/api/chats", json={"kind": "group", "title": "rest", "members": []}
        ).json()["chat_id"]

    @task(5)
    def post_message(self) -> None:
        self.client.post("/api/messages", json={"chat_id": self.chat_id, "content": "from REST"})

    @task(3)
    def history(self) -> None:
        self.client.get(f"/api/chats/{self.chat_id}/messages?limit=50", name="/api/chats/{id}/messages")

    @task(2)
    def list_chats(self) -> None:
        self.client.get("/api/chats")
