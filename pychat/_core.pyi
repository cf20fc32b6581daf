"""Type stubs of the Rust extension (checked against the module by mypy.stubtest)."""

from collections.abc import Sequence
from typing import Any, final

__all__ = [
    "ERROR_CODES",
    "ERROR_STATUS",
    "UNAVAILABLE_RETRY_MS",
    "Acked",
    "ConnectEvent",
    "Deferred",
    "Done",
    "Failed",
    "Gateway",
    "GatewayError",
    "PointerEvent",
    "PointerMoved",
    "PresenceInfo",
    "PresenceQuery",
    "SeenEvent",
    "SendEvent",
    "Stored",
    "SyncEvent",
    "TokenError",
    "frame_limit_defaults",
    "gateway_defaults",
    "sign_token",
    "verify_token",
]

ERROR_CODES: list[str]
# The HTTP status of each error code; how long `unavailable` says to wait by default.
ERROR_STATUS: dict[str, int]
UNAVAILABLE_RETRY_MS: int

def gateway_defaults() -> dict[str, int | float]: ...
def frame_limit_defaults() -> dict[str, int]: ...

# Engine events (made by the gateway, read by the engine).

@final
class SendEvent:
    @property
    def sender_id(self) -> str: ...
    @property
    def chat_id(self) -> str: ...
    @property
    def client_msg_id(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def attachments(self) -> list[str]: ...

@final
class PointerEvent:
    @property
    def user_id(self) -> str: ...
    @property
    def chat_id(self) -> str: ...
    @property
    def kind(self) -> str:
        """ "delivered" or "read"."""
    @property
    def seq(self) -> int: ...

@final
class SyncEvent:
    @property
    def user_id(self) -> str: ...
    @property
    def since(self) -> dict[str, int]: ...
    @property
    def conn(self) -> int: ...
    @property
    def reference(self) -> str | None: ...

@final
class SeenEvent:
    @property
    def user_id(self) -> str: ...
    @property
    def at(self) -> int: ...

@final
class PresenceQuery:
    @property
    def conn(self) -> int: ...
    @property
    def viewer_id(self) -> str: ...
    @property
    def user_ids(self) -> list[str]: ...

@final
class ConnectEvent:
    """An upgrade waiting for the plugins' `on_connect` verdict: answer `Done` or `Failed`."""

    @property
    def user_id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def origin(self) -> str | None: ...

# Results (made by the engine and the stores, read by the gateway).

@final
class Stored:
    def __new__(
        cls, message_id: str, seq: int, created_at: int, content: str, attachments: str, duplicate: bool
    ) -> Stored: ...
    @property
    def message_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def created_at(self) -> int: ...
    @property
    def content(self) -> str: ...
    @property
    def attachments(self) -> str:
        """The attachment objects as a JSON array."""
    @property
    def duplicate(self) -> bool: ...

@final
class PointerMoved:
    def __new__(
        cls, delivered: int, read: int, moved_delivered: bool = False, moved_read: bool = False
    ) -> PointerMoved: ...
    @property
    def delivered(self) -> int: ...
    @property
    def read(self) -> int: ...
    @property
    def moved_delivered(self) -> bool: ...
    @property
    def moved_read(self) -> bool: ...

@final
class Failed:
    def __new__(cls, code: str, message: str, retry_after_ms: int | None = None) -> Failed: ...
    @property
    def code(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def retry_after_ms(self) -> int | None:
        """When to retry; `unavailable` says 1,000 ms unless given."""

@final
class Done:
    def __new__(cls) -> Done: ...

@final
class Deferred:
    def __new__(cls) -> Deferred: ...

@final
class PresenceInfo:
    def __new__(cls, users: list[tuple[str, bool, int | None]]) -> PresenceInfo: ...
    @property
    def users(self) -> list[tuple[str, bool, int | None]]: ...

@final
class Acked:
    @property
    def message_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def created_at(self) -> int: ...
    @property
    def content(self) -> str | None: ...
    @property
    def attachments(self) -> str | None: ...

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
        cluster: bool = ...,
    ) -> Gateway:
        """`settings` and `limits`: any of `gateway_defaults()` / `frame_limit_defaults()`;
        `cluster`: a node of a cluster (pychat.cluster.node)."""

    @property
    def port(self) -> int: ...
    def next_batch(
        self, max_events: int, timeout_ms: int
    ) -> list[SendEvent | PointerEvent | SyncEvent | SeenEvent | PresenceQuery | ConnectEvent] | None: ...
    def complete_batch(
        self, results: Sequence[Stored | PointerMoved | Failed | Done | Deferred | PresenceInfo]
    ) -> None:
        """One result per event of the last batch; acks and fan-out run on the gateway's fan-out thread."""

    def take_tickets(self) -> list[tuple[int, Acked | PointerMoved | Failed]]:
        """REST tickets completed since the last call (`next_batch` also returns early when some are)."""
    def submit_send(
        self,
        ticket: int,
        user_id: str,
        chat_id: str,
        client_msg_id: str,
        content: str,
        attachments: list[str],
    ) -> Acked | None: ...
    def submit_pointer(self, ticket: int, user_id: str, chat_id: str, kind: str, seq: int) -> None: ...
    def set_chat_members(
        self, chat_id: str, members: list[str], direct: bool = False, version: int | None = None
    ) -> bool:
        """Replaces a chat's members unless a newer `version` (log offset) is held; None always applies."""
    def remove_chat(self, chat_id: str) -> None: ...
    def set_connect_gate(self, ttl_ms: int) -> None:
        """Upgrades wait for a `ConnectEvent`'s answer, kept per user this long; 0: off."""
    def push_to_users(self, user_ids: list[str], frame: str) -> None: ...
    def is_online(self, user_id: str) -> bool: ...
    def presence_of(self, user_id: str, stored_last_seen: int | None = None) -> tuple[bool, int | None]: ...
    def connection_count(self) -> int: ...
    def counters(self) -> list[tuple[str, int]]: ...
    def sync_rows(self, conn: int, rows: list[tuple[str, int, str, str, str, str, int, str | None]]) -> str:
        """One page of a sync backlog: "queued", "full" (hand it again later) or "closed"."""

    def fanned_out_heads(self) -> list[tuple[str, int]]:
        """`(chat_id, last seq fanned out here)` for every chat with a member connected here."""

    def deliver_stored(
        self, rows: list[tuple[str, int, str, str, str, str, int, str | None]]
    ) -> list[tuple[str, int, int]]:
        """Messages another node stored, fanned out here like local ones; the seq gaps met,
        `(chat_id, after, before)`, to read from the store and hand over first. A send in flight
        here among them is acked (its connection gets the ack instead of the message)."""

    def answer_sends(
        self,
        answers: list[tuple[str, str, str, tuple[str, int, int] | None, tuple[str, str] | None]],
    ) -> None:
        """`(sender_id, chat_id, client_msg_id, (message_id, seq, created_at) | None,
        (code, message) | None)`: sends another node's sequencer answered without a new message."""

    def apply_sequenced(self, items: list[tuple[str, Any]]) -> list[tuple[str, int, int]]:
        """The sequenced stream in its order: `("members", (chat_id, members, direct, version,
        tell, frame | None))`, `("row", row)`, `("answer", answer)`; a member removed between two
        rows gets nothing after the removal. Returns the gaps met, as `deliver_stored` does."""

    def take_cluster_events(
        self, timeout_ms: int
    ) -> list[tuple[str, str, str, str] | tuple[str, str, bool, int]]:
        """`("chat", chat_id, user_id, frame)` and `("presence", user_id, online, at)` for other nodes."""

    def cluster_presence(self, user_id: str, online: bool, last_seen: int) -> None: ...
    def push_to_chat(self, chat_id: str, frame: str, skip_user_id: str | None = None) -> None: ...
    def chat_members(self, chat_id: str) -> list[str] | None: ...
    def sync_end(self, conn: int, reference: str | None, chats: list[tuple[str, int]]) -> None: ...
    def sync_failed(self, conn: int, reference: str | None, code: str, message: str) -> None: ...
    def presence_answer(self, conn: int, info: list[tuple[str, bool, int | None]]) -> None: ...
    def presence_failed(self, conn: int, code: str, message: str) -> None: ...
    def shutdown(self) -> None: ...

def sign_token(secret: bytes, user_id: str, expires_at_ms: int) -> str: ...
def verify_token(secret: bytes, token: str, now_ms: int) -> str: ...
