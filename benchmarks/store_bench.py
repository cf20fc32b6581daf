"""The stores side by side (issue 12): persist, history pages and a returning user's sync on
SQLite and on Cassandra, each through pychat's `Store` (what the engine and REST call), beside a
floor measured in the same run: a plain scylla-driver loop writing the same message rows with the
same consistency and none of the guarantees (no fence, no idempotency keys, no checks), one INSERT
per row as the issue defines it, and the same rows grouped as pychat groups them (a stricter floor).
On Cassandra persist runs in rounds (floor, grouped floor, pychat) after a warm-up; medians.

    .venv/bin/python benchmarks/store_bench.py            # 200,000 messages per store
    .venv/bin/python benchmarks/store_bench.py --quick    # 20,000

Starts its own Cassandra node (services/cassandra.py) in a temporary directory and stops it.
Writes benchmarks/results/store_bench-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cassandra.concurrent import execute_concurrent  # noqa: E402
from cassandra.query import BatchStatement, BatchType  # noqa: E402

import pychat.store as store_module  # noqa: E402
from benchmarks.results import imported_code, record  # noqa: E402
from pychat.gateway import Stored  # noqa: E402
from pychat.store import Chat, SendRequest, Store, User, open_store  # noqa: E402
from pychat.store.cassandra import CONCURRENCY, CassandraStore, bucket_of  # noqa: E402
from pychat.sync import PAGE_ROWS  # noqa: E402
from services.cassandra import CassandraServer  # noqa: E402

CONTENT = "x" * 100  # bytes of content per message


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def populate(store: Store, users: int, chats: int, per_chat: int) -> tuple[list[str], dict[str, list[str]]]:
    """Users and group chats of `per_chat` members each."""
    ids = [f"u{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(users)]
    for u in ids:
        store.create_user(User(u, u, None, "hash", 1))
    rng = random.Random(7)
    members: dict[str, list[str]] = {}
    for c in range(chats):
        chat_id = f"c{c:05d}-{uuid.uuid4().hex[:6]}"
        who = rng.sample(ids, per_chat)
        store.create_chat(Chat(chat_id, "group", "bench", who[0], 1, 0, who), None)
        members[chat_id] = who
    return ids, members


def plan(members: dict[str, list[str]], messages: int, batch: int, seed: int) -> list[list[SendRequest]]:
    """Batches of sends to random chats from random members, with time-ordered keys."""
    rng = random.Random(seed)
    chats = list(members)
    out, n = [], 0
    while n < messages:
        size = min(batch, messages - n)
        sends = []
        for _ in range(size):
            chat_id = rng.choice(chats)
            sends.append(SendRequest(rng.choice(members[chat_id]), chat_id, f"k{seed}-{n:010d}", CONTENT, []))
            n += 1
        out.append(sends)
    return out


def persist(store: Store, batches: list[list[SendRequest]]) -> dict[str, Any]:
    """Appends the batches; every result must be a new `Stored` with gap-free seqs per chat."""
    last: dict[str, int] = defaultdict(int)
    for chat in {s.chat_id for b in batches for s in b}:
        got = store.get_chat(chat)
        last[chat] = got.last_seq if got else 0
    started = time.perf_counter()
    errors = 0
    for sends in batches:
        results, _ = store.append_batch(sends, [])
        for s, r in zip(sends, results, strict=True):
            if not isinstance(r, Stored) or r.duplicate or r.seq != last[s.chat_id] + 1:
                errors += 1
                continue
            last[s.chat_id] = r.seq
    elapsed = time.perf_counter() - started
    n = sum(len(b) for b in batches)
    return {"messages": n, "seconds": round(elapsed, 3), "msgs_per_s": round(n / elapsed), "errors": errors}


def history_pages(store: Store, members: dict[str, list[str]], pages: int) -> dict[str, Any]:
    rng = random.Random(11)
    chats = [c for c in members if (store.get_chat(c) or Chat("", "", None, "", 0, 0)).last_seq > 60]
    times = []
    for _ in range(pages):
        chat_id = rng.choice(chats)
        last = store.get_chat(chat_id).last_seq  # type: ignore[union-attr]
        before = rng.randint(51, last + 1)
        started = time.perf_counter()
        page, _ = store.history(chat_id, before, None, 50)
        times.append((time.perf_counter() - started) * 1000)
        assert [m["seq"] for m in page] == list(range(before - 50, before)), "a full page in order"
    return {
        "pages": pages,
        "limit": 50,
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(percentile(times, 0.99), 3),
    }


def append_all(store: Store, sends: list[SendRequest]) -> None:
    """Appends the sends, like a client: what was refused (a store timeout) is sent again."""
    for _ in range(10):
        results, _ = store.append_batch(sends, [])
        sends = [s for s, r in zip(sends, results, strict=True) if not isinstance(r, Stored)]
        if not sends:
            return


def sync_missed(store: Store, chats: int, per_chat: int) -> dict[str, Any]:
    """A user in `chats` chats comes back to `per_chat` new messages in each: the store reads of a
    sync answer (pychat/sync.py: the chat list, then pages of `PAGE_ROWS`)."""
    reader = f"r-{uuid.uuid4().hex[:8]}"
    writer = f"w-{uuid.uuid4().hex[:8]}"
    for u in (reader, writer):
        store.create_user(User(u, u, None, "hash", 1))
    chat_ids = []
    for c in range(chats):
        chat_id = f"s{c:04d}-{uuid.uuid4().hex[:6]}"
        store.create_chat(Chat(chat_id, "group", "sync", writer, 1, 0, [writer, reader]), None)
        chat_ids.append(chat_id)
    for start in range(0, per_chat, 50):
        append_all(
            store, [SendRequest(writer, c, f"s{start + i}", CONTENT, []) for c in chat_ids for i in range(50)]
        )
    started = time.perf_counter()
    rows = 0
    for chat_id, cursor, last in store.sync_chats(reader, {}):
        while last > cursor:
            page = store.messages_after(chat_id, cursor, PAGE_ROWS)
            rows += len(page)
            if page:
                cursor = page[-1][1]
            if len(page) < PAGE_ROWS:
                break
    elapsed = time.perf_counter() - started
    out: dict[str, Any] = {"chats": chats, "missed": rows, "seconds": round(elapsed, 3)}
    if rows != chats * per_chat:
        out["error"] = f"{chats * per_chat - rows} of {chats * per_chat} messages were not stored or not read"
    return out


def driver_floor(store: CassandraStore, batches: list[list[SendRequest]], grouped: bool) -> dict[str, Any]:
    """The same message rows as pychat writes, with the same driver, consistency and concurrency,
    and nothing else: no fence, no keys, no checks. `grouped=False` is the issue's plain loop (one
    INSERT per row); `grouped=True` writes them as pychat's fenced batches are cut (one unlogged
    batch per chat and bucket per engine batch), the stricter reference."""
    session = store.session
    session.execute(
        "CREATE TABLE IF NOT EXISTS floor_messages (chat_id text, bucket bigint, seq bigint, message_id text,"
        " sender_id text, content text, attachments text, created_at bigint, client_msg_id text,"
        " PRIMARY KEY ((chat_id, bucket), seq))"
    )
    insert = session.prepare(
        "INSERT INTO floor_messages (chat_id, bucket, seq, message_id, sender_id, content, attachments,"
        " created_at, client_msg_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    last = driver_floor_last
    started = time.perf_counter()
    for sends in batches:
        groups: dict[tuple[str, int], list[tuple[Any, ...]]] = defaultdict(list)
        for s in sends:
            last[s.chat_id] += 1
            seq = last[s.chat_id]
            row = (
                s.chat_id,
                bucket_of(seq),
                seq,
                f"m-{s.chat_id}-{seq}",
                s.sender_id,
                s.content,
                "[]",
                1,
                s.client_msg_id,
            )
            groups[(s.chat_id, bucket_of(seq))].append(row)
        statements: list[tuple[Any, Any]] = []
        for rows in groups.values():
            if grouped:
                b = BatchStatement(batch_type=BatchType.UNLOGGED)
                for r in rows:
                    b.add(insert, r)
                statements.append((b, ()))
            else:
                statements.extend((insert, r) for r in rows)
        for ok, result in execute_concurrent(session, statements, concurrency=CONCURRENCY):
            if not ok:
                raise result
    elapsed = time.perf_counter() - started
    n = sum(len(b) for b in batches)
    return {
        "messages": n,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(n / elapsed),
        "ms_per_engine_batch": round(elapsed / len(batches) * 1000, 3),
    }


# The floor's own seqs per chat, across its runs (its rows go to their own table).
driver_floor_last: dict[str, int] = defaultdict(int)


def timed_fence(store: CassandraStore) -> dict[str, float]:
    """Times the store's fenced writes (its keys go beside them) while persist runs."""
    fence: dict[str, float] = {"calls": 0, "chats": 0, "seconds": 0.0}
    original = CassandraStore._fenced_writes

    def timed(chats: dict[str, tuple[int, list[tuple[Any, ...]]]]) -> dict[str, int | None]:
        started = time.perf_counter()
        try:
            return original(store, chats)
        finally:
            fence["calls"] += 1
            fence["chats"] += len(chats)
            fence["seconds"] += time.perf_counter() - started

    store._fenced_writes = timed  # type: ignore[method-assign]
    return fence


def cassandra_persist(
    store: CassandraStore, members: dict[str, list[str]], args: argparse.Namespace
) -> dict[str, Any]:
    """Rounds of: the plain floor, the grouped floor, pychat, each on its own plan of the same
    shape, after a warm-up of each (the JVM compiles as it goes). Medians over the rounds."""
    persist(store, plan(members, args.messages // 2, args.batch, seed=1))
    driver_floor(store, plan(members, args.messages // 4, args.batch, seed=2), grouped=False)
    driver_floor(store, plan(members, args.messages // 4, args.batch, seed=3), grouped=True)
    fence = timed_fence(store)
    rounds = []
    for r in range(args.rounds):
        floor = driver_floor(store, plan(members, args.messages, args.batch, seed=10 + r), grouped=False)
        floor_grouped = driver_floor(
            store, plan(members, args.messages, args.batch, seed=20 + r), grouped=True
        )
        before = dict(fence)
        batches = plan(members, args.messages, args.batch, seed=30 + r)
        ours = persist(store, batches)
        fence_s = fence["seconds"] - before["seconds"]
        ours["fenced_writes_ms_per_engine_batch"] = round(fence_s / len(batches) * 1000, 3)
        ours["fenced_chat_batches_per_engine_batch"] = round(
            (fence["chats"] - before["chats"]) / len(batches), 1
        )
        rounds.append(
            {
                "pychat": ours,
                "floor": floor,
                "floor_grouped": floor_grouped,
                "ratio_to_floor": round(ours["msgs_per_s"] / floor["msgs_per_s"], 3),
                "ratio_to_floor_grouped": round(ours["msgs_per_s"] / floor_grouped["msgs_per_s"], 3),
                # The fenced batches carry the same rows as the grouped floor's batches: the
                # difference is what the condition (a Paxos round) and the keys beside it cost.
                "fence_ms_per_engine_batch": round(
                    ours["fenced_writes_ms_per_engine_batch"] - floor_grouped["ms_per_engine_batch"], 3
                ),
            }
        )
    del store._fenced_writes  # the class's again

    def median(*path: str) -> float:
        values = []
        for one in rounds:
            v: Any = one
            for p in path:
                v = v[p]
            values.append(v)
        return float(statistics.median(values))

    return {
        "rounds": rounds,
        "median": {
            "pychat_msgs_per_s": median("pychat", "msgs_per_s"),
            "floor_msgs_per_s": median("floor", "msgs_per_s"),
            "floor_grouped_msgs_per_s": median("floor_grouped", "msgs_per_s"),
            "ratio_to_floor": median("ratio_to_floor"),
            "ratio_to_floor_grouped": median("ratio_to_floor_grouped"),
            "fenced_writes_ms_per_engine_batch": median("pychat", "fenced_writes_ms_per_engine_batch"),
            "floor_grouped_ms_per_engine_batch": median("floor_grouped", "ms_per_engine_batch"),
            "fence_ms_per_engine_batch": median("fence_ms_per_engine_batch"),
        },
    }


def run_store(url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    store = open_store(url, tmp)
    try:
        _, members = populate(store, args.users, args.chats, 10)
        out: dict[str, Any] = {}
        if isinstance(store, CassandraStore):
            out["persist"] = cassandra_persist(store, members, args)
        else:
            persist(store, plan(members, min(args.messages // 10, 5_000), args.batch, seed=1))
            out["persist"] = persist(store, plan(members, args.messages, args.batch, seed=2))
        out["history"] = history_pages(store, members, args.pages)
        out["sync"] = sync_missed(store, 100, args.sync_per_chat)
        return out
    finally:
        store.close()


@contextlib.contextmanager
def own_node(directory: Path) -> Iterator[CassandraServer]:
    """A Cassandra node of this run's own in `directory`, on free ports; stopped at the end."""
    node = CassandraServer.on_free_ports(directory)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1024, help="sends per engine batch")
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--chats", type=int, default=1_000)
    ap.add_argument("--pages", type=int, default=2_000)
    ap.add_argument("--sync-per-chat", type=int, default=100, help="missed messages per chat (100 chats)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="persist rounds on Cassandra (floor, grouped floor, pychat)"
    )
    ap.add_argument("--only", default="sqlite,cassandra")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.users, args.chats, args.pages = 20_000, 500, 200, 300
    results: dict[str, Any] = {"params": vars(args), "content_bytes": len(CONTENT)}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "sqlite" in args.only:
            results["sqlite"] = run_store(f"sqlite://{tmp / 'bench.db'}", tmp, args)
        if "cassandra" in args.only:
            with own_node(tmp / "cassandra") as node:
                url = f"cassandra://{node.host}:{node.port}/bench"
                results["cassandra"] = run_store(url, tmp, args)
                results["cassandra_node"] = {"commitlog_sync": "group", "heap_mb": node.heap_mb}
    record("store_bench", results, imported_code(store_module))


if __name__ == "__main__":
    main()
