"""Token buckets keyed by user, username or address (the REST side of `rate_limited`)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class RateLimiter:
    """`per_second` refill and `burst` capacity per key; remembers at most `max_keys` keys
    (the least recently used are forgotten, which only ever makes a limit more lenient)."""

    def __init__(self, per_second: float, burst: float, max_keys: int = 100_000) -> None:
        self.per_second = per_second
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _refilled(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.per_second)

    def _wait_ms(self, tokens: float) -> int | None:
        # A hair under one token counts as one: waiting exactly retry_after_ms must be enough.
        if tokens >= 1.0 - 1e-9:
            return None
        if self.per_second <= 0:
            return 60_000
        return max(1, math.ceil((1.0 - tokens) / self.per_second * 1000))

    def blocked(self, key: str, now: float | None = None) -> int | None:
        """Milliseconds until `key` has a token again, without taking one; None if it has one."""
        return self._wait_ms(self._refilled(key, time.monotonic() if now is None else now))

    def check(self, key: str, now: float | None = None) -> int | None:
        """Takes a token for `key`; None if allowed, else milliseconds until one is there."""
        now = time.monotonic() if now is None else now
        tokens = self._refilled(key, now)
        wait = self._wait_ms(tokens)
        self._buckets.pop(key, None)
        self._buckets[key] = (tokens - 1.0 if wait is None else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
