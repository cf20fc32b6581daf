"""Search over messages: a full-text index kept beside the store, off the message path.

The index is an SQLite FTS5 database of its own (`data_dir/search.db`), whatever the store: a
message is indexed after it is stored, by a process of its own (`pychat.search.worker`, at a
lower CPU priority) that follows per-chat cursors (the engine tells it which chats moved; at
start it catches up every chat from the store), so an ack never waits for the index, the index
never takes the store's write lock, and its Python work never holds the server's GIL. Each indexed message keeps
a copy of what a search result shows, so results are answered from the index alone.

A query is scoped to the chats the caller belongs to *now* (asked of the store each time): the
chat's token is part of the FTS5 expression, so the index only walks those chats' documents.
Ranked by BM25 and recency; each result carries a `highlight` (pychat.search.text).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from pychat.heads import PendingHeads
from pychat.search.text import highlight, index_text, parse_query
from pychat.store import BacklogRow, Store, message_object
from pychat.store.sqlite import private_database

log = logging.getLogger("pychat.search")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(
    body, chat, sender, tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3'
);
CREATE TABLE IF NOT EXISTS hits (
    doc INTEGER PRIMARY KEY,
    chat_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    sender_id TEXT NOT NULL,
    content TEXT NOT NULL,
    attachments TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    client_msg_id TEXT,
    UNIQUE (chat_id, seq)
);
CREATE TABLE IF NOT EXISTS cursors (chat_id TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""

# What the index holds and how text is folded: an index of another version is rebuilt.
INDEX_VERSION = "2"
# Messages read from the store per call; rows indexed per transaction; chats per round.
PAGE = 500
TXN_ROWS = 2_000
CHATS_PER_ROUND = 100
# The deepest result a cursor reaches.
MAX_OFFSET = 10_000
# The largest integer SQLite takes (a cursor's numbers go into the query).
SQLITE_INT_MAX = 2**63 - 1
# Relevance halves every this many days of age (BM25 divided by 1 + age / RECENCY_DAYS).
RECENCY_DAYS = 30.0
# On a cluster node, how often the index looks for chats that moved without a word reaching it
# (a Redis message lost, the node restarting): a lost word delays a message's findability by
# at most this much.
CLUSTER_RESCAN_S = 30.0
DAY_MS = 86_400_000


def token(value: str) -> str:
    """A chat or user id as one index token (ids may hold characters the tokenizer splits on)."""
    return "k" + hashlib.blake2b(value.encode(), digest_size=10).hexdigest()


class SearchIndex:
    def __init__(self, path: Path, store: Store, rescan_s: float = 0) -> None:
        self.path = Path(path)
        private_database(self.path)
        self.store = store
        self.rescan_s = rescan_s
        self._local = threading.local()
        c = self._conn()
        c.executescript(SCHEMA)
        version = c.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if version is None or version[0] != INDEX_VERSION:
            # Another folding or schema: rebuilt from the store (the catch-up reads every chat).
            with c:
                c.execute("DELETE FROM docs")
                c.execute("DELETE FROM hits")
                c.execute("DELETE FROM cursors")
                c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('version', ?)", (INDEX_VERSION,))
        self._pending = PendingHeads()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pychat-indexer", daemon=True)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            # The index can be rebuilt from the store: a lost tail is re-indexed at the next start.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    # indexing

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pending.wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def notify(self, heads: dict[str, int]) -> None:
        """These chats have messages up to these seqs (called by the engine after a batch)."""
        self._pending.add(heads)

    def _rescan(self) -> None:
        """Every chat whose head is past what is indexed of it, to be indexed."""
        heads = self.store.chat_heads()
        cursors = dict(self._conn().execute("SELECT chat_id, seq FROM cursors"))
        self.notify({chat_id: head for chat_id, head in heads if head > cursors.get(chat_id, 0)})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._rescan()
                break
            except Exception:
                log.exception("the search index could not list the chats; trying again")
                self._stop.wait(2)
        next_scan = time.monotonic() + self.rescan_s
        while not self._stop.is_set():
            self._pending.wake.wait(1.0)
            self._pending.wake.clear()
            if self.rescan_s and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + self.rescan_s
                try:
                    self._rescan()
                except Exception:
                    log.exception("looking for chats that moved failed; trying at the next round")
            # A bounded slice per round: a long catch-up leaves room for chats that move.
            pending = self._pending.take(CHATS_PER_ROUND)
            if not pending:
                continue
            try:
                self._index(pending)
            except Exception:
                log.exception("indexing %d chats failed; trying again", len(pending))
                self.notify(pending)
                self._stop.wait(1)

    def _index(self, heads: dict[str, int]) -> None:
        """Reads each chat from its cursor to its end (not only to the head it was told: a
        Cassandra chat's head is a hint that may lag its rows) and indexes what it finds."""
        c = self._conn()
        marks = ",".join("?" * len(heads))
        cursors = dict(c.execute(f"SELECT chat_id, seq FROM cursors WHERE chat_id IN ({marks})", list(heads)))
        batch: list[tuple[str, list[BacklogRow]]] = []
        size = 0
        for chat_id in heads:
            after = cursors.get(chat_id, 0)
            while not self._stop.is_set():
                rows = self.store.messages_after(chat_id, after, PAGE)
                if rows:
                    batch.append((chat_id, rows))
                    size += len(rows)
                    after = rows[-1][1]
                if size >= TXN_ROWS:
                    self._add(c, batch)
                    batch, size = [], 0
                if len(rows) < PAGE:
                    break
        if batch:
            self._add(c, batch)

    @staticmethod
    def _add(c: sqlite3.Connection, batch: list[tuple[str, list[BacklogRow]]]) -> None:
        """Indexes pages of chats' messages and moves their cursors, in one transaction."""
        with c:
            for chat_id, rows in batch:
                for chat, seq, message_id, sender_id, content, attachments, created_at, client_msg_id in rows:
                    cur = c.execute(
                        "INSERT OR IGNORE INTO hits (chat_id, seq, message_id, sender_id, content, attachments,"
                        " created_at, client_msg_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (chat, seq, message_id, sender_id, content, attachments, created_at, client_msg_id),
                    )
                    if cur.rowcount:
                        c.execute(
                            "INSERT INTO docs (rowid, body, chat, sender) VALUES (?, ?, ?, ?)",
                            (cur.lastrowid, index_text(content), token(chat), token(sender_id)),
                        )
                c.execute(
                    "INSERT INTO cursors (chat_id, seq) VALUES (?, ?)"
                    " ON CONFLICT (chat_id) DO UPDATE SET seq = max(seq, excluded.seq)",
                    (chat_id, rows[-1][1]),
                )

    # searching

    def search(
        self,
        q: str,
        chats: list[str],
        *,
        sender: str | None = None,
        before: int | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Messages of `chats` matching `q`, best first, and the cursor of the next page (None at
        the end). `before` (with one chat) keeps messages below that seq."""
        offset, ceiling, now = _read_cursor(cursor)
        query = parse_query(q)
        if query is None or not chats:
            return [], None
        c = self._conn()
        if ceiling is None:  # the first page fixes which messages the later pages take
            ceiling = c.execute("SELECT coalesce(max(doc), 0) FROM hits").fetchone()[0]
            now = int(time.time() * 1000)
        scope = "chat : (" + " OR ".join(token(x) for x in chats) + ")"
        expression = f"body : ({query.expression}) AND {scope}"
        if sender:
            expression += f" AND sender : {token(sender)}"
        sql = (
            "SELECT h.doc, h.chat_id, h.seq, h.message_id, h.sender_id, h.content, h.attachments,"
            " h.created_at, h.client_msg_id FROM docs JOIN hits h ON h.doc = docs.rowid"
            " WHERE docs MATCH ? AND docs.rowid <= ?"
        )
        params: list[Any] = [expression, ceiling]
        if before is not None:
            sql += " AND h.seq < ?"
            params.append(before)
        sql += (
            " ORDER BY bm25(docs, 1.0, 0.0, 0.0) / (1.0 + max(0, ? - h.created_at) / ?), h.doc DESC"
            " LIMIT ? OFFSET ?"
        )
        params += [now, RECENCY_DAYS * DAY_MS, limit + 1, offset]
        rows = c.execute(sql, params).fetchall()
        results = [
            {**message_object(row[1:]), "highlight": highlight(row[5], query.terms)} for row in rows[:limit]
        ]
        more = len(rows) > limit and offset + limit < MAX_OFFSET
        next_cursor = _write_cursor(offset + limit, ceiling, now) if more else None
        return results, next_cursor


def _write_cursor(offset: int, ceiling: int, now: int | None) -> str:
    return base64.urlsafe_b64encode(json.dumps([offset, ceiling, now]).encode()).decode().rstrip("=")


def _read_cursor(cursor: str | None) -> tuple[int, int | None, int | None]:
    if not cursor:
        return 0, None, None
    if len(cursor) <= 200:
        try:
            value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        except (ValueError, TypeError, RecursionError):
            value = None
        if (
            isinstance(value, list)
            and len(value) == 3
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SQLITE_INT_MAX for v in value
            )
            and value[0] <= MAX_OFFSET
        ):
            return value[0], value[1], value[2]
    raise ValueError("not a cursor of this server")
