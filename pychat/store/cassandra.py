"""The Cassandra / ScyllaDB store (scylla-driver), for messages at scale.

Messages live in wide partitions per chat, split into buckets of `BUCKET_SIZE` seqs
(a bucket is `seq // BUCKET_SIZE`, so a huge chat never makes one giant partition),
clustered by seq.

How PROTOCOL.md's guarantees hold without transactions:

- **One writer per seq (the fence).** Each bucket partition carries a static column
  `bucket_last_seq`. A batch's messages for one chat are written in ONE conditional
  batch on that partition: `UPDATE ... SET bucket_last_seq = new IF bucket_last_seq = old`
  plus the rows. A conditional batch on one partition is atomic and isolated (Paxos),
  so the rows and the fence land together or not at all: two writers can never both
  store seq N, and a crash can never leave a gap. The engine is the chat's only
  writer in a process, so the fence is uncontended (one Paxos round per chat per
  batch, two when the batch crosses into a new bucket); a writer whose fence fails
  re-reads the chat's last seq and numbers again.
- **Idempotency.** `send_keys` maps (chat, sender, client_msg_id) to the message's id and
  seq, in one partition per chat and day (TTL 48 h: PROTOCOL.md asks for 24), so a batch
  reads a chat's keys in one query (today's, yesterday's and tomorrow's partitions: a
  retry within 24 h, with clocks a little apart) and writes them in one batch per chat,
  at the same time as the fenced batch. Both orders of a crash between them are safe:
  a key whose fenced batch never landed names a seq that holds another message or none
  (every hit is checked against the message row, and a stale one counts as new); rows
  whose keys never landed lie above the chat's `last_seq` hint (written only after both),
  and the first writer to touch the chat after that (this process after a failure, or
  any process after a restart) writes their keys before it looks any key up.
- **Pointers and times never move back** without a read-modify-write: the cells are
  written `USING TIMESTAMP` of their own value (a seq, or a time in microseconds), so
  Cassandra's last-write-wins keeps the highest whatever the order of the writes, also
  under concurrent writers. Those cells are never written otherwise.
- **Durability.** A write counts when Cassandra acknowledged it at the configured
  consistency (ONE on a single node, QUORUM with three replicas) and the node's commit
  log is synced before it acknowledges (`commitlog_sync: group` or `batch`); an ack
  to a client follows that. See docs/operator.md.

Every method blocks: the engine calls `append_batch` on its own thread, REST calls the
rest on its thread pools.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import threading
import time
from collections import defaultdict, namedtuple
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cassandra import ConsistencyLevel, DriverException, OperationTimedOut, RequestExecutionException
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.concurrent import execute_concurrent
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from pychat.chain import genesis, link_stored
from pychat.errors import ApiError
from pychat.gateway import Failed, PointerMoved, Stored
from pychat.ids import now_ms
from pychat.store import (
    USERNAME_END,
    BacklogRow,
    ChainedRow,
    Chat,
    Media,
    PointerRequest,
    PointerResult,
    SendRequest,
    SendResult,
    User,
    chat_created,
    follows,
    member_event,
    receipt_event,
)

log = logging.getLogger("pychat.store.cassandra")

SCHEMA_VERSION = 5
# Seqs per messages partition.
BUCKET_SIZE = 10_000
# How long a send's key is remembered (PROTOCOL.md: at least 24 h), and the span of one
# partition of a chat's keys.
KEYS_TTL_S = 48 * 3600
KEY_DAY_MS = 86_400_000
# Statements in flight at once for one call.
CONCURRENCY = 128
# Small writes (idempotency keys, chat hints) per unlogged batch: fewer round trips, while a
# batch's partitions stay few enough for one coordinator (32 timed out under load here).
WRITE_GROUP = 8
# One fenced batch carries at most this many rows and content bytes (Cassandra refuses batches
# over `batch_size_fail_threshold`, 50 KiB by default); a chat's larger share of an engine batch
# goes in several fenced batches in turn, each atomic, so a crash between them leaves no gap.
FENCE_ROWS = 100
FENCE_BYTES = 40 * 1024
# Per-user upload rows are kept for the quota's window (a day) and then some.
MEDIA_QUOTA_TTL_S = 2 * 86_400
# Plugins' receipt and chat events: kept this long (a plugin stopped for longer misses the
# oldest), one partition per kind and minute, placed by the writer's clock in microseconds.
EVENT_TTL_S = 7 * 86_400
EVENT_MINUTE_US = 60_000_000
# A write lands within this long of its place (the driver's timeout and its retries are far
# shorter); a feed's durable cursor stays this far behind the clock.
EVENT_SETTLE_US = 60_000_000
# Usernames are found by prefix (`users_named`) from a partition per first few characters.
USERNAME_PREFIX = 3
# Rows of the username index written together while an upgrade fills it.
BACKFILL_ROWS = 3000
# Rows per IN query.
IN_CHUNK = 100
# How long a chat's members are trusted from memory when another process may change them.
MEMBERS_TTL_S = 2.0
# Unread messages counted exactly per chat in `list_chats`; past it the count is estimated from seqs.
UNREAD_SCAN = 1_000

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text)",
    """CREATE TABLE IF NOT EXISTS users (
        user_id text PRIMARY KEY, username text, display_name text, password_hash text,
        created_at bigint, last_seen bigint)""",
    "CREATE TABLE IF NOT EXISTS usernames (username_key text PRIMARY KEY, user_id text)",
    # Each username under its first 1..USERNAME_PREFIX characters (schema 5).
    """CREATE TABLE IF NOT EXISTS usernames_by_prefix (prefix text, username_key text, user_id text,
        PRIMARY KEY (prefix, username_key))""",
    """CREATE TABLE IF NOT EXISTS chats (
        chat_id text PRIMARY KEY, kind text, title text, created_by text, created_at bigint,
        last_seq bigint)""",
    "CREATE TABLE IF NOT EXISTS direct_chats (direct_key text PRIMARY KEY, chat_id text)",
    """CREATE TABLE IF NOT EXISTS chat_members (
        chat_id text, user_id text, joined_at bigint, PRIMARY KEY (chat_id, user_id))""",
    """CREATE TABLE IF NOT EXISTS user_chats (
        user_id text, chat_id text, active boolean, joined_at bigint,
        delivered_seq bigint, read_seq bigint, PRIMARY KEY (user_id, chat_id))""",
    """CREATE TABLE IF NOT EXISTS messages (
        chat_id text, bucket bigint, seq bigint, bucket_last_seq bigint STATIC,
        message_id text, sender_id text, content text, attachments text, created_at bigint,
        client_msg_id text, chain blob, PRIMARY KEY ((chat_id, bucket), seq))""",
    f"""CREATE TABLE IF NOT EXISTS send_keys (
        chat_id text, day bigint, sender_id text, client_msg_id text, message_id text, seq bigint,
        PRIMARY KEY ((chat_id, day), sender_id, client_msg_id)) WITH default_time_to_live = {KEYS_TTL_S}""",
    # Media (schema 3): one row per upload; the blobs they point to (sha256, thumbnail included);
    # the chats where a message carried it (their members may read it); uploads per user (quota);
    # uploads not attached yet, by day (collected after `media_unattached_age_s`).
    """CREATE TABLE IF NOT EXISTS media (
        media_id text PRIMARY KEY, uploader_id text, sha256 text, content_type text, size bigint,
        created_at bigint, filename text, width int, height int, thumb_sha256 text, thumb_size bigint,
        attached boolean)""",
    "CREATE TABLE IF NOT EXISTS media_blobs (sha256 text, media_id text, PRIMARY KEY (sha256, media_id))",
    "CREATE TABLE IF NOT EXISTS media_posts (media_id text, chat_id text, PRIMARY KEY (media_id, chat_id))",
    # How far each plugin's after_store has taken each chat (pychat/plugins/feed.py); written
    # USING TIMESTAMP of the seq, so a cursor never moves back.
    # Where messages imported from another store are (their ids do not say: `message_by_id`).
    "CREATE TABLE IF NOT EXISTS message_ids (message_id text PRIMARY KEY, chat_id text, seq bigint)",
    "CREATE TABLE IF NOT EXISTS plugin_cursors (plugin text, chat_id text, seq bigint, PRIMARY KEY (plugin, chat_id))",
    f"""CREATE TABLE IF NOT EXISTS media_by_uploader (
        uploader_id text, created_at bigint, media_id text, size bigint,
        PRIMARY KEY (uploader_id, created_at, media_id)) WITH default_time_to_live = {MEDIA_QUOTA_TTL_S}""",
    """CREATE TABLE IF NOT EXISTS media_unattached (
        day bigint, created_at bigint, media_id text, PRIMARY KEY (day, created_at, media_id))""",
    # Plugins' receipt and chat events (`events_after`), and the minutes that have any.
    f"""CREATE TABLE IF NOT EXISTS plugin_events (
        kind text, minute bigint, at bigint, event_id timeuuid, body text,
        PRIMARY KEY ((kind, minute), at, event_id)) WITH default_time_to_live = {EVENT_TTL_S}
        AND compaction = {{'class': 'TimeWindowCompactionStrategy',
                           'compaction_window_unit': 'HOURS', 'compaction_window_size': 6}}""",
    f"""CREATE TABLE IF NOT EXISTS plugin_event_minutes (kind text, minute bigint,
        PRIMARY KEY (kind, minute)) WITH default_time_to_live = {EVENT_TTL_S}""",
]

_MEDIA_FIELDS = [f.name for f in dataclasses.fields(Media)]
_MEDIA_COLUMNS = ", ".join(_MEDIA_FIELDS)
DAY_MS = 86_400_000

_MESSAGE_FIELDS = "seq, message_id, sender_id, content, attachments, created_at, client_msg_id, chain"


def bucket_of(seq: int) -> int:
    return seq // BUCKET_SIZE


# A message's id names its place: unique because (chat, seq) is (the fence), and found without an
# index. Opaque to clients (PROTOCOL.md); ids from other stores are never parsed as places.
def message_id_of(chat_id: str, seq: int) -> str:
    return f"m-{chat_id}-{seq}"


def message_place(message_id: str) -> tuple[str, int] | None:
    if not message_id.startswith("m-"):
        return None
    chat_id, _, seq = message_id[2:].rpartition("-")
    return (chat_id, int(seq)) if chat_id and seq.isdigit() else None


@dataclass(frozen=True)
class CassandraUrl:
    """`cassandra://host[:port][,host...]/keyspace?replication=N&consistency=ONE`"""

    hosts: list[str]
    port: int
    keyspace: str
    replication: int
    consistency: str

    @classmethod
    def parse(cls, url: str) -> CassandraUrl:
        parts = urlsplit(url)
        if parts.scheme != "cassandra":
            raise ValueError(f"not a cassandra:// url: {url!r}")
        netloc = parts.netloc or "127.0.0.1:9042"
        hosts, port = [], 9042
        for item in netloc.split(","):
            host, _, p = item.partition(":")
            hosts.append(host or "127.0.0.1")
            if p:
                port = int(p)
        keyspace = parts.path.strip("/") or "pychat"
        if not keyspace.replace("_", "").isalnum():
            raise ValueError(f"keyspace must be letters, digits and _: {keyspace!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        replication = int(query.get("replication", "1"))
        default = "ONE" if replication == 1 else "QUORUM"
        consistency = query.get("consistency", default).upper()
        if consistency not in ConsistencyLevel.name_to_value:
            raise ValueError(f"unknown consistency level {consistency!r}")
        return cls(hosts, port, keyspace, replication, consistency)


class CassandraStore:
    unavailable_errors: tuple[type[BaseException], ...] = (
        DriverException,
        RequestExecutionException,
        NoHostAvailable,
        OperationTimedOut,
    )

    def __init__(self, session: Session, cluster: Cluster | None = None) -> None:
        self.session = session
        self._cluster = cluster
        # The true last seq of each chat this process writes (it is the chats' only writer).
        self._last: dict[str, int] = {}
        # ... and the chain value of the message at that seq (pychat/chain.py).
        self._chain: dict[str, bytes] = {}
        self._prepared: dict[str, PreparedStatement] = {}
        self._members_cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._members_lock = threading.Lock()
        # What plugins' event hooks want recorded ("receipt", "chat"; `record_events`).
        self.event_kinds: frozenset[str] = frozenset()
        unchained = self._migrate()
        self._prepare()
        if unchained:
            self._chain_stored()

    @classmethod
    def from_url(cls, url: str) -> CassandraStore:
        u = CassandraUrl.parse(url)
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
            consistency_level=ConsistencyLevel.name_to_value[u.consistency],
            serial_consistency_level=ConsistencyLevel.SERIAL,
            request_timeout=10.0,
            row_factory=_named_rows,
        )
        # No compression: the driver would lz4 every frame (CPU on both ends) to save bandwidth
        # that a store next door does not need.
        cluster = Cluster(
            u.hosts,
            port=u.port,
            protocol_version=5,
            compression=False,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        )
        session = cluster.connect()
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {u.keyspace} WITH replication ="
            f" {{'class': 'SimpleStrategy', 'replication_factor': {u.replication}}}"
        )
        session.set_keyspace(u.keyspace)
        return cls(session, cluster)

    def _migrate(self) -> bool:
        """Creates the tables (or keeps them: every statement is IF NOT EXISTS) and records the
        version. True when messages stored before schema 4 need their chain values."""
        row = None
        try:
            row = self.session.execute("SELECT value FROM meta WHERE key = 'schema_version'").one()
        except Exception:  # no meta table yet: a new keyspace
            row = None
        if row is not None and int(row.value) > SCHEMA_VERSION:
            raise RuntimeError(
                f"the keyspace has schema {row.value}, newer than this pychat ({SCHEMA_VERSION})"
            )
        for statement in SCHEMA:
            self.session.execute(statement)
        if row is not None and int(row.value) < 5:
            # Schema 5 finds users by prefix: the users stored before are indexed once (again,
            # harmlessly, if an upgrade was cut short before it recorded the version).
            users = self.session.execute("SELECT user_id, username FROM users")
            self._index_usernames((user.user_id, user.username) for user in users)
        unchained = row is not None and int(row.value) < 4
        if unchained:
            columns = self.session.execute(
                "SELECT column_name FROM system_schema.columns WHERE keyspace_name = %s AND table_name = 'messages'",
                (self.session.keyspace,),
            )
            if "chain" not in {c.column_name for c in columns}:
                self.session.execute("ALTER TABLE messages ADD chain blob")
        if row is not None and int(row.value) == 1:
            # Schema 1 kept keys in `idempotency`, one partition each: they are still looked up
            # there until the last of them has expired.
            until = now_ms() + KEYS_TTL_S * 1000
            self.session.execute(
                "INSERT INTO meta (key, value) VALUES ('legacy_keys_until', %s) IF NOT EXISTS", (str(until),)
            )
        if not unchained:  # else once every message has its value (`_chain_stored`)
            self._record_version()
        legacy = self.session.execute("SELECT value FROM meta WHERE key = 'legacy_keys_until'").one()
        self._legacy_keys_until = int(legacy.value) if legacy else 0
        return unchained

    def _record_version(self) -> None:
        self.session.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', %s)", (str(SCHEMA_VERSION),)
        )

    def _chain_stored(self) -> None:
        """Schema 3 -> 4: the chain values of the messages stored before, chat by chat; the
        version is recorded after the last, so an upgrade cut short starts over (it rewrites
        the same values)."""
        started, total = time.monotonic(), 0
        for r in self.session.execute("SELECT chat_id FROM chats"):
            total += self._chain_chat(r.chat_id)[1]
        self._record_version()
        log.info(
            "computed the chain values of %d stored messages (%.1f s)", total, time.monotonic() - started
        )

    def _chain_chat(self, chat_id: str) -> tuple[bytes, int]:
        """Writes the chain value of every message of the chat (stored before there were any);
        its last value and how many messages it has."""
        prev, after, count = genesis(chat_id), 0, 0
        while True:
            rows = self._rows_after(chat_id, after, 1000)
            values = []
            for m in rows:
                prev = link_stored(prev, m.seq, m.sender_id, m.content, m.created_at, m.attachments or "[]")
                values.append((prev, chat_id, bucket_of(m.seq), m.seq))
            self._write_all(self._q_chain_put, values)
            count += len(rows)
            if len(rows) < 1000:
                return prev, count
            after = rows[-1].seq

    def _chain_at(self, chat_id: str, seq: int) -> bytes:
        """The chain value of the chat's message `seq` (the chat's genesis value for 0)."""
        if seq <= 0:
            return genesis(chat_id)
        row = self.session.execute(self._q_message, (chat_id, bucket_of(seq), seq)).one()
        if row is None or row.chain is None:  # written by a version before chains
            return self._chain_chat(chat_id)[0]
        return bytes(row.chain)

    def _head(self, chat_id: str, hint: int) -> None:
        """This writer learns the chat's true last seq and its chain value."""
        last = self._true_last(chat_id, hint)
        self._chain[chat_id] = self._chain_at(chat_id, last)
        self._last[chat_id] = last

    def _prepare(self) -> None:
        p = self.session.prepare
        self._q_keys = p(
            "SELECT chat_id, sender_id, client_msg_id, message_id, seq FROM send_keys"
            " WHERE chat_id = ? AND day IN ? AND (sender_id, client_msg_id) IN ?"
        )
        self._q_key_put = p(
            "INSERT INTO send_keys (chat_id, day, sender_id, client_msg_id, message_id, seq)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )
        if self._legacy_keys_until:
            self._q_legacy_key = p(
                "SELECT message_id, seq FROM idempotency WHERE chat_id = ? AND sender_id = ? AND client_msg_id = ?"
            )
        self._q_message = p(
            f"SELECT {_MESSAGE_FIELDS} FROM messages WHERE chat_id = ? AND bucket = ? AND seq = ?"
        )
        self._q_bucket_last = p(
            "SELECT bucket_last_seq FROM messages WHERE chat_id = ? AND bucket = ? LIMIT 1"
        )
        self._q_fence = p(
            "UPDATE messages SET bucket_last_seq = ? WHERE chat_id = ? AND bucket = ? IF bucket_last_seq = ?"
        )
        self._q_row = p(
            "INSERT INTO messages (chat_id, bucket, seq, message_id, sender_id, content, attachments,"
            " created_at, client_msg_id, chain) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._q_chain_put = p("UPDATE messages SET chain = ? WHERE chat_id = ? AND bucket = ? AND seq = ?")
        self._q_chat_last = p("UPDATE chats USING TIMESTAMP ? SET last_seq = ? WHERE chat_id = ?")
        self._q_chat = p(
            "SELECT chat_id, kind, title, created_by, created_at, last_seq FROM chats WHERE chat_id = ?"
        )
        self._q_members = p("SELECT user_id, joined_at FROM chat_members WHERE chat_id = ?")
        self._q_member = p("SELECT user_id FROM chat_members WHERE chat_id = ? AND user_id = ?")
        self._q_user_chat = p(
            "SELECT active, delivered_seq, read_seq FROM user_chats WHERE user_id = ? AND chat_id = ?"
        )
        self._q_delivered = p(
            "UPDATE user_chats USING TIMESTAMP ? SET delivered_seq = ? WHERE user_id = ? AND chat_id = ?"
        )
        self._q_read = p(
            "UPDATE user_chats USING TIMESTAMP ? SET read_seq = ? WHERE user_id = ? AND chat_id = ?"
        )
        self._q_seen = p("UPDATE users USING TIMESTAMP ? SET last_seen = ? WHERE user_id = ?")
        self._q_after = p(
            f"SELECT {_MESSAGE_FIELDS} FROM messages WHERE chat_id = ? AND bucket = ? AND seq > ? ORDER BY seq LIMIT ?"
        )
        self._q_before = p(
            f"SELECT {_MESSAGE_FIELDS} FROM messages WHERE chat_id = ? AND bucket = ? AND seq < ? AND seq > ?"
            " ORDER BY seq DESC LIMIT ?"
        )
        self._q_user = p(
            "SELECT user_id, username, display_name, password_hash, created_at, last_seen FROM users WHERE user_id = ?"
        )

        self._q_media_put = p(
            f"INSERT INTO media ({_MEDIA_COLUMNS}, attached) VALUES ({', '.join('?' * (len(_MEDIA_FIELDS) + 1))})"
            " IF NOT EXISTS"
        )
        self._q_media_get = p(f"SELECT {_MEDIA_COLUMNS} FROM media WHERE media_id = ?")
        # Compare-and-set both ways: a send marks media attached only if it still exists; garbage
        # collection deletes it only if still unattached.
        self._q_media_attach = p("UPDATE media SET attached = true WHERE media_id = ? IF EXISTS")
        self._q_media_drop = p("DELETE FROM media WHERE media_id = ? IF attached = false")
        self._q_media_blob = p("INSERT INTO media_blobs (sha256, media_id) VALUES (?, ?)")
        self._q_media_blob_drop = p("DELETE FROM media_blobs WHERE sha256 = ? AND media_id = ?")
        self._q_blob_used = p("SELECT media_id FROM media_blobs WHERE sha256 = ? LIMIT 1")
        self._q_media_post = p("INSERT INTO media_posts (media_id, chat_id) VALUES (?, ?)")
        self._q_media_chats = p("SELECT chat_id FROM media_posts WHERE media_id = ?")
        self._q_media_upload = p(
            "INSERT INTO media_by_uploader (uploader_id, created_at, media_id, size) VALUES (?, ?, ?, ?)"
        )
        self._q_media_uploads = p(
            "SELECT created_at, size FROM media_by_uploader WHERE uploader_id = ? AND created_at >= ?"
        )
        self._q_media_unattached = p(
            "INSERT INTO media_unattached (day, created_at, media_id) VALUES (?, ?, ?)"
        )
        self._q_unattached_day = p(
            "SELECT media_id FROM media_unattached WHERE day = ? AND created_at < ? LIMIT ?"
        )
        self._q_unattached_drop = p(
            "DELETE FROM media_unattached WHERE day = ? AND created_at = ? AND media_id = ?"
        )

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()

    def ping(self) -> bool:
        return self.session.execute("SELECT release_version FROM system.local").one() is not None

    # helpers

    def _write_all(self, statement: PreparedStatement, args: Sequence[Sequence[Any]]) -> None:
        """Runs one write for each argument tuple, `WRITE_GROUP` to an unlogged batch (one round
        trip and one commit-log sync for the group instead of one each); raises the first failure."""
        batches = []
        for start in range(0, len(args), WRITE_GROUP):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for a in args[start : start + WRITE_GROUP]:
                batch.add(statement, a)
            batches.append((batch, ()))
        for ok, result in execute_concurrent(self.session, batches, concurrency=CONCURRENCY):
            if not ok:
                raise result

    def _all(self, statement: PreparedStatement, args: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """Runs one statement for each argument tuple; the rows of each, in order."""
        return self._all_statements([(statement, a) for a in args])

    def _all_statements(self, statements: Sequence[tuple[Any, Sequence[Any]]]) -> list[list[Any]]:
        """Runs these (statement, arguments) pairs, `CONCURRENCY` at a time; the rows of each, in
        order. Raises the first failure."""
        if not statements:
            return []
        out: list[list[Any]] = []
        for ok, result in execute_concurrent(self.session, statements, concurrency=CONCURRENCY):
            if not ok:
                raise result
            out.append(list(result))
        return out

    def _statement(self, query: str) -> PreparedStatement:
        statement = self._prepared.get(query)
        if statement is None:
            statement = self._prepared[query] = self.session.prepare(query)
        return statement

    def _in(self, query: str, ids: Iterable[str], *extra: Any) -> list[Any]:
        """`query` has one `IN ?` (then `extra`'s markers): its rows over every chunk of ids."""
        statement = self._statement(query)
        # Cassandra refuses an empty partition key; no row has one.
        ids = [i for i in dict.fromkeys(ids) if i]
        rows: list[Any] = []
        for start in range(0, len(ids), IN_CHUNK):
            rows.extend(self.session.execute(statement, (ids[start : start + IN_CHUNK], *extra)))
        return rows

    def _true_last(self, chat_id: str, hint: int) -> int:
        """A chat's last stored seq: the `bucket_last_seq` of its newest bucket, found from the
        chats row's `last_seq` (which never runs ahead of it)."""
        bucket = bucket_of(hint)
        last = hint
        while True:
            row = self.session.execute(self._q_bucket_last, (chat_id, bucket)).one()
            if row is None or row.bucket_last_seq is None:
                return last
            last = max(last, int(row.bucket_last_seq))
            if last < (bucket + 1) * BUCKET_SIZE - 1:
                return last
            bucket += 1

    # users

    def create_user(self, user: User) -> None:
        self.session.execute(
            "INSERT INTO users (user_id, username, display_name, password_hash, created_at) VALUES (%s, %s, %s, %s, %s)",
            (user.user_id, user.username, user.display_name, user.password_hash, user.created_at),
        )
        applied = self.session.execute(
            "INSERT INTO usernames (username_key, user_id) VALUES (%s, %s) IF NOT EXISTS",
            (user.username.lower(), user.user_id),
        ).one()
        if not applied.applied:
            self.session.execute("DELETE FROM users WHERE user_id = %s", (user.user_id,))
            raise ApiError("conflict", "username is taken")
        self._index_usernames([(user.user_id, user.username)])

    def _index_usernames(self, users: Iterable[tuple[str, str]]) -> None:
        """Each (user_id, username) found by the first 1 to `USERNAME_PREFIX` characters of the
        username; written `BACKFILL_ROWS` rows at a time (the upgrade to schema 5 passes them all)."""
        statement = self._statement(
            "INSERT INTO usernames_by_prefix (prefix, username_key, user_id) VALUES (?, ?, ?)"
        )
        rows: list[tuple[str, str, str]] = []
        for user_id, username in users:
            key = username.lower()
            rows += [(key[:n], key, user_id) for n in range(1, min(len(key), USERNAME_PREFIX) + 1)]
            if len(rows) >= BACKFILL_ROWS:
                self._write_all(statement, rows)
                rows = []
        if rows:
            self._write_all(statement, rows)

    def users_named(self, prefix: str, limit: int) -> list[User]:
        key = prefix.lower()
        if not key:
            return []
        rows = self.session.execute(
            self._statement(
                "SELECT user_id FROM usernames_by_prefix WHERE prefix = ? AND username_key >= ?"
                " AND username_key < ? LIMIT ?"
            ),
            (key[:USERNAME_PREFIX], key, key + USERNAME_END, limit),
        )
        found = {u.user_id: u for u in self.users_by_ids([r.user_id for r in rows])}
        return sorted(found.values(), key=lambda u: u.username.lower())

    def users_by_ids(self, user_ids: list[str]) -> list[User]:
        return [
            self._user_of(r)
            for r in self._in(
                "SELECT user_id, username, display_name, password_hash, created_at FROM users WHERE user_id IN ?",
                user_ids,
            )
        ]

    @staticmethod
    def _user_of(row: Any) -> User:
        return User(row.user_id, row.username, row.display_name, row.password_hash, row.created_at)

    def user_by_name(self, username: str) -> User | None:
        if not username:
            return None
        row = self.session.execute(
            "SELECT user_id FROM usernames WHERE username_key = %s", (username.lower(),)
        ).one()
        return self.user_by_id(row.user_id) if row else None

    def user_by_id(self, user_id: str) -> User | None:
        if not user_id:
            return None
        row = self.session.execute(self._q_user, (user_id,)).one()
        return self._user_of(row) if row else None

    def existing_users(self, user_ids: list[str]) -> set[str]:
        return {r.user_id for r in self._in("SELECT user_id FROM users WHERE user_id IN ?", user_ids)}

    def all_users(self) -> list[User]:
        rows = self.session.execute(
            "SELECT user_id, username, display_name, password_hash, created_at FROM users"
        )
        return [self._user_of(r) for r in rows]

    def set_password_hash(self, user_id: str, password_hash: str) -> bool:
        # IF EXISTS: an UPDATE of no row would make one.
        row = self.session.execute(
            "UPDATE users SET password_hash = %s WHERE user_id = %s IF EXISTS", (password_hash, user_id)
        ).one()
        return bool(row.applied)

    # chats

    def _members(self, chat_id: str) -> list[str]:
        return _in_join_order(self.session.execute(self._q_members, (chat_id,)))

    def create_chat(self, chat: Chat, direct_key: str | None) -> tuple[Chat, bool]:
        if direct_key is not None:
            taken = self.session.execute(
                "INSERT INTO direct_chats (direct_key, chat_id) VALUES (%s, %s) IF NOT EXISTS",
                (direct_key, chat.chat_id),
            ).one()
            if not taken.applied:
                existing = self.get_chat(taken.chat_id)
                if existing is not None:
                    return existing, False
                chat.chat_id = taken.chat_id  # its creator crashed midway: finish it
        created = (
            "INSERT INTO chats (chat_id, kind, title, created_by, created_at) VALUES (%s, %s, %s, %s, %s)",
            (chat.chat_id, chat.kind, chat.title, chat.created_by, chat.created_at),
        )
        # The event goes with the chat's row (a creator that dies before the members' rows leaves
        # a chat its retry finishes; the event already names every member).
        self._together([created], [("chat", chat_created(chat))])
        for user_id in chat.members:
            self._join(chat.chat_id, user_id, chat.created_at)
        return chat, True

    def _join(
        self, chat_id: str, user_id: str, at: int, events: list[tuple[str, dict[str, Any]]] | None = None
    ) -> None:
        # The pointer cells are left alone: a former member's come back with it.
        self._together(
            [
                (
                    "INSERT INTO chat_members (chat_id, user_id, joined_at) VALUES (%s, %s, %s)",
                    (chat_id, user_id, at),
                ),
                (
                    "UPDATE user_chats SET active = true, joined_at = %s WHERE user_id = %s AND chat_id = %s",
                    (at, user_id, chat_id),
                ),
            ],
            events or [],
        )

    def _together(
        self, statements: list[tuple[Any, tuple[Any, ...]]], events: list[tuple[str, dict[str, Any]]]
    ) -> None:
        """The statements one by one, or with the (kind, body) events plugins want in one logged
        batch (all of them, or after a crash all of them in the end: an event is not lost while
        its change lands)."""
        writes = [w for kind, body in events for w in self._event(kind, body)]
        if not writes:
            for q, args in statements:
                self.session.execute(q, args)
            return
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        for q, args in [*statements, *writes]:
            batch.add(q, args)
        try:
            self.session.execute(batch)
        except self.unavailable_errors:
            # A batch that timed out may still be applied later by the batchlog, its event then
            # placed below a feed's settled cursor: told again at a fresh place (at least once;
            # the caller hears the failure, so the change may also not have happened).
            try:  # `_event` places them now
                self._all_statements([w for kind, body in events for w in self._event(kind, body)])
            except self.unavailable_errors:
                log.warning("an event whose change timed out could not be told again")
            raise

    def get_chat(self, chat_id: str) -> Chat | None:
        if not chat_id:
            return None
        # Both reads at once: one round trip (REST checks membership this way on every call).
        members = self.session.execute_async(self._q_members, (chat_id,))
        row = self.session.execute(self._q_chat, (chat_id,)).one()
        who = _in_join_order(members.result())
        if row is None or row.kind is None:
            return None
        return Chat(row.chat_id, row.kind, row.title, row.created_by, row.created_at, row.last_seq or 0, who)

    def list_chats(self, user_id: str) -> list[dict[str, Any]]:
        mine = {
            r.chat_id: r.read_seq or 0
            for r in self.session.execute(
                "SELECT chat_id, active, read_seq FROM user_chats WHERE user_id = %s", (user_id,)
            )
            if r.active
        }
        chats = self._in(
            "SELECT chat_id, kind, title, created_by, created_at, last_seq FROM chats WHERE chat_id IN ?",
            mine,
        )
        # Every chat's members, last message and unread rows in one concurrent round (a user in
        # 100 chats is 300 reads: at once, not one after another).
        with_last = [r for r in chats if r.last_seq]
        unread_read = [r for r in chats if 0 < (r.last_seq or 0) - mine[r.chat_id] <= UNREAD_SCAN]
        statements: list[tuple[PreparedStatement, tuple[Any, ...]]] = [
            (self._q_members, (r.chat_id,)) for r in chats
        ]
        statements += [(self._q_message, (r.chat_id, bucket_of(r.last_seq), r.last_seq)) for r in with_last]
        statements += [
            (self._q_after, (r.chat_id, bucket_of(mine[r.chat_id] + 1), mine[r.chat_id], UNREAD_SCAN))
            for r in unread_read
        ]
        answers = iter(self._all_statements(statements))
        members = {r.chat_id: next(answers) for r in chats}
        last_rows = {r.chat_id: next(answers) for r in with_last}
        unread_rows = {r.chat_id: next(answers) for r in unread_read}
        out = []
        for r in chats:
            chat = Chat(
                r.chat_id,
                r.kind,
                r.title,
                r.created_by,
                r.created_at,
                r.last_seq or 0,
                _in_join_order(members[r.chat_id]),
            )
            item = chat.to_json()
            last = chat.last_seq
            row = last_rows.get(r.chat_id)
            item["last_message"] = self._message_json(r.chat_id, row[0]) if row else None
            read = mine[r.chat_id]
            if r.chat_id in unread_rows and bucket_of(read + 1) == bucket_of(last):
                # One bucket holds every unread row: the read above counted them all.
                item["unread"] = sum(
                    1 for m in unread_rows[r.chat_id] if m.sender_id != user_id and m.seq <= last
                )
            else:
                item["unread"] = self._unread(r.chat_id, read, last, user_id)
            out.append(item)
        # Newest activity first: the last message's time, or the chat's creation.
        out.sort(key=lambda c: (-(c["last_message"] or c)["created_at"], c["chat_id"]))
        return out

    def _unread(self, chat_id: str, read_seq: int, last: int, user_id: str) -> int:
        """Messages above the read pointer not sent by the user (counted up to `UNREAD_SCAN`)."""
        if last <= read_seq:
            return 0
        if last - read_seq > UNREAD_SCAN:
            return last - read_seq
        count, after = 0, read_seq
        while after < last:
            rows = list(
                self.session.execute(self._q_after, (chat_id, bucket_of(after + 1), after, UNREAD_SCAN))
            )
            if not rows:
                after = (bucket_of(after + 1) + 1) * BUCKET_SIZE - 1
                continue
            count += sum(1 for m in rows if m.sender_id != user_id and m.seq <= last)
            after = rows[-1].seq
        return count

    def add_member(self, chat_id: str, user_id: str) -> bool:
        if self.is_member(chat_id, user_id):
            return False
        at = now_ms()
        self._join(chat_id, user_id, at, [("chat", member_event("added", chat_id, user_id, at))])
        self.forget_members(chat_id)
        return True

    def remove_member(self, chat_id: str, user_id: str) -> bool:
        if not self.is_member(chat_id, user_id):
            return False
        event = member_event("removed", chat_id, user_id, now_ms())
        self._together(
            [
                ("DELETE FROM chat_members WHERE chat_id = %s AND user_id = %s", (chat_id, user_id)),
                # The row stays (inactive) with its pointers, for a later add_member.
                (
                    "UPDATE user_chats SET active = false WHERE user_id = %s AND chat_id = %s",
                    (user_id, chat_id),
                ),
            ],
            [("chat", event)],
        )
        self.forget_members(chat_id)
        return True

    def is_member(self, chat_id: str, user_id: str) -> bool:
        if not chat_id or not user_id:
            return False
        return self.session.execute(self._q_member, (chat_id, user_id)).one() is not None

    def all_memberships(self) -> list[tuple[str, str, list[str]]]:
        members: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for r in self.session.execute("SELECT chat_id, user_id, joined_at FROM chat_members"):
            members[r.chat_id].append((r.joined_at or 0, r.user_id))
        out = []
        for r in self.session.execute("SELECT chat_id, kind FROM chats"):
            if r.kind is not None:
                out.append((r.chat_id, r.kind, [u for _, u in sorted(members.get(r.chat_id, []))]))
        return out

    def sync_chats(self, user_id: str, since: dict[str, int]) -> list[tuple[str, int, int]]:
        mine = {
            r.chat_id: r.read_seq or 0
            for r in self.session.execute(
                "SELECT chat_id, active, read_seq FROM user_chats WHERE user_id = %s", (user_id,)
            )
            if r.active
        }
        last = {
            r.chat_id: r.last_seq or 0
            for r in self._in("SELECT chat_id, last_seq FROM chats WHERE chat_id IN ?", mine)
        }
        return [(chat_id, since.get(chat_id, read), last.get(chat_id, 0)) for chat_id, read in mine.items()]

    def pointers(self, chat_id: str) -> dict[str, tuple[int, int]]:
        members = sorted(self._members(chat_id))
        rows = self._in(
            "SELECT user_id, delivered_seq, read_seq FROM user_chats WHERE user_id IN ? AND chat_id = ?",
            members,
            chat_id,
        )
        rows.sort(key=lambda r: r.user_id)
        return {r.user_id: (r.delivered_seq or 0, r.read_seq or 0) for r in rows}

    # presence

    def last_seen(self, user_id: str) -> int | None:
        if not user_id:
            return None
        row = self.session.execute("SELECT last_seen FROM users WHERE user_id = %s", (user_id,)).one()
        return row.last_seen if row else None

    def last_seen_many(self, user_ids: list[str]) -> dict[str, int | None]:
        return {
            r.user_id: r.last_seen
            for r in self._in("SELECT user_id, last_seen FROM users WHERE user_id IN ?", user_ids)
        }

    def visible_users(self, viewer_id: str, user_ids: list[str]) -> set[str]:
        wanted = set(user_ids)
        visible = {viewer_id} & wanted
        chats = [
            r.chat_id
            for r in self.session.execute(
                "SELECT chat_id, active FROM user_chats WHERE user_id = %s", (viewer_id,)
            )
            if r.active
        ]
        for rows in self._all(self._q_members, [(c,) for c in chats]):
            visible |= {r.user_id for r in rows} & wanted
            if visible == wanted:
                break
        return visible

    # messages

    def append_batch(
        self,
        sends: list[SendRequest],
        pointers: list[PointerRequest],
        seen: list[tuple[str, int]] | None = None,
    ) -> tuple[list[SendResult], list[PointerResult]]:
        send_results = self._append_sends(sends) if sends else []
        pointer_results = self._move_pointers(pointers) if pointers else []
        if seen:
            self._all(self._q_seen, [(at * 1000, at, user_id) for user_id, at in seen])
        return send_results, pointer_results

    def _append_sends(self, sends: list[SendRequest]) -> list[SendResult]:
        """The batch's sends in a few concurrent rounds (never a round trip per send or per chat in
        turn): the chats, their members and every send's key at once; the fenced batches with the
        new keys; the chats' hints."""
        results: list[SendResult | None] = [None] * len(sends)
        chat_ids = list(dict.fromkeys(s.chat_id for s in sends if s.chat_id))
        members, uncached = self._cached_members(chat_ids)
        chat_query = self._statement("SELECT chat_id, kind, last_seq FROM chats WHERE chat_id IN ?")
        statements: list[tuple[PreparedStatement, tuple[Any, ...]]] = [
            (chat_query, (chat_ids[i : i + IN_CHUNK],)) for i in range(0, len(chat_ids), IN_CHUNK)
        ]
        statements += [(self._q_members, (c,)) for c in uncached]
        keys = _keys_by_chat(sends)
        statements += self._key_queries(keys)
        answers = iter(self._all_statements(statements))
        chat_rows = {r.chat_id: r for _ in range(0, len(chat_ids), IN_CHUNK) for r in next(answers)}
        members.update(self._remember_members({c: next(answers) for c in uncached}))
        found = self._found_keys(answers)
        # The first touch of a chat by this writer writes the keys a crash may have left out.
        new = {c: r.last_seq or 0 for c, r in chat_rows.items() if c not in self._last and r.kind is not None}
        caught = self._catch_up(new, keys) if new else {}
        if self._legacy_keys_until > now_ms():
            found.update(self._legacy_keys([k for c in chat_rows for k in keys.get(c, ()) if k not in found]))
        hits: dict[int, list[tuple[str, int]]] = {}
        originals: dict[int, Stored] = {}
        for i, s in enumerate(sends):
            key = (s.chat_id, s.sender_id, s.client_msg_id)
            if key in caught:
                originals[i] = caught[key]
            elif key in found:
                hits[i] = found[key]
        originals.update(self._originals(sends, hits))
        # A retry of a message whose batch went through but whose chat hint was not written yet
        # (a failure in between) catches the chat up from its hint (every row above it gets its
        # key, then the hint moves), so that sync finds it.
        behind = {
            sends[i].chat_id: chat_rows[sends[i].chat_id].last_seq or 0
            for i, r in originals.items()
            if r.seq > (chat_rows[sends[i].chat_id].last_seq or 0)
        }
        if behind:
            self._catch_up(behind, {})
        media = self._media_of([s for i, s in enumerate(sends) if s.attachments and i not in originals])
        # New sends per chat, in order; a key repeated in the batch is stored once.
        fresh: dict[str, list[int]] = defaultdict(list)
        repeats: dict[int, int] = {}
        first_of: dict[tuple[str, str, str], int] = {}
        for i, s in enumerate(sends):
            if s.chat_id not in chat_rows or chat_rows[s.chat_id].kind is None:
                results[i] = Failed("not_found", "no such chat")
            elif i in originals:
                results[i] = originals[i]
            elif s.sender_id not in members.get(s.chat_id, ()):
                results[i] = Failed("forbidden", "not a member of this chat")
            elif s.attachments and (refused := self._check_attachments(s, media)) is not None:
                results[i] = refused
            elif (key := (s.chat_id, s.sender_id, s.client_msg_id)) in first_of:
                repeats[i] = first_of[key]
            else:
                first_of[key] = i
                fresh[s.chat_id].append(i)
        attached: dict[int, str] = {}
        if media:
            for i, answer in self._attach(sends, fresh, media, attached).items():
                results[i] = answer
            fresh = {c: [i for i in indexes if results[i] is None] for c, indexes in fresh.items()}
            fresh = {c: indexes for c, indexes in fresh.items() if indexes}
        if fresh:
            created_at = now_ms()
            hints = {c: chat_rows[c].last_seq or 0 for c in fresh}
            for i, answer in self._store_chats(fresh, sends, hints, created_at, attached).items():
                results[i] = answer
        for i, first in repeats.items():
            was = results[first]
            if isinstance(was, Stored):
                was = Stored(was.message_id, was.seq, was.created_at, was.content, was.attachments, True)
            results[i] = was
        return [r if r is not None else Failed("internal", "no result") for r in results]

    # media

    def _media_of(self, sends: list[SendRequest]) -> dict[str, tuple[Media, bool]]:
        """The media these sends carry, and whether each was attached already."""
        wanted = sorted({m for s in sends for m in s.attachments})
        if not wanted:
            return {}
        rows = self._in(f"SELECT {_MEDIA_COLUMNS}, attached FROM media WHERE media_id IN ?", wanted)
        return {r.media_id: (_media(r), bool(r.attached)) for r in rows}

    def _check_attachments(self, s: SendRequest, media: dict[str, tuple[Media, bool]]) -> Failed | None:
        for media_id in s.attachments:
            found = media.get(media_id)
            if found is None:
                return Failed("not_found", f"no such media: {media_id}")
            m = found[0]
            if m.uploader_id != s.sender_id and not self.may_see_media(media_id, s.sender_id):
                return Failed("forbidden", f"you may not post media {media_id}")
        return None

    def _attach(
        self,
        sends: list[SendRequest],
        fresh: dict[str, list[int]],
        media: dict[str, tuple[Media, bool]],
        out: dict[int, str],
    ) -> dict[int, SendResult]:
        """Marks the media of these sends attached (a compare-and-set, so an upload being collected
        at this moment is either kept or refused here, never lost under a message) and lets their
        chats' members see them. Fills `out` with each send's attachment objects; the answers of
        sends that cannot be stored."""
        indexes = [i for chat in fresh.values() for i in chat if sends[i].attachments]
        # Media attached once stays attached: only the others need the compare-and-set.
        ids = sorted({m for i in indexes for m in sends[i].attachments if not media[m][1]})
        marked = dict(zip(ids, self._all(self._q_media_attach, [(m,) for m in ids]), strict=True))
        refused: dict[int, SendResult] = {}
        for i in indexes:
            gone = [
                m for m in sends[i].attachments if m in marked and not (marked[m] and marked[m][0].applied)
            ]
            if gone:
                refused[i] = Failed("not_found", f"no such media: {gone[0]}")
                continue
            items = [media[m][0].attachment() for m in sends[i].attachments]
            out[i] = json.dumps(items, separators=(",", ":"))
        grants = {(m, sends[i].chat_id) for i in indexes if i not in refused for m in sends[i].attachments}
        self._write_all(self._q_media_post, sorted(grants))
        return refused

    def add_media(self, media: Media) -> None:
        # The row through Paxos like every later write of `attached` (a send's compare-and-set,
        # the collector's conditional delete): a plain write's client timestamp could otherwise
        # land after a send's mark and set the media unattached again.
        self.session.execute(self._q_media_put, (*dataclasses.astuple(media), False))
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        batch.add(self._q_media_blob, (media.sha256, media.media_id))
        if media.thumb_sha256:
            batch.add(self._q_media_blob, (media.thumb_sha256, media.media_id))
        batch.add(self._q_media_upload, (media.uploader_id, media.created_at, media.media_id, media.size))
        batch.add(self._q_media_unattached, (media.created_at // DAY_MS, media.created_at, media.media_id))
        self.session.execute(batch)

    def get_media(self, media_id: str) -> Media | None:
        row = self.session.execute(self._q_media_get, (media_id,)).one()
        return _media(row) if row is not None else None

    def may_see_media(self, media_id: str, user_id: str) -> bool:
        m = self.get_media(media_id)
        if m is None:
            return False
        if m.uploader_id == user_id:
            return True
        chats = [r.chat_id for r in self.session.execute(self._q_media_chats, (media_id,))]
        answers = self._all(self._q_member, [(c, user_id) for c in chats])
        return any(answers)

    def uploaded_since(self, user_id: str, since_ms: int) -> tuple[int, int | None]:
        rows = list(self.session.execute(self._q_media_uploads, (user_id, since_ms)))
        return sum(r.size for r in rows), (rows[0].created_at if rows else None)

    def unattached_media(self, before_ms: int, limit: int) -> list[Media]:
        # Days from the oldest upload still waiting (kept in meta) up to the cutoff.
        row = self.session.execute("SELECT value FROM meta WHERE key = 'media_unattached_from'").one()
        first_day = int(row.value) if row else (before_ms // DAY_MS) - 30
        ids: list[str] = []
        for day in range(first_day, before_ms // DAY_MS + 1):
            for r in self.session.execute(self._q_unattached_day, (day, before_ms, limit - len(ids))):
                ids.append(r.media_id)
            if len(ids) >= limit:
                break
        media = (
            self._in(f"SELECT {_MEDIA_COLUMNS}, attached FROM media WHERE media_id IN ?", ids) if ids else []
        )
        found = {r.media_id: r for r in media}
        out = []
        for media_id in ids:
            r = found.get(media_id)
            if r is not None and not r.attached:
                out.append(_media(r))
            else:  # attached since, or removed: nothing to collect
                self._forget_unattached(media_id, r.created_at if r is not None else None)
        if not ids:  # every upload before the cutoff is collected: later rounds start later
            self.session.execute(
                "INSERT INTO meta (key, value) VALUES ('media_unattached_from', %s)",
                (str(before_ms // DAY_MS - 1),),
            )
        return out

    def _forget_unattached(self, media_id: str, created_at: int | None) -> None:
        if created_at is not None:
            self.session.execute(self._q_unattached_drop, (created_at // DAY_MS, created_at, media_id))

    def remove_unattached(self, media_id: str) -> bool:
        m = self.get_media(media_id)
        if m is None:
            return False
        applied = self.session.execute(self._q_media_drop, (media_id,)).one()
        if not applied.applied:
            return False
        self._write_all(
            self._q_media_blob_drop,
            [(sha, media_id) for sha in (m.sha256, m.thumb_sha256) if sha],
        )
        self._forget_unattached(media_id, m.created_at)
        return True

    def blob_in_use(self, sha256: str) -> bool:
        return self.session.execute(self._q_blob_used, (sha256,)).one() is not None

    def _cached_members(self, chat_ids: list[str]) -> tuple[dict[str, frozenset[str]], list[str]]:
        """The members of these chats known from a short-lived cache (this store's own membership
        changes clear it; changes by another process are seen within `MEMBERS_TTL_S`), and the
        chats to read."""
        now = time.monotonic()
        out: dict[str, frozenset[str]] = {}
        missing = []
        with self._members_lock:
            for c in chat_ids:
                cached = self._members_cache.get(c)
                if cached is not None and now - cached[0] < MEMBERS_TTL_S:
                    out[c] = cached[1]
                else:
                    missing.append(c)
        return out, missing

    def _remember_members(self, rows_of: dict[str, list[Any]]) -> dict[str, frozenset[str]]:
        now = time.monotonic()
        out = {c: frozenset(r.user_id for r in rows) for c, rows in rows_of.items()}
        with self._members_lock:
            for c, who in out.items():
                self._members_cache[c] = (now, who)
        return out

    def forget_members(self, chat_id: str) -> None:
        with self._members_lock:
            self._members_cache.pop(chat_id, None)

    def _key_queries(self, keys: dict[str, list[Key]]) -> list[tuple[PreparedStatement, tuple[Any, ...]]]:
        """One query per chat (per `IN_CHUNK` keys) over the key partitions a retry within 24 h can be in."""
        today = now_ms() // KEY_DAY_MS
        days = [today - 1, today, today + 1]
        return [
            (self._q_keys, (chat_id, days, [(k[1], k[2]) for k in chat_keys[i : i + IN_CHUNK]]))
            for chat_id, chat_keys in keys.items()
            for i in range(0, len(chat_keys), IN_CHUNK)
        ]

    def _found_keys(self, answers: Iterable[list[Any]]) -> dict[Key, list[tuple[str, int]]]:
        """The keys found by `_key_queries`' answers: every candidate (one key can sit in two day
        partitions, one of them naming a seq its fenced batch never got)."""
        found: dict[Key, list[tuple[str, int]]] = defaultdict(list)
        for rows in answers:
            for r in rows:
                found[(r.chat_id, r.sender_id, r.client_msg_id)].append((r.message_id, r.seq))
        return dict(found)

    def _legacy_keys(self, wanted: list[Key]) -> dict[Key, list[tuple[str, int]]]:
        rows = self._all(self._q_legacy_key, wanted)
        return {k: [(r[0].message_id, r[0].seq)] for k, r in zip(wanted, rows, strict=True) if r}

    def _key_writes(self, rows: list[tuple[Any, ...]]) -> list[BatchStatement]:
        """The keys of these message rows (one chat's), one unlogged batch per key partition (and
        `FENCE_ROWS` keys): a single-partition batch is one mutation."""
        by_day: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        for r in rows:
            by_day[r[7] // KEY_DAY_MS].append(r)
        batches = []
        for day, day_rows in by_day.items():
            for start in range(0, len(day_rows), FENCE_ROWS):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for r in day_rows[start : start + FENCE_ROWS]:
                    batch.add(self._q_key_put, (r[0], day, r[4], r[8], r[3], r[2]))
                batches.append(batch)
        return batches

    def _catch_up(self, hints: dict[str, int], keys: dict[str, list[Key]]) -> dict[Key, Stored]:
        """This writer's first touch of these chats (or a failed fence): their true last seqs, and
        for rows above the hint (a batch whose keys or hint did not land), their keys and the
        hint written. The messages among those rows whose keys are in `keys`, as originals."""
        caught: dict[Key, Stored] = {}
        for chat_id, hint in hints.items():
            last = self._true_last(chat_id, hint)
            if last > hint:
                rows = self._rows_after(chat_id, hint, last - hint)
                as_written = [
                    (chat_id, 0, m.seq, m.message_id, m.sender_id, "", "", m.created_at, m.client_msg_id)
                    for m in rows
                ]
                for batch in self._key_writes(as_written):
                    self.session.execute(batch)
                self.session.execute(self._q_chat_last, (last, last, chat_id))
                wanted = set(keys.get(chat_id, ()))
                for m in rows:
                    if (key := (chat_id, m.sender_id, m.client_msg_id)) in wanted:
                        caught[key] = Stored(
                            m.message_id, m.seq, m.created_at, m.content, m.attachments, True
                        )
                chain = bytes(rows[-1].chain) if rows and rows[-1].seq == last and rows[-1].chain else None
                self._chain[chat_id] = chain or self._chain_at(chat_id, last)
            else:
                self._chain[chat_id] = self._chain_at(chat_id, last)
            self._last[chat_id] = last
        return caught

    def _originals(
        self, sends: list[SendRequest], found: dict[int, list[tuple[str, int]]]
    ) -> dict[int, Stored]:
        """The sends whose key names a stored message: that message (each candidate checked
        against its row, since a key is written beside its fenced batch and may name a seq that
        batch never got)."""
        asked = [(i, seq) for i, candidates in found.items() for _, seq in candidates]
        rows = self._all(self._q_message, [(sends[i].chat_id, bucket_of(seq), seq) for i, seq in asked])
        out: dict[int, Stored] = {}
        for (i, _), msg in zip(asked, rows, strict=True):
            if (
                msg
                and i not in out
                and (msg[0].sender_id, msg[0].client_msg_id)
                == (
                    sends[i].sender_id,
                    sends[i].client_msg_id,
                )
            ):
                m = msg[0]
                out[i] = Stored(m.message_id, m.seq, m.created_at, m.content, m.attachments, True)
        return out

    def _store_chats(
        self,
        fresh: dict[str, list[int]],
        sends: list[SendRequest],
        hints: dict[str, int],
        created_at: int,
        attached: dict[int, str],
    ) -> dict[int, SendResult]:
        """Numbers each chat's new sends after its last seq and stores them fenced, with their
        keys, all chats at once. The answer of each send, by its index in `sends`."""
        out: dict[int, SendResult] = {}
        pending = dict(fresh)
        for _attempt in range(5):
            if not pending:
                break
            for c in pending:
                if c not in self._last:
                    self._head(c, hints.get(c, 0))
            rows = {
                c: self._numbered(
                    c, [sends[i] for i in indexes], [attached.get(i, "[]") for i in indexes], created_at
                )
                for c, indexes in pending.items()
            }
            # The keys go beside the fenced batches (see the module's docstring for a crash
            # between them); a chat whose keys did not all land is not acked.
            key_futures = [
                (c, self.session.execute_async(batch))
                for c, chat_rows in rows.items()
                for batch in self._key_writes(chat_rows)
            ]
            fenced = self._fenced_writes({c: (self._last[c], chat_rows) for c, chat_rows in rows.items()})
            keys_failed = set()
            for c, future in key_futures:
                try:
                    future.result()
                except Exception:
                    keys_failed.add(c)
            if keys_failed:
                log.error("writing the keys of %d chats failed", len(keys_failed))
            done: dict[str, list[tuple[Any, ...]]] = {}
            for c, chat_rows in rows.items():
                count = fenced[c]
                if count is None or c in keys_failed:
                    # Stored or not, unknown: the next touch reads the truth and writes missing keys.
                    self._forget_head(c)
                    for i in pending.pop(c):
                        out[i] = Failed("unavailable", "the store did not take the message; retry")
                    continue
                written = chat_rows[:count]
                for i, r in zip(pending[c], written, strict=False):
                    out[i] = Stored(r[3], r[2], created_at, r[5], r[6], False)
                if written:
                    self._last[c] = written[-1][2]
                    self._chain[c] = written[-1][9]
                    done[c] = written
                if len(written) == len(chat_rows):
                    del pending[c]
                else:
                    pending[c] = pending[c][len(written) :]
            try:
                # The chats' hints (never back: the cell's timestamp is its value).
                self._write_all(self._q_chat_last, [(r[-1][2], r[-1][2], c) for c, r in done.items()])
            except Exception:  # stored already; a hint that lags is moved up by the next write
                log.exception("updating chat hints failed")
            if pending:
                # A fence failed: the chat moved past what this writer knew. Another writer, or a
                # batch of this one whose answer was lost (a timeout, a node killed mid-Paxos: the
                # next conditional write completes it first). Its rows may be some of these very
                # sends, retried, with no keys yet: they are caught up like a first touch, and
                # those sends get their original answer instead of a second copy.
                log.warning("%d chats moved past this writer's last seq; numbering again", len(pending))
                wanted = {
                    c: [(c, sends[i].sender_id, sends[i].client_msg_id) for i in indexes]
                    for c, indexes in pending.items()
                }
                caught: dict[Key, Stored] = {}
                for c in list(pending):
                    try:
                        caught.update(self._catch_up({c: self._last[c]}, wanted))
                    except Exception:
                        log.exception("catching up chat %s failed", c)
                        self._forget_head(c)
                        for i in pending.pop(c):
                            out[i] = Failed("unavailable", "the store did not take the message; retry")
                for c in list(pending):
                    for i in pending[c]:
                        key = (c, sends[i].sender_id, sends[i].client_msg_id)
                        if key in caught:
                            out[i] = caught[key]
                    pending[c] = [i for i in pending[c] if i not in out]
                    if not pending[c]:
                        del pending[c]
        for indexes in pending.values():
            for i in indexes:
                out[i] = Failed("unavailable", "the chat is contended by another writer; retry")
        return out

    def _numbered(
        self, chat_id: str, sends: list[SendRequest], attachments: list[str], created_at: int
    ) -> list[tuple[Any, ...]]:
        """The message rows of a chat's new sends, numbered and chained after its head (the
        `_q_row` columns)."""
        rows: list[tuple[Any, ...]] = []
        seq, chain = self._last[chat_id], self._chain[chat_id]
        for s, attached in zip(sends, attachments, strict=True):
            seq += 1
            chain = link_stored(chain, seq, s.sender_id, s.content, created_at, attached)
            rows.append(
                (
                    chat_id,
                    bucket_of(seq),
                    seq,
                    message_id_of(chat_id, seq),
                    s.sender_id,
                    s.content,
                    attached,
                    created_at,
                    s.client_msg_id,
                    chain,
                )
            )
        return rows

    def _forget_head(self, chat_id: str) -> None:
        """The chat's head is unknown (a write's outcome is): the next touch reads it."""
        self._last.pop(chat_id, None)
        self._chain.pop(chat_id, None)

    def _fenced_writes(self, chats: dict[str, tuple[int, list[tuple[Any, ...]]]]) -> dict[str, int | None]:
        """For each chat, its rows in one conditional batch per bucket, each fenced on the bucket's
        last seq; all chats at once. How many of each chat's rows were written: fewer than all
        (those of the buckets before) when another writer got there first."""
        plans: dict[str, list[tuple[int | None, list[tuple[Any, ...]]]]] = {}
        for chat_id, (last, rows) in chats.items():
            by_bucket: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
            for r in rows:
                by_bucket[r[1]].append(r)
            steps: list[tuple[int | None, list[tuple[Any, ...]]]] = []
            before = last
            for bucket, bucket_rows in sorted(by_bucket.items()):
                for part in _fence_parts(bucket_rows):
                    # A bucket's first rows meet a partition that does not exist yet: its fence is null.
                    steps.append((before if before > 0 and bucket_of(before) == bucket else None, part))
                    before = part[-1][2]
            plans[chat_id] = steps
        ok = dict.fromkeys(chats, True)
        written: dict[str, int | None] = dict.fromkeys(chats, 0)
        step = 0
        while True:
            batches = {c: steps[step] for c, steps in plans.items() if ok[c] and step < len(steps)}
            if not batches:
                return written
            futures = {}
            for chat_id, (expected, rows) in batches.items():
                batch = BatchStatement(batch_type=BatchType.LOGGED)
                batch.add(self._q_fence, (rows[-1][2], chat_id, rows[0][1], expected))
                for r in rows:
                    batch.add(self._q_row, r)
                futures[chat_id] = self.session.execute_async(batch)
            for chat_id, future in futures.items():
                try:
                    applied = future.result().one().applied
                except Exception:
                    # This chat's outcome is unknown (a timeout, the node gone); the others' stand.
                    log.exception("the fenced batch of chat %s failed", chat_id)
                    written[chat_id] = None
                    ok[chat_id] = False
                    continue
                if applied:
                    written[chat_id] = (written[chat_id] or 0) + len(batches[chat_id][1])
                else:
                    ok[chat_id] = False
            step += 1

    def _move_pointers(self, pointers: list[PointerRequest]) -> list[PointerResult]:
        keys = list(dict.fromkeys((p.user_id, p.chat_id) for p in pointers))
        try:
            current = dict(zip(keys, self._all(self._q_user_chat, keys), strict=True))
            chats = {
                r.chat_id: r.last_seq or 0
                for r in self._in(
                    "SELECT chat_id, last_seq FROM chats WHERE chat_id IN ?", {c for _, c in keys}
                )
            }
        except Exception:
            log.exception("reading pointers failed")
            return [Failed("unavailable", "the store did not answer; retry")] * len(pointers)
        state: dict[tuple[str, str], list[int]] = {}
        results: list[PointerResult] = []
        writes: list[tuple[PreparedStatement, tuple[Any, ...]]] = []
        events: list[tuple[PreparedStatement, tuple[Any, ...]]] = []
        for p in pointers:
            key = (p.user_id, p.chat_id)
            rows = current[key]
            if not rows or not rows[0].active:
                results.append(Failed("forbidden", "not a member of this chat"))
                continue
            last = max(chats.get(p.chat_id, 0), self._last.get(p.chat_id, 0))
            if p.seq > last:
                results.append(
                    Failed("bad_request", f"seq {p.seq} is beyond the chat's last message ({last})")
                )
                continue
            delivered, read = state.setdefault(key, [rows[0].delivered_seq or 0, rows[0].read_seq or 0])
            new_delivered = max(delivered, p.seq)
            new_read = max(read, p.seq) if p.kind == "read" else read
            if new_delivered != delivered:
                writes.append((self._q_delivered, (new_delivered, new_delivered, p.user_id, p.chat_id)))
            if new_read != read:
                writes.append((self._q_read, (new_read, new_read, p.user_id, p.chat_id)))
            state[key] = [new_delivered, new_read]
            results.append(
                PointerMoved(new_delivered, new_read, new_delivered != delivered, new_read != read)
            )
            if "receipt" in self.event_kinds and (new_delivered != delivered or new_read != read):
                receipt = receipt_event(p.chat_id, p.user_id, new_delivered, new_read)
                events.extend(self._event("receipt", receipt))
        try:
            # Events first: a pointer that moved has its event (one whose pointer write then
            # failed is a receipt told twice, or once early: at least once, never lost).
            for phase in (events, writes):
                futures: list[ResponseFuture] = [self.session.execute_async(q, args) for q, args in phase]
                for f in futures:
                    f.result()
        except Exception:
            log.exception("writing pointers failed")
            return [Failed("unavailable", "the store did not take the pointer; retry")] * len(pointers)
        return results

    def _message_json(self, chat_id: str, m: Any) -> dict[str, Any]:
        out = {
            "message_id": m.message_id,
            "chat_id": chat_id,
            "seq": m.seq,
            "sender_id": m.sender_id,
            "content": m.content,
            "attachments": json.loads(m.attachments or "[]"),
            "created_at": m.created_at,
            "client_msg_id": m.client_msg_id,
        }
        if m.chain is not None:
            out["chain"] = bytes(m.chain).hex()
        return out

    def _rows_after(self, chat_id: str, after: int, limit: int) -> list[Any]:
        """Up to `limit` message rows with seq > `after`, walking the buckets in order. A chat's
        seqs are gap-free (the fence), so a bucket read that stops short of the bucket's end is
        the chat's end: no read of the chat's last seq is needed."""
        out: list[Any] = []
        bucket = bucket_of(after + 1)
        while len(out) < limit:
            rows = list(self.session.execute(self._q_after, (chat_id, bucket, after, limit - len(out))))
            out.extend(rows)
            if not rows or rows[-1].seq < (bucket + 1) * BUCKET_SIZE - 1:
                break
            after, bucket = rows[-1].seq, bucket + 1
        return out

    def messages_after(self, chat_id: str, after: int, limit: int) -> list[BacklogRow]:
        return [row[:8] for row in self.chained_after(chat_id, after, limit)]

    def chained_after(self, chat_id: str, after: int, limit: int) -> list[ChainedRow]:
        return [
            (
                chat_id,
                m.seq,
                m.message_id,
                m.sender_id,
                m.content,
                m.attachments or "[]",
                m.created_at,
                m.client_msg_id,
                bytes(m.chain) if m.chain is not None else None,
            )
            for m in self._rows_after(chat_id, after, limit)
        ]

    def restore_messages(self, chat_id: str, rows: list[ChainedRow]) -> None:
        """Through the message path's own writes: fenced batches after the chat's last seq, the
        keys, then the hint."""
        if not rows:
            return
        chat = self.session.execute(self._q_chat, (chat_id,)).one()
        if chat is None:
            raise ValueError(f"no chat {chat_id}")
        last = self._true_last(chat_id, chat.last_seq or 0)
        if not follows(rows, last):
            raise ValueError(f"chat {chat_id}: the rows do not follow seq {last} without a gap")
        written = [
            (
                chat_id,
                bucket_of(seq),
                seq,
                message_id,
                sender,
                content,
                attachments,
                at,
                client_msg_id or message_id,
                chain,
            )
            for _, seq, message_id, sender, content, attachments, at, client_msg_id, chain in rows
        ]
        for batch in self._key_writes(written):
            self.session.execute(batch)
        # Ids minted by another store (SQLite's) do not say where the message is: a table does.
        foreign = [(r[3], chat_id, r[2]) for r in written if message_place(r[3]) != (chat_id, r[2])]
        if foreign:
            put = self._statement("INSERT INTO message_ids (message_id, chat_id, seq) VALUES (?, ?, ?)")
            self._write_all(put, foreign)
        if self._fenced_writes({chat_id: (last, written)})[chat_id] != len(written):
            raise RuntimeError(f"chat {chat_id}: another writer moved the chat during the import")
        top = written[-1][2]
        self.session.execute(self._q_chat_last, (top, top, chat_id))
        self._forget_head(chat_id)

    def history(
        self, chat_id: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        lo = after if after is not None else 0
        if after is not None and before is None:
            rows = self._rows_after(chat_id, lo, limit + 1)
            return [self._message_json(chat_id, m) for m in rows[:limit]], len(rows) > limit
        if before is None:
            row = self.session.execute("SELECT last_seq FROM chats WHERE chat_id = %s", (chat_id,)).one()
            hi = max(row.last_seq or 0, self._last.get(chat_id, 0)) + 1 if row else 1
        else:
            hi = before
        found: list[Any] = []
        bucket = bucket_of(max(hi - 1, 0))
        while len(found) < limit + 1 and bucket >= bucket_of(lo + 1) and bucket >= 0:
            rows = list(
                self.session.execute(self._q_before, (chat_id, bucket, hi, lo, limit + 1 - len(found)))
            )
            if not rows and not found and bucket > 0 and before is not None:
                # `before` lies past the chat's end (its bucket is empty): start at the end instead
                # of walking every empty bucket down to it.
                row = self.session.execute("SELECT last_seq FROM chats WHERE chat_id = %s", (chat_id,)).one()
                last = max(row.last_seq or 0, self._last.get(chat_id, 0)) if row else 0
                if bucket_of(last) < bucket:
                    hi, bucket = min(hi, last + 1), bucket_of(last)
                    continue
            found.extend(rows)
            if found:
                hi = found[-1].seq
            bucket -= 1
        has_more = len(found) > limit
        return [self._message_json(chat_id, m) for m in reversed(found[:limit])], has_more

    def chat_heads(self) -> list[tuple[str, int]]:
        # Hints: a chat's last seq may lag its rows by a batch whose hint write failed; the rows
        # above it are read when the chat's next message moves it.
        rows = self.session.execute("SELECT chat_id, last_seq FROM chats")
        return [(r.chat_id, r.last_seq) for r in rows if r.last_seq]

    def hook_cursors(self, plugin: str) -> dict[str, int]:
        rows = self.session.execute("SELECT chat_id, seq FROM plugin_cursors WHERE plugin = %s", (plugin,))
        return {r.chat_id: r.seq for r in rows}

    def move_hook_cursors(self, plugin: str, cursors: dict[str, int]) -> None:
        statement = self._statement(
            "UPDATE plugin_cursors USING TIMESTAMP ? SET seq = ? WHERE plugin = ? AND chat_id = ?"
        )
        self._write_all(statement, [(seq, seq, plugin, chat_id) for chat_id, seq in cursors.items()])

    # plugins' event hooks

    EVENT_SWEEP_S = 10.0
    EVENT_OVERLAP = 2_000_000  # 2 s of positions (microseconds)

    def record_events(self, kinds: set[str]) -> None:
        self.event_kinds = frozenset(kinds)

    def _event(self, kind: str, body: dict[str, Any]) -> list[tuple[PreparedStatement, tuple[Any, ...]]]:
        """The writes recording an event, if a plugin wants its kind."""
        if kind not in self.event_kinds:
            return []
        at = time.time_ns() // 1000
        minute = at // EVENT_MINUTE_US
        return [
            (
                self._statement(
                    "INSERT INTO plugin_events (kind, minute, at, event_id, body) VALUES (?, ?, ?, now(), ?)"
                ),
                (kind, minute, at, json.dumps(body, separators=(",", ":"))),
            ),
            (
                self._statement("INSERT INTO plugin_event_minutes (kind, minute) VALUES (?, ?)"),
                (kind, minute),
            ),
        ]

    def events_after(self, kind: str, after: int, limit: int) -> list[tuple[int, str, str]]:
        minutes = self.session.execute(
            self._statement("SELECT minute FROM plugin_event_minutes WHERE kind = ? AND minute >= ?"),
            (kind, after // EVENT_MINUTE_US),
        )
        read = self._statement(
            "SELECT at, event_id, body FROM plugin_events WHERE kind = ? AND minute = ? AND at > ? LIMIT ?"
        )
        out: list[tuple[int, str, str]] = []
        last_id = None
        for row in minutes:
            for e in self.session.execute(read, (kind, row.minute, after, limit - len(out))):
                out.append((e.at, str(e.event_id), e.body))
                last_id = e.event_id
            if len(out) >= limit:
                break
        if len(out) >= limit:
            # A page never ends inside a position: the rest of the last one comes with it, so a
            # reader pages on from the last position (`> at`) without skipping any.
            at = out[-1][0]
            rest = self._statement(
                "SELECT at, event_id, body FROM plugin_events WHERE kind = ? AND minute = ? AND at = ? AND event_id > ?"
            )
            for e in self.session.execute(rest, (kind, at // EVENT_MINUTE_US, at, last_id)):
                out.append((e.at, str(e.event_id), e.body))
        return out

    def events_settled(self) -> int:
        return time.time_ns() // 1000 - EVENT_SETTLE_US

    def forget_events(self, kind: str, upto: int) -> None:
        """Nothing to delete: events expire (`EVENT_TTL_S`; deletes would leave tombstones that
        every read steps over)."""

    def message_by_id(self, message_id: str) -> dict[str, Any] | None:
        where = message_place(message_id)
        if where is None and not message_id:
            return None  # Cassandra refuses an empty key
        if where is None:  # an id from another store, imported (`restore_messages`)
            row = self.session.execute(
                self._statement("SELECT chat_id, seq FROM message_ids WHERE message_id = ?"), (message_id,)
            ).one()
            if row is None:
                return None
            where = (row.chat_id, row.seq)
        chat_id, seq = where
        m = self.session.execute(self._q_message, (chat_id, bucket_of(seq), seq)).one()
        return self._message_json(chat_id, m) if m and m.message_id == message_id else None


def _media(row: Any) -> Media:
    return Media(*(getattr(row, name) for name in _MEDIA_FIELDS))


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> Any:
    # "[applied]" (a conditional write's answer) reads as `.applied`, as with the driver's factory.
    return namedtuple("Row", [re.sub(r"[^0-9a-zA-Z_]", "", n) for n in names])


def _named_rows(names: list[str], rows: list[tuple[Any, ...]]) -> list[Any]:
    """Rows as named tuples, like the driver's default factory but with one class per column list
    instead of a new class for every answer (that was 7% of the message path's CPU)."""
    row = _row_class(tuple(names))
    return [row(*r) for r in rows]


def _in_join_order(member_rows: Iterable[Any]) -> list[str]:
    """A chat's member ids from its `chat_members` rows, in the order they joined (as SQLite lists them)."""
    return [r.user_id for r in sorted(member_rows, key=lambda r: (r.joined_at, r.user_id))]


# A send's key: (chat_id, sender_id, client_msg_id).
Key = tuple[str, str, str]


def _keys_by_chat(sends: list[SendRequest]) -> dict[str, list[Key]]:
    out: dict[str, list[Key]] = defaultdict(list)
    for s in sends:
        if s.chat_id:
            out[s.chat_id].append((s.chat_id, s.sender_id, s.client_msg_id))
    return {c: list(dict.fromkeys(keys)) for c, keys in out.items()}


def _fence_parts(rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Consecutive rows cut into fenced batches under `FENCE_ROWS` and `FENCE_BYTES` (a message
    larger than that goes alone)."""
    parts: list[list[tuple[Any, ...]]] = [[]]
    size = 0
    for r in rows:
        weight = len(r[5].encode()) + 200
        if parts[-1] and (len(parts[-1]) >= FENCE_ROWS or size + weight > FENCE_BYTES):
            parts.append([])
            size = 0
        parts[-1].append(r)
        size += weight
    return parts
