"""Sequencing from the log alone (pychat.bus.sequencing): the same records from the same state
give the same rows, wherever a replay starts; times never go back; a retry is answered, a former
member refused, from the log's order and nothing else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pychat.bus.records import ChatCreate, MemberChange, Record, SendRecord
from pychat.bus.sequencing import (
    DEDUP_WINDOW_MS,
    ChatState,
    Duplicate,
    KeyHit,
    LogPosition,
    MembersChanged,
    Outcome,
    Refused,
    Row,
    SequencingRound,
)
from pychat.store import SendRequest

USERS = ["alice", "bob", "carol", "dan"]
CHATS = ["c1", "c2"]


def send(chat: str, sender: str, cmid: str, content: str = "hi") -> SendRecord:
    return SendRecord("n1", 0, SendRequest(sender, chat, cmid, content, []))


record = st.one_of(
    st.builds(
        lambda c, u, k, t: send(c, u, f"k{k}", t),
        st.sampled_from(CHATS),
        st.sampled_from(USERS),
        st.integers(0, 6),
        st.text(max_size=8),
    ),
    st.builds(
        lambda c, kind, u, v: ChatCreate("n1", 0, c, u, kind, None, (u, v)),
        st.sampled_from(CHATS),
        st.sampled_from(["group", "direct"]),
        st.sampled_from(USERS),
        st.sampled_from(USERS),
    ),
    st.builds(
        lambda c, u, by, added: MemberChange("n1", 0, c, u, by, added),
        st.sampled_from(CHATS),
        st.sampled_from(USERS),
        st.sampled_from(USERS),
        st.booleans(),
    ),
)
# Log times may go back (a leader change): steps of -5 s .. +5 s.
log = st.lists(st.tuples(record, st.integers(-5_000, 5_000)), min_size=1, max_size=60)


def positions(steps: list[int]) -> list[LogPosition]:
    out, t = [], 1_700_000_000_000
    for offset, step in enumerate(steps):
        t += step
        out.append(LogPosition(3, offset, t))
    return out


def run(
    records: list[Record], at: list[LogPosition], states: dict[str, ChatState], hits: dict | None = None
) -> tuple[list[Outcome], dict[str, ChatState]]:
    r = SequencingRound(states, hits)
    outcomes = [r.apply(rec, pos) for rec, pos in zip(records, at, strict=True)]
    return outcomes, r.commit()


@settings(max_examples=300)
@given(log, st.data())
def test_a_replay_from_any_offset_derives_the_same_outcomes(
    entries: list[tuple[Record, int]], data: st.DataObject
) -> None:
    records = [r for r, _ in entries]
    at = positions([s for _, s in entries])
    whole, _ = run(records, at, {})
    again, _ = run(records, at, {})
    assert whole == again
    # An owner that took over at C: the state as of C (folded from what came before), and the
    # store already holding what the first owner wrote at C and after (its keys found, ignored).
    cut = data.draw(st.integers(0, len(records)))
    _, state = run(records[:cut], at[:cut], {})
    for chat in state.values():
        chat.keys.clear()  # a new owner knows the keys only from the store
    written = {
        (o.chat_id, o.sender_id, o.client_msg_id): KeyHit(
            o.seq, o.message_id, o.created_at, o.at.offset, o.at.log_time
        )
        for o in whole
        if isinstance(o, Row)
    }
    replay, _ = run(records[cut:], at[cut:], state, written)
    assert replay == whole[cut:]


@given(log)
def test_a_chats_times_and_seqs_never_go_back(entries: list[tuple[Record, int]]) -> None:
    outcomes, _ = run([r for r, _ in entries], positions([s for _, s in entries]), {})
    last: dict[str, tuple[int, int]] = {}
    for o in outcomes:
        if isinstance(o, Row):
            seq, created = last.get(o.chat_id, (0, 0))
            assert o.seq == seq + 1 and o.created_at >= created
            last[o.chat_id] = (o.seq, o.created_at)


def at(offset: int, t: int = 1_000_000) -> LogPosition:
    return LogPosition(0, offset, t)


def test_a_retry_is_answered_with_its_message_and_a_key_past_the_window_is_new() -> None:
    r = SequencingRound({})
    r.apply(ChatCreate("n1", 0, "c", "alice", "group", None, ("alice", "bob")), at(0))
    first = r.apply(send("c", "alice", "k1", "hello"), at(1))
    assert isinstance(first, Row) and first.seq == 1
    retry = r.apply(send("c", "alice", "k1", "other words"), at(2))
    assert retry == Duplicate("c", KeyHit(1, first.message_id, first.created_at, 1, 1_000_000))
    late = r.apply(send("c", "alice", "k1", "hello"), at(3, 1_000_000 + DEDUP_WINDOW_MS))
    assert isinstance(late, Row) and late.seq == 2


def test_a_store_key_of_this_offset_or_later_is_not_this_records_original() -> None:
    state = {"c": ChatState("c", "group", None, "alice", ["alice"], version=0)}
    later = {("c", "alice", "k1"): KeyHit(1, "m-x", 5, 7, 1_000_000)}
    out, _ = run([send("c", "alice", "k1")], [at(7)], state, later)
    assert isinstance(out[0], Row), "its own earlier write: derived again"
    out, _ = run([send("c", "alice", "k1")], [at(8)], state, later)
    assert out[0] == Duplicate("c", later[("c", "alice", "k1")])


def test_membership_is_the_logs_order_a_send_after_a_removal_is_refused() -> None:
    r = SequencingRound({})
    created = r.apply(ChatCreate("n1", 0, "c", "alice", "group", "t", ("alice", "bob")), at(0))
    assert isinstance(created, MembersChanged) and created.members == ("alice", "bob")
    assert isinstance(r.apply(send("c", "bob", "b1"), at(1)), Row)
    removed = r.apply(MemberChange("n1", 0, "c", "bob", "alice", False), at(2))
    assert isinstance(removed, MembersChanged)
    assert (removed.change, removed.members, removed.at_seq, removed.version) == ("removed", ("alice",), 1, 2)
    assert r.apply(send("c", "bob", "b2"), at(3)) == Refused("c", "forbidden", "not a member of this chat")
    # A retry of what bob sent while a member is still answered with it.
    assert isinstance(r.apply(send("c", "bob", "b1"), at(4)), Duplicate)
    assert r.apply(MemberChange("n1", 0, "c", "alice", "bob", False), at(5)).code == "not_found"  # type: ignore[union-attr]


def test_a_round_leaves_the_states_it_was_given_alone_until_committed() -> None:
    given_state = {"c": ChatState("c", "group", None, "alice", ["alice"], version=0)}
    r = SequencingRound(given_state)
    r.apply(send("c", "alice", "k"), at(1))
    r.apply(MemberChange("n1", 0, "c", "bob", "alice", True), at(2))
    assert given_state["c"].last_seq == 0 and given_state["c"].members == ["alice"]
    after = r.commit()["c"]
    assert (after.last_seq, after.members, after.version) == (1, ["alice", "bob"], 2)


def test_a_second_creation_of_a_chat_finds_the_first() -> None:
    r = SequencingRound({})
    r.apply(ChatCreate("n1", 0, "d", "alice", "direct", None, ("alice", "bob")), at(0))
    second = r.apply(ChatCreate("n2", 0, "d", "bob", "direct", None, ("bob", "alice")), at(1))
    assert isinstance(second, MembersChanged)
    assert (second.change, second.members, second.created_by) == ("unchanged", ("alice", "bob"), "alice")
