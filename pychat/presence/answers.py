"""Answers to `presence.subscribe`, off the engine thread.

Each one is a membership lookup whose cost grows with the viewer's chats: on the engine
thread, one user's subscribes delayed every other user's acks (issue 24). The gateway
charges each user for the users it names (`presence_ids_per_s`); here one thread answers
them in turn from a bounded queue, and a full queue is told to retry.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from pychat.gateway import Gateway, PresenceQuery
from pychat.presence import Presence
from pychat.store import Store

log = logging.getLogger("pychat.presence")

# Queries waiting for the answering thread; past this, `rate_limited`.
WAITING = 1_024


class PresenceAnswers:
    def __init__(
        self,
        gateway: Gateway,
        store: Store,
        presence: Callable[[], Presence],
        online_elsewhere: Callable[[list[str]], set[str]] | None = None,
    ) -> None:
        self.gateway = gateway
        self.store = store
        # Read at each answer: a cluster node replaces the server's presence after the start.
        self.presence = presence
        self.online_elsewhere = online_elsewhere
        self._queue: queue.Queue[PresenceQuery | None] = queue.Queue(WAITING)
        self._thread = threading.Thread(target=self._run, name="pychat-presence", daemon=True)
        self._thread.start()

    def submit(self, query: PresenceQuery) -> None:
        try:
            self._queue.put_nowait(query)
        except queue.Full:
            self.gateway.presence_failed(query.conn, "rate_limited", "presence lookups are busy; retry")

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (query := self._queue.get()) is not None:
            try:
                self._answer(query)
            except Exception:
                log.exception("presence query failed")
                self.gateway.presence_failed(query.conn, "unavailable", "presence lookup failed; retry")

    def _answer(self, q: PresenceQuery) -> None:
        visible = self.presence().visible(q.viewer_id, q.user_ids)
        last_seen = self.store.last_seen_many(sorted(visible))
        if self.online_elsewhere is not None:
            # This node may have started after they connected elsewhere.
            for user in self.online_elsewhere(sorted(visible)):
                self.gateway.cluster_presence(user, True, last_seen.get(user) or 0)
        self.gateway.presence_answer(
            q.conn, [(u, u in visible, last_seen.get(u)) for u in dict.fromkeys(q.user_ids)]
        )
