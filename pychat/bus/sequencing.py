"""Sequencing as a pure function of the log (issue 26; docs/scale-out-plan.md, D1).

The owner of a chat's partition turns each record, in offset order, into an outcome, from the
chat's state as of that offset and the record alone: no clock, no random id, no cache with a TTL,
no read of anything another partition writes. Any owner that replays the same records from the
same state derives the same rows, so a write needs no fence: a stale owner can only write what the
new one writes too.

- seq: one more than the chat's last accepted message;
- created_at: the record's log time, never going back within a chat;
- message_id: derived from the record's place in the log (partition, offset) and its time;
- chain: pychat.chain's link of the previous row's value (the replay check, too);
- dedup: a send whose (sender, client_msg_id) an earlier record of the chat took is answered with
  that message, whatever its content (a retry); the store's keys for earlier offsets come in as
  `KeyHit`s, this round's own as it goes;
- membership: a chat exists once its `chat.create` is applied, and its members are those of the
  records before this one: a send after a removal is refused, one before it is stored.

Nothing here does I/O: `SequencingRound` works on copies of the states it is given, and
`commit()` hands back the new states only once the caller has written the outcomes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pychat.bus.records import ChatCreate, MemberChange, Record, SendRecord
from pychat.chain import genesis, link

# How long a key answers a retry (the log's retention is at most this: docs/scale-out-plan.md, D7).
DEDUP_WINDOW_MS = 24 * 3600 * 1000
MAX_MEMBERS = 10_000


@dataclass(frozen=True)
class LogPosition:
    """Where a record sits: its partition, its offset and the log's time for it (ms)."""

    partition: int
    offset: int
    log_time: int


@dataclass(frozen=True)
class KeyHit:
    """A stored message found by its (sender, client_msg_id) key, and where its record was."""

    seq: int
    message_id: str
    created_at: int
    offset: int
    log_time: int


@dataclass
class ChatState:
    """A chat as of an offset: its head and its members (in the order they joined)."""

    chat_id: str
    kind: str = ""  # "" while not created
    title: str | None = None
    created_by: str = ""
    members: list[str] = field(default_factory=list)
    last_seq: int = 0
    last_created_at: int = 0
    last_chain: bytes = b""
    # The offset of the last membership change applied (-1: from before the log).
    version: int = -1
    # Keys of the messages this state's rounds took (sender, client_msg_id) -> hit: a retry
    # within a round, or the next rounds before the store's keys are read again.
    keys: dict[tuple[str, str], KeyHit] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.kind != ""

    def copy(self) -> ChatState:
        return dataclasses.replace(self, members=list(self.members), keys=dict(self.keys))


@dataclass(frozen=True)
class Row:
    """A message to write, exactly as every replay writes it."""

    chat_id: str
    seq: int
    message_id: str
    sender_id: str
    content: str
    attachments: tuple[str, ...]
    created_at: int
    client_msg_id: str
    chain: bytes
    at: LogPosition


@dataclass(frozen=True)
class Duplicate:
    """A retry of a message an earlier record stored: answered with it, nothing written."""

    chat_id: str
    hit: KeyHit


@dataclass(frozen=True)
class Refused:
    """A record the chat's state refuses, with PROTOCOL.md's code."""

    chat_id: str
    code: str
    message: str


@dataclass(frozen=True)
class MembersChanged:
    """A chat's members after a change (`change`: created, added, removed or unchanged), and the
    chat's last seq when it took effect: who joins gets what follows, who leaves nothing after."""

    chat_id: str
    kind: str
    title: str | None
    created_by: str
    members: tuple[str, ...]
    version: int
    at_seq: int
    change: str
    user_id: str | None


Outcome = Row | Duplicate | Refused | MembersChanged


def message_id(at: LogPosition) -> str:
    """A message's id from its record's place: unique (one record per partition and offset),
    time-ordered, 29 characters like the stores' random ids."""
    return f"m{at.log_time:012x}{at.partition & 0xFFFF:04x}{at.offset & 0xFFFF_FFFF_FFFF:012x}"


class SequencingRound:
    """One batch of records of one partition, applied in offset order to copies of its chats'
    states. `commit()` returns the states after the round (call it once the outcomes are written;
    drop the round to forget it)."""

    def __init__(self, states: dict[str, ChatState], hits: dict[tuple[str, str, str], KeyHit] | None = None):
        self._states = {c: s.copy() for c, s in states.items()}
        # Keys the store holds for earlier offsets: (chat, sender, client_msg_id) -> hit.
        self._hits = hits or {}

    def state(self, chat_id: str) -> ChatState:
        return self._states.setdefault(chat_id, ChatState(chat_id))

    def apply(self, record: Record, at: LogPosition) -> Outcome:
        if isinstance(record, SendRecord):
            return self._send(record, at)
        if isinstance(record, ChatCreate):
            return self._create(record, at)
        return self._member(record, at)

    def commit(self) -> dict[str, ChatState]:
        return self._states

    def _send(self, record: SendRecord, at: LogPosition) -> Outcome:
        s = record.send
        chat = self.state(s.chat_id)
        hit = chat.keys.get((s.sender_id, s.client_msg_id)) or self._hits.get(
            (s.chat_id, s.sender_id, s.client_msg_id)
        )
        # Only an earlier record's key within the window answers: a key of this offset or later
        # is a write of a replay ahead of this one, never this record's original.
        if hit is not None and hit.offset < at.offset and at.log_time - hit.log_time < DEDUP_WINDOW_MS:
            return Duplicate(s.chat_id, hit)
        if not chat.exists:
            return Refused(s.chat_id, "not_found", "no such chat")
        if s.sender_id not in chat.members:
            return Refused(s.chat_id, "forbidden", "not a member of this chat")
        seq = chat.last_seq + 1
        created_at = max(at.log_time, chat.last_created_at)
        prev = chat.last_chain if chat.last_seq else genesis(s.chat_id)
        chain = link(prev, seq, s.sender_id, s.content, created_at, s.attachments)
        row = Row(
            s.chat_id,
            seq,
            message_id(at),
            s.sender_id,
            s.content,
            tuple(s.attachments),
            created_at,
            s.client_msg_id,
            chain,
            at,
        )
        chat.last_seq, chat.last_created_at, chat.last_chain = seq, created_at, chain
        chat.keys[(s.sender_id, s.client_msg_id)] = KeyHit(
            seq, row.message_id, created_at, at.offset, at.log_time
        )
        return row

    def _create(self, record: ChatCreate, at: LogPosition) -> Outcome:
        chat = self.state(record.chat_id)
        if chat.exists:
            # Two creations of one direct chat (its id comes from the pair) land here: the second
            # finds the first.
            return self._members(chat, "unchanged", None)
        if record.kind not in ("direct", "group"):
            return Refused(record.chat_id, "bad_request", f"unknown chat kind {record.kind!r}")
        members = list(dict.fromkeys([record.creator, *record.members]))
        if record.kind == "direct" and len(members) != 2:
            return Refused(record.chat_id, "bad_request", "a direct chat has two members")
        if len(members) > MAX_MEMBERS:
            return Refused(record.chat_id, "too_large", f"a chat has at most {MAX_MEMBERS} members")
        chat.kind, chat.title, chat.created_by, chat.members = (
            record.kind,
            record.title,
            record.creator,
            members,
        )
        chat.last_created_at = max(at.log_time, chat.last_created_at)
        chat.version = at.offset
        return self._members(chat, "created", record.creator)

    def _member(self, record: MemberChange, at: LogPosition) -> Outcome:
        chat = self.state(record.chat_id)
        if not chat.exists or record.by not in chat.members:
            return Refused(record.chat_id, "not_found", "no such chat")
        if chat.kind != "group":
            return Refused(record.chat_id, "bad_request", "only a group's members change")
        if record.added:
            if record.user_id in chat.members:
                return self._members(chat, "unchanged", record.user_id)
            if len(chat.members) >= MAX_MEMBERS:
                return Refused(record.chat_id, "too_large", f"a chat has at most {MAX_MEMBERS} members")
            chat.members.append(record.user_id)
            change = "added"
        else:
            if record.user_id != record.by and record.by != chat.created_by:
                return Refused(record.chat_id, "forbidden", "only the group's creator may remove others")
            if record.user_id not in chat.members:
                return Refused(record.chat_id, "not_found", "not a member of this chat")
            chat.members.remove(record.user_id)
            change = "removed"
        chat.version = at.offset
        return self._members(chat, change, record.user_id)

    @staticmethod
    def _members(chat: ChatState, change: str, user_id: str | None) -> MembersChanged:
        return MembersChanged(
            chat.chat_id,
            chat.kind,
            chat.title,
            chat.created_by,
            tuple(chat.members),
            chat.version,
            chat.last_seq,
            change,
            user_id,
        )
