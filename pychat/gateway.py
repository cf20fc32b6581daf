"""The Rust extension as the rest of pychat sees it: the one module that imports
`pychat._core` (a thin facade, as pydantic-core keeps one over its compiled module).

What lives here is what Python may use of the Rust side: the gateway (sockets,
sequencing, fan-out), token signing, the gateway's setting defaults (the only copy
of them: `pychat.config` reads them from here) and the protocol's error codes.
"""

from __future__ import annotations

from typing import Final

from pychat._core import (
    ERROR_CODES,
    ERROR_STATUS,
    UNAVAILABLE_RETRY_MS,
    Acked,
    ConnectEvent,
    Deferred,
    Done,
    Failed,
    Gateway,
    GatewayError,
    PointerEvent,
    PointerMoved,
    PresenceInfo,
    PresenceQuery,
    SeenEvent,
    SendEvent,
    Stored,
    SyncEvent,
    TokenError,
    frame_limit_defaults,
    gateway_defaults,
    sign_token,
    verify_token,
)

__all__ = [
    "ERROR_CODES",
    "ERROR_STATUS",
    "FRAME_LIMIT_DEFAULTS",
    "GATEWAY_DEFAULTS",
    "UNAVAILABLE_RETRY_MS",
    "Acked",
    "ConnectEvent",
    "Deferred",
    "Done",
    "Failed",
    "Gateway",
    "GatewayError",
    "PointerEvent",
    "PointerMoved",
    "PresenceInfo",
    "PresenceQuery",
    "SeenEvent",
    "SendEvent",
    "Stored",
    "SyncEvent",
    "TokenError",
    "sign_token",
    "verify_token",
]

# Every gateway setting by the name the configuration gives it, with its default.
GATEWAY_DEFAULTS: Final[dict[str, int | float]] = gateway_defaults()
# The frame limits the gateway enforces, with their defaults.
FRAME_LIMIT_DEFAULTS: Final[dict[str, int]] = frame_limit_defaults()
