"""One writer per chat, from Kafka (issue 13, `../shared/DESIGN.md` "Scale-out").

Gateway nodes produce each send to the `sends` topic keyed by its chat (`SendLog`: idempotent
producer, `acks=all`), so Kafka keeps one chat's sends in order in one partition. Every node runs a
`Sequencer` in one consumer group: the partitions the group assigns a node are the chats it owns,
and it is their only writer. Per poll it hands the records to the store's `append_batch` (which
de-duplicates, numbers after the chat's last seq and writes one fenced batch per chat), publishes
the results, and only then commits the offsets.

Why replay derives the same seqs without a checkpoint of its own: a record processed before a
crash or a rebalance but not committed is consumed again by the partition's next owner, and the
store answers it from its keys (written with the message, or caught up from the rows above the
chat's hint) with the original seq; a record that never reached the store is numbered after the
chat's true last seq, which is what the first owner would have given it, since records of a chat
arrive in one order. A stale owner (paused past its session) races the new one on the store's
fence: one numbering wins, the other finds its rows and keys (`tests/test_store_contract.py`).

What the store refused for want of a store (`unavailable`) is written again, after a pause, until
the store takes them (the partition waits, no gap is made); their senders are told `unavailable`
at once, and a retry of theirs is answered with what the first record became.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pychat.bus.records import Poison, SendRecord, decode
from pychat.gateway import Failed, Stored
from pychat.store import SendResult, Store

log = logging.getLogger("pychat.cluster.sequencer")

SENDS_TOPIC = "pychat.sends"
# Partitions of the sends topic: the most nodes that can share the writing (`kafka_partitions`).
SENDS_PARTITIONS = 256
# Records handed to the store at once (like the engine's batches).
BATCH_MAX = 1024
# Pause before writing again what the store did not take.
STORE_RETRY_S = 0.5
# A consumer with records waiting that takes none for this long is replaced (`_check_stall`).
STALL_S = 30.0


# What a sequencer publishes for each processed record.
Publish = Callable[[Sequence[tuple[SendRecord, SendResult]]], None]


@dataclass(frozen=True)
class TopicSettings:
    """How the sends topic is made (config.py's `kafka_*`; docs/operator.md, "A cluster")."""

    partitions: int = SENDS_PARTITIONS
    replication: int = 0  # 0: 3, or every broker if fewer
    min_insync: int = 0  # 0: replication - 1, at least 1
    retention_ms: int = 24 * 3600 * 1000


class TopicMismatch(RuntimeError):
    """The sends topic exists with another partition count than the settings say."""


def ensure_sends_topic(bootstrap: str, settings: TopicSettings | None = None, timeout: float = 30.0) -> None:
    """Creates the sends topic if it is missing (every node may call it; one creation wins), and
    refuses one whose partition count is not the settings': a chat's partition must never change."""
    settings = settings or TopicSettings()
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(timeout=timeout)
    existing = metadata.topics.get(SENDS_TOPIC)
    if existing is None:
        brokers = max(1, len(metadata.brokers))
        replication = settings.replication or min(3, brokers)
        min_insync = settings.min_insync or max(1, replication - 1)
        topic = NewTopic(
            SENDS_TOPIC,
            num_partitions=settings.partitions,
            replication_factor=replication,
            config={
                "min.insync.replicas": str(min_insync),
                "retention.ms": str(settings.retention_ms),
                # A record's time is the broker's (the owner derives created_at from it).
                "message.timestamp.type": "LogAppendTime",
                "unclean.leader.election.enable": "false",
                "cleanup.policy": "delete",
            },
        )
        try:
            admin.create_topics([topic])[SENDS_TOPIC].result(timeout)
            return
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise
        existing = admin.list_topics(SENDS_TOPIC, timeout=timeout).topics[SENDS_TOPIC]
    if len(existing.partitions) != settings.partitions:
        raise TopicMismatch(
            f"{SENDS_TOPIC} has {len(existing.partitions)} partitions and kafka_partitions says"
            f" {settings.partitions}: a live topic's count cannot change (a chat would get two"
            f" writers); set kafka_partitions = {len(existing.partitions)}"
        )


# How long the producer keeps trying to hand a record to the broker before its send is told
# `unavailable` (the broker is gone): well inside a client's patience.
PRODUCE_TIMEOUT_MS = 5_000


class SendLog:
    """The gateway side: produces sends keyed by chat (idempotent, acks=all: a delivered record is
    on the broker's log and never written twice by a producer retry)."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 1,
                "message.timeout.ms": PRODUCE_TIMEOUT_MS,
                "socket.nagle.disable": True,
            }
        )

    def produce(self, record: SendRecord, failed: Callable[[SendRecord, str], None]) -> str | None:
        """Queues one record without waiting; `failed(record, why)` runs (on the thread calling
        `poll`) if the broker never takes it. Returns why not at once (queue full), else None."""

        def report(error: Any, _message: Message) -> None:
            if error is not None:
                failed(record, str(error))

        try:
            self._producer.produce(
                SENDS_TOPIC, key=record.send.chat_id.encode(), value=record.encode(), on_delivery=report
            )
        except BufferError as e:
            return f"the producer's queue is full: {e}"
        except KafkaException as e:
            return str(e)
        return None

    def poll(self, timeout: float) -> None:
        """Serves delivery reports (run it in a loop on one thread)."""
        self._producer.poll(timeout)

    def submit(self, records: Sequence[SendRecord], timeout: float = 10.0) -> list[str | None]:
        """Produces the records and waits for them: per record None when the broker has it, else
        why not (the caller answers that send `unavailable`)."""
        outcome: list[str | None] = ["not delivered in time"] * len(records)

        def delivered(i: int) -> Callable[[Any, Message], None]:
            def report(error: Any, _message: Message) -> None:
                outcome[i] = None if error is None else str(error)

            return report

        for i, record in enumerate(records):
            self._producer.produce(
                SENDS_TOPIC, key=record.send.chat_id.encode(), value=record.encode(), on_delivery=delivered(i)
            )
        self._producer.flush(timeout)
        return outcome

    def close(self) -> None:
        self._producer.flush(10)


def _committed(error: Any, _partitions: Any) -> None:
    if error is not None:
        # A rebalance moved some partitions while their batch was stored (the group's generation
        # changed): their next owner consumes the records again and the store answers them with
        # the seqs given here. Nothing to undo.
        log.warning("offsets not committed (%s); the partitions' next owner replays them", error)


class Sequencer:
    """The store's only writer for the chats of the partitions the group assigns this node."""

    def __init__(self, store: Store, bootstrap: str, group: str, publish: Publish, node_id: str = "") -> None:
        self.store = store
        self.publish = publish
        self.node_id = node_id
        self._bootstrap = bootstrap
        self._group = group
        self._consumer = self._join()
        self.last_error: str | None = None  # the consumer's last error, for logs and tests
        self._error_logged = 0.0
        self._last_record = time.monotonic()
        self.rejoined = 0  # times a stalled consumer was replaced (`_check_stall`)

    def _join(self) -> Consumer:
        """A consumer of the sends topic in this node's group."""
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": self._group,
                "client.id": self.node_id or "pychat",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "socket.nagle.disable": True,
                # Hand a record over as soon as the broker has one.
                "fetch.wait.max.ms": 10,
                # A node that stops polling this long loses its partitions (and is then a stale owner).
                "session.timeout.ms": 10_000,
                "max.poll.interval.ms": 60_000,
                "on_commit": _committed,
            }
        )
        consumer.subscribe([SENDS_TOPIC])
        return consumer

    def poll_once(self, timeout: float = 1.0) -> int:
        """Consumes up to `BATCH_MAX` records, stores them, publishes the results, commits. How many."""
        # What has arrived, at once; else wait for the first record only (a `consume` of a whole
        # batch waits its full timeout for the batch to fill: up to `timeout` of latency each).
        batch = self._consumer.consume(BATCH_MAX, 0) or self._consumer.consume(1, timeout)
        if len(batch) == 1:
            batch += self._consumer.consume(BATCH_MAX - 1, 0)
        messages = [m for m in batch if m.error() is None]
        if len(messages) < len(batch):
            self._consumer_error(next(m.error() for m in batch if m.error() is not None))
        if not messages:
            self._check_stall()
            return 0
        self._last_record = time.monotonic()
        records = []
        for m in messages:
            record = decode(m.value())
            if not isinstance(record, SendRecord):
                # Not a send this sequencer can take (chat changes go through REST and the relay
                # until the log's owner applies them): skipped, and said (a dead-letter topic takes
                # these next: docs/scale-out-plan.md, S15).
                why = record.reason if isinstance(record, Poison) else f"a {type(record).__name__}"
                log.error("record not taken at %s[%s]@%s: %s", m.topic(), m.partition(), m.offset(), why)
                continue
            records.append(record)
        try:
            self.publish(list(zip(records, self.store_all(records), strict=True)))
        except Exception:
            # Stored, not published: read the same records again (the store answers them with
            # the same seqs) rather than commit past answers nobody got.
            log.exception("publishing a batch failed; it is consumed again")
            first: dict[tuple[str, int], int] = {}
            for m in messages:
                where = (m.topic() or "", m.partition() or 0)
                first[where] = min(first.get(where, m.offset() or 0), m.offset() or 0)
            for (topic, partition), offset in first.items():
                self._consumer.seek(TopicPartition(topic, partition, offset))
            time.sleep(STORE_RETRY_S)
            return 0
        # Not waited for (a synchronous commit was a broker round trip per batch, ~70 ms of each
        # batch's time on a busy machine): a commit that fails (`_committed`) only means the
        # partitions' next owner replays these records, which the store answers with the same seqs.
        self._consumer.commit(asynchronous=True)
        return len(records)

    def _consumer_error(self, error: Any) -> None:
        """Kept and logged (at most every 10 s): a consumer that only sees errors takes no sends,
        and without this nothing said why."""
        self.last_error = str(error)
        now = time.monotonic()
        if now - self._error_logged >= 10:
            self._error_logged = now
            log.warning("sends consumer error: %s", error)

    def _check_stall(self) -> None:
        """A consumer that owns partitions with records past its position and has taken none for
        `STALL_S` is replaced by a new one (it leaves the group, the new one joins and reads on
        from the committed offsets: nothing is lost, a batch at most is stored again). Seen in CI:
        after a member died, the next owner held every partition and read nothing for minutes."""
        now = time.monotonic()
        if now - self._last_record < STALL_S:
            return
        self._last_record = now  # looked at again after another STALL_S
        owned = self._consumer.assignment()
        if not owned:
            return
        behind = []
        try:
            for tp in self._consumer.position(owned):
                low, high = self._consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
                if high > max(tp.offset, low):
                    behind.append(f"{tp.partition}@{tp.offset}<{high}")
        except KafkaException as e:
            log.warning("checking the sends consumer's progress failed: %s", e)
            return
        if not behind:
            return
        log.error(
            "sends consumer took nothing for %.0f s with records waiting (%s); joining again",
            STALL_S,
            ", ".join(behind),
        )
        self.rejoined += 1
        try:
            self._consumer.close()
        finally:
            self._consumer = self._join()

    def assignment(self) -> list[int]:
        """The sends partitions this node owns now."""
        return sorted(tp.partition for tp in self._consumer.assignment())

    def positions(self) -> dict[int, int]:
        """Where this node reads next in each partition it owns (negative: not known yet)."""
        return {tp.partition: tp.offset for tp in self._consumer.position(self._consumer.assignment())}

    def store_all(self, records: list[SendRecord]) -> list[SendResult]:
        """The store's answer to every record; what it did not take for want of a store is written
        again until it is taken (retries of one chat's sends keep their order: they are written
        together, after the ones already answered)."""
        results: list[SendResult | None] = [None] * len(records)
        pending = list(range(len(records)))
        told = False
        while pending:
            try:
                answers, _ = self.store.append_batch([records[i].send for i in pending], [])
            except Exception:
                log.exception("store batch failed; writing it again")
                answers = [Failed("unavailable", "store batch failed")] * len(pending)
            again = []
            for i, answer in zip(pending, answers, strict=True):
                if isinstance(answer, Failed) and answer.code == "unavailable":
                    again.append(i)
                else:
                    results[i] = answer
            if again and not told:
                # Their senders hear it now (`unavailable`: retry) rather than wait for the store;
                # a retry is a new record behind these, answered with whatever these became.
                told = True
                try:
                    self.publish(
                        [
                            (records[i], Failed("unavailable", "the store is unavailable; retry"))
                            for i in again
                        ]
                    )
                except Exception:
                    log.exception("telling senders the store is unavailable failed")
            if again:
                time.sleep(STORE_RETRY_S)
            pending = again
        return [r for r in results if isinstance(r, Stored | Failed)]

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll_once(0.2)

    def close(self) -> None:
        """Leaves the group (its partitions move at once instead of after the session timeout)."""
        self._consumer.close()
