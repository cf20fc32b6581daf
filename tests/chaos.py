"""Crash chaos: clients send and read through the SDK while the server is killed
with SIGKILL at random moments and restarted. Afterwards the clients' own logs
are checked against the stored history.

    .venv/bin/python -m tests.chaos --kills 25             # the long run (`make chaos`)
    .venv/bin/python -m tests.chaos --kills 10 --nodes 3   # a cluster: a random node each time

In cluster mode the clients are spread over the nodes (each reconnects to its own node when it is
back), on a Cassandra, a Kafka and a Redis of the run's own.
Bounded runs are part of `make test` (tests/test_chaos.py, tests/test_nodes_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pychat.client import ChatClient, ChatError
from services.cluster import PychatCluster
from tests.conftest import PASSWORD, ServerProcess


class Target(Protocol):
    """What the chaos kills: one server, or a node of a cluster."""

    @property
    def urls(self) -> list[str]: ...

    async def kill_and_restart(self) -> None: ...


@dataclass
class OneServer:
    server: ServerProcess

    @property
    def urls(self) -> list[str]:
        return [self.server.url]

    async def kill_and_restart(self) -> None:
        self.server.kill()
        await asyncio.sleep(random.uniform(0, 0.2))
        self.server.start()


@dataclass
class AnyNode:
    cluster: PychatCluster

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.cluster.nodes]

    async def kill_and_restart(self) -> None:
        node = random.choice(self.cluster.nodes)
        node.kill()
        await asyncio.sleep(random.uniform(0, 0.2))
        await asyncio.to_thread(node.start)


@dataclass
class Reader:
    client: ChatClient
    seen: dict[str, set[int]] = field(default_factory=dict)
    synced: bool = False
    order_violations: list[str] = field(default_factory=list)
    msgs: int = 0

    async def run(self) -> None:
        async for event in self.client.events():
            kind = event["type"]
            if kind == "connected":
                self.synced = False
            elif kind == "synced":
                self.synced = True
            elif kind == "msg":
                self.msgs += 1
                chat, seq = event["chat_id"], event["seq"]
                seen = self.seen.setdefault(chat, set())
                # Once a connection's sync is answered, each chat continues with no gap.
                if self.synced and seen and seq != max(seen) + 1:
                    self.order_violations.append(f"{chat}: {seq} after {max(seen)}")
                seen.add(seq)


@dataclass
class ChaosReport:
    kills: int = 0
    sent: int = 0
    acked: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    ack_mismatches: int = 0
    gaps: int = 0
    reader_gaps: int = 0
    order_violations: int = 0
    # Sends answered `unavailable` (a store or a node busy or restarting) and sent again.
    unavailable_retried: int = 0
    delivered_to_readers: int = 0
    # The first refusals (other than `unavailable` and `rate_limited`), for a failed run's report.
    refusals: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def assert_clean(self, kills: int) -> None:
        """What a bounded run in the tests must show."""
        assert self.kills == kills
        assert self.acked == self.sent > 0, "everything sent was acked in the end"
        assert (self.lost, self.duplicated, self.ack_mismatches, self.gaps) == (0, 0, 0, 0)
        assert (self.reader_gaps, self.order_violations) == (0, 0)
        assert self.stored == self.sent

    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.ack_mismatches
            or self.gaps
            or self.reader_gaps
            or self.order_violations
        )


# Enough sends per connection for the chaos's pace.
CHAOS_ENV = {"PYCHAT_SEND_PER_S": "10000", "PYCHAT_SEND_BURST": "10000"}


async def run_chaos(
    data_dir: Path, kills: int, senders: int = 4, readers: int = 2, pause: tuple[float, float] = (0.3, 1.2)
) -> ChaosReport:
    """The chaos against one server (SQLite, in `data_dir`)."""
    server = ServerProcess(data_dir, env=CHAOS_ENV)
    server.start()
    try:
        return await chaos_against(OneServer(server), kills, senders, readers, pause)
    finally:
        server.stop()


async def chaos_against(
    target: Target, kills: int, senders: int = 4, readers: int = 2, pause: tuple[float, float] = (0.3, 1.2)
) -> ChaosReport:
    started = time.monotonic()
    report = ChaosReport()
    clients: list[ChatClient] = []
    urls = target.urls
    run = random.randrange(1 << 30)
    try:
        for i in range(senders + readers):
            url = urls[i % len(urls)]
            await ChatClient.register(url, f"chaos{run}x{i}", PASSWORD)
            clients.append(await ChatClient.login(url, f"chaos{run}x{i}", PASSWORD))
        send_clients, read_clients = clients[:senders], clients[senders:]
        group = (await clients[0].create_group("chaos", [c.user_id for c in clients[1:]]))["chat_id"]
        directs = [(await s.create_direct(read_clients[0].user_id))["chat_id"] for s in send_clients]
        for c in clients:
            await c.connect()
        reader_state = [Reader(c) for c in read_clients]
        reader_tasks = [asyncio.create_task(r.run()) for r in reader_state]
        for c in read_clients:
            await c.sync()

        sent: dict[str, str] = {}
        acked: dict[str, dict[str, Any]] = {}
        refused: list[str] = []
        stop = asyncio.Event()
        answered = asyncio.Event()  # every send acked or refused for good, once `stop` is set
        stop_retrying = asyncio.Event()

        async def sender(client: ChatClient, own_direct: str) -> None:
            i = 0
            while not stop.is_set():
                if len(client.unacked) >= 16:
                    await asyncio.sleep(0.005)
                    continue
                chat = random.choice([group, own_direct])
                cmid = f"{client.user_id}-{i}"
                i += 1
                sent[cmid] = chat
                send(client, chat, cmid)
                await asyncio.sleep(random.uniform(0, 0.004))

        def send(client: ChatClient, chat: str, cmid: str) -> None:
            fut = client.send_nowait(chat, f"chaos {cmid}", client_msg_id=cmid)

            def done(f: asyncio.Future[dict[str, Any]]) -> None:
                error = None if f.cancelled() else f.exception()
                if (
                    isinstance(error, ChatError)
                    and error.code == "unavailable"
                    and not stop_retrying.is_set()
                ):
                    # What a client does with `unavailable`: the same send again, when told.
                    report.unavailable_retried += 1
                    delay = (error.retry_after_ms or 1000) / 1000
                    asyncio.get_running_loop().call_later(delay, send, client, chat, cmid)
                elif f.cancelled() or error is not None:
                    refused.append(f"{cmid}: {error!r}")
                else:
                    acked[cmid] = f.result()
                if stop.is_set() and len(acked) + len(refused) >= len(sent):
                    answered.set()

            fut.add_done_callback(done)

        sender_tasks = [asyncio.create_task(sender(c, d)) for c, d in zip(send_clients, directs, strict=True)]
        for _ in range(kills):
            await asyncio.sleep(random.uniform(*pause))
            await target.kill_and_restart()
            report.kills += 1
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*sender_tasks)
        # Everything sent is acked in the end: the SDK re-sends across restarts.
        if len(acked) + len(refused) >= len(sent):
            answered.set()
        await asyncio.wait_for(answered.wait(), 120)
        stop_retrying.set()
        for c in read_clients:
            await c.sync()
        await asyncio.sleep(0.5)

        stored_by_cmid: dict[str, list[dict[str, Any]]] = {}
        last_seq: dict[str, int] = {}
        for chat_id in [group, *directs]:
            history = await read_clients[0].history_all(chat_id)
            seqs = [m["seq"] for m in history]
            report.gaps += sum(1 for a, b in zip([0, *seqs], seqs, strict=False) if b != a + 1)
            last_seq[chat_id] = seqs[-1] if seqs else 0
            for m in history:
                stored_by_cmid.setdefault(m["client_msg_id"], []).append(m)
        report.sent, report.acked = len(sent), len(acked)
        report.stored = sum(len(v) for k, v in stored_by_cmid.items() if k in sent)
        report.duplicated = sum(len(v) - 1 for v in stored_by_cmid.values() if len(v) > 1)
        for cmid, ack in acked.items():
            copies = stored_by_cmid.get(cmid, [])
            if not copies:
                report.lost += 1
            elif (copies[0]["message_id"], copies[0]["seq"]) != (ack["message_id"], ack["seq"]):
                report.ack_mismatches += 1
        report.lost += len([r for r in refused if "rate_limited" not in r])
        report.refusals = refused[:5]
        for r in reader_state:
            report.order_violations += len(r.order_violations)
            report.delivered_to_readers += r.msgs
            for chat_id, seen in r.seen.items():
                report.reader_gaps += len(set(range(1, last_seq.get(chat_id, 0) + 1)) - seen)
        for t in reader_tasks:
            t.cancel()
    finally:
        for c in clients:
            with contextlib.suppress(ChatError):
                await c.close()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _cluster_chaos(directory: Path, nodes: int, kills: int, senders: int) -> ChaosReport:
    from services.cassandra import CassandraServer
    from tests.nodekit import running_cluster

    cassandra = CassandraServer.on_free_ports(directory / "cassandra")
    cassandra.start()
    try:
        with running_cluster(directory, cassandra, nodes, env=CHAOS_ENV) as running:
            return asyncio.run(
                chaos_against(AnyNode(running.cluster), kills, senders=senders, pause=(1.0, 3.0))
            )
    finally:
        cassandra.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=25)
    ap.add_argument("--senders", type=int, default=6)
    ap.add_argument("--nodes", type=int, default=0, help="a cluster of this many nodes (0: one server)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if args.nodes:
            report = _cluster_chaos(Path(d), args.nodes, args.kills, args.senders)
        else:
            report = asyncio.run(run_chaos(Path(d), args.kills, senders=args.senders))
    print(json.dumps(report.__dict__, indent=2))
    print("chaos: OK" if report.ok() else "chaos: FAILED")
    raise SystemExit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
