"""A lease in Redis: which one node does a deployment-wide job now (the plugins' after_store
feeds, so each stored message reaches a hook once per deployment, not once per node).

The holder renews it every `CHECK_S`; when the holder dies, the key expires after `TTL_MS` and
the next node that asks takes it. Between two holders both may believe they hold it for up to
`CHECK_S` (a delayed renewal): what the lease guards must tolerate a repeat (after_store is at
least once), never a gap.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

log = logging.getLogger("pychat.cluster")

TTL_MS = 15_000
CHECK_S = 2.0

# Renews the key only if this node holds it (atomic compare-and-expire).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class Lease:
    def __init__(self, client: redis.Redis, name: str, holder: str) -> None:
        self.client = client
        self.key = f"lease:{name}"
        self.holder = holder
        self._renew = client.register_script(_RENEW)
        self._held = False
        self._checked = 0.0
        self._lock = threading.Lock()

    def held(self) -> bool:
        """Whether this node holds the lease (taking or renewing it at most every CHECK_S)."""
        with self._lock:
            if time.monotonic() - self._checked < CHECK_S:
                return self._held
            self._checked = time.monotonic()
            try:
                held = bool(self.client.set(self.key, self.holder, nx=True, px=TTL_MS)) or bool(
                    self._renew(keys=[self.key], args=[self.holder, TTL_MS])
                )
            except redis.RedisError:
                held = False  # cannot tell: stand down (another node may take over)
            if held != self._held:
                log.info("%s the %s lease", "took" if held else "lost", self.key)
            self._held = held
            return held

    def release(self) -> None:
        try:
            if self._renew(keys=[self.key], args=[self.holder, 1]):
                self._held = False
        except redis.RedisError:
            pass
