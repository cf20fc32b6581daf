"""Does a client that stops reading hurt anyone else? A sender posts messages
at a steady rate into a group; a reader measures send->receive latency. Run
twice in the same process against the same server: without, then with stuck
members (clients that upgrade and never read again) in the group.

    .venv/bin/python benchmarks/slow_consumer.py [--messages 3000] [--rate 1000] [--stuck 5]

Writes benchmarks/results/slow_consumer-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import Code, record, server_code  # noqa: E402
from tests.conftest import Clients, ServerProcess  # noqa: E402
from tests.test_messaging import open_raw, send_frame  # noqa: E402
from tests.test_reliability import _stuck_socket, rss_mb  # noqa: E402


async def measure(
    srv: ServerProcess, clients: Clients, stuck: int, messages: int, rate: float
) -> dict[str, Any]:
    alice, bob = await clients.user("lat_a"), await clients.user("lat_b")
    stuck_users = [await clients.user("lat_s") for _ in range(stuck)]
    chat_id = (await alice.create_group("latency", [bob.user_id, *(u.user_id for u in stuck_users)]))[
        "chat_id"
    ]
    sender, reader = await open_raw(srv, alice), await open_raw(srv, bob)
    sockets = [await _stuck_socket(srv, u.token) for u in stuck_users]
    body = "y" * 4000
    latencies: list[float] = []

    async def receive() -> None:
        for _ in range(messages):
            msg = await reader.until("msg", timeout=60)
            latencies.append(time.perf_counter() - float(msg["content"].split("|")[0]))

    receiving = asyncio.create_task(receive())
    rss_before = rss_mb(srv)
    start = time.perf_counter()
    for i in range(messages):
        # Open loop: each message leaves at its scheduled time, whatever happened before.
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await sender.send(send_frame(chat_id, f"{time.perf_counter()}|{body}"))
    await receiving
    rss_after = rss_mb(srv)
    for _, w in sockets:
        w.close()
    await sender.close()
    await reader.close()
    latencies.sort()
    return {
        "stuck_members": stuck,
        "messages": messages,
        "rate_per_s": rate,
        "latency_ms": {
            "p50": round(statistics.median(latencies) * 1000, 2),
            "p99": round(latencies[int(0.99 * len(latencies))] * 1000, 2),
            "max": round(latencies[-1] * 1000, 2),
        },
        "server_rss_growth_mb": round(rss_after - rss_before, 1),
    }


async def run(args: argparse.Namespace) -> tuple[dict[str, Any], Code]:
    with tempfile.TemporaryDirectory() as d:
        env = {
            "PYCHAT_QUEUE_CAPACITY": "256",
            "PYCHAT_SEND_PER_S": "100000",
            "PYCHAT_SEND_BURST": "100000",
            # The stuck members of both runs register over REST from this one address.
            "PYCHAT_REGISTER_PER_MIN": "1000000",
        }
        srv = ServerProcess(Path(d), env=env)
        srv.start()
        assert srv.proc is not None
        measured = server_code(srv.proc.pid)
        clients = Clients(srv)
        try:
            baseline = await measure(srv, clients, 0, args.messages, args.rate)
            with_stuck = await measure(srv, clients, args.stuck, args.messages, args.rate)
        finally:
            await clients.close()
            srv.stop()
    return {
        "baseline": baseline,
        "with_stuck_members": with_stuck,
        "p99_ratio": round(with_stuck["latency_ms"]["p99"] / baseline["latency_ms"]["p99"], 2),
    }, measured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--stuck", type=int, default=5)
    out, measured = asyncio.run(run(ap.parse_args()))
    record("slow_consumer", out, measured)


if __name__ == "__main__":
    main()
