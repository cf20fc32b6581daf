"""Responses and frames match the machine-readable contract in api/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from pychat.auth import TokenIssuer
from pychat.blobs import open_blob_store
from pychat.client import ChatError, open_websocket
from pychat.config import Config
from pychat.metrics import Metrics
from pychat.rest import RestApi
from pychat.store import open_store
from tests.conftest import ROOT, Clients, ServerProcess
from tests.test_messaging import open_raw, send_frame

API = ROOT / "api"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


OPENAPI = _load(API / "openapi.json")
FRAMES = _load(API / "ws-frames.schema.json")


def check_rest(schema_name: str, value: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": OPENAPI["components"]}
    jsonschema.Draft202012Validator(schema).validate(value)


def check_frame(frame: dict[str, Any]) -> None:
    schema = {"$ref": "#/$defs/ServerFrame", "$defs": FRAMES["$defs"]}
    jsonschema.Draft202012Validator(schema).validate(frame)


HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


async def rest_routes(data_dir: Path) -> dict[str, set[str]]:
    """The REST port's route table, {path template: methods}, as `pychat serve` builds it (the
    server's own `RestApi`, on a store and media folder of its own)."""
    store = open_store("", data_dir)
    api = RestApi(
        Config(data_dir=data_dir),
        store,
        None,  # type: ignore[arg-type]  # engine, gateway, presence: only called by handlers
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        TokenIssuer(b"k" * 32, 60),
        Metrics(),
        open_blob_store("", data_dir),
    )
    try:
        table: dict[str, set[str]] = {}
        for method, _, _, _, path in api.routes:
            table.setdefault(path, set()).add(method)
        return table
    finally:
        await api.close()
        store.close()


def documented(on_rest_port: bool) -> dict[str, set[str]]:
    """OpenAPI's paths and their methods: those of the REST port, or those whose path item names
    a server of its own (the WebSocket port)."""
    return {
        path: {m.upper() for m in item if m in HTTP_METHODS}
        for path, item in OPENAPI["paths"].items()
        if ("servers" not in item) == on_rest_port
    }


def filled(path: str) -> str:
    return re.sub(r"\{\w+\}", "x", path)


async def test_every_route_is_documented_and_every_documented_path_is_routed(
    server: ServerProcess, clients: Clients, tmp_path: Path
) -> None:
    routes = await rest_routes(tmp_path)
    api = documented(on_rest_port=True)
    async with httpx.AsyncClient(base_url=server.url) as http:
        # The files the documented HTML pages load (their scripts, styles, icon) are part of
        # those pages, not API paths of their own.
        assets: set[str] = set()
        for path in (p for p, item in OPENAPI["paths"].items() if "text/html" in json.dumps(item)):
            page = (await http.get(path)).text
            assets |= set(re.findall(r'<(?:script [^>]*src|link [^>]*href)="(/[^"]*)"', page))
        assert assets, "the pages load their scripts and styles from this server"
        assert assets <= routes.keys(), assets - routes.keys()
        served = {path: methods for path, methods in routes.items() if path not in assets}
        undocumented = {p: sorted(m - api.get(p, set())) for p, m in served.items() if m - api.get(p, set())}
        unrouted = {p: sorted(m - served.get(p, set())) for p, m in api.items() if m - served.get(p, set())}
        assert undocumented == {}, f"routed, not in api/openapi.json: {undocumented}"
        assert unrouted == {}, f"in api/openapi.json, not routed: {unrouted}"
        # The running server has that table: each path answers a method it lacks with 405 and
        # lists exactly its methods (an unrouted path would be 404).
        probe = "PATCH"
        assert all(probe not in m for m in routes.values())
        for path, methods in routes.items():
            r = await http.request(probe, filled(path))
            assert r.status_code == 405, (path, r.status_code, r.text)
            assert set(r.headers["allow"].split(", ")) == methods, (path, r.headers["allow"])
    # The WebSocket port's documented path opens a WebSocket; any other path is refused.
    alice = await clients.user("routes")
    on_gateway = documented(on_rest_port=False)
    assert on_gateway and all(m == {"GET"} for m in on_gateway.values()), on_gateway
    for path in on_gateway:
        ws, hello = await open_websocket(f"ws://127.0.0.1:{server.ws_port}{path}", alice.token)
        await ws.close()
        assert hello["type"] == "hello"
        with pytest.raises(ChatError) as refused:
            await open_websocket(f"ws://127.0.0.1:{server.ws_port}{path}-undocumented", alice.token)
        assert refused.value.status == 404, refused.value


async def test_rest_answers_and_ws_frames_match_the_contract(server: ServerProcess, clients: Clients) -> None:
    alice, bob = await clients.user("ka"), await clients.user("kb")
    chat = await alice.create_group("contract", [bob.user_id])
    check_rest("Chat", chat)
    bob_ws = await open_raw(server, bob)
    alice_ws = await open_raw(server, alice)
    await alice_ws.send(send_frame(chat["chat_id"], "contract"))
    await alice_ws.until("ack")
    await bob_ws.until("msg")
    await bob_ws.send({"type": "read", "chat_id": chat["chat_id"], "seq": 1})
    await alice_ws.until("receipt")
    await bob_ws.send("garbage")
    await bob_ws.until("error")
    await bob_ws.send({"type": "presence.subscribe", "user_ids": [alice.user_id]})
    await bob_ws.until("presence")
    await bob_ws.send({"type": "typing", "chat_id": chat["chat_id"], "state": "start"})
    await alice_ws.until("typing")
    for frame in [alice_ws.hello, bob_ws.hello, *alice_ws.frames, *bob_ws.frames]:
        check_frame(frame)
    check_rest("SendResult", await alice.post_message(chat["chat_id"], "rest"))
    page = await alice.history(chat["chat_id"])
    for m in page["messages"]:
        check_rest("Message", m)
    for item in await alice.list_chats():
        check_rest("ChatListItem", item)
    check_rest("Config", await alice.request("GET", "/api/config"))
    check_rest(
        "Receipts", await alice.request("GET", f"/api/chats/{chat['chat_id']}/receipts", params={"seq": 1})
    )
    r = await alice.http.get("/api/chats/unknown")
    check_rest("Error", r.json())
    await alice_ws.close()
    await bob_ws.close()
