"""The suite's persist and sync scenarios and a history-page scenario, on a pychat server on
SQLite and on one on Cassandra (issue 12), with the driver floor for the persist's rows
measured right after on the same Cassandra node.

- persist: the Rust load generator's `persist` scenario (one sender per chat, 64 sends in
  flight each, over WebSocket); every ack is then checked against the store (read back through
  `pychat.store`: each acked (chat, seq) holds its message id and key, no other rows, each chat's
  last seq is its last ack).
- history: `GET /api/chats/{id}/messages?before=SEQ&limit=50` over one keep-alive connection,
  random pages of chats of `--history-messages` messages each; p50 and p99 of the client's time.
- sync: the generator's `sync` scenario: a user comes back to 100 chats of 100 missed messages
  (10,000), time to `synced` with every message once and in order.
- floor (Cassandra): `store_bench.driver_floor` with the persist run's acked rows: as many
  chats, rows and engine batches of the server's mean size, the issue's plain loop and the
  grouped one.

    .venv/bin/python benchmarks/store_server.py [--quick]

Needs the load generator (`make loadgen`) and the extension (`make build`); starts its own
Cassandra node and stops it. Writes benchmarks/results/store_server-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import Code, one, record, server_code, tree_code  # noqa: E402
from benchmarks.store_bench import CONTENT, append_all, driver_floor, own_node, percentile  # noqa: E402
from benchmarks.suite import SOURCE_IPS, UNLIMITED, mean_batch_events, run_loadgen  # noqa: E402
from pychat import _core  # noqa: E402
from pychat.store import Chat, SendRequest, User, open_store  # noqa: E402
from pychat.store.cassandra import CassandraStore  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

SECRET = "store-server-bench-secret-0123456789"
SERVERS: list[Code] = []


def populate(
    url: str, tmp: Path, users: int, chats: dict[str, list[int]], messages: dict[str, int]
) -> list[str]:
    """Users u0..u{users-1} and the chats (chat id -> member numbers), each filled with its
    `messages` count through the store (as a server would have written them)."""
    store = open_store(url, tmp)
    try:
        ids = [f"u{i:05d}" for i in range(users)]
        for u in ids:
            store.create_user(User(u, u, None, "hash", 1))
        for chat_id, members in chats.items():
            store.create_chat(
                Chat(chat_id, "group", "bench", ids[members[0]], 1, 0, [ids[m] for m in members]), None
            )
        for chat_id, count in messages.items():
            sender = ids[chats[chat_id][0]]
            for start in range(0, count, 500):
                append_all(
                    store,
                    [
                        SendRequest(sender, chat_id, f"pre{i}", CONTENT, [])
                        for i in range(start, min(count, start + 500))
                    ],
                )
        return ids
    finally:
        store.close()


def server(url: str, data: Path) -> ServerProcess:
    srv = ServerProcess(data, env={**UNLIMITED, "PYCHAT_STORE": url, "PYCHAT_SECRET_KEY": SECRET})
    srv.start()
    assert srv.proc is not None
    SERVERS.append(server_code(srv.proc.pid))
    return srv


def token(user_id: str) -> str:
    return _core.sign_token(SECRET.encode(), user_id, int(time.time() * 1000) + 3_600_000)


def persist(url: str, tmp: Path, chats: int, seconds: float) -> tuple[dict[str, Any], int]:
    chat_ids = {f"p{c:04d}": [c] for c in range(chats)}
    ids = populate(url, tmp, chats, chat_ids, {})
    srv = server(url, tmp)
    acks = tmp / "acks.tsv"
    try:
        plan = {
            "scenario": "persist",
            "server": f"127.0.0.1:{srv.ws_port}",
            "source_ips": SOURCE_IPS,
            "groups": [{"chat_id": c, "members": [token(ids[m[0]])]} for c, m in chat_ids.items()],
            "seconds": seconds,
            "window": 64,
            "acks_file": str(acks),
            "verify_sample": 1000,
        }
        out = run_loadgen(plan)
        batch = round(mean_batch_events(srv.url))
    finally:
        srv.stop()
    out.pop("chats", None)
    out["mean_batch_events"] = batch
    out["verify"] = verify(url, tmp, acks, {c: ids[m[0]] for c, m in chat_ids.items()})
    return out, batch


def verify(url: str, tmp: Path, acks: Path, senders: dict[str, str]) -> dict[str, Any]:
    """Every ack against the store, read back through `pychat.store`."""
    acked: dict[str, dict[int, tuple[str, str, str]]] = {c: {} for c in senders}
    for line in acks.read_text().splitlines():
        chat_id, seq, message_id, key, content = line.split("\t")
        acked[chat_id][int(seq)] = (message_id, key, content)
    problems: list[str] = []
    store = open_store(url, tmp)
    stored = checked_content = 0
    try:
        for chat_id, by_seq in acked.items():
            rows, after = [], 0
            while True:
                page = store.messages_after(chat_id, after, 1000)
                rows += page
                if len(page) < 1000:
                    break
                after = page[-1][1]
            stored += len(rows)
            if [r[1] for r in rows] != sorted(by_seq):
                problems.append(f"chat {chat_id}: stored seqs are not the acked seqs")
            for r in rows:
                want = by_seq.get(r[1])
                if want is None or (r[2], r[7], r[3]) != (want[0], want[1], senders[chat_id]):
                    problems.append(f"chat {chat_id} seq {r[1]}: {r[2:4]} is not the ack {want}")
                elif want[2]:
                    checked_content += 1
                    if r[4] != want[2]:
                        problems.append(f"chat {chat_id} seq {r[1]}: other content")
            chat = store.get_chat(chat_id)
            if chat is None or chat.last_seq != max(by_seq, default=0):
                problems.append(f"chat {chat_id}: last_seq {chat and chat.last_seq} is not its last ack")
    finally:
        store.close()
    acked_n = sum(len(v) for v in acked.values())
    if stored != acked_n:
        problems.append(f"the store holds {stored} messages, {acked_n} were acked")
    return {"acked": acked_n, "stored": stored, "checked_content": checked_content, "problems": problems[:10]}


def history(url: str, tmp: Path, chats: int, per_chat: int, pages: int) -> dict[str, Any]:
    chat_ids = {f"h{c:04d}": [0, 1] for c in range(chats)}
    ids = populate(url, tmp, 2, chat_ids, dict.fromkeys(chat_ids, per_chat))
    srv = server(url, tmp)
    rng = random.Random(5)
    times = []
    try:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token(ids[1])}"}) as client:
            for i in range(pages + pages // 10):
                chat_id = rng.choice(list(chat_ids))
                before = rng.randint(51, per_chat + 1)
                started = time.perf_counter()
                r = client.get(f"/api/chats/{chat_id}/messages", params={"before": before, "limit": 50})
                took = (time.perf_counter() - started) * 1000
                r.raise_for_status()
                seqs = [m["seq"] for m in r.json()["messages"]]
                if seqs != list(range(before - 50, before)):
                    raise AssertionError(f"page before {before} of {chat_id}: {seqs[:3]}...")
                if i >= pages // 10:  # the first tenth warms up
                    times.append(took)
    finally:
        srv.stop()
    return {
        "chats": chats,
        "messages_per_chat": per_chat,
        "pages": len(times),
        "limit": 50,
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(percentile(times, 0.99), 3),
    }


def sync(url: str, tmp: Path, chats: int, per_chat: int) -> dict[str, Any]:
    chat_ids = {f"s{c:04d}": [0, 1] for c in range(chats)}
    ids = populate(url, tmp, 2, chat_ids, dict.fromkeys(chat_ids, per_chat))
    srv = server(url, tmp)
    try:
        plan = {
            "scenario": "sync",
            "server": f"127.0.0.1:{srv.ws_port}",
            "source_ips": SOURCE_IPS,
            "tokens": [token(ids[1])],
            "expected": dict.fromkeys(chat_ids, per_chat),
        }
        return run_loadgen(plan)
    finally:
        srv.stop()


def floor(url: str, tmp: Path, chats: int, rows: int, batch: int) -> dict[str, Any]:
    """The persist run's rows (as many, over as many chats, in engine batches of its mean
    size) written by the driver alone: the plain loop and the grouped one."""
    store = open_store(url, tmp)
    assert isinstance(store, CassandraStore)
    try:
        rng = random.Random(9)
        sends = [SendRequest("u", f"p{rng.randrange(chats):04d}", f"f{i}", CONTENT, []) for i in range(rows)]
        batches = [sends[i : i + max(batch, 1)] for i in range(0, rows, max(batch, 1))]
        return {
            "plain": driver_floor(store, batches, grouped=False),
            "grouped": driver_floor(store, batches, grouped=True),
        }
    finally:
        store.close()


def run(url: str, tmp: Path, args: argparse.Namespace, cassandra: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in args.scenarios.split(","):
        part = tmp / name
        part.mkdir()
        # Each scenario on a keyspace (or file) of its own.
        where = f"{url}_{name}" if cassandra else f"sqlite://{part / 'pychat.db'}"
        if name == "persist":
            out["persist"], batch = persist(where, part, args.chats, args.seconds)
            if cassandra:
                out["floor"] = floor(where, part, args.chats, out["persist"]["acked"], batch)
                out["persist"]["ratio_to_floor"] = round(
                    out["persist"]["acked_per_s"] / out["floor"]["plain"]["msgs_per_s"], 3
                )
                out["persist"]["ratio_to_floor_grouped"] = round(
                    out["persist"]["acked_per_s"] / out["floor"]["grouped"]["msgs_per_s"], 3
                )
        elif name == "history":
            out["history"] = history(where, part, 20, args.history_messages, args.pages)
        else:
            out["sync"] = sync(where, part, 100, 100)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chats", type=int, default=64, help="persist: chats, one sender each")
    ap.add_argument("--seconds", type=float, default=10.0, help="persist: seconds of sending")
    ap.add_argument("--history-messages", type=int, default=2000)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--only", default="sqlite,cassandra", help="stores")
    ap.add_argument("--scenarios", default="persist,history,sync")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.history_messages, args.pages = 3.0, 500, 500
    results: dict[str, Any] = {"params": vars(args), "content_bytes": len(CONTENT)}
    with tempfile.TemporaryDirectory(prefix="store-server-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "sqlite" in args.only:
            (tmp / "sqlite").mkdir()
            results["sqlite"] = run("", tmp / "sqlite", args, cassandra=False)
        if "cassandra" in args.only:
            with own_node(tmp / "node") as node:
                (tmp / "cassandra").mkdir()
                url = f"cassandra://{node.host}:{node.port}/bench"
                results["cassandra"] = run(url, tmp / "cassandra", args, cassandra=True)
                results["cassandra_node"] = {"commitlog_sync": "group", "heap_mb": node.heap_mb}
    path = record("store_server", results, one(SERVERS) if SERVERS else tree_code(ROOT))
    print(json.dumps({k: v for k, v in results.items() if k in ("sqlite", "cassandra")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
