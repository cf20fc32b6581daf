"""The benchmark suite's tools work: the compiled load generator against a real
server, with its own loss/duplicate/order accounting (tiny sizes; `make
bench-quick` and `make bench` run them for figures)."""

from __future__ import annotations

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
