"""The REST port: granian's embedded server, bounded against idle and slow clients.

- Connections served at once (`rest_max_connections`, granian's backpressure); the ones past it
  wait in the listen backlog (`rest_backlog`, else the kernel's somaxconn).
- HTTP/1.1 only: with protocol detection (HTTP/1 or 2) hyper has no timer until the first byte
  arrives, so a silent socket kept its slot for good. With HTTP/1.1, `rest_header_timeout_ms`
  bounds a silent socket, a slow head and a keep-alive connection left idle (measured with
  granian 2.8.7: hyper has no separate idle timeout; the head timeout runs from the end of the
  previous response).
- Stalled readers: the listening socket gets TCP_USER_TIMEOUT (`rest_send_timeout_ms`), which
  every accepted connection inherits, so the kernel cuts a connection whose client has taken none
  of a response's bytes for that long (a zero window, or a client gone), and granian frees its
  slot and buffers.

Not here: slots per client address. granian accepts in Rust with no hook before the request, so a
limit per address would need changes there (or a proxy in front: docs/operator.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from pychat.config import Config

# When the kernel's somaxconn cannot be read.
DEFAULT_BACKLOG = 1024


def somaxconn() -> int:
    """The kernel's cap on a listen backlog (a larger one is cut to it)."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def rest_server(app: Any, cfg: Config) -> Any:
    """granian's embedded server for `app` on the REST port, with the bounds of this module."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server as EmbeddedServer

    return EmbeddedServer(
        app,
        address=cfg.host,
        port=cfg.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=cfg.rest_header_timeout_ms),
        backlog=cfg.rest_backlog or somaxconn(),
        backpressure=max(1, cfg.rest_max_connections),
        websockets=False,
        log_enabled=cfg.log_level == "debug",
    )


def cut_stalled_readers(port: int, timeout_ms: int) -> bool:
    """Sets TCP_USER_TIMEOUT on this process's listening socket of `port` (granian makes it in
    Rust, so it is found among the open files); False where that cannot be done (not Linux)."""
    fds = Path("/proc/self/fd")
    if timeout_ms <= 0 or not hasattr(socket, "TCP_USER_TIMEOUT") or not fds.is_dir():
        return False
    found = False
    for entry in fds.iterdir():
        with contextlib.suppress(OSError, ValueError):
            if not os.readlink(entry).startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(entry.name))) as sock:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port
                ):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
                    found = True
    return found
