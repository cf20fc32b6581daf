"""One writer per chat, from Kafka (pychat/cluster/sequencer.py), on a real Kafka and a real
Cassandra: sends keyed by chat are numbered in the order they were produced; a sequencer that
dies between the store and its offset commit is replayed by the next owner to the same seqs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pychat.bus.records import SendRecord
from pychat.cluster.sequencer import (
    SENDS_PARTITIONS,
    SENDS_TOPIC,
    SendLog,
    Sequencer,
    TopicMismatch,
    TopicSettings,
    ensure_sends_topic,
)
from pychat.gateway import Stored
from pychat.store import Chat, SendRequest, SendResult, Store, User, open_store
from services.cassandra import CassandraServer
from services.kafka import KafkaServer

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setting(
    kafka: KafkaServer, cassandra: CassandraServer, tmp_path: Path
) -> Iterator[tuple[str, str, Store]]:
    """A keyspace and a consumer group of the test's own (the sends topic is shared: each test's
    chats are its own)."""
    url = f"cassandra://{cassandra.host}:{cassandra.port}/seq_{uuid.uuid4().hex[:12]}"
    store = open_store(url, tmp_path)
    ensure_sends_topic(kafka.bootstrap_servers)
    yield url, f"group-{uuid.uuid4().hex[:8]}", store
    store.close()


def chats_of(store: Store, n: int) -> tuple[str, list[str]]:
    sender = f"u_{uuid.uuid4().hex[:8]}"
    store.create_user(User(sender, sender, None, "hash", 1))
    chats = [f"c_{uuid.uuid4().hex[:8]}" for _ in range(n)]
    for c in chats:
        store.create_chat(Chat(c, "group", "g", sender, 1, 0, [sender]), None)
    return sender, chats


def produce(kafka: KafkaServer, sender: str, chats: list[str], per_chat: int) -> list[SendRecord]:
    """Sends interleaved over the chats, `k<chat>-<n>` keys; returns them in production order."""
    records = [
        SendRecord("n1", i * len(chats) + j, SendRequest(sender, c, f"k{c}-{i:04d}", f"body {i}", []))
        for i in range(per_chat)
        for j, c in enumerate(chats)
    ]
    log = SendLog(kafka.bootstrap_servers)
    try:
        assert log.submit(records) == [None] * len(records), "every send is on the broker"
    finally:
        log.close()
    return records


def by_chat_in_order(store: Store, chats: list[str]) -> dict[str, list[tuple[int, str]]]:
    return {c: [(m["seq"], m["client_msg_id"]) for m in store.history(c, None, 0, 200)[0]] for c in chats}


def test_sends_are_numbered_per_chat_in_the_order_they_were_produced(
    kafka: KafkaServer, setting: tuple[str, str, Store]
) -> None:
    _, group, store = setting
    sender, chats = chats_of(store, 8)
    records = produce(kafka, sender, chats, 40)
    published: list[tuple[SendRecord, SendResult]] = []
    sequencer = Sequencer(store, kafka.bootstrap_servers, group, published.extend, node_id="n1")
    try:
        mine = {r.send.client_msg_id for r in records}
        deadline = time.monotonic() + 60
        while sum(1 for r, _ in published if r.send.client_msg_id in mine) < len(records):
            assert time.monotonic() < deadline, "every produced send is published"
            sequencer.poll_once(0.5)
    finally:
        sequencer.close()
    results = {r.send.client_msg_id: res for r, res in published if r.send.client_msg_id in mine}
    for c in chats:
        expected = [r.send.client_msg_id for r in records if r.send.chat_id == c]
        seqs = [results[k] for k in expected]
        assert all(isinstance(s, Stored) for s in seqs)
        assert [s.seq for s in seqs if isinstance(s, Stored)] == list(range(1, 41)), (
            "produced order is seq order"
        )
    stored = by_chat_in_order(store, chats)
    assert all(len(v) == 40 for v in stored.values())


def test_a_sequencer_that_dies_before_committing_is_replayed_to_the_same_seqs(
    kafka: KafkaServer, setting: tuple[str, str, Store]
) -> None:
    url, group, store = setting
    sender, chats = chats_of(store, 6)
    records = produce(kafka, sender, chats, 30)
    # The first owner stores its first batch, publishes it, and dies before committing its offsets.
    first = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/sequencer_process.py"),
            "--bootstrap",
            kafka.bootstrap_servers,
            "--group",
            group,
            "--store",
            url,
            "--die-after-store",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 9, first.stderr[-3000:]
    lines = [json.loads(x) for x in first.stdout.splitlines()]
    acked_before = {x["key"]: x["seq"] for x in lines if "seq" in x}
    assert acked_before, "the first owner stored some sends before it died"
    # The next owner gets the partitions once the dead member's session expires, and replays.
    published: list[tuple[SendRecord, SendResult]] = []
    sequencer = Sequencer(store, kafka.bootstrap_servers, group, published.extend, node_id="n2")
    try:
        mine = {r.send.client_msg_id for r in records}
        # The dead member's session (10 s) expires, then a rebalance; on a loaded CI machine a
        # Cassandra answering `unavailable` for a while makes the sequencer write the batch again
        # (seen once past 90 s): room enough, and what was published if it runs out.
        deadline = time.monotonic() + 240
        while len({r.send.client_msg_id for r, _ in published} & mine) < len(records):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the next owner published {len(published)} of {len(records)} sends"
                    f" ({sorted({type(res).__name__ for _, res in published})});"
                    f" assigned partitions {sequencer.assignment()}, positions {sequencer.positions()},"
                    f" last consumer error {sequencer.last_error}, rejoined {sequencer.rejoined}\n"
                    + "\n".join(x for x in kafka.log_tail(400).splitlines() if group in x or "ERROR" in x)[
                        -6000:
                    ]
                )
            sequencer.poll_once(0.5)
    finally:
        sequencer.close()
    replayed: dict[str, Any] = {r.send.client_msg_id: res for r, res in published}
    for key, seq in acked_before.items():
        again = replayed[key]
        assert isinstance(again, Stored) and again.seq == seq and again.duplicate, (key, seq, again)
    stored = by_chat_in_order(store, chats)
    for c in chats:
        expected = [r.send.client_msg_id for r in records if r.send.chat_id == c]
        assert stored[c] == [(i + 1, k) for i, k in enumerate(expected)], "each send once, in produced order"


def test_two_sequencers_share_the_partitions_and_each_chat_has_one_writer(
    kafka: KafkaServer, setting: tuple[str, str, Store]
) -> None:
    _, group, store = setting
    sender, chats = chats_of(store, 24)
    published: dict[str, list[tuple[SendRecord, SendResult]]] = defaultdict(list)
    stop = threading.Event()

    def publisher(node: str) -> Any:
        def publish(results: Sequence[tuple[SendRecord, SendResult]]) -> None:
            published[node].extend(results)

        return publish

    nodes = [Sequencer(store, kafka.bootstrap_servers, group, publisher(n), node_id=n) for n in ("a", "b")]
    owned: list[set[int]] = [set(), set()]

    def run(i: int) -> None:  # Sequencer.run, telling what it owns after each poll
        while not stop.is_set():
            nodes[i].poll_once(0.2)
            # Asked here: a consumer called from another thread while it polls can hang.
            owned[i] = set(nodes[i].assignment())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    try:
        # Both joined the group before the sends arrive: the partitions split between them.
        deadline = time.monotonic() + 60
        while not (
            all(owned) and not owned[0] & owned[1] and owned[0] | owned[1] == set(range(SENDS_PARTITIONS))
        ):
            assert time.monotonic() < deadline, f"the partitions are not split between the two: {owned}"
            time.sleep(0.1)
        records = produce(kafka, sender, chats, 20)
        mine = {r.send.client_msg_id for r in records}
        deadline = time.monotonic() + 90
        while len({r.send.client_msg_id for n in published for r, _ in published[n]} & mine) < len(records):
            assert time.monotonic() < deadline, "every send is published"
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for s in nodes:
            s.close()
    writers: dict[str, set[str]] = defaultdict(set)
    for node, results in published.items():
        for r, _ in results:
            if r.send.client_msg_id in mine:
                writers[r.send.chat_id].add(node)
    assert all(len(w) == 1 for w in writers.values()), writers
    assert set().union(*writers.values()) == {"a", "b"}, "the partitions are shared"
    stored = by_chat_in_order(store, chats)
    for c in chats:
        expected = [r.send.client_msg_id for r in records if r.send.chat_id == c]
        assert stored[c] == [(i + 1, k) for i, k in enumerate(expected)]


def test_a_consumer_that_stalls_with_records_waiting_is_replaced(
    kafka: KafkaServer, setting: tuple[str, str, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog (`Sequencer._check_stall`): a consumer that holds partitions with records past
    its position and takes none (here: paused) is closed and a new one joins; every send is
    stored once, in order."""
    from pychat.cluster import sequencer as sequencer_module

    monkeypatch.setattr(sequencer_module, "STALL_S", 2.0)
    _, group, store = setting
    sender, chats = chats_of(store, 3)
    published: list[tuple[SendRecord, SendResult]] = []
    sequencer = Sequencer(store, kafka.bootstrap_servers, group, published.extend, node_id="n1")
    try:
        deadline = time.monotonic() + 60
        while not sequencer.assignment():
            assert time.monotonic() < deadline, "the only member of the group gets the partitions"
            sequencer.poll_once(0.2)
        # Whatever older tests left on the shared topic is read first; then this consumer stops
        # taking records (as the stuck one in CI did) and this test's sends arrive.
        while sequencer.poll_once(0.5):
            pass
        sequencer._consumer.pause(sequencer._consumer.assignment())
        records = produce(kafka, sender, chats, 10)
        mine = {r.send.client_msg_id for r in records}
        deadline = time.monotonic() + 120
        while len({r.send.client_msg_id for r, _ in published} & mine) < len(records):
            assert time.monotonic() < deadline, ("every send is published", sequencer.rejoined)
            sequencer.poll_once(0.2)
    finally:
        sequencer.close()
    assert sequencer.rejoined == 1
    stored = by_chat_in_order(store, chats)
    for c in chats:
        assert [k for _, k in stored[c]] == [r.send.client_msg_id for r in records if r.send.chat_id == c]


def test_the_sends_topic_is_made_for_production_and_its_partition_count_never_changes(
    setting: tuple[str, str, Store], kafka: KafkaServer
) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    topic = admin.list_topics(SENDS_TOPIC, timeout=10).topics[SENDS_TOPIC]
    assert len(topic.partitions) == SENDS_PARTITIONS == 256
    resource = ConfigResource(ConfigResource.Type.TOPIC, SENDS_TOPIC)
    configs = admin.describe_configs([resource])[resource].result(10)
    got = {k: configs[k].value for k in ("retention.ms", "min.insync.replicas", "message.timestamp.type")}
    # One broker here: replication 1, so min.insync 1.
    assert got == {
        "retention.ms": "86400000",
        "min.insync.replicas": "1",
        "message.timestamp.type": "LogAppendTime",
    }
    # A node set up for another count is refused, not let in to number chats another way.
    with pytest.raises(TopicMismatch, match="kafka_partitions = 256"):
        ensure_sends_topic(kafka.bootstrap_servers, TopicSettings(partitions=12))
