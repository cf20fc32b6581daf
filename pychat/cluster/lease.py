"""A lease in Redis: which one node does a deployment-wide job now (the plugins' after_store
feeds, so each stored message reaches a hook once per deployment, not once per node).

A thread of its own takes or renews it every `CHECK_S` (so a long piece of the guarded work never
lets it lapse); when the holder dies, the key expires after `TTL_MS` and the next node that asks
takes it. Between two holders both may believe they hold it for up to `CHECK_S` (a delayed
renewal): what the lease guards must tolerate a repeat (after_store is at least once), never a
gap.
"""

from __future__ import annotations

import logging
import threading

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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="pychat-lease", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """Whether this node holds the lease (as of the last renewal, at most CHECK_S ago)."""
        return self._held

    def _keep(self) -> None:
        while True:
            self._check()
            if self._stop.wait(CHECK_S):
                return

    def _check(self) -> None:
        try:
            held = bool(self.client.set(self.key, self.holder, nx=True, px=TTL_MS)) or bool(
                self._renew(keys=[self.key], args=[self.holder, TTL_MS])
            )
        except redis.RedisError:
            held = False  # cannot tell: stand down (another node may take over)
        if held != self._held:
            log.info("%s the %s lease", "took" if held else "lost", self.key)
        self._held = held

    def release(self) -> None:
        self._stop.set()
        self._thread.join(CHECK_S + 5)
        self._held = False
        try:
            if self._renew(keys=[self.key], args=[self.holder, 1]):
                self._held = False
        except redis.RedisError:
            pass
