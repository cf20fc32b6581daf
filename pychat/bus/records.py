"""Records of the sends log (`pychat.sends`), versioned.

Every record is a JSON object with a format version `v` and a kind `k`; the log is read by nodes of
other releases during a rolling upgrade, so a reader decodes what it knows and turns the rest into a
`Poison` with its reason, never into a guess (the owner dead-letters a poison record and moves on:
docs/scale-out-plan.md, D6). Keys are short: a record is written once per send and read by the
chat's owner, and the log is bounded by bytes.

    v1 send:  {"v": 1, "k": "send", "n": node_id, "r": request_id, "c": chat_id,
               "u": sender_id, "m": client_msg_id, "t": content, "ids": [media_id, ...]}

Version 0 is the first format, a JSON array (node, request, sender, chat, client_msg_id, content,
attachments): still read, so a log written by the previous release drains after an upgrade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pychat.store import SendRequest

# The format this release writes.
VERSION = 1
# The formats this release reads.
READABLE = (0, 1)


@dataclass(frozen=True)
class SendRecord:
    """A send as it travels through the log: what the store needs, and where its ack goes (the
    node that holds the sender's connection or REST call, and its request there)."""

    node_id: str
    request_id: int
    send: SendRequest

    def encode(self) -> bytes:
        s = self.send
        return _dumps(
            {
                "v": VERSION,
                "k": "send",
                "n": self.node_id,
                "r": self.request_id,
                "c": s.chat_id,
                "u": s.sender_id,
                "m": s.client_msg_id,
                "t": s.content,
                "ids": s.attachments,
            }
        )


@dataclass(frozen=True)
class Poison:
    """A record this release cannot take, and why: it goes to the dead-letter topic, and its
    partition moves on. `node_id`/`request_id` when they could be read (its sender is answered)."""

    reason: str
    node_id: str | None = None
    request_id: int | None = None


Record = SendRecord


def decode(value: bytes | None) -> Record | Poison:
    """The record in a log message's value, or why it is poison."""
    try:
        raw = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as e:
        return Poison(f"undecodable: {e}")
    if isinstance(raw, list):
        return _decode_v0(raw)
    if not isinstance(raw, dict):
        return Poison(f"not a record: a JSON {type(raw).__name__}")
    version = raw.get("v")
    origin = _origin(raw)
    if version not in READABLE or isinstance(version, bool):
        return Poison(f"unknown version {version!r}", *origin)
    kind = raw.get("k")
    if kind != "send":
        return Poison(f"unknown kind {kind!r} in version {version}", *origin)
    try:
        return SendRecord(
            _text(raw, "n"),
            _int(raw, "r"),
            SendRequest(_text(raw, "u"), _text(raw, "c"), _text(raw, "m"), _text(raw, "t"), _ids(raw)),
        )
    except ValueError as e:
        return Poison(f"bad send: {e}", *origin)


def _decode_v0(raw: list[Any]) -> Record | Poison:
    if len(raw) != 7:
        return Poison(f"bad version 0 record: {len(raw)} fields, not 7")
    node_id, request_id, sender_id, chat_id, client_msg_id, content, attachments = raw
    fields = {"n": node_id, "r": request_id, "u": sender_id, "c": chat_id, "m": client_msg_id}
    try:
        send = SendRequest(
            _text(fields, "u"),
            _text(fields, "c"),
            _text(fields, "m"),
            _text({"t": content}, "t"),
            _ids({"ids": attachments}),
        )
        return SendRecord(_text(fields, "n"), _int(fields, "r"), send)
    except ValueError as e:
        return Poison(f"bad version 0 record: {e}")


def _origin(raw: dict[str, Any]) -> tuple[str | None, int | None]:
    node, request = raw.get("n"), raw.get("r")
    if isinstance(node, str) and isinstance(request, int) and not isinstance(request, bool):
        return node, request
    return None, None


def _text(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise ValueError(f"`{key}` is not a string")
    return value


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"`{key}` is not an integer")
    return value


def _ids(raw: dict[str, Any]) -> list[str]:
    value = raw.get("ids", [])
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise ValueError("`ids` is not a list of strings")
    return value


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
