"""Presence of a single node: the gateway's live state plus the stored last_seen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pychat.gateway import Gateway
from pychat.store import Store


class LocalPresence:
    def __init__(self, gateway: Gateway, store: Store) -> None:
        self.gateway = gateway
        self.store = store

    def status(self, user_id: str) -> dict[str, Any]:
        online, last_seen = self.gateway.presence_of(user_id, self.store.last_seen(user_id))
        return {"user_id": user_id, "status": "online" if online else "offline", "last_seen": last_seen}

    def may_follow(self, viewer_id: str, user_id: str) -> bool:
        return viewer_id == user_id or user_id in self.store.visible_users(viewer_id, [user_id])


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
