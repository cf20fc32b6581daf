"""Server pings and dead-peer detection, with a 1 s heartbeat."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from websockets.asyncio.client import connect

from tests.conftest import Clients, ServerProcess
from tests.wsraw import raw_upgrade


async def test_pings_keep_a_live_client_and_drop_a_silent_one(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory({"PYCHAT_HEARTBEAT_S": "1"})
    clients = Clients(srv)
    client = await clients.user("beater")
    # A live client (websockets answers pings) stays connected across several heartbeats.
    async with connect(f"{srv.ws_url}?token={client.token}") as live:
        hello = await live.recv()
        assert '"heartbeat_s":1' in str(hello)
        # A dead peer: upgrade by hand, then never read or answer anything.
        reader, writer = await raw_upgrade(srv.ws_port, client.token)
        # The server pings, gets nothing back, and closes within ~2 heartbeats.
        received = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                received += chunk
        assert b"heartbeat timeout" in received
        writer.close()
        await live.ping()
        assert live.state.name == "OPEN"
    await clients.close()
