"""pychat as many nodes (issue 13), measured on this machine: every node, Kafka, Redis and
Cassandra share its two cores.

- connections: 5 nodes hold `--connections` idle WebSocket connections between them (one load
  generator process per node: no process may hold more than 20,000 files), each node's RSS
  before and with its connections -> bytes per connection per node.
- fanout: one sender, a group of `--receivers` members spread over the nodes; deliveries/s and
  deliveries per CPU-second of the pychat processes (Kafka, Redis and Cassandra CPU apart), a
  3-node cluster against 1 node (plain `pychat serve` on the same Cassandra), same run.
- latency: groups of 10 (sender and receivers spread over the nodes), `--rate` msg/s open loop
  for `--seconds`; send -> deliver p50/p99, lost, duplicated, out of order; 3 nodes and 1 node.

    .venv/bin/python benchmarks/cluster_bench.py [--quick] [--only connections,fanout,latency]

Starts its own Cassandra, Kafka and Redis and stops them. Needs the load generator (`make
loadgen`). Writes benchmarks/results/cluster-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import Code, one, record, server_code, tree_code  # noqa: E402
from benchmarks.store_bench import own_node  # noqa: E402
from benchmarks.store_server import populate  # noqa: E402
from benchmarks.suite import SOURCE_IPS, UNLIMITED, proc_stats, run_loadgen  # noqa: E402
from pychat import _core  # noqa: E402
from services.cassandra import CassandraServer  # noqa: E402
from services.cluster import PychatCluster  # noqa: E402
from services.kafka import KafkaServer  # noqa: E402
from services.process import free_port  # noqa: E402
from services.redis import RedisServer  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

SERVERS: list[Code] = []
# Connections each load generator process opens at most (its files: 20,000 at most).
PER_LOADGEN = 18_500


class Infra:
    """Cassandra, Kafka and Redis of this run."""

    def __init__(self, cassandra: CassandraServer, kafka: KafkaServer, redis: RedisServer) -> None:
        self.cassandra, self.kafka, self.redis = cassandra, kafka, redis

    def cpu(self) -> float:
        return sum(proc_stats(pid)[0] for pid in self.pids())

    def pids(self) -> list[int]:
        return [p for p in (self.cassandra.pid(), self.kafka.pid(), self.redis.pid()) if p is not None]


@contextmanager
def infra(tmp: Path) -> Iterator[Infra]:
    with own_node(tmp / "cassandra") as cassandra:
        kafka = KafkaServer(
            tmp / "kafka", port=free_port(), controller_port=free_port(), exit_with_parent=True
        )
        kafka.start()
        redis = RedisServer(tmp / "redis", port=free_port(), exit_with_parent=True)
        redis.start()
        try:
            yield Infra(cassandra, kafka, redis)
        finally:
            redis.stop()
            kafka.stop()


class Service:
    """pychat under test: N cluster nodes, or one plain server (`nodes=0`), on a keyspace of its own."""

    def __init__(self, tmp: Path, infra: Infra, nodes: int, keyspace: str) -> None:
        self.store = f"cassandra://{infra.cassandra.host}:{infra.cassandra.port}/{keyspace}"
        env = {**UNLIMITED, "PYCHAT_QUEUE_CAPACITY": "65536"}
        self.cluster: PychatCluster | None = None
        self.single: ServerProcess | None = None
        if nodes:
            self.cluster = PychatCluster(
                tmp / keyspace,
                nodes=nodes,
                store=self.store,
                kafka=infra.kafka.bootstrap_servers,
                redis=infra.redis.url,
                env=env,
            )
            self.secret = self.cluster.secret.encode()
        else:
            self.secret = b"cluster-bench-single-node-secret-0123456789"
            (tmp / keyspace).mkdir()
            self.single = ServerProcess(
                tmp / keyspace,
                env={**env, "PYCHAT_STORE": self.store, "PYCHAT_SECRET_KEY": self.secret.decode()},
            )

    def start(self) -> None:
        if self.cluster is not None:
            self.cluster.start()
        else:
            assert self.single is not None
            self.single.start()
        for pid in self.pids():
            SERVERS.append(server_code(pid))

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        elif self.single is not None:
            self.single.stop()

    def pids(self) -> list[int]:
        if self.cluster is not None:
            return [n.proc.pid for n in self.cluster.nodes if n.proc is not None]
        assert self.single is not None and self.single.proc is not None
        return [self.single.proc.pid]

    def ws(self) -> list[str]:
        if self.cluster is not None:
            return [f"127.0.0.1:{n.ws_port}" for n in self.cluster.nodes]
        assert self.single is not None
        return [f"127.0.0.1:{self.single.ws_port}"]

    def cpu(self) -> float:
        return sum(proc_stats(pid)[0] for pid in self.pids())

    def token(self, user_id: str) -> str:
        return _core.sign_token(self.secret, user_id, int(time.time() * 1000) + 3_600_000)

    def plan(self, scenario: str, **kw: Any) -> dict[str, Any]:
        servers = self.ws()
        return {
            "scenario": scenario,
            "server": servers[0],
            "servers": servers,
            "source_ips": SOURCE_IPS,
            **kw,
        }


def connections(tmp: Path, infra: Infra, nodes: int, total: int, hold: float) -> dict[str, Any]:
    service = Service(tmp, infra, nodes, "connections")
    service.start()
    try:
        time.sleep(2.0)
        base = [proc_stats(pid)[1] for pid in service.pids()]
        per_node = total // nodes
        assert per_node <= PER_LOADGEN, "one load generator per node, under its file limit"
        ready = [threading.Event() for _ in range(nodes)]
        outs: list[dict[str, Any]] = [{} for _ in range(nodes)]

        def drive(k: int) -> None:
            tokens = [service.token(f"idle{k}x{i}") for i in range(per_node)]
            plan = service.plan("idle", tokens=tokens, seconds=hold)
            plan["servers"] = [service.ws()[k]]
            outs[k] = run_loadgen(plan, ready[k].set)

        threads = [threading.Thread(target=drive, args=(k,)) for k in range(nodes)]
        for t in threads:
            t.start()
        for e in ready:
            e.wait(600)
        time.sleep(3.0)
        held = [proc_stats(pid)[1] for pid in service.pids()]
        infra_rss = {
            name: proc_stats(pid)[1]
            for name, pid in zip(("cassandra", "kafka", "redis"), infra.pids(), strict=False)
        }
        for t in threads:
            t.join()
    finally:
        service.stop()
    connected = [o.get("connected", 0) for o in outs]
    return {
        "nodes": nodes,
        "connections": sum(connected),
        "per_node": [
            {
                "connected": c,
                "rss_mb": {"empty": round(b, 1), "connected": round(h, 1)},
                "bytes_per_connection": round((h - b) * 1024 * 1024 / max(c, 1)),
            }
            for c, b, h in zip(connected, base, held, strict=True)
        ],
        "infra_rss_mb": {k: round(v, 1) for k, v in infra_rss.items()},
        "loadgen": outs,
    }


def measured(
    tmp: Path, infra: Infra, nodes: int, keyspace: str, plan: Callable[[Service], dict[str, Any]]
) -> dict[str, Any]:
    """One load generator run against a fresh `Service`, with the CPU every process used in it."""
    service = Service(tmp, infra, nodes, keyspace)
    service.start()
    try:
        time.sleep(2.0)
        cpu0, infra0 = service.cpu(), infra.cpu()
        out = run_loadgen(plan(service))
        cpu, infra_cpu = service.cpu() - cpu0, infra.cpu() - infra0
    finally:
        service.stop()
    return {
        "nodes": max(nodes, 1),
        "clustered": nodes > 0,
        **out,
        "pychat_cpu_s": round(cpu, 2),
        "infra_cpu_s": round(infra_cpu, 2),
    }


def fanout(tmp: Path, infra: Infra, nodes: int, receivers: int, messages: int) -> dict[str, Any]:
    keyspace = f"fanout{nodes}"
    store = f"cassandra://{infra.cassandra.host}:{infra.cassandra.port}/{keyspace}"
    ids = populate(store, tmp, receivers + 1, {"fan": list(range(receivers + 1))}, {})
    out = measured(
        tmp,
        infra,
        nodes,
        keyspace,
        lambda service: service.plan(
            "fanout", tokens=[service.token(u) for u in ids], chat_id="fan", messages=messages, window=64
        ),
    )
    cpu, infra_cpu = out["pychat_cpu_s"], out["infra_cpu_s"]
    out["deliveries_per_cpu_s"] = round(out["deliveries"] / max(cpu, 0.01))
    out["deliveries_per_cpu_s_with_infra"] = round(out["deliveries"] / max(cpu + infra_cpu, 0.01))
    return out


def latency(
    tmp: Path, infra: Infra, nodes: int, groups: int, rate: float, seconds: float, run: str = ""
) -> dict[str, Any]:
    keyspace = f"latency{nodes}{run}"
    chats = {f"g{g:04d}": list(range(g * 10, g * 10 + 10)) for g in range(groups)}
    store = f"cassandra://{infra.cassandra.host}:{infra.cassandra.port}/{keyspace}"
    ids = populate(store, tmp, groups * 10, chats, {})

    def plan(service: Service) -> dict[str, Any]:
        # Member k of a group connects to node k % N: the sender and its receivers are spread.
        plan_groups = [
            {"chat_id": c, "members": [service.token(ids[m]) for m in members]}
            for c, members in chats.items()
        ]
        return service.plan("latency", groups=plan_groups, rate=rate, seconds=seconds, warmup_s=3.0)

    return measured(tmp, infra, nodes, keyspace, plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="connections,fanout,latency")
    ap.add_argument("--connections", type=int, default=90_000)
    ap.add_argument("--connection-nodes", type=int, default=5)
    ap.add_argument("--receivers", type=int, default=1_000)
    ap.add_argument("--messages", type=int, default=2_000)
    ap.add_argument("--groups", type=int, default=100)
    ap.add_argument("--rate", type=float, default=2_000.0)
    ap.add_argument("--low-rate", type=float, default=500.0, help="latency also at this rate (0: not)")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    if args.quick:
        args.connections, args.receivers, args.messages, args.seconds = 5_000, 200, 300, 3.0
    only = set(args.only.split(","))
    results: dict[str, Any] = {"params": vars(args)}
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        with infra(tmp) as services:
            results["infra"] = {"cassandra_heap_mb": services.cassandra.heap_mb}
            if "fanout" in only:
                results["fanout"] = {
                    "one_node": fanout(tmp, services, 0, args.receivers, args.messages),
                    "three_nodes": fanout(tmp, services, 3, args.receivers, args.messages),
                }
                one_, three = results["fanout"]["one_node"], results["fanout"]["three_nodes"]
                results["fanout"]["ratio_deliveries_per_s"] = round(
                    three["deliveries_per_s"] / one_["deliveries_per_s"], 3
                )
                results["fanout"]["ratio_deliveries_per_cpu_s"] = round(
                    three["deliveries_per_cpu_s"] / one_["deliveries_per_cpu_s"], 3
                )
            if "latency" in only:
                results["latency"] = {
                    "one_node": latency(tmp, services, 0, args.groups, args.rate, args.seconds),
                    "three_nodes": latency(tmp, services, 3, args.groups, args.rate, args.seconds),
                }
                if args.low_rate:
                    results["latency_low_rate"] = {
                        "one_node": latency(tmp, services, 0, args.groups, args.low_rate, args.seconds, "lo"),
                        "three_nodes": latency(
                            tmp, services, 3, args.groups, args.low_rate, args.seconds, "lo"
                        ),
                    }
            if "connections" in only:
                results["connections"] = connections(
                    tmp, services, args.connection_nodes, args.connections, 60.0
                )
    path = record("cluster", results, one(SERVERS) if SERVERS else tree_code(ROOT))
    print(json.dumps({k: v for k, v in results.items() if k != "params"}, indent=1, default=str)[:6000])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
