"""The same-run baseline: a naive Python chat server on the `websockets` package,
speaking the subset of PROTOCOL.md the load generator uses (hello, send -> ack +
msg fan-out, sync -> synced) with no persistence and no checks beyond the basics.
Tokens are taken as the user id (`v1.<user>.<exp>.<sig>`, signature not checked).

    python benchmarks/baselines/naive_server.py --port 9000 --chats chats.json

`chats.json` maps chat ids to member user ids.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections import defaultdict
from typing import Any
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

members: dict[str, list[str]] = {}
connections: dict[str, set[ServerConnection]] = defaultdict(set)
last_seq: dict[str, int] = defaultdict(int)
ids = itertools.count(1)


async def handle(ws: ServerConnection) -> None:
    assert ws.request is not None
    token = parse_qs(urlparse(ws.request.path).query).get("token", [""])[0]
    user = token.split(".")[1] if token.count(".") >= 3 else token
    connections[user].add(ws)
    await ws.send(
        json.dumps(
            {
                "type": "hello",
                "user_id": user,
                "session_id": str(next(ids)),
                "server_time": int(time.time() * 1000),
                "heartbeat_s": 25,
            }
        )
    )
    try:
        await serve_frames(ws, user)
    except ConnectionClosed:
        pass
    finally:
        connections[user].discard(ws)


async def serve_frames(ws: ServerConnection, user: str) -> None:
    async for raw in ws:
        frame: dict[str, Any] = json.loads(raw)
        if frame.get("type") == "send":
            chat = frame["chat_id"]
            last_seq[chat] += 1
            msg = {
                "type": "msg",
                "chat_id": chat,
                "seq": last_seq[chat],
                "message_id": str(next(ids)),
                "sender_id": user,
                "content": frame["content"],
                "attachments": [],
                "created_at": int(time.time() * 1000),
                "client_msg_id": frame["client_msg_id"],
            }
            await ws.send(
                json.dumps(
                    {
                        "type": "ack",
                        "client_msg_id": frame["client_msg_id"],
                        "chat_id": chat,
                        "message_id": msg["message_id"],
                        "seq": msg["seq"],
                        "created_at": msg["created_at"],
                    }
                )
            )
            text = json.dumps(msg)
            broadcast([c for m in members.get(chat, []) for c in connections[m] if c is not ws], text)
        elif frame.get("type") == "sync":
            chats = {c: last_seq[c] for c, ms in members.items() if user in ms}
            await ws.send(json.dumps({"type": "synced", "chats": chats}))


async def run(host: str, port: int) -> None:
    async with serve(handle, host, port, max_size=2**20, ping_interval=25):
        print("ready", flush=True)
        await asyncio.Future()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chats", required=True)
    args = ap.parse_args()
    with open(args.chats) as f:
        members.update(json.load(f))
    asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
