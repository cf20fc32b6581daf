"""`pychat export`: chats' histories into Parquet files for operators, partitioned by chat and by
day, incremental from a watermark file, so a nightly job copies only what is new.

    OUT/chat=<chat_id>/day=<YYYY-MM-DD>/part-<first seq>-<last seq>.parquet
    OUT/_watermark.json     {chat_id: last exported seq}

Readable as one dataset: `pyarrow.dataset.dataset(OUT, partitioning="hive")`. The watermark is
written last (after the files are durable), so an interrupted run is repeated from where the
previous one ended (part files are named by their seqs: written again, never twice).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pychat.export import batches_of, by_day
from pychat.store import Store

WATERMARK = "_watermark.json"


@dataclass
class ExportSummary:
    chats: int = 0
    messages: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        rate = round(self.messages / self.seconds) if self.seconds else 0
        return {
            "chats": self.chats,
            "messages": self.messages,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 2),
            "messages_per_s": rate,
        }


def read_watermark(out: Path) -> dict[str, int]:
    path = out / WATERMARK
    if not path.exists():
        return {}
    value = json.loads(path.read_text())
    return {str(k): int(v) for k, v in value.items()}


def write_watermark(out: Path, marks: dict[str, int]) -> None:
    tmp = out / (WATERMARK + ".tmp")
    with open(tmp, "w") as f:
        json.dump(dict(sorted(marks.items())), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / WATERMARK)


def export_chats(
    store: Store, chats: list[tuple[str, int]], out: Path, progress: bool = True
) -> ExportSummary:
    """Exports each (chat_id, last_seq) above the watermark into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    marks = read_watermark(out)
    todo = [(c, head) for c, head in chats if head > marks.get(c, 0)]
    summary = ExportSummary()
    started = time.perf_counter()
    bar = tqdm(total=sum(head - marks.get(c, 0) for c, head in todo), unit="msg", disable=not progress)
    try:
        for chat_id, _ in todo:
            written: list[Path] = []
            try:
                after = _export_chat(store, chat_id, marks.get(chat_id, 0), out, written, summary, bar)
            except BaseException:
                # Files of a chat not finished are removed: the next run writes them again from
                # the watermark, and a dataset never holds a message twice.
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            if written:
                summary.chats += 1
                marks[chat_id] = after
    finally:
        bar.close()
        write_watermark(out, marks)
        summary.seconds = time.perf_counter() - started
    return summary


def _export_chat(
    store: Store, chat_id: str, after: int, out: Path, written: list[Path], summary: ExportSummary, bar: tqdm
) -> int:
    for batch in batches_of(store, chat_id, after):
        for day, part in by_day(batch):
            seqs = part.column("seq")
            first, last = seqs[0].as_py(), seqs[len(seqs) - 1].as_py()
            folder = out / f"chat={quote(chat_id, safe='')}" / f"day={day}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"part-{first:012d}-{last:012d}.parquet"
            written.append(path)
            pq.write_table(pa.Table.from_batches([part]), path, compression="zstd")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            summary.files += 1
            summary.bytes += path.stat().st_size
        after = batch.column("seq")[batch.num_rows - 1].as_py()
        summary.messages += batch.num_rows
        bar.update(batch.num_rows)
    return after
