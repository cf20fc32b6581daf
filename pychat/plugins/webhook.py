"""A webhook forwarder (a shipped example plugin): POSTs stored messages to a URL, at least once.

    [[plugins]]
    use = "webhook"
    after_store_budget_ms = 30000
    [plugins.settings]
    url = "https://example.com/pychat-hook"
    secret = "a shared secret"      # the receiver checks the signature with it
    timeout_s = 5
    attempts = 3                    # per call; past them the feed calls again later

Each POST carries `{"messages": [...]}` (PROTOCOL.md message objects, up to 500) with
`X-Pychat-Timestamp` (ms) and `X-Pychat-Signature: sha256=<hex HMAC-SHA256 of
"<timestamp>." + body with the secret>`. A receiver answers 2xx once it has the messages; any
other answer or no answer is retried here, then by the feed from its durable cursor, so the
receiver may see a message twice (deduplicate on `message_id`), never miss one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from pychat.plugins import Plugin


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Webhook(Plugin):
    name = "webhook"

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self.url = str(settings.get("url", ""))
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("settings.url: the http(s) URL to POST stored messages to")
        self.secret = str(settings.get("secret", ""))
        if not self.secret:
            raise ValueError("settings.secret: the key receivers check signatures with")
        self.timeout_s = float(settings.get("timeout_s", 5.0))
        self.attempts = max(1, int(settings.get("attempts", 3)))
        self._client: httpx.AsyncClient | None = None

    async def after_store(self, messages: list[dict[str, Any]]) -> None:
        if self._client is None:  # made on the plugin loop, where it is used
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        body = json.dumps({"messages": messages}, ensure_ascii=False, separators=(",", ":")).encode()
        last: Exception | None = None
        for attempt in range(self.attempts):
            timestamp = str(int(time.time() * 1000))
            headers = {
                "Content-Type": "application/json",
                "X-Pychat-Timestamp": timestamp,
                "X-Pychat-Signature": signature(self.secret, timestamp, body),
            }
            try:
                r = await self._client.post(self.url, content=body, headers=headers)
                if 200 <= r.status_code < 300:
                    return
                last = RuntimeError(f"the receiver answered {r.status_code}")
            except httpx.HTTPError as e:
                last = e
            await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
        raise RuntimeError(f"POST {self.url} failed {self.attempts} times: {last!r}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
