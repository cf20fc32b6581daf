"""Locust users for load-testing a pychat deployment: a WebSocket chat user and
a REST user, with statistics per frame type in Locust's UI and CSV output.

    make loadtest                                            # local server, headless, 30 s, CSV stats
    locust -f loadtest/locustfile.py --host http://HOST:PORT  # against your own deployment, web UI

Each simulated person registers (random name), logs in, and makes a group with
a few people who registered before it, so sends fan out to real members. A server
limits registrations per client address (`register_per_min`, default 120): `make
loadtest` starts its server with a high limit; against your own deployment, users
past the limit wait as the server says (`retry_after_ms`) before they start.

What is timed, as Locust requests (request type WS): `connect` (upgrade to `hello`), `send -> ack`,
`sync -> synced`, and `send -> deliver`: from a send to its `msg` frame at each other member's
connection (the send's wall-clock time travels in its `client_msg_id`, so senders and receivers
may be in different Locust processes; across machines their clocks must agree). Frames with no
answer to time (`read`, `typing` sent; `msg`, `receipt`, `typing`, `presence`, `chat` received)
are counted apart, not as requests: printed at the end and written as JSON to
$PYCHAT_LOADTEST_FRAMES when it is set.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter
from typing import Any, ClassVar

import gevent
import websocket  # websocket-client: blocking, cooperative under Locust's gevent
from gevent.event import AsyncResult
from locust import HttpUser, User, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

PASSWORD = "loadtest-password"
# Registration attempts per simulated person while the server says `rate_limited`.
REGISTER_ATTEMPTS = 100
# How long a send waits for its ack and a sync for its `synced`.
ANSWER_TIMEOUT_S = 30.0
# A client_msg_id of this run: the prefix, the send's wall-clock time in microseconds, a random part.
TIMED = "lt"

# Frames counted, not timed (per Locust process; workers report theirs to the master).
FRAMES: Counter[str] = Counter()


@events.report_to_master.add_listener
def _frames_to_master(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["pychat_frames"] = dict(FRAMES)
    FRAMES.clear()


@events.worker_report.add_listener
def _frames_from_worker(client_id: str, data: dict[str, Any], **_: Any) -> None:
    FRAMES.update(data.get("pychat_frames", {}))


@events.quitting.add_listener
def _frames_report(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    seconds = max((total.last_request_timestamp or 0) - (total.start_time or 0), 1e-9)
    counted = {k: {"count": n, "per_s": round(n / seconds, 1)} for k, n in sorted(FRAMES.items())}
    print("\nframes counted (not timed):")
    for name, c in counted.items():
        print(f"  {name:<16} {c['count']:>8}  {c['per_s']:>8}/s")
    path = os.environ.get("PYCHAT_LOADTEST_FRAMES")
    if path:
        with open(path, "w") as f:
            json.dump({"seconds": round(seconds, 1), "frames": counted}, f, indent=2)


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
    """A person on a phone: WebSocket connect, sync, send, read, typing. One greenlet reads every
    frame as it comes (as an app does), so a delivery is timed when it arrives, not when the
    user next looks."""

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
        self.ws = websocket.create_connection(f"{ws_url}?token={token}", timeout=ANSWER_TIMEOUT_S)
        hello = json.loads(self.ws.recv())
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected hello, got {hello}")
        self._fire("connect", started)
        self.ws.settimeout(None)  # the reader waits for frames as long as the chat is quiet
        self.last_seq = 0
        # Sends and syncs waiting for their answer, by client_msg_id / ref.
        self.waiting: dict[str, AsyncResult] = {}
        # While a sync is answered, `msg` frames are backlog (old), not deliveries to time.
        self.syncing = 0
        self.reader = gevent.spawn(self._read_frames)
        self.sync()

    def on_stop(self) -> None:
        self.reader.kill(block=False)
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

    def _read_frames(self) -> None:
        """Every frame of the connection: answers go to who waits for them, deliveries are timed,
        the rest is counted."""
        while True:
            try:
                raw = self.ws.recv()
            except Exception as e:  # closed: whoever waits learns it now
                for waiter in self.waiting.values():
                    waiter.set_exception(e)
                self.waiting.clear()
                return
            arrived = time.time()
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "ack":
                self._answer(frame.get("client_msg_id"), frame)
            elif kind == "synced":
                self._answer(frame.get("ref"), frame)
            elif kind == "error":
                self._answer(frame.get("ref"), RuntimeError(f"{frame['code']}: {frame['message']}"))
            else:
                FRAMES[f"received {kind}"] += 1
                if kind == "msg":
                    self._delivered(frame, arrived, len(raw))

    def _answer(self, key: str | None, answer: dict[str, Any] | Exception) -> None:
        waiter = self.waiting.pop(key, None) if key is not None else None
        if waiter is None:
            return
        if isinstance(answer, Exception):
            waiter.set_exception(answer)
        else:
            waiter.set(answer)

    def _delivered(self, frame: dict[str, Any], arrived: float, length: int) -> None:
        if frame["chat_id"] == self.chat_id:
            self.last_seq = max(self.last_seq, frame["seq"])
        cmid = frame.get("client_msg_id") or ""
        if self.syncing or frame["sender_id"] == self.user_id or not cmid.startswith(TIMED):
            return  # backlog, this user's own, or not sent by this load test
        sent_us = int(cmid[len(TIMED) :].split("-", 1)[0])
        self.environment.events.request.fire(
            request_type="WS",
            name="send -> deliver",
            response_time=max(0.0, arrived * 1000 - sent_us / 1000),
            response_length=length,
            exception=None,
            context={},
        )

    def _ask(self, key: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Sends a frame and waits for the answer keyed `key`."""
        waiter = self.waiting[key] = AsyncResult()
        try:
            self.ws.send(json.dumps(frame))
            return dict(waiter.get(timeout=ANSWER_TIMEOUT_S))
        finally:
            self.waiting.pop(key, None)

    def _tell(self, name: str, frame: dict[str, Any]) -> None:
        """A frame with no answer: counted; a failure to send it is a failed request."""
        started = time.perf_counter()
        try:
            self.ws.send(json.dumps(frame))
            FRAMES[f"sent {name}"] += 1
        except Exception as e:
            self._fire(name, started, e)

    @task(10)
    def send(self) -> None:
        cmid = f"{TIMED}{time.time_ns() // 1000}-{uuid.uuid4().hex[:12]}"
        started = time.perf_counter()
        try:
            ack = self._ask(
                cmid,
                {"type": "send", "chat_id": self.chat_id, "client_msg_id": cmid, "content": "hello " * 8},
            )
            self.last_seq = max(self.last_seq, ack["seq"])
            self._fire("send -> ack", started)
        except Exception as e:
            self._fire("send -> ack", started, e)

    @task(3)
    def read(self) -> None:
        if self.last_seq:
            self._tell("read", {"type": "read", "chat_id": self.chat_id, "seq": self.last_seq})

    @task(2)
    def typing(self) -> None:
        self._tell("typing", {"type": "typing", "chat_id": self.chat_id, "state": "start"})

    @task(1)
    def sync(self) -> None:
        ref = uuid.uuid4().hex
        started = time.perf_counter()
        self.syncing += 1
        try:
            self._ask(ref, {"type": "sync", "since": {self.chat_id: self.last_seq}, "ref": ref})
            self._fire("sync -> synced", started)
        except Exception as e:
            self._fire("sync -> synced", started, e)
        finally:
            self.syncing -= 1


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
