"""An export folder as files: its layout, the watermark, and the chats' part files in seq order.
Shared by `pychat.archive` (export, import) and `pychat.verify`, which import nothing of each other.

    OUT/chat=<chat_id>/day=<YYYY-MM-DD>/part-<first seq>-<last seq>.parquet
    OUT/_watermark.json     {chat_id: {"seq", "chain", "at"}}
    OUT/_chats.jsonl, OUT/_users.jsonl
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from pychat.export import PAGE, SCHEMA

WATERMARK = "_watermark.json"
CHATS = "_chats.jsonl"
USERS = "_users.jsonl"


@dataclass(frozen=True)
class Mark:
    """How far a chat is exported: its last seq and that message's chain value, and when the last
    run that exported (or found nothing new in) the chat started, in ms: every message the store
    held then is in the export (what `pychat verify --against-store` checks)."""

    seq: int
    chain: str | None = None
    at: int | None = None


def read_watermark(out: Path) -> dict[str, Mark]:
    path = out / WATERMARK
    if not path.exists():
        return {}
    value = json.loads(path.read_text())
    # Written before chain values: a bare seq.
    return {
        str(k): Mark(int(v))
        if isinstance(v, int)
        else Mark(int(v["seq"]), v.get("chain"), int(v["at"]) if v.get("at") is not None else None)
        for k, v in value.items()
    }


def write_watermark(out: Path, marks: dict[str, Mark]) -> None:
    write_durably(
        out / WATERMARK,
        json.dumps(
            {c: {"seq": m.seq, "chain": m.chain, "at": m.at} for c, m in sorted(marks.items())}, indent=1
        ),
    )


def write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dataset_chats(out: Path) -> dict[str, list[Path]]:
    """Each chat in an export folder and its part files in seq order."""
    chats: dict[str, list[Path]] = {}
    for folder in sorted(out.glob("chat=*")):
        parts = sorted(folder.glob("day=*/part-*.parquet"), key=lambda p: p.name)
        chats[unquote(folder.name.removeprefix("chat="))] = parts
    return chats


def chat_batches(parts: list[Path]) -> Iterator[pa.RecordBatch]:
    """A chat's exported messages, file after file, a record batch at a time."""
    for path in parts:
        yield from pq.ParquetFile(path).iter_batches(batch_size=PAGE, columns=SCHEMA.names)
