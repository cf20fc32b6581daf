"""The SQLite store alone, in the persist shape (64 chats, batches of 1,024 sends, each store
growing to N messages), once per kind of client_msg_id, in the same run:

- `time_ordered`: what the SDK and REST generate (`pychat.ids.new_id`: a millisecond
  timestamp, then random bits), so each (chat, sender)'s keys arrive in index order;
- `counter`: "<run>-<n, zero-padded>" like the compiled load generator;
- `uuid4`: random keys, what the SDK generated before: the baseline.

Durable msgs/s (synchronous=FULL, one transaction per batch) overall and for the last
tenth (the grown store), so the ratio shows what a key's order costs the idempotency index.

    .venv/bin/python benchmarks/store_keys.py            # 600,000 messages per kind
    .venv/bin/python benchmarks/store_keys.py --quick    # 100,000

To measure another commit's store, put its tree on PYTHONPATH:
`PYTHONPATH=/path/to/worktree .venv/bin/python benchmarks/store_keys.py`. The results record
the commit of the tree the store was imported from (and whether it had uncommitted changes),
not this checkout's.

Writes benchmarks/results/store_keys-<time>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.results import imported_code, record  # noqa: E402

# This checkout is the harness; the store measured is pychat as PYTHONPATH (or the venv) finds it.
sys.path.remove(str(ROOT))
from pychat.ids import new_id  # noqa: E402
from pychat.store import Chat, SendRequest, User  # noqa: E402
from pychat.store import sqlite as sqlite_store  # noqa: E402
from pychat.store.sqlite import SqliteStore  # noqa: E402


def _new(result: Any) -> bool:
    """A newly stored message, in either shape a measured tree answers with: the tagged tuples of
    commits before 1b46d6b, or the bridge's `Stored` objects since."""
    if isinstance(result, tuple):
        return bool(result[0] == "stored" and not result[5])
    return type(result).__name__ == "Stored" and not result.duplicate


CHATS = 64
BATCH = 1024
CONTENT = "x" * 64


def run(kind: str, key: Callable[[int], str], total: int) -> dict[str, Any]:
    scratch = Path.home() / ".cache" / "pychat" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(dir=scratch))
    try:
        store = SqliteStore(data / "store.db")
        users = [new_id("u") for _ in range(CHATS)]
        chats = [new_id("c") for _ in range(CHATS)]
        for user, chat in zip(users, chats, strict=True):
            store.create_user(User(user, user, None, "scrypt$x", 1))
            store.create_chat(Chat(chat, "group", None, user, 1, 0, [user]), None)
        sent, segments = 0, []
        segment = max(total // 10, BATCH)
        seg_start, seg_sent = time.perf_counter(), 0
        started = seg_start
        while sent < total:
            sends = [
                SendRequest(users[i % CHATS], chats[i % CHATS], key(sent + i), CONTENT, [])
                for i in range(BATCH)
            ]
            results, _ = store.append_batch(sends, [])
            assert all(_new(r) for r in results), "every send is new"
            sent += BATCH
            if sent - seg_sent >= segment:
                now = time.perf_counter()
                segments.append(round((sent - seg_sent) / (now - seg_start)))
                seg_start, seg_sent = now, sent
        seconds = time.perf_counter() - started
        store.close()
        db_bytes = sum(f.stat().st_size for f in data.iterdir())
        return {
            "client_msg_id": kind,
            "example": key(0),
            "messages": sent,
            "durable_msgs_per_s": round(sent / seconds),
            "last_tenth_msgs_per_s": segments[-1] if segments else None,
            "per_tenth_msgs_per_s": segments,
            "bytes_per_message": round(db_bytes / sent),
        }
    finally:
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, default=0)
    args = ap.parse_args()
    total = args.messages or (100_000 if args.quick else 600_000)
    kinds: dict[str, Callable[[int], str]] = {
        "time_ordered": lambda n: new_id(""),
        "counter": lambda n: f"r1-{n:012d}",
        "uuid4": lambda n: uuid.uuid4().hex,
    }
    runs = [run(kind, key, total) for kind, key in kinds.items()]
    base = runs[-1]
    for r in runs:
        r["ratio_to_uuid4"] = round(r["durable_msgs_per_s"] / base["durable_msgs_per_s"], 2)
        print(r, flush=True)
    record(
        "store_keys",
        {"chats": CHATS, "batch": BATCH, "content_bytes": len(CONTENT), "runs": runs},
        imported_code(sqlite_store),
    )


if __name__ == "__main__":
    main()
