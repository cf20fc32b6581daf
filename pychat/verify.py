"""`pychat verify EXPORT`: proves that an export holds every message of its chats, in order and as
stored, from the chain values the store computed as it numbered them (pychat/chain.py).

EXPORT is a `pychat export` folder (each chat from seq 1 to its watermark, whose chain value
vouches for the last message) or one file of `GET /api/chats/{id}/export` (Parquet, Arrow IPC
stream or JSON lines). Each message must follow the one before it: the next seq (else a gap, or
a row out of order) and a chain value that the previous value and the message's own fields give
(else the message was changed). With a store to compare with (`--against-store`), each chat's
last verified value must also be the store's: an export rewritten whole, chain values included,
is caught there; and a folder's chat must hold every message the store had stored when the
export ran (the watermark's `at`, less SETTLED_MS): one cut short, its watermark edited to match,
is caught there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pychat.chain import genesis, link, media_ids_of
from pychat.dataset import chat_batches, dataset_chats, read_watermark
from pychat.export import PAGE, rows_of
from pychat.store import ChainedRow, MessageStore

# Breaks listed per chat; past them the chat is only counted as broken.
MAX_BREAKS_PER_CHAT = 20
# A message stored this long before an export run started is in it. Younger ones may not be: a
# message is timed when it is numbered and readable once its batch commits, and on a cluster the
# clocks of the node that numbered it and of the one exporting differ a little.
SETTLED_MS = 60_000


@dataclass(frozen=True)
class Break:
    chat_id: str
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"chat {self.chat_id}, seq {self.seq}: {self.problem}"


@dataclass
class Report:
    chats: int = 0
    messages: int = 0
    breaks: list[Break] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # chat_id -> (last seq, its chain value) as verified
    heads: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    # chat_id -> when the export run that last covered it started (ms; a folder's watermark)
    exported_at: dict[str, int | None] = field(default_factory=dict)

    # Everyone who sent a message in the export (an import needs each as a user).
    senders: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.breaks

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chats": self.chats,
            "messages": self.messages,
            "breaks": [{"chat_id": b.chat_id, "seq": b.seq, "problem": b.problem} for b in self.breaks],
            "notes": self.notes,
        }


class _Chain:
    """One chat's messages checked as they come."""

    def __init__(self, chat_id: str, report: Report, from_start: bool) -> None:
        self.chat_id = chat_id
        self.report = report
        self.from_start = from_start
        self.seq = 0
        self.chain = genesis(chat_id)
        self.breaks = 0

    def _break(self, seq: int, problem: str) -> None:
        self.breaks += 1
        if self.breaks <= MAX_BREAKS_PER_CHAT:
            self.report.breaks.append(Break(self.chat_id, seq, problem))
        elif self.breaks == MAX_BREAKS_PER_CHAT + 1:
            self.report.breaks.append(Break(self.chat_id, seq, "more breaks in this chat, not listed"))

    def add(self, row: ChainedRow) -> None:
        _, seq, _, sender_id, content, attachments, created_at, _, chain = row
        self.report.messages += 1
        self.report.senders.add(sender_id)
        if chain is None or len(chain) != 32:
            self._break(seq, "no chain value")
            self.seq = max(self.seq, seq)
            return
        if self.seq == 0 and not self.from_start and seq != 1:
            # A file exported with `after`: what came before is not in it.
            self.report.notes.append(
                f"chat {self.chat_id} starts at seq {seq}: verified from there on, not before"
            )
            self.seq, self.chain = seq, chain
            return
        expected = self.seq + 1
        if seq > expected:
            missing = f"seq {expected}" if seq == expected + 1 else f"seqs {expected} to {seq - 1}"
            self._break(expected, f"{missing} missing (a gap, or rows out of order) before seq {seq}")
        elif seq < expected:
            self._break(seq, f"out of order: seq {seq} comes after seq {self.seq}")
        elif link(self.chain, seq, sender_id, content, created_at, media_ids_of(attachments)) != chain:
            self._break(
                seq,
                "the value before it and its sender, content, time and attachments do not give its chain"
                " value: edited (this message, or the one before it)",
            )
        # Past a break the chat goes on from this row's own value, so one change is reported once.
        if seq > self.seq:
            self.seq, self.chain = seq, chain


def verify_export(path: Path, against: MessageStore | None = None) -> Report:
    report = Report()
    if path.is_dir():
        _verify_folder(path, report)
    else:
        _verify_file(path, report)
    if against is not None:
        for chat_id, (seq, chain) in report.heads.items():
            rows = against.chained_after(chat_id, seq - 1, 2)
            if not rows or rows[0][1] != seq or rows[0][8] != chain:
                report.breaks.append(
                    Break(
                        chat_id,
                        seq,
                        "differs from the store's message with this seq: not the store's history",
                    )
                )
                continue
            if chat_id not in report.exported_at:
                continue  # one exported file: it says nothing of when it was taken
            at = report.exported_at[chat_id]
            if at is None:
                report.notes.append(
                    f"chat {chat_id}: the watermark has no export time (an older pychat): whether the"
                    " export was cut short is not compared with the store"
                )
            elif len(rows) > 1 and rows[1][6] <= at - SETTLED_MS:
                report.breaks.append(
                    Break(
                        chat_id,
                        seq + 1,
                        f"the export ends at seq {seq}, but the store had stored seq {seq + 1} (at"
                        f" {_utc(rows[1][6])}) before this export ran ({_utc(at)}): cut short",
                    )
                )
    return report


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _verify_folder(out: Path, report: Report) -> None:
    marks = read_watermark(out)
    chats = dataset_chats(out)
    for chat_id in sorted(set(marks) - set(chats)):
        report.breaks.append(
            Break(chat_id, 1, f"no files, while the watermark says seq {marks[chat_id].seq}")
        )
    for chat_id, parts in chats.items():
        report.chats += 1
        check = _Chain(chat_id, report, from_start=True)
        unchained = [p for p in parts if "chain" not in pq.ParquetFile(p).schema_arrow.names]
        if unchained:
            check._break(
                0,
                f"{unchained[0].name} has no chain values (written by an older pychat): export again into a new folder",
            )
            continue
        for batch in chat_batches(parts):
            for row in rows_of(batch):
                if row[0] != chat_id:
                    check._break(row[1], f"a row of chat {row[0]} in this chat's files")
                    continue
                check.add(row)
        report.heads[chat_id] = (check.seq, check.chain)
        mark = marks.get(chat_id)
        report.exported_at[chat_id] = mark.at if mark is not None else None
        if mark is None:
            check._break(check.seq, "the watermark does not name this chat (files of an interrupted run?)")
        elif mark.seq != check.seq:
            check._break(
                min(mark.seq, check.seq) + 1,
                f"the files end at seq {check.seq}, the watermark at seq {mark.seq}",
            )
        elif mark.chain is not None and mark.chain != check.chain.hex():
            check._break(check.seq, "the last message's chain value is not the watermark's")


def _verify_file(path: Path, report: Report) -> None:
    checks: dict[str, _Chain] = {}
    for rows in _file_rows(path):
        for row in rows:
            check = checks.get(row[0])
            if check is None:
                check = checks[row[0]] = _Chain(row[0], report, from_start=False)
            check.add(row)
    report.chats = len(checks)
    report.heads = {c: (check.seq, check.chain) for c, check in checks.items()}


def _file_rows(path: Path) -> Iterator[list[ChainedRow]]:
    """The rows of one exported file, a page at a time, by its format."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PAGE):
            yield rows_of(_with_chain(batch))
    elif magic == b"\xff\xff\xff\xff":  # an Arrow IPC stream (a continuation marker first)
        with pa.ipc.open_stream(path) as reader:
            for batch in reader:
                yield rows_of(_with_chain(batch))
    else:
        with open(path, encoding="utf-8") as lines:
            page: list[ChainedRow] = []
            for line in lines:
                if line.strip():
                    page.append(_json_row(json.loads(line)))
                if len(page) >= PAGE:
                    yield page
                    page = []
            yield page


def _with_chain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A file from an older pychat has no chain column: its rows then each break as `no chain value`."""
    if "chain" in batch.schema.names:
        return batch
    return batch.append_column("chain", pa.nulls(batch.num_rows, pa.binary(32)))


def _json_row(m: dict[str, Any]) -> ChainedRow:
    chain = m.get("chain")
    return (
        m["chat_id"],
        m["seq"],
        m["message_id"],
        m["sender_id"],
        m["content"],
        json.dumps(m.get("attachments") or []),
        m["created_at"],
        m.get("client_msg_id"),
        bytes.fromhex(chain) if isinstance(chain, str) else None,
    )


def describe(report: Report) -> Iterable[str]:
    """Lines for a person: what was checked and each break."""
    yield f"{report.messages} messages in {report.chats} chats: " + ("verified" if report.ok else "BROKEN")
    for b in report.breaks:
        yield f"  {b}"
    for note in report.notes:
        yield f"  note: {note}"
