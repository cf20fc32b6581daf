"""Search over messages: a full-text index kept beside the store, off the message path.

The index is an SQLite FTS5 database of its own (`data_dir/search.db`), whatever the store: a
message is indexed after it is stored, by a thread that follows per-chat cursors (the engine
tells it which chats moved; at start it catches up every chat from the store), so an ack never
waits for the index and the index never takes the store's write lock. Each indexed message keeps
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

from pychat.search.text import highlight, index_text, parse_query
from pychat.store import BacklogRow, Store

log = logging.getLogger("pychat.search")

SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(
    body, chat, sender, tokenize = 'unicode61 remove_diacritics 2'
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

# Messages read from the store per call, and indexed per transaction.
PAGE = 500
# Relevance halves every this many days of age (BM25 divided by 1 + age / RECENCY_DAYS).
RECENCY_DAYS = 30.0
DAY_MS = 86_400_000


def token(value: str) -> str:
    """A chat or user id as one index token (ids may hold characters the tokenizer splits on)."""
    return "k" + hashlib.blake2b(value.encode(), digest_size=10).hexdigest()


class SearchIndex:
    def __init__(self, path: Path, store: Store) -> None:
        self.path = Path(path)
        self.store = store
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(SCHEMA)
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
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
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def notify(self, heads: dict[str, int]) -> None:
        """These chats have messages up to these seqs (called by the engine after a batch)."""
        with self._lock:
            for chat_id, seq in heads.items():
                if seq > self._pending.get(chat_id, 0):
                    self._pending[chat_id] = seq
        self._wake.set()

    def wait_caught_up(self, timeout: float) -> bool:
        return self._caught_up.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.notify(dict(self.store.chat_heads()))
                break
            except Exception:
                log.exception("the search index could not list the chats; trying again")
                self._stop.wait(2)
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                self._caught_up.set()
                continue
            try:
                self._index(pending)
            except Exception:
                log.exception("indexing %d chats failed; trying again", len(pending))
                self.notify(pending)
                self._stop.wait(1)

    def _index(self, heads: dict[str, int]) -> None:
        c = self._conn()
        cursors = dict(c.execute("SELECT chat_id, seq FROM cursors"))
        for chat_id, head in heads.items():
            after = cursors.get(chat_id, 0)
            while after < head and not self._stop.is_set():
                rows = self.store.messages_after(chat_id, after, PAGE)
                if not rows:
                    break
                self._add(c, chat_id, rows)
                after = rows[-1][1]

    @staticmethod
    def _add(c: sqlite3.Connection, chat_id: str, rows: list[BacklogRow]) -> None:
        with c:
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
        offset, ceiling = _read_cursor(cursor)
        query = parse_query(q)
        if query is None or not chats:
            return [], None
        c = self._conn()
        if ceiling is None:  # the first page fixes what the later pages see
            ceiling = c.execute("SELECT coalesce(max(doc), 0) FROM hits").fetchone()[0]
        scope = "chat : (" + " OR ".join(token(x) for x in chats) + ")"
        expression = f"({query.expression}) AND {scope}"
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
        now = int(time.time() * 1000)
        sql += " ORDER BY bm25(docs, 1.0, 0.0, 0.0) / (1.0 + (? - h.created_at) / ?) LIMIT ? OFFSET ?"
        params += [now, RECENCY_DAYS * DAY_MS, limit + 1, offset]
        rows = c.execute(sql, params).fetchall()
        results = []
        for _, chat_id, seq, message_id, sender_id, content, attachments, created_at, client_msg_id in rows[
            :limit
        ]:
            results.append(
                {
                    "message_id": message_id,
                    "chat_id": chat_id,
                    "seq": seq,
                    "sender_id": sender_id,
                    "content": content,
                    "attachments": json.loads(attachments),
                    "created_at": created_at,
                    "client_msg_id": client_msg_id,
                    "highlight": highlight(content, query.terms),
                }
            )
        next_cursor = _write_cursor(offset + limit, ceiling) if len(rows) > limit else None
        return results, next_cursor

    def close(self) -> None:
        self.stop()


def _write_cursor(offset: int, ceiling: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([offset, ceiling]).encode()).decode().rstrip("=")


def _read_cursor(cursor: str | None) -> tuple[int, int | None]:
    if not cursor:
        return 0, None
    try:
        offset, ceiling = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(offset, int) and isinstance(ceiling, int) and 0 <= offset <= 10_000 and ceiling >= 0:
            return offset, ceiling
    except (ValueError, TypeError):
        pass
    raise ValueError("not a cursor of this server")
