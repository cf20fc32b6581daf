"""The `Presence` seam: who is online, as the REST API and plugins see it.

The live state (connections, grace periods, followers, coalesced pushes) is
kept by the Rust gateway of each node; an implementation answers questions
about it and decides who may see whom. `local.LocalPresence` serves one node;
a Redis implementation will merge the nodes' states for scale-out.
"""

from __future__ import annotations

from typing import Any, Protocol


class Presence(Protocol):
    def status(self, user_id: str) -> dict[str, Any]:
        """`{"user_id", "status": "online"|"offline", "last_seen"}` (last_seen null if never seen)."""

    def may_follow(self, viewer_id: str, user_id: str) -> bool:
        """Whether `viewer_id` may see `user_id`'s presence (itself, or they share a chat)."""

    def visible(self, viewer_id: str, user_ids: list[str]) -> set[str]:
        """Which of `user_ids` `viewer_id` may follow (cached briefly)."""

    def membership_changed(self) -> None:
        """A chat's members changed: forget what `visible` looked up."""
