"""Responses and frames match the machine-readable contract in api/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

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


def test_every_protocol_path_is_in_the_openapi_document() -> None:
    paths = OPENAPI["paths"]
    for path in [
        "/api/users",
        "/api/auth/token",
        "/api/config",
        "/api/chats",
        "/api/chats/{chat_id}",
        "/api/chats/{chat_id}/members",
        "/api/chats/{chat_id}/members/{user_id}",
        "/api/messages",
        "/api/messages/{message_id}/read",
        "/api/chats/{chat_id}/receipts",
        "/api/users/{user_id}/presence",
        "/api/chats/{chat_id}/messages",
        "/healthz",
        "/metrics",
    ]:
        assert path in paths, path


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
