"""Records of the sends log (`pychat.sends`), versioned.

Every record is a JSON object with a format version `v` and a kind `k`; the log is read by nodes of
other releases during a rolling upgrade, so a reader decodes what it knows and turns the rest into a
`Poison` with its reason, never into a guess (the owner dead-letters a poison record and moves on:
docs/scale-out-plan.md, D6). Keys are short: a record is written once per send and read by the
chat's owner, and the log is bounded by bytes.

    v1 send:  {"v": 1, "k": "send", "n": node_id, "r": request_id, "c": chat_id,
               "u": sender_id, "m": client_msg_id, "t": content, "ids": [media_id, ...]}

    v1 chat.create:   + "u": creator, "kind": "direct"|"group", "title": str|null, "members": [...]
    v1 member.add:    + "u": the user added, "by": who adds
    v1 member.remove: + "u": the user removed, "by": who removes (themselves: leaving)

A chat's membership changes travel in its own partition, so its owner applies them in log order
with its sends (docs/scale-out-plan.md, D1): a send after a removal is judged without the member.

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
                **_head("send", self.node_id, self.request_id, s.chat_id),
                "u": s.sender_id,
                "m": s.client_msg_id,
                "t": s.content,
                "ids": s.attachments,
            }
        )


@dataclass(frozen=True)
class ChatCreate:
    """Creating a chat: `members` includes the creator."""

    node_id: str
    request_id: int
    chat_id: str
    creator: str
    kind: str
    title: str | None
    members: tuple[str, ...]

    def encode(self) -> bytes:
        return _dumps(
            {
                **_head("chat.create", self.node_id, self.request_id, self.chat_id),
                "u": self.creator,
                "kind": self.kind,
                "title": self.title,
                "members": list(self.members),
            }
        )


@dataclass(frozen=True)
class MemberChange:
    """Adding (`added`) or removing a member; `by` is who asks (the member themselves: leaving)."""

    node_id: str
    request_id: int
    chat_id: str
    user_id: str
    by: str
    added: bool

    def encode(self) -> bytes:
        kind = "member.add" if self.added else "member.remove"
        return _dumps(
            {**_head(kind, self.node_id, self.request_id, self.chat_id), "u": self.user_id, "by": self.by}
        )


@dataclass(frozen=True)
class Poison:
    """A record this release cannot take, and why: it goes to the dead-letter topic, and its
    partition moves on. `node_id`/`request_id` when they could be read (its sender is answered)."""

    reason: str
    node_id: str | None = None
    request_id: int | None = None


Record = SendRecord | ChatCreate | MemberChange


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
    try:
        node, request, chat = _text(raw, "n"), _int(raw, "r"), _text(raw, "c")
        if kind == "send":
            return SendRecord(
                node, request, SendRequest(_text(raw, "u"), chat, _text(raw, "m"), _text(raw, "t"), _ids(raw))
            )
        if kind == "chat.create":
            title = raw.get("title")
            if title is not None and not isinstance(title, str):
                raise ValueError("`title` is not a string")
            members = _strings(raw, "members")
            return ChatCreate(node, request, chat, _text(raw, "u"), _text(raw, "kind"), title, tuple(members))
        if kind in ("member.add", "member.remove"):
            return MemberChange(node, request, chat, _text(raw, "u"), _text(raw, "by"), kind == "member.add")
    except ValueError as e:
        return Poison(f"bad {kind}: {e}", *origin)
    return Poison(f"unknown kind {kind!r} in version {version}", *origin)


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
    return _strings({"ids": raw.get("ids", [])}, "ids")


def _strings(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key)
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise ValueError(f"`{key}` is not a list of strings")
    return value


def _head(kind: str, node_id: str, request_id: int, chat_id: str) -> dict[str, Any]:
    return {"v": VERSION, "k": kind, "n": node_id, "r": request_id, "c": chat_id}


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
