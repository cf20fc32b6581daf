"""Type stubs of the Rust extension (checked against the module by mypy.stubtest)."""

from typing import Any, final

__all__ = ["Gateway", "GatewayError", "TokenError", "sign_token", "verify_token"]

class GatewayError(Exception):
    """A request refused by the gateway: args are (code, message)."""

class TokenError(ValueError):
    """A token that is malformed, badly signed or expired."""

@final
class Gateway:
    """The running WebSocket gateway: sockets, sequencing, fan-out (tokio threads)."""

    def __new__(
        cls,
        *,
        host: str,
        port: int,
        secret: bytes,
        heartbeat_s: int = 25,
        queue_capacity: int = 4096,
        read_buffer_bytes: int = 4096,
        runtime_threads: int = 2,
        engine_queue_capacity: int = 16384,
        window_capacity: int = 1000000,
        window_ttl_s: int = 86400,
        max_bad_frames: int = 20,
        max_frame_bytes: int = 262144,
        max_content_bytes: int = 65536,
        max_attachments: int = 10,
        max_subscribe: int = 1000,
        typing_ttl_ms: int = 6000,
        typing_min_interval_ms: int = 2000,
        presence_grace_ms: int = 5000,
        tick_ms: int = 200,
        upgrades_per_s: float = 2000.0,
        upgrade_burst: float = 4000.0,
        max_connections: int = 0,
        send_per_s: float = 200.0,
        send_burst: float = 400.0,
        allowed_origins: list[str] = ...,
    ) -> Gateway: ...
    @property
    def port(self) -> int: ...
    def next_batch(self, max_events: int, timeout_ms: int) -> list[tuple[Any, ...]] | None:
        """Events: ("send", user, chat, client_msg_id, content, [media_id]),
        ("delivered"|"read", user, chat, seq), ("sync", user, [(chat, seq)]),
        ("seen", user, last_seen_ms), ("presence.query", viewer, [user_id])."""

    def complete_batch(self, results: list[tuple[Any, ...]]) -> None:
        """One result per event of the last batch; acks and fan-out run on the gateway's fan-out thread."""

    def take_tickets(self) -> list[tuple[int, tuple[Any, ...]]]:
        """REST tickets completed since the last call (`next_batch` also returns early when some are)."""
    def submit_send(
        self,
        ticket: int,
        user_id: str,
        chat_id: str,
        client_msg_id: str,
        content: str,
        attachments: list[str],
    ) -> tuple[str, str, int, int] | None: ...
    def submit_pointer(self, ticket: int, user_id: str, chat_id: str, kind: str, seq: int) -> None: ...
    def set_chat_members(self, chat_id: str, members: list[str], direct: bool = False) -> None: ...
    def remove_chat(self, chat_id: str) -> None: ...
    def push_to_users(self, user_ids: list[str], frame: str) -> None: ...
    def is_online(self, user_id: str) -> bool: ...
    def presence_of(self, user_id: str, stored_last_seen: int | None = None) -> tuple[bool, int | None]: ...
    def connection_count(self) -> int: ...
    def counters(self) -> list[tuple[str, int]]: ...
    def shutdown(self) -> None: ...

def sign_token(secret: bytes, user_id: str, expires_at_ms: int) -> str: ...
def verify_token(secret: bytes, token: str, now_ms: int) -> str: ...
