"""Server pings and dead-peer detection, with a 1 s heartbeat."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from pychat.client import ChatClient
from tests.conftest import PASSWORD, ServerProcess


@pytest.fixture
def fast_heartbeat(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path, env={"PYCHAT_HEARTBEAT_S": "1"})
    srv.start()
    yield srv
    srv.stop()


async def test_pings_keep_a_live_client_and_drop_a_silent_one(fast_heartbeat: ServerProcess) -> None:
    srv = fast_heartbeat
    await ChatClient.register(srv.url, "beater", PASSWORD)
    client = await ChatClient.login(srv.url, "beater", PASSWORD)
    # A live client (websockets answers pings) stays connected across several heartbeats.
    async with connect(f"{srv.ws_url}?token={client.token}") as live:
        hello = await live.recv()
        assert '"heartbeat_s":1' in str(hello)
        # A dead peer: upgrade by hand, then never read or answer anything.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.ws_port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws?token={client.token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        # The server pings, gets nothing back, and closes within ~2 heartbeats.
        received = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                received += chunk
        assert b"heartbeat timeout" in received
        writer.close()
        await live.ping()
        assert live.state.name == "OPEN"
    await client.close()
