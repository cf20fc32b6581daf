"""A raw WebSocket test client that records exactly what the server sent:
no de-duplication, no reordering (the SDK does those; the tests check the server)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


async def raw_upgrade(
    port: int, token: str, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket upgrade by hand, returning the bare stream: a client that can stop
    reading or answering whenever a test wants (a small `rcvbuf` makes it stall sooner)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def client_frame(opcode: int, payload: bytes, masked: bool = True) -> bytes:
    """One client frame by hand (FIN set), masked as RFC 6455 requires unless told not to."""
    n = len(payload)
    if n < 126:
        length = bytes([(0x80 if masked else 0) | n])
    elif n < 1 << 16:
        length = bytes([(0x80 if masked else 0) | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([(0x80 if masked else 0) | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4) if masked else b""
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
    return bytes([0x80 | opcode]) + length + mask + body


def split_server_frames(buf: bytes, until: int | None = None) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete server frames (unmasked) at the start of `buf` as (opcode, payload), up to
    the first of opcode `until` if given, and the bytes after them."""
    frames: list[tuple[int, bytes]] = []
    while len(buf) >= 2:
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < at + n:
            break
        frames.append((buf[0] & 0x0F, buf[at : at + n]))
        buf = buf[at + n :]
        if frames[-1][0] == until:
            break
    return frames, buf


class RawWs:
    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.frames: list[dict[str, Any]] = []  # everything received, in order
        self._taken: set[int] = set()  # indexes already returned by until/collect

    @classmethod
    async def open(cls, ws_url: str, token: str) -> RawWs:
        ws = await connect(f"{ws_url}?token={token}", max_size=2**22)
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        return cls(ws, hello)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        return frame

    def _take(self, kind: str, match: dict[str, Any]) -> dict[str, Any] | None:
        for i, frame in enumerate(self.frames):
            if i in self._taken or frame["type"] != kind:
                continue
            if all(frame.get(k) == v for k, v in match.items()):
                self._taken.add(i)
                return frame
        return None

    async def until(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The next frame of `kind` (matching the given fields) not returned before,
        whether it already arrived or is still to come."""
        async with asyncio.timeout(timeout):
            while True:
                frame = self._take(kind, match)
                if frame is not None:
                    return frame
                await self.recv()

    async def collect(self, kind: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The next `count` frames of `kind`, in arrival order."""
        async with asyncio.timeout(timeout):
            return [await self.until(kind, timeout) for _ in range(count)]

    async def quiet(self, wait: float = 0.3) -> list[dict[str, Any]]:
        """Frames that arrive within `wait` seconds (used after a barrier)."""
        got = []
        try:
            while True:
                got.append(await self.recv(timeout=wait))
        except TimeoutError:
            return got

    async def close(self) -> None:
        await self.ws.close()
