"""A chat's history as a file: Parquet, Arrow IPC stream or JSON lines, written as it is read.

The store is read `READ_ROWS` messages at a time; the reads are gathered into pages of at most
`PAGE` messages or `PAGE_BYTES` bytes, whichever comes first; each page becomes one Arrow record
batch (one Parquet row group), is encoded on a thread and handed to the HTTP response. The chat
is never held whole in memory, and a page of the largest messages stays a few MB. `after` makes
an export incremental: only messages with a higher seq.

The schema (also in api/openapi.json, `ExportRow`):

    message_id string, chat_id string, seq int64, sender_id string, content string,
    attachments list<struct<media_id, content_type, size int64, url, thumbnail_url,
                            width int32, height int32, filename>>,
    created_at timestamp[ms, UTC], client_msg_id string (null when none),
    chain fixed_size_binary[32] (the message's hash chain value, pychat/chain.py)

JSON lines carry PROTOCOL.md's message objects, `chain` in hex.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pychat.errors import ApiError
from pychat.store import ChainedRow, Store, message_object

DAY_MS = 86_400_000

# Messages per record batch (and Parquet row group) read straight into Arrow; a few MB usually.
PAGE = 10_000
# Messages per page read as Python rows (JSON lines, stores without an Arrow reader): each row is
# a handful of objects, so fewer at a time.
ROW_PAGE = 5_000
# Bytes of messages in a page, whatever its count (10,000 messages of 64 KiB made a page of
# 640 MB); a page may pass it by one read. A stalled export holds about 20 of these (measured).
PAGE_BYTES = 1024 * 1024
# Messages per read from the store: a read of the largest messages (64 KiB) stays under 9 MB.
READ_ROWS = 128
# Tell a client refused an export slot to come back after this long.
EXPORT_RETRY_MS = 5_000

ATTACHMENT = pa.struct(
    [
        ("media_id", pa.string()),
        ("content_type", pa.string()),
        ("size", pa.int64()),
        ("url", pa.string()),
        ("thumbnail_url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("filename", pa.string()),
    ]
)
SCHEMA = pa.schema(
    [
        pa.field("message_id", pa.string(), nullable=False),
        pa.field("chat_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("sender_id", pa.string(), nullable=False),
        pa.field("content", pa.string(), nullable=False),
        pa.field("attachments", pa.list_(ATTACHMENT), nullable=False),
        pa.field("created_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("client_msg_id", pa.string()),
        pa.field("chain", pa.binary(32)),
    ]
)

FORMATS = {
    "parquet": ("application/vnd.apache.parquet", "parquet"),
    "arrow": ("application/vnd.apache.arrow.stream", "arrows"),
    "jsonl": ("application/x-ndjson", "jsonl"),
}


def from_raw(raw: pa.RecordBatch) -> pa.RecordBatch:
    """A batch as the store's SQL gives it (attachments as JSON text, created_at as integer ms)
    in SCHEMA. Vectorized: only messages that have attachments are parsed in Python."""
    n = raw.num_rows
    text = raw.column("attachments")
    empty = pc.fill_null(pc.equal(text, "[]"), True)
    if pc.all(empty).as_py():
        attachments = pa.ListArray.from_arrays(pa.array([0] * (n + 1), pa.int32()), pa.array([], ATTACHMENT))
    else:
        values = [
            [] if e else json.loads(t) for e, t in zip(empty.to_pylist(), text.to_pylist(), strict=True)
        ]
        attachments = pa.array(values, pa.list_(ATTACHMENT))
    return pa.RecordBatch.from_arrays(
        [
            raw.column("message_id").cast(pa.string()),
            raw.column("chat_id").cast(pa.string()),
            raw.column("seq").cast(pa.int64()),
            raw.column("sender_id").cast(pa.string()),
            raw.column("content").cast(pa.string()),
            attachments,
            raw.column("created_at").cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            raw.column("client_msg_id").cast(pa.string()),
            raw.column("chain").cast(pa.binary(32)),
        ],
        schema=SCHEMA,
    )


def record_batch(rows: list[ChainedRow]) -> pa.RecordBatch:
    """One page of the store as a record batch of SCHEMA."""
    chat_ids, seqs, message_ids, senders, contents, attachments, created, client_ids, chains = zip(
        *rows, strict=True
    )
    return pa.RecordBatch.from_arrays(
        [
            pa.array(message_ids, pa.string()),
            pa.array(chat_ids, pa.string()),
            pa.array(seqs, pa.int64()),
            pa.array(senders, pa.string()),
            pa.array(contents, pa.string()),
            pa.array([json.loads(a) if a != "[]" else [] for a in attachments], pa.list_(ATTACHMENT)),
            pa.array(created, pa.timestamp("ms", tz="UTC")),
            pa.array(client_ids, pa.string()),
            pa.array(chains, pa.binary(32)),
        ],
        schema=SCHEMA,
    )


def rows_of(batch: pa.RecordBatch) -> list[ChainedRow]:
    """A SCHEMA batch (an export read back) as store rows: attachments as JSON text, created_at
    as integer ms (the inverse of `record_batch`)."""
    columns = {
        name: batch.column(name).to_pylist()
        for name in ("chat_id", "seq", "message_id", "sender_id", "content", "client_msg_id", "chain")
    }
    created = batch.column("created_at").cast(pa.int64()).to_pylist()
    attachments = [
        json.dumps([{k: v for k, v in a.items() if v is not None} for a in items], separators=(",", ":"))
        if items
        else "[]"
        for items in batch.column("attachments").to_pylist()
    ]
    return list(
        zip(
            columns["chat_id"],
            columns["seq"],
            columns["message_id"],
            columns["sender_id"],
            columns["content"],
            attachments,
            created,
            columns["client_msg_id"],
            columns["chain"],
            strict=True,
        )
    )


class _Prefetch:
    """An iterator read ahead on a thread of its own (at most `depth` items waiting): the store's
    next batch is read while this one is encoded, on the other core."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int = 1) -> None:
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pychat-export-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the reader
            self._put(e)
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _put(self, item: Any) -> bool:
        """Waits for room for `item`; False once closed (a reader that left takes nothing more:
        a blocking put would keep this thread and the store's connection for good)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(self._END)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock the reader if it waits for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(5)


class _Sink:
    """What a pyarrow writer writes into: bytes collected until the exporter takes them."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False
        self.position = 0

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def row_pages(store: Store, chat_id: str, after: int) -> Iterator[list[ChainedRow]]:
    """The chat's messages above `after` as store rows, a page (`ROW_PAGE`, `PAGE_BYTES`) at a time."""
    done = False
    while not done:
        page: list[ChainedRow] = []
        size = 0
        while len(page) < ROW_PAGE and size < PAGE_BYTES:
            rows = store.chained_after(chat_id, after, READ_ROWS)
            if rows:
                after = rows[-1][1]
                page += rows
                size += sum(len(r[4]) + len(r[5]) for r in rows)
            if len(rows) < READ_ROWS:
                done = True
                break
        if page:
            yield page


def gathered(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Small record batches gathered into pages of `PAGE` rows or `PAGE_BYTES` bytes."""
    page: list[pa.RecordBatch] = []
    rows = size = 0
    for batch in batches:
        page.append(batch)
        rows += batch.num_rows
        size += batch.nbytes
        if rows >= PAGE or size >= PAGE_BYTES:
            yield pa.concat_batches(page)
            page, rows, size = [], 0, 0
    if rows:
        yield pa.concat_batches(page)


class ExportSlots:
    """Exports streaming at once, in all and per user (each holds a page or two and a reader
    thread while its client reads): past either bound the next one is refused, `unavailable` or
    `rate_limited`, with when to come back."""

    def __init__(self, in_all: int, per_user: int) -> None:
        self.in_all = in_all
        self.per_user = per_user
        self.running: dict[str, int] = {}

    def claim(self, user_id: str) -> None:
        if self.running.get(user_id, 0) >= self.per_user:
            raise ApiError(
                "rate_limited",
                f"at most {self.per_user} exports at once per user",
                retry_after_ms=EXPORT_RETRY_MS,
            )
        if sum(self.running.values()) >= self.in_all:
            raise ApiError(
                "unavailable", "the server is busy with other exports", retry_after_ms=EXPORT_RETRY_MS
            )
        self.running[user_id] = self.running.get(user_id, 0) + 1

    def release(self, user_id: str) -> None:
        left = self.running.pop(user_id, 0) - 1
        if left > 0:
            self.running[user_id] = left


class ChatExport:
    """The export of one chat as an async iterator of byte chunks (one per page). `on_close`
    runs once, when it is closed."""

    def __init__(
        self,
        store: Store,
        chat_id: str,
        fmt: str,
        after: int,
        pool: Executor,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.chat_id = chat_id
        self.format = fmt
        self.after = after
        self.pool = pool
        self._on_close = on_close
        self._sink = _Sink()
        self._writer: Any = None
        self._done = False
        self._first: bytes | None = None
        self._pages: Iterator[Any] | None = None
        self._reader: _Prefetch | None = None

    async def prefetch(self) -> None:
        """Reads and encodes the first page now: a store that fails fails before an answer starts."""
        self._first = await self._read()

    def __aiter__(self) -> ChatExport:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._done:
            raise StopAsyncIteration
        return await self._read()

    async def _read(self) -> bytes:
        chunk: bytes = await asyncio.get_running_loop().run_in_executor(self.pool, self._next_chunk)
        return chunk

    def _open_pages(self) -> Iterator[Any]:
        """(On a thread.) Pages of store rows (JSON lines) or SCHEMA record batches."""
        if self.format == "jsonl":
            return row_pages(self.store, self.chat_id, self.after)
        if hasattr(self.store, "arrow_batches"):
            # A store that reads straight into Arrow (SQLite through ADBC): no Python row objects,
            # and the next read runs on a thread of its own while this page is encoded.
            self._reader = _Prefetch(iter(self.store.arrow_batches(self.chat_id, self.after, READ_ROWS)))
            return (from_raw(page) for page in gathered(self._reader))
        return (record_batch(rows) for rows in row_pages(self.store, self.chat_id, self.after))

    def _next_chunk(self) -> bytes:
        """(On a thread.) The encoding of the next page; the format's end after the last one."""
        if self._pages is None:
            self._pages = self._open_pages()
        page = next(self._pages, None)
        if page is None:
            self._finish()
            self._done = True
        elif self.format == "jsonl":
            self._sink.write(jsonl(page))
        else:
            self._writer_for().write_batch(page)
        # Arrow's allocator keeps freed pages for reuse; a long export would hold many.
        pa.default_memory_pool().release_unused()
        return self._sink.take()

    def _writer_for(self) -> Any:
        if self._writer is None:
            if self.format == "parquet":
                self._writer = pq.ParquetWriter(self._sink, SCHEMA, compression="zstd")
            else:
                self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        return self._writer

    def _finish(self) -> None:
        if self.format != "jsonl":
            self._writer_for().close()  # an empty export is still a valid file with the schema

    async def aclose(self) -> None:
        self._done = True
        self._first = None
        reader, self._reader = self._reader, None
        if reader is not None:  # stops the read-ahead thread (which closes the ADBC connection)
            await asyncio.to_thread(reader.close)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def jsonl(rows: list[ChainedRow]) -> bytes:
    lines = [json.dumps(message_object(row), ensure_ascii=False, separators=(",", ":")) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def batches_of(store: Store, chat_id: str, after: int) -> Iterator[pa.RecordBatch]:
    """The chat's messages above `after` as SCHEMA record batches, a page at a time."""
    if hasattr(store, "arrow_batches"):
        reader = _Prefetch(iter(store.arrow_batches(chat_id, after, READ_ROWS)))
        try:
            for page in gathered(reader):
                yield from_raw(page)
        finally:
            reader.close()
        return
    for rows in row_pages(store, chat_id, after):
        yield record_batch(rows)


def by_day(batch: pa.RecordBatch) -> Iterator[tuple[str, pa.RecordBatch]]:
    """The batch cut where the UTC day of `created_at` ("YYYY-MM-DD") changes: runs of
    consecutive messages, in seq order (a clock that stepped back over midnight gives a day
    twice, never a file whose seqs interleave with another's)."""
    n = batch.num_rows
    if n == 0:
        return
    days = pc.divide(batch.column("created_at").cast(pa.int64()), DAY_MS)
    changes = pc.indices_nonzero(pc.not_equal(days.slice(1), days.slice(0, n - 1))).to_pylist()
    starts = [0, *(i + 1 for i in changes)]
    for start, end in zip(starts, [*starts[1:], n], strict=True):
        name = time.strftime("%Y-%m-%d", time.gmtime(days[start].as_py() * 86_400))
        yield name, batch.slice(start, end - start)
