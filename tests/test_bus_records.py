"""The sends log's records (pychat.bus.records): what one release writes, the next reads; what no
release wrote is poison with its reason, never a guess."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from pychat.bus.records import VERSION, ChatCreate, MemberChange, Poison, SendRecord, decode
from pychat.store import SendRequest

text = st.text(max_size=200)


@given(
    st.text(min_size=1, max_size=40),
    st.integers(min_value=0, max_value=2**62),
    text,
    text,
    text,
    text,
    st.lists(st.text(max_size=30), max_size=10),
)
def test_a_send_round_trips(
    node: str, request: int, sender: str, chat: str, cmid: str, content: str, ids: list[str]
) -> None:
    record = SendRecord(node, request, SendRequest(sender, chat, cmid, content, ids))
    assert decode(record.encode()) == record


def test_records_carry_their_version_and_kind() -> None:
    raw = json.loads(SendRecord("n1", 7, SendRequest("u", "c", "m", "hi", [])).encode())
    assert (raw["v"], raw["k"]) == (VERSION, "send")


def test_the_first_format_a_json_array_is_still_read() -> None:
    old = json.dumps(["n1", 3, "alice", "chat-1", "k1", "hello", ["media-1"]]).encode()
    assert decode(old) == SendRecord("n1", 3, SendRequest("alice", "chat-1", "k1", "hello", ["media-1"]))


def test_what_no_release_wrote_is_poison_with_its_reason() -> None:
    good = json.loads(SendRecord("n1", 9, SendRequest("u", "c", "m", "hi", [])).encode())
    cases = {
        b"\xff\xfe not json": "undecodable",
        b"": "undecodable",
        b'"a string"': "not a record",
        json.dumps({**good, "v": 99}).encode(): "unknown version 99",
        json.dumps({**good, "v": True}).encode(): "unknown version True",
        json.dumps({k: v for k, v in good.items() if k != "v"}).encode(): "unknown version None",
        json.dumps({**good, "k": "edit"}).encode(): "unknown kind 'edit'",
        json.dumps({**good, "t": 5}).encode(): "`t` is not a string",
        json.dumps({**good, "ids": "m1"}).encode(): "`ids` is not a list",
        json.dumps(["n1", 3, "alice"]).encode(): "3 fields, not 7",
        json.dumps(["n1", "3", "a", "c", "k", "t", []]).encode(): "`r` is not an integer",
    }
    for value, why in cases.items():
        poison = decode(value)
        assert isinstance(poison, Poison), value
        assert why in poison.reason, (value, poison.reason)
    # A poison record whose origin is readable names it: its sender can be answered.
    assert decode(json.dumps({**good, "v": 99}).encode()) == Poison("unknown version 99", "n1", 9)


def test_chat_changes_round_trip_and_a_bad_one_is_poison() -> None:
    changes = [
        ChatCreate("n1", 1, "c1", "alice", "group", "Lunch", ("alice", "bob")),
        ChatCreate("n2", 2, "c2", "alice", "direct", None, ("alice", "bob")),
        MemberChange("n1", 3, "c1", "carol", "alice", True),
        MemberChange("n1", 4, "c1", "bob", "bob", False),
    ]
    for change in changes:
        assert decode(change.encode()) == change
    bad = json.loads(changes[0].encode())
    assert decode(json.dumps({**bad, "members": "bob"}).encode()) == Poison(
        "bad chat.create: `members` is not a list of strings", "n1", 1
    )
    assert decode(json.dumps({**bad, "title": 3}).encode()) == Poison(
        "bad chat.create: `title` is not a string", "n1", 1
    )
