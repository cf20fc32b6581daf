"""The control socket: how an admin command (`pychat chat create`, `pychat import`) reaches the
server running on the same data dir, so that what it wrote is live at once.

A server listens on `data_dir/control.sock`, a Unix socket in its 0700 data dir: only the user
who runs it connects, and no token or port is involved. One request per connection, a JSON line
each way:

    {"op": "chats_written", "chat_ids": [...]}  ->  {"pid": N, "applied": K}

The server reads those chats from its store and publishes each as a REST write does (its gateway
and, on a cluster, every node's, then a `chat` frame to the members). A server killed without
cleaning up leaves the file behind; nothing answers there, which reads as "no server running".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pychat.control")

SOCKET_NAME = "control.sock"
# A request names every chat an import wrote (about 40 bytes each).
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Publishing is one store read per chat (and on a cluster a round to every node): an import of
# many chats takes a while.
ANSWER_TIMEOUT_S = 300.0
# Longest path a Unix socket address takes (108 bytes with its terminating zero).
_SUN_PATH_MAX = 107

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """A name for `path` that fits a Unix socket address: itself, or (a deep data dir) the same
    file through an open descriptor of its folder."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


@dataclass(frozen=True)
class ServerAnswer:
    pid: int
    body: dict[str, Any]


def ask_server(
    data_dir: Path, request: dict[str, Any], timeout: float = ANSWER_TIMEOUT_S
) -> ServerAnswer | None:
    """The answer of the server running on `data_dir`, or None when none runs there (no socket
    file, or a stale one nobody listens on). Raises OSError if the server stops answering."""
    path = socket_path(data_dir)
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _address(path) as address:
        s.settimeout(timeout)
        try:
            s.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        s.sendall(json.dumps(request).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    if not received:
        raise OSError("the server closed the control connection without an answer")
    body: dict[str, Any] = json.loads(received)
    if "error" in body:
        raise OSError(f"the server refused the request: {body['error']}")
    return ServerAnswer(int(body["pid"]), body)


class ControlSocket:
    """The server's end: answers each request with `handle`'s answer (plus the server's pid)."""

    def __init__(self, data_dir: Path, handle: Handler) -> None:
        self.path = socket_path(data_dir)
        self._handle = handle
        self._server: asyncio.AbstractServer | None = None
        self._folder: int | None = None

    async def open(self) -> bool:
        """Listens; False (and a warning) when another live server has the data dir's socket."""
        if self.path.exists():
            answer = None
            with contextlib.suppress(OSError, ValueError):
                answer = await asyncio.to_thread(ask_server, self.path.parent, {"op": "ping"}, 2.0)
            if answer is not None:
                log.warning(
                    "another server (pid %d) runs on this data dir: admin commands reach that one",
                    answer.pid,
                )
                return False
            self.path.unlink(missing_ok=True)  # left by a server that was killed
        address = str(self.path)
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:  # kept open while listening
            self._folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            address = f"/proc/self/fd/{self._folder}/{self.path.name}"
        try:
            self._server = await asyncio.start_unix_server(self._serve, address, limit=MAX_REQUEST_BYTES)
        except OSError as e:  # e.g. a file system without sockets: the server runs without it
            log.warning(
                "no control socket at %s (%s): admin commands' chats wait for a restart", self.path, e
            )
            return False
        self.path.chmod(0o600)
        return True

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        self.path.unlink(missing_ok=True)
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            answer = {"ok": True} if request.get("op") == "ping" else await self._handle(request)
        except Exception as e:  # answered, never raised into the server
            log.exception("a control request failed")
            answer = {"error": str(e) or type(e).__name__}
        try:
            writer.write(json.dumps({"pid": os.getpid(), **answer}).encode() + b"\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except OSError:
            pass  # the command gave up waiting
