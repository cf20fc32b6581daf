"""Opaque ids. Time-prefixed so rows created together sit together in indexes;
never contain '.', which the token format uses as a separator."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def now_ms() -> int:
    return int(time.time() * 1000)
