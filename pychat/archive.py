"""`pychat export` / `pychat import`: chats' histories as Parquet files for operators, partitioned
by chat and by day, incremental from a watermark file (a nightly job copies only what is new), and
read back into an empty server (a restore, or a move from one store to another).

    OUT/chat=<chat_id>/day=<YYYY-MM-DD>/part-<first seq>-<last seq>.parquet
    OUT/_watermark.json     {chat_id: {"seq": last exported seq, "chain": its chain value (hex),
                                       "at": when the last run that covered the chat started (ms)}}
    OUT/_chats.jsonl        each exported chat: kind, title, creator, members and their read seqs
    OUT/_users.jsonl        the users those chats name (password hashes included: keep OUT private)

Readable as one dataset: `pyarrow.dataset.dataset(OUT, partitioning="hive")` (files starting
with `_` are not part of it). The watermark is written last (after the files are durable), so an
interrupted run is repeated from where the previous one ended (part files are named by their
seqs: written again, never twice). `pychat verify OUT` checks the files against the chain values
(pychat/verify.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pychat.dataset import (
    CHATS,
    USERS,
    Mark,
    chat_batches,
    dataset_chats,
    read_watermark,
    write_durably,
    write_watermark,
)
from pychat.export import batches_of, by_day, rows_of
from pychat.gateway import PointerMoved
from pychat.ids import now_ms
from pychat.store import ChainedRow, Chat, PointerRequest, Store, User
from pychat.verify import verify_export

# Messages per write when importing (one transaction on SQLite, fenced batches on Cassandra).
IMPORT_PAGE = 5_000


@dataclass
class ExportSummary:
    chats: int = 0
    messages: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

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


def _read_jsonl(path: Path, key: str) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return {item[key]: item for item in map(json.loads, path.read_text().splitlines()) if item}


def _write_jsonl(path: Path, items: dict[str, dict[str, Any]]) -> None:
    write_durably(path, "".join(json.dumps(v, ensure_ascii=False) + "\n" for _, v in sorted(items.items())))


def _write_metadata(store: Store, out: Path, chat_ids: list[str], senders: set[str]) -> None:
    """The chats' records (members and their read seqs) and their users', merged into what earlier
    runs wrote: what `pychat import` needs beside the messages."""
    chats = _read_jsonl(out / CHATS, "chat_id")
    users = _read_jsonl(out / USERS, "user_id")
    wanted = set(senders)
    for chat_id in chat_ids:
        chat = store.get_chat(chat_id)
        if chat is None:
            continue
        record = chat.to_json()
        record.pop("last_seq")
        record["read"] = {}
        chats[chat_id] = record
        wanted.update(chat.members, [chat.created_by])
    read_seqs: dict[str, dict[str, int]] = {}
    for user_id in sorted(wanted):
        user = store.user_by_id(user_id)
        if user is not None:
            users[user_id] = dataclasses.asdict(user)
            read_seqs[user_id] = {c: cursor for c, cursor, _ in store.sync_chats(user_id, {})}
    for chat_id in chat_ids:
        if chat_id in chats:
            record = chats[chat_id]
            record["read"] = {
                u: read_seqs[u][chat_id] for u in record["members"] if chat_id in read_seqs.get(u, {})
            }
    _write_jsonl(out / USERS, users)
    _write_jsonl(out / CHATS, chats)


def export_chats(
    store: Store, chats: list[tuple[str, int]], out: Path, progress: bool = True
) -> ExportSummary:
    """Exports each (chat_id, last_seq) above the watermark into `out`."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)  # it holds password hashes
    marks = read_watermark(out)
    older = [c for c, m in marks.items() if m.seq and m.chain is None]
    if older:
        raise ValueError(
            f"{out} was written by a pychat without chain values (chat {older[0]}): export into a new folder"
        )
    # Before the chats are read: what the store held at this time, this run exports.
    at = now_ms()
    done = {c: m.seq for c, m in marks.items()}
    todo = [(c, head) for c, head in chats if head > done.get(c, 0)]
    for chat_id in {c for c, _ in chats} - {c for c, _ in todo}:
        if chat_id in marks:  # nothing new: complete as of now
            marks[chat_id] = dataclasses.replace(marks[chat_id], at=at)
    summary = ExportSummary()
    senders: set[str] = set()
    started = time.perf_counter()
    bar = tqdm(total=sum(head - done.get(c, 0) for c, head in todo), unit="msg", disable=not progress)
    try:
        for chat_id, _ in todo:
            written: list[Path] = []
            try:
                mark = _export_chat(
                    store, chat_id, marks.get(chat_id, Mark(0)), out, written, summary, bar, senders
                )
            except BaseException:
                # Files of a chat not finished are removed: the next run writes them again from
                # the watermark, and a dataset never holds a message twice.
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            if written:
                summary.chats += 1
                marks[chat_id] = dataclasses.replace(mark, at=at)
    finally:
        bar.close()
        # The records first: a watermark never names messages whose senders are not recorded.
        _write_metadata(store, out, [c for c, _ in chats], senders)
        write_watermark(out, marks)
        summary.seconds = time.perf_counter() - started
    return summary


def _export_chat(
    store: Store,
    chat_id: str,
    mark: Mark,
    out: Path,
    written: list[Path],
    summary: ExportSummary,
    bar: tqdm,
    senders: set[str],
) -> Mark:
    for batch in batches_of(store, chat_id, mark.seq):
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
        last = batch.num_rows - 1
        chain = batch.column("chain")[last].as_py()
        mark = Mark(batch.column("seq")[last].as_py(), chain.hex() if chain is not None else None)
        senders.update(pc.unique(batch.column("sender_id")).to_pylist())
        summary.messages += batch.num_rows
        bar.update(batch.num_rows)
    return mark


@dataclass
class ImportSummary:
    users: int = 0
    chats: int = 0
    messages: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict[str, object]:
        rate = round(self.messages / self.seconds) if self.seconds else 0
        return dataclasses.asdict(self) | {"seconds": round(self.seconds, 2), "messages_per_s": rate}


def _restore(
    store: Store,
    out: Path,
    users: dict[str, dict[str, Any]],
    chats: dict[str, dict[str, Any]],
    marks: dict[str, Mark],
    summary: ImportSummary,
    progress: bool,
) -> None:
    for record in users.values():
        store.create_user(User(**record))
        summary.users += 1
    for chat_id, record in chats.items():
        members = list(record["members"])
        key = "|".join(sorted(members)) if record["kind"] == "direct" else None
        chat = Chat(
            chat_id, record["kind"], record["title"], record["created_by"], record["created_at"], 0, members
        )
        store.create_chat(chat, key)
        summary.chats += 1
    bar = tqdm(total=sum(m.seq for m in marks.values()), unit="msg", disable=not progress)
    try:
        for chat_id, parts in dataset_chats(out).items():
            pending: list[ChainedRow] = []
            for batch in chat_batches(parts):
                pending.extend(rows_of(batch))
                while len(pending) >= IMPORT_PAGE:
                    store.restore_messages(chat_id, pending[:IMPORT_PAGE])
                    del pending[:IMPORT_PAGE]
                    summary.messages += IMPORT_PAGE
                    bar.update(IMPORT_PAGE)
            store.restore_messages(chat_id, pending)
            summary.messages += len(pending)
            bar.update(len(pending))
    finally:
        bar.close()
    # Read positions (recorded after the messages were read: never past what was exported).
    pointers = [
        PointerRequest(user_id, chat_id, "read", min(seq, marks[chat_id].seq))
        for chat_id, record in chats.items()
        if chat_id in marks
        for user_id, seq in record["read"].items()
        if seq > 0
    ]
    for start in range(0, len(pointers), IMPORT_PAGE):
        _, results = store.append_batch([], pointers[start : start + IMPORT_PAGE])
        refused = [r for r in results if not isinstance(r, PointerMoved)]
        if refused:
            raise RuntimeError(f"the store refused a read position: {refused[0]}")


class ImportRefused(Exception):
    """The export cannot be imported into this store (it does not verify, or the store is not empty)."""


@dataclass(frozen=True)
class Importable:
    """An export folder that verified and names every user it needs: what an import writes."""

    out: Path
    users: dict[str, dict[str, Any]]
    chats: dict[str, dict[str, Any]]
    marks: dict[str, Mark]


def check_export(out: Path) -> Importable:
    """The export folder, verified and complete, or ImportRefused; reads no store (a refused
    import creates nothing)."""
    if not out.is_dir():
        raise ImportRefused(f"{out} is not a folder written by `pychat export`")
    report = verify_export(out)
    if not report.ok:
        raise ImportRefused(f"the export does not verify: {report.breaks[0]}")
    users = _read_jsonl(out / USERS, "user_id")
    chats = _read_jsonl(out / CHATS, "chat_id")
    marks = read_watermark(out)
    unknown = sorted(set(marks) - set(chats))
    if unknown:
        raise ImportRefused(f"no {CHATS} record for chat {unknown[0]} (exported by an older pychat)")
    needed = report.senders | {u for r in chats.values() for u in (*r["members"], r["created_by"])}
    missing = sorted(needed - set(users))
    if missing:
        raise ImportRefused(f"user {missing[0]} sent or belongs, and is not in {USERS}")
    return Importable(out, users, chats, marks)


def import_export(store: Store, out: Path | Importable, progress: bool = True) -> ImportSummary:
    """Reads an export folder (verified first, unless `check_export` did) into a store that holds
    none of it: users (with their password hashes), chats with their members, every message as it
    was (ids, seqs, times, chain values), then each member's read seq. Media bytes are not in an
    export: attachments keep their descriptions, and their downloads answer 404."""
    started = time.perf_counter()
    checked = out if isinstance(out, Importable) else check_export(out)
    users, chats, marks = checked.users, checked.chats, checked.marks
    if store.chat_heads() or store.existing_users(list(users)) or any(store.get_chat(c) for c in chats):
        raise ImportRefused("the store is not empty: import into a new data directory or keyspace")
    summary = ImportSummary()
    try:
        _restore(store, checked.out, users, chats, marks, summary, progress)
    except Exception as e:
        raise ImportRefused(
            f"the import failed midway ({e!r}); the store now holds part of the export: remove it"
            " (the data directory or keyspace) before trying again"
        ) from e
    summary.seconds = time.perf_counter() - started
    return summary
