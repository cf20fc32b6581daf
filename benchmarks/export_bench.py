"""Export (issue 15) on SQLite, measured on this machine: rows/s of a chat's history exported
to Parquet, Arrow IPC and JSON lines through pychat's exporter (what GET /api/chats/{id}/export
runs, without HTTP), against the floor measured in the same run: pyarrow writing the same rows
to Parquet / Arrow from a table already in memory. Then the operators' path on the same chat:
`pychat export` into a folder, `pychat verify` of that folder (every chain value recomputed) and
`pychat import` of it into an empty SQLite store, each in messages/s.

    .venv/bin/python benchmarks/export_bench.py            # one chat of 1,000,000 messages
    .venv/bin/python benchmarks/export_bench.py --quick    # 100,000

Writes benchmarks/results/export-<time>.json.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import pychat.store as store_module  # noqa: E402
from benchmarks.results import imported_code, record  # noqa: E402
from pychat.archive import export_chats, import_export  # noqa: E402
from pychat.export import PAGE, SCHEMA, ChatExport, record_batch  # noqa: E402
from pychat.store import Chat, SendRequest, Store, User, open_store  # noqa: E402
from pychat.verify import verify_export  # noqa: E402

BATCH = 2_000


def fill(store: Store, messages: int) -> str:
    for u in ("ua", "ub"):
        store.create_user(User(u, u, None, "hash", 1))
    store.create_chat(Chat("c1", "group", None, "ua", 1, 0, ["ua", "ub"]), None)
    for start in range(0, messages, BATCH):
        sends = [
            SendRequest(
                "ua" if i % 2 else "ub",
                "c1",
                f"k{i:09d}",
                f"message {i}: the quick brown fox, naïve café",
                [],
            )
            for i in range(start, min(messages, start + BATCH))
        ]
        store.append_batch(sends, [])
    return "c1"


def exported(store: Store, chat_id: str, fmt: str, pool: ThreadPoolExecutor) -> tuple[float, int]:
    """Seconds to export the whole chat, and the bytes written."""
    started = time.perf_counter()
    export = ChatExport(store, chat_id, fmt, 0, pool)
    size = 0
    while not export._done:
        size += len(export._next_chunk())
    return time.perf_counter() - started, size


def floor(table: pa.Table, fmt: str) -> float:
    """Seconds for pyarrow to write a table already in memory."""
    sink = io.BytesIO()
    started = time.perf_counter()
    if fmt == "parquet":
        pq.write_table(table, sink, compression="zstd", row_group_size=PAGE)
    else:
        with pa.ipc.new_stream(sink, SCHEMA) as writer:
            writer.write_table(table, max_chunksize=PAGE)
    return time.perf_counter() - started


def folder_path(store: Store, chat_id: str, messages: int, tmp: Path) -> dict[str, Any]:
    """`pychat export` / `verify` / `import` of the chat, once each: messages/s."""
    out = tmp / "folder"
    started = time.perf_counter()
    export_chats(store, [(chat_id, messages)], out, progress=False)
    exported_s = time.perf_counter() - started
    started = time.perf_counter()
    report = verify_export(out)
    verified_s = time.perf_counter() - started
    assert report.ok and report.messages == messages, report.as_json()
    target = open_store("", tmp / "imported")
    try:
        started = time.perf_counter()
        summary = import_export(target, out, progress=False)
        imported_s = time.perf_counter() - started
    finally:
        target.close()
    assert summary.messages == messages
    return {
        "export_per_s": round(messages / exported_s),
        "verify_per_s": round(messages / verified_s),
        "import_per_s": round(messages / imported_s),
        "note": "import verifies the folder first: its rate includes a verify",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.messages, args.repeats = 100_000, 1
    results: dict[str, Any] = {"settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1) as pool:
        store = open_store("", Path(tmp))
        chat_id = fill(store, args.messages)
        rows = store.chained_after(chat_id, 0, args.messages)
        table = pa.Table.from_batches([record_batch(rows[i : i + PAGE]) for i in range(0, len(rows), PAGE)])
        del rows
        for fmt in ("parquet", "arrow", "jsonl"):
            runs = [exported(store, chat_id, fmt, pool) for _ in range(args.repeats)]
            seconds = statistics.median(r[0] for r in runs)
            out: dict[str, Any] = {
                "seconds": [round(r[0], 3) for r in runs],
                "bytes": runs[0][1],
                "rows_per_s": round(args.messages / seconds),
            }
            if fmt != "jsonl":
                floors = [floor(table, fmt) for _ in range(args.repeats)]
                out["floor_seconds"] = [round(f, 3) for f in floors]
                out["floor_rows_per_s"] = round(args.messages / statistics.median(floors))
                out["vs_floor"] = round(out["rows_per_s"] / out["floor_rows_per_s"], 3)
            results[fmt] = out
        results["folder"] = folder_path(store, chat_id, args.messages, Path(tmp))
        store.close()
    record("export", results, imported_code(store_module))


if __name__ == "__main__":
    main()
