"""Presence of a single node: the gateway's live state plus the stored last_seen."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pychat.gateway import Gateway
from pychat.store import Store

# How long a viewer's looked-up visibility is reused (a membership change clears it at once on
# the node that made it; `membership_changed`), and how much of it is kept.
VISIBLE_TTL_S = 5.0
VISIBLE_VIEWERS = 4_096
VISIBLE_PER_VIEWER = 5_000


class LocalPresence:
    def __init__(self, gateway: Gateway, store: Store) -> None:
        self.gateway = gateway
        self.store = store
        # viewer -> (looked up at, user -> may follow): a client that subscribes again to the
        # same users (every reconnect) costs no store lookup.
        self._visible: OrderedDict[str, tuple[float, dict[str, bool]]] = OrderedDict()
        self._lock = threading.Lock()

    def status(self, user_id: str) -> dict[str, Any]:
        online, last_seen = self.gateway.presence_of(user_id, self.store.last_seen(user_id))
        return {"user_id": user_id, "status": "online" if online else "offline", "last_seen": last_seen}

    def may_follow(self, viewer_id: str, user_id: str) -> bool:
        return user_id in self.visible(viewer_id, [user_id])

    def visible(self, viewer_id: str, user_ids: list[str]) -> set[str]:
        """Which of `user_ids` `viewer_id` may follow: itself and those it shares a chat with."""
        now = time.monotonic()
        with self._lock:
            entry = self._visible.get(viewer_id)
            since = entry[0] if entry is not None and now - entry[0] < VISIBLE_TTL_S else now
            known = dict(entry[1]) if entry is not None and since == entry[0] else {}
        unknown = [u for u in dict.fromkeys(user_ids) if u != viewer_id and u not in known]
        if unknown:
            found = self.store.visible_users(viewer_id, unknown)
            known.update((u, u in found) for u in unknown)
            if len(known) > VISIBLE_PER_VIEWER:
                known = dict(list(known.items())[-VISIBLE_PER_VIEWER:])
            with self._lock:
                self._visible[viewer_id] = (since, known)
                self._visible.move_to_end(viewer_id)
                while len(self._visible) > VISIBLE_VIEWERS:
                    self._visible.popitem(last=False)
        return {u for u in user_ids if u == viewer_id or known.get(u)}

    def membership_changed(self) -> None:
        """A chat's members changed: visibility is looked up again."""
        with self._lock:
            self._visible.clear()


class ClusterPresence(LocalPresence):
    """Presence on a node of a cluster: a user is online while any node holds a connection of it."""

    def __init__(self, gateway: Gateway, store: Store, online: Callable[[list[str]], set[str]]) -> None:
        super().__init__(gateway, store)
        self.online = online

    def status(self, user_id: str) -> dict[str, Any]:
        answer = super().status(user_id)
        if answer["status"] == "offline" and self.online([user_id]):
            answer["status"] = "online"
        return answer
