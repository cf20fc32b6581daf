"""The plugin API: Python hooks at the batch boundary, never per message across the GIL.

A plugin is a class with some of these hooks (each plain or `async def`):

    class Plugin:
        def __init__(self, settings: dict[str, Any]) -> None: ...
        def before_send(self, batch: list[Send]) -> list[Verdict | None] | None: ...
        def after_store(self, messages: list[dict[str, Any]]) -> None: ...

- `before_send` sees every send of an engine batch before it is stored (on the node that received
  it), and answers one verdict per send, in order: `None` or `Accept()` keeps it, `Reject(code,
  message)` answers the sender with that error (nothing is stored; a retry asks again),
  `Rewrite(content, attachments)` stores the new text (what every member then receives, live and
  in history, sync and export). Answering `None` for the whole batch accepts all of it.
- `on_connect` sees users about to connect (a WebSocket upgrade with a valid token, or a login
  with the right password) and answers one verdict each: `None` lets them in, `Reject(code,
  message)` refuses them (the upgrade gets that HTTP error, the login 403). Verdicts on upgrades
  are kept per user for `plugin_connect_cache_s` in the gateway, so a reconnect storm asks once.
- `on_receipt` gets receipts (`{"type": "receipt", chat_id, user_id, delivered, read}`: a
  member's pointers after they moved) and `on_chat_event` chat events (`chat.created`,
  `member.added`, `member.removed`, with chat_id, user_id or members, at) the same way as
  `after_store`: in order, at least once, from a durable cursor (SQLite store for now).
- `after_store` gets stored messages (PROTOCOL.md message objects) after their commit, off the
  ack path, from a durable cursor per plugin and chat: each message reaches it at least once, also
  across crashes (the cursor moves only after the hook returns); a hook that fails is called again
  with the same messages later.

Each plugin is configured in the `[[plugins]]` tables of the configuration (by the name of a
`pychat.plugins` entry point, or `module:Class`), with its own `settings`, a time budget per call
and a policy for `before_send` when it fails or overruns (`open`: the sends go on as they were;
`closed`: they are refused `unavailable`). See docs/plugins.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pychat.store import SendRequest

# The codes a plugin may reject a send with (PROTOCOL.md).
REJECT_CODES = frozenset(
    {"bad_request", "forbidden", "not_found", "too_large", "rate_limited", "unavailable", "conflict"}
)


# A send as a plugin sees it: sender_id, chat_id, client_msg_id, content, attachments (media ids),
# as earlier plugins left them. Immutable: answer a `Rewrite` to change it.
Send = SendRequest


@dataclass(frozen=True, slots=True)
class Accept:
    pass


@dataclass(frozen=True, slots=True)
class Reject:
    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in REJECT_CODES:
            raise ValueError(f"a send is rejected with one of {sorted(REJECT_CODES)}, not {self.code!r}")


@dataclass(frozen=True, slots=True)
class Rewrite:
    content: str
    attachments: list[str] | None = None  # None: as they were


Verdict = Accept | Reject | Rewrite


@dataclass(frozen=True, slots=True)
class Connect:
    """Someone about to connect: `via` is "websocket" (an upgrade with a valid token) or "login"
    (a correct password at POST /api/auth/token); `origin` is the browser's Origin, if any."""

    user_id: str
    address: str
    via: str
    origin: str | None = None


class Plugin:
    """A base class for plugins (optional: any class with the hooks will do). `settings` is the
    plugin's `settings` table from the configuration."""

    name = "plugin"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    # A plugin may also have `close()` (plain or async): called once when the server stops.


HOOKS = ("before_send", "after_store", "on_connect", "on_receipt", "on_chat_event")


def hooks_of(plugin: object) -> list[str]:
    """The hooks a plugin implements."""
    return [h for h in HOOKS if callable(getattr(plugin, h, None))]
