"""Type stubs of the Rust extension (checked against the module by mypy.stubtest)."""

from typing import Any, final

__all__ = [
    "ERROR_CODES",
    "Gateway",
    "GatewayError",
    "TokenError",
    "frame_limit_defaults",
    "gateway_defaults",
    "sign_token",
    "verify_token",
]

ERROR_CODES: list[str]

def gateway_defaults() -> dict[str, int | float]: ...
def frame_limit_defaults() -> dict[str, int]: ...

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
        settings: dict[str, int | float],
        limits: dict[str, int],
        allowed_origins: list[str] = ...,
    ) -> Gateway:
        """`settings` and `limits`: any of `gateway_defaults()` / `frame_limit_defaults()`."""

    @property
    def port(self) -> int: ...
    def next_batch(self, max_events: int, timeout_ms: int) -> list[tuple[Any, ...]] | None:
        """Events: ("send", user, chat, client_msg_id, content, [media_id]),
        ("delivered"|"read", user, chat, seq), ("sync", user, [(chat, seq)], conn, ref),
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
    def sync_rows(self, conn: int, rows: list[tuple[str, int, str, str, str, str, int, str | None]]) -> str:
        """One page of a sync backlog: "queued", "full" (hand it again later) or "closed"."""

    def sync_end(self, conn: int, reference: str | None, chats: list[tuple[str, int]]) -> None: ...
    def sync_failed(self, conn: int, reference: str | None, code: str, message: str) -> None: ...
    def shutdown(self) -> None: ...

def sign_token(secret: bytes, user_id: str, expires_at_ms: int) -> str: ...
def verify_token(secret: bytes, token: str, now_ms: int) -> str: ...
