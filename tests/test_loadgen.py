"""The benchmark suite's tools work: the compiled load generator against a real
server, with its own loss/duplicate/order accounting (tiny sizes; `make
bench-quick` and `make bench` run them for figures)."""

from __future__ import annotations

import sqlite3
from typing import Any

from benchmarks import suite


def test_loadgen_fanout_counts_every_delivery_in_order() -> None:
    r = suite.fanout("pychat", receivers=20, messages=200)
    assert (r["acked"], r["deliveries"]) == (200, 20 * 200)
    assert (r["lost"], r["duplicated"], r["out_of_order"]) == (0, 0, 0)


def test_loadgen_sync_and_persist_report_complete_runs() -> None:
    s = suite.sync(chats=3, per_chat=10)
    assert (s["messages"], s["chats"], s["lost"], s["duplicated"], s["out_of_order"]) == (30, 3, 0, 0, 0)
    p = suite.persist(connections=2, seconds=0.5, repeats=2)
    assert p["acked"] == p["sent"] > 0 and (p["lost"], p["duplicated"], p["errors"]) == (0, 0, 0)


def test_the_naive_baseline_speaks_enough_protocol_for_the_suite() -> None:
    r = suite.fanout("naive", receivers=5, messages=50)
    assert (r["deliveries"], r["lost"], r["duplicated"], r["out_of_order"]) == (250, 0, 0, 0)


def test_the_persist_check_finds_a_message_the_store_lost_or_changed() -> None:
    def body(t: suite.Target, ids: list[str], chats: list[str]) -> dict[str, Any]:
        acks = t.data / "acks.tsv"
        groups = [{"chat_id": c, "members": [t.token[ids[i]]]} for i, c in enumerate(chats)]
        # A content sample larger than the run: every ack's content is checked.
        run = suite.run_loadgen(
            t.plan("persist", groups=groups, seconds=0.3, window=8, acks_file=str(acks), verify_sample=10**6)
        )
        t.stop()
        senders = {c: ids[i] for i, c in enumerate(chats)}
        clean = suite.verify_persist(t.data / "pychat.db", [run], [acks], senders)
        db = sqlite3.connect(t.data / "pychat.db")
        with db:
            db.execute("DELETE FROM messages WHERE seq = 2")
            db.execute("UPDATE messages SET content = 'other' WHERE seq = 3")
        db.close()
        return {
            "clean": clean,
            "tampered": suite.verify_persist(t.data / "pychat.db", [run], [acks], senders),
        }

    r = suite.with_target("pychat", 2, [[0], [1]], 0, body)
    assert r["clean"]["problems"] == [] and r["clean"]["checked_present"] == r["clean"]["acked"] > 4
    problems = " | ".join(r["tampered"]["problems"])
    assert "the store holds" in problems and "no matching row" in problems and "other content" in problems


def test_idle_with_chats_syncs_every_connection() -> None:
    r = suite.idle("pychat", 20, 0.5, groups_per_user=2, group_size=10, messages=3)
    assert (r["connected"], r["synced"], r["synced_chats"], r["synced_messages"]) == (20, 20, 40, 120)
    assert (r["lost"], r["duplicated"], r["out_of_order"], r["errors"]) == (0, 0, 0, 0)
