"""Registration, login, tokens on REST and at the WebSocket upgrade."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pychat import gateway as _core
from pychat.client import ChatClient, ChatError
from tests.conftest import PASSWORD, Clients, ServerProcess, unique_name
from tests.test_contract import OPENAPI


async def test_register_returns_the_user_and_login_returns_a_token(server: ServerProcess) -> None:
    name = unique_name("reg")
    user = await ChatClient.register(server.url, name, PASSWORD, display_name="Reg Istered")
    assert set(user) == {"user_id", "username", "display_name"}
    assert (user["username"], user["display_name"]) == (name, "Reg Istered")
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/api/auth/token", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200
    body = r.json()
    assert body["user_id"] == user["user_id"]
    assert body["expires_at"] > time.time() * 1000
    assert isinstance(body["token"], str) and body["token"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"username": "ab", "password": PASSWORD}, 400, "bad_request"),
        ({"username": "x" * 33, "password": PASSWORD}, 400, "bad_request"),
        ({"username": "bad name!", "password": PASSWORD}, 400, "bad_request"),
        ({"username": "okname", "password": "short"}, 400, "bad_request"),
        ({"username": "okname"}, 400, "bad_request"),
        ({"password": PASSWORD}, 400, "bad_request"),
        ({"username": 5, "password": PASSWORD}, 400, "bad_request"),
        ({"username": "okname", "password": PASSWORD, "display_name": 7}, 400, "bad_request"),
    ],
)
async def test_register_refuses_bad_input(
    server: ServerProcess, body: dict[str, object], status: int, code: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/api/users", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)


async def test_taken_username_is_a_conflict_case_insensitively(server: ServerProcess) -> None:
    name = unique_name("Dup")
    await ChatClient.register(server.url, name, PASSWORD)
    for attempt in (name, name.lower()):
        with pytest.raises(ChatError) as e:
            await ChatClient.register(server.url, attempt, PASSWORD)
        assert (e.value.status, e.value.code) == (409, "conflict")


async def test_bad_json_body_is_bad_request(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        for raw in (b"{not json", b"[1,2]", b""):
            r = await http.post("/api/users", content=raw)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request")


async def test_login_refuses_wrong_password_and_unknown_user(server: ServerProcess) -> None:
    name = unique_name("login")
    await ChatClient.register(server.url, name, PASSWORD)
    for username, password in ((name, "wrong password"), (unique_name("nobody"), PASSWORD)):
        with pytest.raises(ChatError) as e:
            await ChatClient.login(server.url, username, password)
        assert (e.value.status, e.value.code) == (401, "unauthorized")


def _tokens(server: ServerProcess, user_id: str, good: str) -> dict[str, str]:
    now = int(time.time() * 1000)
    return {
        "missing": "",
        "garbage": "not-a-token",
        "tampered": good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
        "other user": good.replace(user_id, user_id[:-1] + ("0" if user_id[-1] != "0" else "1")),
        "other key": _core.sign_token(b"another-secret-key-0123456789", user_id, now + 60_000),
        "expired": _core.sign_token(server.secret, user_id, now - 1),
    }


async def test_rest_refuses_missing_tampered_expired_and_other_key_tokens(
    server: ServerProcess, clients: Clients
) -> None:
    client = await clients.user("tok")
    assert await client.list_chats() == []
    async with httpx.AsyncClient(base_url=server.url) as http:
        for label, token in _tokens(server, client.user_id, client.token).items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            r = await http.get("/api/chats", headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), label
        r = await http.get("/api/chats", headers={"Authorization": f"Basic {client.token}"})
        assert r.status_code == 401


async def test_a_signed_token_for_a_user_the_store_does_not_have_is_refused_everywhere(
    server: ServerProcess, clients: Clients
) -> None:
    """A token signed with the server's key for a user who is not in the store (as after the
    store was replaced under the same key) gets 401 on every REST endpoint that needs a token,
    uploads included; the user's own token still works."""
    ghost = _core.sign_token(server.secret, "u-nobody", int(time.time() * 1000) + 3_600_000)
    operations = [
        (method.upper(), re.sub(r"\{\w+\}", "x", path))
        for path, ops in OPENAPI["paths"].items()
        for method, op in ops.items()
        if isinstance(op, dict) and op.get("security") != []
    ]
    assert ("POST", "/api/media") in operations and ("GET", "/api/chats") in operations
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {ghost}"}) as http:
        for method, path in operations:
            r = await http.request(method, path, content=b"{}", params={"q": "a", "seq": "1"})
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized"
        r = await http.post(
            "/api/media", content=b"%PDF-1.4 ghost", headers={"Content-Type": "application/pdf"}
        )
        assert r.status_code == 401
    real = await clients.user("real")
    assert await real.list_chats() == []


async def test_websocket_upgrade_refuses_bad_tokens_with_401(server: ServerProcess, clients: Clients) -> None:
    client = await clients.user("wstok")
    for label, token in _tokens(server, client.user_id, client.token).items():
        url = f"{server.ws_url}?token={token}" if token else server.ws_url
        with pytest.raises(InvalidStatus) as e:
            async with connect(url):
                pass
        assert e.value.response.status_code == 401, label
    # The good token is accepted, and the gateway says who we are.
    hello = await client.connect()
    assert hello["user_id"] == client.user_id
    assert isinstance(hello["session_id"], str) and hello["heartbeat_s"] == 25
    assert abs(hello["server_time"] - time.time() * 1000) < 60_000


async def test_other_paths_on_the_gateway_are_not_found(server: ServerProcess, clients: Clients) -> None:
    client = await clients.user("path")
    with pytest.raises(InvalidStatus) as e:
        async with connect(f"ws://127.0.0.1:{server.ws_port}/other?token={client.token}"):
            pass
    assert e.value.response.status_code == 404


async def test_config_health_and_metrics_need_no_token(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        config = (await http.get("/api/config")).json()
        assert config["ws_url"] == server.ws_url
        assert config["limits"]["max_content_bytes"] == 65536
        assert config["limits"]["max_attachments"] == 10
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        for name in ("pychat_connections", "pychat_gateway_frames_in_total", "pychat_http_requests_total"):
            assert f"\n{name}" in metrics.text or metrics.text.startswith(name)


async def test_unknown_routes_and_methods(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/api/nope")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
        r = await http.delete("/api/users")
        assert (r.status_code, r.json()["error"]["code"]) == (405, "bad_request")


async def test_the_rest_port_does_not_serve_websockets(server: ServerProcess) -> None:
    """`/ws` belongs to the Rust gateway on its own port; the Python side has no WebSocket server."""
    with pytest.raises(InvalidStatus):
        async with connect(f"ws://127.0.0.1:{server.port}/ws?token=x"):
            pass
