"""The Kafka and the Redis that the project installs and runs by itself (services/kafka.py,
services/redis.py): real servers on free ports, real clients (confluent-kafka, redis-py), and a real
SIGKILL."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import confluent_kafka
import pytest
import redis
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # confluent_kafka.admin re-exports it without saying so

from services.kafka import KafkaServer
from services.redis import REDIS_VERSION, RedisServer
from tests.conftest import free_port, started

# The first run downloads Kafka (Maven) and installs Redis (apt) while setting up the first test.
pytestmark = pytest.mark.timeout(600)


# -- Redis ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port(), exit_with_parent=True)
    started(server)
    yield server
    server.stop()


def connect(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, decode_responses=True)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = connect(redis_server)
    yield client
    client.close()


def test_redis_answers_ping_with_its_version(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    assert redis_client.ping() is True
    assert redis_server.server_version() == REDIS_VERSION
    assert redis_server.status() == "running"


def test_redis_set_and_get(redis_client: redis.Redis) -> None:
    key = f"user:{uuid.uuid4().hex}:name"
    assert redis_client.get(key) is None
    assert redis_client.set(key, "ada") is True
    assert redis_client.get(key) == "ada"


def test_redis_key_with_ttl_expires(redis_client: redis.Redis) -> None:
    key = f"presence:{uuid.uuid4().hex}"
    redis_client.set(key, "online", px=300)
    assert 0 < redis_client.pttl(key) <= 300
    deadline = time.monotonic() + 5
    while redis_client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client.exists(key) == 0
    assert redis_client.get(key) is None


def aof_buffer_length(client: redis.Redis) -> int:
    return int(client.info("persistence")["aof_buffer_length"])


def test_redis_keeps_its_data_across_a_restart_and_a_sigkill(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port(), exit_with_parent=True)
    try:
        started(server)
        client = connect(server)
        client.mset({f"chat:{i}:title": f"chat {i}" for i in range(500)})
        client.rpush("chat:7:messages", *[f"message {i}" for i in range(100)])
        client.close()

        server.restart()  # SIGTERM: Redis fsyncs its append-only file before it exits
        client = connect(server)
        assert client.mget([f"chat:{i}:title" for i in range(500)]) == [f"chat {i}" for i in range(500)]
        assert client.lrange("chat:7:messages", 0, -1) == [f"message {i}" for i in range(100)]

        client.set("after-restart", "yes")
        # Once Redis has written its AOF buffer out, the writes are in the kernel: a SIGKILL loses none.
        deadline = time.monotonic() + 5
        while aof_buffer_length(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        server.kill()
        assert server.pid() is None
        started(server)
        client = connect(server)
        assert client.get("after-restart") == "yes"
        assert client.llen("chat:7:messages") == 100
        client.close()
    finally:
        server.stop()


# -- Kafka ----------------------------------------------------------------------------------------

RECORDS = 1_000
KEYS = [f"chat-{i}" for i in range(25)]


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    node = KafkaServer(
        tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port(), exit_with_parent=True
    )
    started(node)
    yield node
    node.stop()


def create_topic(node: KafkaServer, partitions: int = 4) -> str:
    topic = f"events-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": node.bootstrap_servers})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1)], operation_timeout=30
    )
    futures[topic].result(timeout=60)
    assert len(admin.list_topics(topic, timeout=30).topics[topic].partitions) == partitions
    return topic


def produce_keyed(node: KafkaServer, topic: str) -> None:
    """RECORDS records over KEYS, each value naming its key and its sequence number within that key;
    returns once every one is acknowledged (acks=all), and fails on any delivery error."""
    producer = Producer(
        {
            "bootstrap.servers": node.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    delivered: list[tuple[int, int]] = []
    errors: list[str] = []

    def report(err: confluent_kafka.KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            delivered.append((msg.partition() or 0, msg.offset() or 0))

    next_seq: defaultdict[str, int] = defaultdict(int)
    for i in range(RECORDS):
        key = KEYS[i % len(KEYS)]
        producer.produce(topic, key=key, value=f"{key}/{next_seq[key]}", on_delivery=report)
        next_seq[key] += 1
        producer.poll(0)
    assert producer.flush(60) == 0, "records still unacknowledged after 60 s"
    assert errors == []
    assert len(delivered) == RECORDS
    assert len(set(delivered)) == RECORDS  # no record written twice


def consume_all(node: KafkaServer, topic: str, group: str) -> list[tuple[str, int, int]]:
    """(key, sequence number, partition) of every record of `topic`, in the order a consumer of group
    `group` received them; commits the group's offsets at the end."""
    consumer = Consumer(
        {
            "bootstrap.servers": node.bootstrap_servers,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )
    consumer.subscribe([topic])
    records: list[tuple[str, int, int]] = []
    deadline = time.monotonic() + 90
    try:
        while len(records) < RECORDS and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=1.0):
                assert msg.error() is None, msg.error()
                key, _, seq = (msg.value() or b"").decode().partition("/")
                assert (msg.key() or b"").decode() == key
                records.append((key, int(seq), msg.partition() or 0))
        if records:
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return records


def assert_all_in_key_order(records: list[tuple[str, int, int]]) -> None:
    assert len(records) == RECORDS
    seqs: defaultdict[str, list[int]] = defaultdict(list)
    partitions: defaultdict[str, set[int]] = defaultdict(set)
    for key, seq, partition in records:
        seqs[key].append(seq)
        partitions[key].add(partition)
    assert sorted(seqs) == sorted(KEYS)
    for key, got in seqs.items():
        assert got == list(range(len(got))), f"{key} out of order"
    assert all(len(p) == 1 for p in partitions.values()), "a key spread over partitions"


def test_kafka_keyed_records_come_back_in_key_order(kafka: KafkaServer) -> None:
    assert kafka.status() == "running"
    topic = create_topic(kafka, partitions=4)
    produce_keyed(kafka, topic)
    records = consume_all(kafka, topic, group=f"readers-{uuid.uuid4().hex[:8]}")
    assert_all_in_key_order(records)
    assert len({partition for _, _, partition in records}) == 4


def test_kafka_records_and_offsets_survive_sigkill(kafka: KafkaServer) -> None:
    topic = create_topic(kafka, partitions=4)
    produce_keyed(kafka, topic)
    group = f"readers-{uuid.uuid4().hex[:8]}"
    assert_all_in_key_order(consume_all(kafka, topic, group))

    kafka.kill()  # no flush, no controlled shutdown: the next start recovers the logs
    assert kafka.pid() is None
    started(kafka)

    assert_all_in_key_order(consume_all(kafka, topic, group=f"after-kill-{uuid.uuid4().hex[:8]}"))
    # The first group's committed offsets (in __consumer_offsets) survived too.
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": group})
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in range(4)], timeout=60)
    finally:
        consumer.close()
    assert sum(tp.offset for tp in committed) == RECORDS
